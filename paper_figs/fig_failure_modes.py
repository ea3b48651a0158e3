"""Fig 2-5 analogs (arXiv 2603.25562 §4): the three failure modes of sampled-token OPD, plus coverage.

    python paper_figs/fig_failure_modes.py <results_dir> [out_dir]

Reads every `diagnostics.json` under <results_dir> (written by the training job next to its metrics.json;
format below) and the job's metrics.json for labels. Reads files only; never imports `opd`. Writes:

- fig_failure_modes_scatter.png  (Fig 2) teacher vs student probability of sampled tokens at the first
  recorded step, y = x line, title with neg_reward_frac (fraction below the line).
- fig_failure_modes_loop.png     (Fig 3) the longest repetition loop found in any recorded rollout:
  teacher and student probability per loop token (token text on the x axis when recorded).
- fig_failure_modes_gap.png      (Fig 4) teacher − student log-prob gap by position bucket: median,
  25-75% box and 5-95% whiskers, first vs last recorded step.
- fig_failure_modes_special.png  (Fig 5) student vs teacher log-prob of each special token at its first
  occurrence in the response (mean over rows; points = rows).
- fig_failure_modes_coverage.png sampled token outside the teacher's top-K, by position bucket, per task.

diagnostics.json: {"records": [{"step": int, "task": str, **opd.failure_modes.failure_mode_record(...)}]}.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import PALETTE, fail, get, mapped_teacher, plt, read_rows, save, setup_style


def load_diagnostics(root: str | Path) -> list[dict[str, Any]]:
    """[{'dir', 'label', 'config', 'records'}] for every diagnostics.json under root."""
    jobs = []
    for path in sorted(Path(root).rglob("diagnostics.json")):
        payload = json.loads(path.read_text())
        summary = path.parent / "metrics.json"
        if not summary.exists():  # a job still running (or one that died): not a finished result
            continue
        config = json.loads(summary.read_text()).get("config", {})
        jobs.append({"dir": path.parent, "config": config, "records": payload.get("records", []),
                     "label": job_label(config, path.parent)})
    if not jobs:
        fail(f"results_dir: no diagnostics.json under {root}")
    return jobs


def job_label(config: dict[str, Any], directory: Path, *, seed: bool = True) -> str:
    loss = get(config, "loss.name")
    if loss is None:
        return directory.name
    mask = " +mask" if get(config, "loss.mask_special_tokens") else ""
    variant = " (mapped teacher)" if mapped_teacher(config) else ""
    s = get(config, "seed")
    return f"{loss}{mask}{variant}" + (f" s{s}" if seed and s is not None else "")


def first_seed_only(jobs) -> list[dict[str, Any]]:
    """One job per configuration (the lowest seed), for the per-job panels."""
    seen, out = set(), []
    for job in sorted(jobs, key=lambda j: (get(j["config"], "seed", 0) or 0)):
        key = job_label(job["config"], job["dir"], seed=False)
        if key not in seen:
            seen.add(key)
            out.append(job)
    return sorted(out, key=lambda j: j["label"])


def _tasks(jobs) -> list[str]:
    return sorted({r.get("task", "task") for j in jobs for r in j["records"]})


def _records(job, task) -> list[dict[str, Any]]:
    return sorted((r for r in job["records"] if r.get("task", "task") == task), key=lambda r: r["step"])


def _task_job_grid(jobs, panel_width: float, panel: Callable[[Any, dict[str, Any], str, list], None]):
    """A figure with one panel per (task row, job column): `panel(ax, job, task, records)` draws each one that
    has records of that task (sorted by step); the others are left blank."""
    tasks = _tasks(jobs)
    fig, axes = plt.subplots(len(tasks), len(jobs), figsize=(panel_width * len(jobs), 3.3 * len(tasks)),
                             squeeze=False, layout="constrained")
    for i, task in enumerate(tasks):
        for j, job in enumerate(jobs):
            ax = axes[i, j]
            recs = _records(job, task)
            if not recs:
                ax.set_axis_off()
                continue
            panel(ax, job, task, recs)
    return fig


def fig_scatter(jobs, out_dir) -> None:
    def panel(ax, job, task, recs):
        r = recs[0]
        sc = r["scatter"]
        ax.scatter(sc["student_prob"], sc["teacher_prob"], s=3, alpha=0.35, color=PALETTE[0], lw=0)
        ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.01)
        ax.set_title(f"{job['label']}\n{task}, step {r['step']}: neg-reward {r['neg_reward_frac']:.2f} "
                     f"(n={sc['n_total']})", fontsize=7)
        ax.set_xlabel("student prob π(y_t)")
        ax.set_ylabel("teacher prob q(y_t)")

    fig = _task_job_grid(jobs, 3.3, panel)
    fig.suptitle("Fig 2 analog: teacher vs student probability of sampled tokens (below y=x: negative reward)")
    save(fig, "fig_failure_modes_scatter", out_dir)


def fig_loop(jobs, out_dir) -> None:
    best = None
    for job in jobs:
        for r in job["records"]:
            for loop in r["loops"]["loops"]:
                if best is None or loop["length"] > best[2]["length"]:
                    best = (job, r, loop)
    fig, ax = plt.subplots(figsize=(10, 3.2))
    if best is None:
        ax.text(0.5, 0.5, "no repetition loop found in any recorded rollout", ha="center", va="center")
        ax.set_axis_off()
    else:
        job, r, loop = best
        n = min(loop["length"], 80)
        x = np.arange(n)
        ax.plot(x, loop["teacher_prob"][:n], "o-", ms=3, label="teacher q(y_t)", color=PALETTE[1])
        ax.plot(x, loop["student_prob"][:n], "s-", ms=3, label="student π(y_t)", color=PALETTE[0])
        if "text" in loop:
            ax.set_xticks(x)
            ax.set_xticklabels([repr(t)[1:-1] for t in loop["text"][:n]], rotation=90, fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("probability")
        means = r["loops"]
        ax.set_title(f"Fig 3 analog: longest loop ({job['label']}, {r.get('task')}, step {r['step']}, "
                     f"period {loop['period']}, {loop['length']} tokens); all loops at this step: teacher "
                     f"{means['teacher_prob_mean']:.2f} vs student {means['student_prob_mean']:.2f} mean prob",
                     fontsize=8)
        ax.legend(fontsize=8)
    save(fig, "fig_failure_modes_loop", out_dir)


def _box(ax, xs, qrows, width, color, label):
    first = True
    for x, q in zip(xs, qrows):
        if q[0] is None:
            continue
        q05, q25, q50, q75, q95 = q
        ax.add_patch(plt.Rectangle((x - width / 2, q25), width, q75 - q25, fc=color, alpha=0.35, ec=color,
                                   label=label if first else None))
        ax.plot([x, x], [q05, q25], color=color, lw=0.8)
        ax.plot([x, x], [q75, q95], color=color, lw=0.8)
        ax.plot([x - width / 2, x + width / 2], [q50, q50], color=color, lw=1.5)
        first = False


def fig_gap(jobs, out_dir) -> None:
    def panel(ax, job, task, recs):
        for k, (r, color, dx) in enumerate(((recs[0], PALETTE[0], -0.2), (recs[-1], PALETTE[1], 0.2))):
            if k == 1 and len(recs) == 1:
                break
            g = r["gap_by_bucket"]
            if g["quantile_levels"] != [0.05, 0.25, 0.5, 0.75, 0.95]:
                continue
            xs = np.arange(len(g["bucket_start"])) + dx
            _box(ax, xs, g["quantiles"], 0.35, color, f"step {r['step']}")
        g = recs[0]["gap_by_bucket"]
        ax.set_xticks(np.arange(len(g["bucket_start"])))
        ax.set_xticklabels([str(s) for s in g["bucket_start"]], rotation=90, fontsize=6)
        ax.axhline(0, color="k", lw=0.6)
        ax.autoscale_view()
        ax.set_title(f"{job['label']} · {task}", fontsize=8)
        ax.set_xlabel(f"position bucket start (size {g['bucket_size']})")
        ax.set_ylabel("log q − log π")
        ax.legend(fontsize=7)

    fig = _task_job_grid(jobs, 3.8, panel)
    fig.suptitle("Fig 4 analog: teacher − student log-prob gap of sampled tokens by position (box 25-75%, "
                 "whiskers 5-95%)")
    save(fig, "fig_failure_modes_gap", out_dir)


def fig_special(jobs, out_dir) -> None:
    """(a) first-occurrence log-probs of special tokens, student vs teacher, at each job's first record;
    (b) per job: the sampled-token reward at those positions that the special-token mask takes out of the
    loss, per rollout (mean over steps, `<task>/masked_reward_sum` rows; 0 when masking is off)."""
    entries = []  # (label, token name, student list, teacher list)
    for job in first_seed_only(jobs):
        for r in job["records"][:1]:
            for name, d in r["special_tokens"].items():
                if d["student_logprob"]:
                    entries.append((f"{job['label']}", name, d["student_logprob"], d["teacher_logprob"]))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(max(7, 1.1 * len(entries) + 3), 3.8),
                                 gridspec_kw={"width_ratios": [max(len(entries), 1), 2]})
    if not entries:
        ax.text(0.5, 0.5, "no special token in any recorded response", ha="center", va="center")
        ax.set_axis_off()
    for k, (_label, _name, s, t) in enumerate(entries):
        for off, vals, color, who in ((-0.18, s, PALETTE[0], "student"), (0.18, t, PALETTE[1], "teacher")):
            ax.bar(k + off, np.mean(vals), 0.34, color=color, alpha=0.6, label=who if k == 0 else None)
            ax.scatter(np.full(len(vals), k + off), vals, s=4, color=color)
            ax.annotate(f"{np.mean(vals):.1f}", (k + off, np.mean(vals)), fontsize=6, ha="center", va="top")
    ax.set_xticks(range(len(entries)))
    ax.set_xticklabels([f"{n} · {lab}" for lab, n, _, _ in entries], fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("log-prob at first occurrence")
    ax.axhline(0, color="k", lw=0.6)
    if entries:
        ax.legend(fontsize=8)
    ax.set_title("(a) special tokens at first occurrence (first recorded step; points = rollouts)", fontsize=8)
    per_config: dict[str, list[float]] = {}
    for job in jobs:
        vals = [v for row in read_rows(job["dir"]) for k_, v in row.items() if k_.endswith("/masked_reward_sum")]
        if vals:
            per_config.setdefault(job_label(job["config"], job["dir"], seed=False), []).append(float(np.mean(vals)))
    labels = sorted(per_config)
    removed = [float(np.mean(per_config[k])) for k in labels]
    bx.bar(range(len(removed)), removed, color=PALETTE[2], alpha=0.7)
    for i, k in enumerate(labels):
        bx.scatter(np.full(len(per_config[k]), i), per_config[k], s=8, color="k", zorder=3)
    bx.set_xticks(range(len(removed)))
    bx.set_xticklabels(labels, fontsize=6, rotation=30, ha="right")
    bx.set_ylabel("nats per rollout")
    bx.set_title("(b) reward the mask removes from the loss\n(mean over steps; points = seeds)", fontsize=8)
    fig.suptitle("Fig 5 analog: special-token mismatch (failure mode 3)", fontsize=9)
    save(fig, "fig_failure_modes_special", out_dir)


def fig_coverage(jobs, out_dir) -> None:
    tasks = _tasks(jobs)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[0, i]
        for j, job in enumerate(jobs):
            recs = [r for r in _records(job, task) if "coverage" in r]
            if not recs:
                continue
            for r, ls in ((recs[0], "--"), (recs[-1], "-")):
                c = r["coverage"]
                ax.plot(c["bucket_start"], [np.nan if f is None else f for f in c["frac"]], ls,
                        color=PALETTE[j % len(PALETTE)], label=f"{job['label']} step {r['step']}")
                if len(recs) == 1:
                    break
        ax.set_title(f"{task}", fontsize=9)
        ax.set_xlabel("position bucket start")
        ax.set_ylabel("not_in_topk_frac")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "no top-K coverage recorded\n(teacher reached through a token mapping)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=8)
    fig.suptitle("Coverage: sampled token outside the teacher's top-K, by position (dashed: first step)")
    save(fig, "fig_failure_modes_coverage", out_dir)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    setup_style()
    jobs = load_diagnostics(argv[0])
    out_dir = argv[1] if len(argv) > 1 else None
    one = first_seed_only(jobs)
    fig_scatter(one, out_dir)
    fig_loop(jobs, out_dir)
    fig_gap(one, out_dir)
    fig_special(jobs, out_dir)
    fig_coverage(one, out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
