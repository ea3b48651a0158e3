"""Training curves and final scores of an OPD sweep (reads rows only; never imports opd).

    python paper_figs/fig_opd_curves.py multirun/opd/<date>_<time> [--out paper_figs]
    python paper_figs/fig_opd_curves.py results/rows/table1.jsonl.gz --name table1   # from committed rows

Writes `<name>_curves.png` (--name, default `opd`): one block of panels per task, five to a row, the legend in
the last slot (a multi-task run alternates tasks, so each task's curves are drawn against its own step count);
panels = held-out sampled score, the score of the step's own rollouts (the paper's Fig. 6 score: seen every
step, where held-out is not), objective, entropy, gradient norm, response length, truncated fraction, teacher −
student log-prob gap on sampled tokens, and the fraction of sampled tokens outside the teacher's top-K. One line
per method (as the tables name methods: paper_figs/tables.py method_keys); line = mean over seeds, band = 95%
interval of that mean (t over seeds). And `<name>_final_accuracy.png`: the final sampled score per method and
task, the seeds as dots, the teacher and the student before OPD as lines.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import PALETTE, load_jobs, plt, save, setup_style
from paper_figs.tables import method_keys

PANELS = [
    ("eval", "held-out score (top-p 0.9)"),
    ("train_score", "rollout score (training prompts)"),
    ("loss", "objective"),
    ("entropy", "student entropy (nats)"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("response_len", "response length (tokens)"),
    ("truncated_frac", "truncated fraction"),
    ("logprob_gap", "log q(y) − log π(y), sampled"),
    ("not_in_topk_frac", "sampled outside teacher top-K"),
]
COLS = 5  # panels per row
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # t_{0.975, n-1}


def eval_key(job, task: str) -> str | None:
    """The task's held-out sampled score key (`eval/<task>/<metric>`) as the rows name it."""
    for row in job["rows"]:
        for k in row:
            if k.startswith(f"eval/{task}/") and "/greedy_" not in k:
                return k
    return None


def series(job, task: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(task step, value) of `key` on the rows of `task`; the eval panel starts at the initial score."""
    steps, values = [], []
    if key == "eval":
        key = eval_key(job, task) or "eval/?"
        initial = "initial/" + key[len("eval/"):]
        if initial in job["metrics"]:
            steps.append(0)
            values.append(job["metrics"][initial])
    done = 0  # steps of `task` so far: an evaluation may sit on another task's row
    for row in job["rows"]:
        done += row.get("task") == task
        if (key.startswith("eval/") or row.get("task") == task) and row.get(key) is not None:
            steps.append(done)
            values.append(row[key])
    return np.asarray(steps), np.asarray(values, dtype=float)


def mean_band(runs: list[tuple[np.ndarray, np.ndarray]]):
    """Mean and the 95% t half-width of the mean (0 for one run) over runs, on the steps every run has."""
    common = sorted(set.intersection(*[set(s.tolist()) for s, _ in runs])) if runs else []
    if not common:
        return np.array([]), np.array([]), np.array([])
    mat = np.stack([[v[list(s).index(c)] for c in common] for s, v in runs])
    n = len(mat)
    half = T95.get(n - 1, 1.96) * mat.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(mat.shape[1])
    return np.asarray(common), mat.mean(0), half


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="output folder (default: paper_figs/)")
    ap.add_argument("--name", default="opd", help="file name prefix")
    args = ap.parse_args(argv)
    setup_style()
    jobs = load_jobs(args.sweep_dir)
    by_loss: dict[str, list] = defaultdict(list)
    for job, key in zip(jobs, method_keys(jobs), strict=True):
        by_loss[key].append(job)
    order = sorted(by_loss, key=lambda n: (not n.startswith("sampled_token"), n))
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(order)}

    tasks = sorted({r["task"] for j in jobs for r in j["rows"] if "task" in r})
    # per task a block of COLS-wide rows of panels; the block's last free slot holds the legend, so that many
    # methods (the baselines block has eight) never cover a curve
    rows = -(-(len(PANELS) + 1) // COLS)
    fig, axes = plt.subplots(rows * len(tasks), COLS, figsize=(3.6 * COLS, 3.0 * rows * len(tasks)), squeeze=False,
                             layout="constrained")
    for t, task in enumerate(tasks):
        block = axes[t * rows:(t + 1) * rows].ravel()
        for ax, (key, title) in zip(block, PANELS):
            for name in order:
                steps, mean, half = mean_band([series(j, task, key) for j in by_loss[name]])
                if steps.size == 0:
                    continue
                ax.plot(steps, mean, color=colors[name], label=f"{name} (n={len(by_loss[name])})",
                        marker="o" if key == "eval" else None, ms=3)
                ax.fill_between(steps, mean - half, mean + half, color=colors[name], alpha=0.2, lw=0)
            ax.set_title(f"{task}: {title}" if len(tasks) > 1 else title, fontsize=9)
            ax.set_xlabel(f"{task} step" if len(tasks) > 1 else "OPD step")
        for ax in block[len(PANELS):]:
            ax.axis("off")
        handles, labels = block[0].get_legend_handles_labels()
        block[len(PANELS)].legend(handles, labels, loc="center", fontsize=8, frameon=False,
                                  title="method (seeds); band: 95% over seeds", title_fontsize=8)
    save(fig, f"{args.name}_curves", args.out)

    fig, axes = plt.subplots(1, len(tasks), figsize=((1.6 + 1.3 * len(order)) * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        final_plot(ax, task, order, by_loss, jobs, colors)
    save(fig, f"{args.name}_final_accuracy", args.out)


def final_plot(ax, task: str, order: list[str], by_loss: dict, jobs: list, colors: dict) -> None:
    key = eval_key(jobs[0], task)
    metric = key.split("/")[-1] if key else "score"
    for i, name in enumerate(order):
        finals = np.array([j["metrics"].get(f"final/{task}/{metric}", np.nan) for j in by_loss[name]], float)
        err = np.nanstd(finals, ddof=1) if finals.size > 1 else 0.0
        ax.bar(i, np.nanmean(finals), yerr=err, color=colors[name], alpha=0.85, capsize=4)
        ax.scatter(np.full(finals.shape, i) + np.linspace(-0.15, 0.15, finals.size), finals, color="k", s=10, zorder=3)
    for who, style, text in (("teacher", "--", "teacher"), ("initial", ":", "student before OPD")):
        vals = [j["metrics"][f"{who}/{task}/{metric}"] for j in jobs if f"{who}/{task}/{metric}" in j["metrics"]]
        if vals:
            ax.axhline(float(np.mean(vals)), color="0.3", ls=style, lw=1.2, label=f"{text} ({np.mean(vals):.2f})")
    ax.set_xticks(range(len(order)), [n.replace(" + ", "\n+ ").replace(" @ ", "\n@ ") for n in order],
                  rotation=20, ha="right")  # long objective names side by side
    ax.set_ylabel(f"final held-out {metric} (top-p 0.9)")
    ax.set_title(task)
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="upper left", fontsize=8)


if __name__ == "__main__":
    main()
