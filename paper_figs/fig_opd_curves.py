"""Training curves and final accuracy of an OPD sweep (reads rows only; never imports opd).

    python paper_figs/fig_opd_curves.py multirun/opd/<date>_<time> [--out paper_figs]

Writes `opd_curves.png` (loss, held-out sampled and greedy pass@1, fraction of sampled tokens outside the
teacher's top-K, response length and gradient norm per step; one line per loss, "+ mask" when special tokens
are masked, = mean over seeds, band = ± sample std) and `opd_final_accuracy.png` (final sampled pass@1
per loss, mean ± std over seeds with the seeds as dots, and horizontal lines for the teacher and the
student before OPD).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import PALETTE, get, load_jobs, plt, save, setup_style

PANELS = [
    ("loss", "objective (loss)"),
    ("eval/accuracy", "held-out pass@1 (top-p 0.9)"),
    ("eval/greedy_accuracy", "held-out pass@1 (greedy)"),
    ("not_in_topk_frac", "sampled tokens outside teacher top-K"),
    ("response_len", "response length (tokens)"),
    ("grad_norm", "gradient norm (before clipping)"),
]


def label_of(job) -> str:
    """The loss, and "+ mask" when special tokens were masked (the two halves of a table sweep)."""
    mask = bool(get(job["config"], "loss.mask_special_tokens", False))
    return str(get(job["config"], "loss.name", "?")) + (" + mask" if mask else "")


def series(job, key: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    initial = key.replace("eval/", "initial/")
    if key.startswith("eval/") and initial in job["metrics"]:
        steps.append(0)
        values.append(job["metrics"][initial])
    for row in job["rows"]:
        if row.get(key) is not None:
            steps.append(row["step"])
            values.append(row[key])
    return np.asarray(steps), np.asarray(values, dtype=float)


def mean_band(runs: list[tuple[np.ndarray, np.ndarray]]):
    """Mean and sample std (0 for one run) over runs on the steps every run has."""
    common = sorted(set.intersection(*[set(s.tolist()) for s, _ in runs])) if runs else []
    if not common:
        return np.array([]), np.array([]), np.array([])
    mat = np.stack([[v[list(s).index(c)] for c in common] for s, v in runs])
    return np.asarray(common), mat.mean(0), mat.std(0, ddof=1) if len(mat) > 1 else np.zeros(mat.shape[1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="output folder (default: paper_figs/)")
    args = ap.parse_args(argv)
    setup_style()
    jobs = load_jobs(args.sweep_dir)
    by_loss: dict[str, list] = defaultdict(list)
    for job in jobs:
        by_loss[label_of(job)].append(job)
    order = sorted(by_loss, key=lambda n: (not n.startswith("sampled_token"), n))
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(order)}

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.0 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        for name in order:
            steps, mean, std = mean_band([series(j, key) for j in by_loss[name]])
            if steps.size == 0:
                continue
            n = len(by_loss[name])
            marker = "o" if key.startswith("eval") else None
            ax.plot(steps, mean, color=colors[name], label=f"{name} (n={n})", marker=marker, ms=3)
            ax.fill_between(steps, mean - std, mean + std, color=colors[name], alpha=0.2, lw=0)
        ax.set_title(title)
        ax.set_xlabel("OPD step")
    axes[0].legend()
    save(fig, "opd_curves", args.out)

    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(order), 3.4))
    for i, name in enumerate(order):
        finals = np.array([j["metrics"].get("final/accuracy", np.nan) for j in by_loss[name]], float)
        err = np.nanstd(finals, ddof=1) if finals.size > 1 else 0.0
        ax.bar(i, np.nanmean(finals), yerr=err, color=colors[name], alpha=0.85, capsize=4)
        ax.scatter(np.full(finals.shape, i) + np.linspace(-0.15, 0.15, finals.size), finals, color="k", s=10, zorder=3)
    for key, style, text in (("teacher/accuracy", "--", "teacher"), ("initial/accuracy", ":", "student before OPD")):
        vals = [j["metrics"][key] for j in jobs if j["metrics"].get(key) is not None]
        if vals:
            ax.axhline(float(np.mean(vals)), color="0.3", ls=style, lw=1.2, label=f"{text} ({np.mean(vals):.2f})")
    ax.set_xticks(range(len(order)), [n.replace(" + ", "\n+ ") for n in order])
    ax.set_ylabel("final held-out pass@1 (top-p 0.9)")
    shown = [j["metrics"].get(k) for j in jobs for k in ("final/accuracy", "initial/accuracy")]
    low = min([v for v in shown if v is not None], default=0.0)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)  # zoomed: differences of a few points must be visible
    ax.legend(loc="upper left", fontsize=8)
    save(fig, "opd_final_accuracy", args.out)


if __name__ == "__main__":
    main()
