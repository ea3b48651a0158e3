"""The paper's tables from a sweep's rows, with their protocol: a JSON table in results/tables/<name>.json
(what RESULTS.md is generated from, `python paper_figs/results_md.py`) and the same table as markdown.

    python paper_figs/tables.py <sweep_dir> --table table1            # Table 1: single task
    python paper_figs/tables.py <sweep_dir> --table table2            # Table 2: multi-task, a column per task
    python paper_figs/tables.py <sweep_dir> --table table3            # objective vs rollout top-p
    python paper_figs/tables.py <sweep_dir> --table baselines         # also ablation_renorm, ablation_k, ...
    python paper_figs/tables.py <sweep_dir> --table NAME --min-seeds 1 --min-items 16   # a smaller analysis

Reads every job under <sweep_dir> (metrics.json, eval_items.jsonl); never imports `opd`. A cell is the final
held-out sampled pass@1 of one method on one task: the mean over seeds, items and samples, with a 95%
two-way bootstrap interval over seeds and items (so evaluation noise is in it). Teacher and student rows come
from the same jobs' evaluations. The headline is LSM − sampled-token OPD, paired by seed and item, with its
interval and the relative gain as the paper computes its +19.8%.

Refused with one line (exit status 2, nothing written): fewer seeds per method or fewer items than the
protocol asks (--min-seeds, --min-items; defaults 5 and 1000), rows from different code revisions, methods
that do not share seeds and items. Jobs that failed (a job directory without metrics.json) are listed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import get
from paper_figs.stats import mean_ci, paired_diff

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "table1": "Table 1 analog: single-task OPD",
    "table2": "Table 2 analog: multi-task OPD, one teacher per task, tasks alternate per step",
    "table3": "Components: the objective vs the rollout top-p",
    "ablation_renorm": "Ablation: LSM with and without renormalization",
    "ablation_k": "Ablation: LSM's support size K (and the full vocabulary)",
    "ablation_top_p": "Ablation: rollout top-p for LSM and sampled-token OPD",
    "support_variants": "Support variants V1-V5",
    "baselines": "Baselines: every objective side by side, with its cost",
}
NAMES = {"sampled_token": "Sampled-token OPD", "lsm": "LSM (teacher top-K)"}
HEADLINE = ("lsm", "sampled_token")  # A − B, both without mask at the paper's top-p


class TableError(ValueError):
    """A sweep the protocol cannot summarize; the message is one line."""


# ---------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------


def method_key(config: dict[str, Any], *, with_k: bool = False) -> str:
    """loss name, + ' K=k' when the sweep varies K, + ' + mask', + ' @ top-p P' when the rollout top-p was set
    explicitly."""
    key = str(get(config, "loss.name", "?"))
    if with_k:
        key += f" K={get(config, 'loss.k')}"
    if get(config, "loss.mask_special_tokens", False):
        key += " + mask"
    top_p = get(config, "rollout.top_p")
    if top_p is not None:
        key += f" @ top-p {float(top_p):g}"
    return key


def label(key: str) -> str:
    base, _, rest = key.partition(" ")
    return NAMES.get(base, base) + (" " + rest if rest else "")


def load(sweep: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(finished jobs, failed job directories). A job directory is one Hydra made (it holds .hydra/)."""
    jobs, failed = [], []
    for hydra_dir in sorted(sweep.rglob(".hydra")):
        job = hydra_dir.parent
        summary, items = job / "metrics.json", job / "eval_items.jsonl"
        if not summary.exists() or not items.exists():
            failed.append(str(job.relative_to(sweep)))
            continue
        payload = json.loads(summary.read_text())
        jobs.append({"dir": job, "config": payload["config"], "metrics": payload["metrics"],
                     "revision": payload.get("git_revision", "unknown"),
                     "items": [json.loads(x) for x in items.read_text().splitlines() if x.strip()]})
    if not jobs:
        raise TableError(f"sweep_dir: no finished jobs (metrics.json + eval_items.jsonl) under {sweep}")
    return jobs, failed


def score_matrix(jobs: list[dict], phase: str, task: str) -> tuple[np.ndarray, list[int], int]:
    """[seeds, items] per-item sampled scores (mean over samples) of `phase` on `task`, rows sorted by seed;
    also the seeds and the number of samples per item."""
    by_seed: dict[int, dict[int, list[float]]] = {}
    for j in jobs:
        seed = int(get(j["config"], "seed", 0))
        cell = by_seed.setdefault(seed, {})
        for row in j["items"]:
            if row["phase"] == phase and row["task"] == task and row["sample"] >= 0:
                cell.setdefault(int(row["item"]), []).append(float(row["correct"]))
    seeds = sorted(s for s, c in by_seed.items() if c)
    if not seeds:
        return np.zeros((0, 0)), [], 0
    items = sorted(by_seed[seeds[0]])
    for s in seeds:
        if sorted(by_seed[s]) != items:
            raise TableError(f"eval_items: seed {s} of phase {phase!r} on task {task!r} has other items than seed "
                             f"{seeds[0]}; every job must be evaluated on the same items")
    samples = len(by_seed[seeds[0]][items[0]])
    return np.asarray([[np.mean(by_seed[s][i]) for i in items] for s in seeds]), seeds, samples


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


def build(name: str, sweep: Path, *, min_seeds: int, min_items: int, command: str) -> dict[str, Any]:
    jobs, failed = load(sweep)
    tuning = [str(j["dir"].relative_to(sweep)) for j in jobs if get(j["config"], "eval_split", "eval") != "eval"]
    if tuning:
        raise TableError(f"sweep_dir: {len(tuning)} jobs were evaluated on the validation split (tuning runs, e.g. "
                         f"{tuning[0]}); a reported table reads the test split (eval_split=eval)")
    revisions = sorted({j["revision"] for j in jobs})
    if len(revisions) > 1:
        raise TableError(f"sweep_dir: rows from {len(revisions)} code revisions are mixed ({', '.join(revisions)}); "
                         "a table summarizes one revision")
    tasks = list(get(jobs[0]["config"], "tasks", {}) or {})
    groups: dict[str, list[dict]] = {}
    with_k = len({get(j["config"], "loss.k") for j in jobs}) > 1
    for j in jobs:
        groups.setdefault(method_key(j["config"], with_k=with_k), []).append(j)
    rows: list[dict[str, Any]] = []
    matrices: dict[tuple[str, str], tuple[np.ndarray, list[int]]] = {}
    for task in tasks:
        for phase, who in (("teacher", "Teacher"), ("initial", "Student before OPD")):
            # the same checkpoints in every job: one job's evaluation is the row (interval over items only)
            x, _, samples = score_matrix(jobs[:1], phase, task)
            if x.size:
                rows.append(_row(who, task, x, samples))
        for key, members in sorted(groups.items()):
            x, seeds, samples = score_matrix(members, "final", task)
            if len(seeds) < min_seeds or x.shape[1] < min_items:
                raise TableError(f"sweep_dir: method {key!r} on task {task!r} has {len(seeds)} seeds x {x.shape[1]} "
                                 f"items; the protocol asks for >= {min_seeds} seeds and >= {min_items} items "
                                 "(--min-seeds, --min-items)")
            matrices[(key, task)] = (x, seeds)
            rows.append({**_row(label(key), task, x, samples, key=key), **_cost(members)})
    headline = []
    for task in tasks:
        a, b = matrices.get((HEADLINE[0], task)), matrices.get((HEADLINE[1], task))
        if a is None or b is None:
            continue
        if a[1] != b[1]:
            raise TableError(f"sweep_dir: {HEADLINE[0]} and {HEADLINE[1]} ran different seeds ({a[1]} vs {b[1]}) on "
                             f"task {task!r}; the paired difference needs the same seeds")
        headline.append({"task": task, "a": label(HEADLINE[0]), "b": label(HEADLINE[1]), **paired_diff(a[0], b[0])})
    return {"name": name, "title": TABLES[name], "command": command, "revision": revisions[0],
            "date": datetime.date.today().isoformat(), "jobs": len(jobs), "failed_jobs": failed,
            "interval": "95% two-way bootstrap over seeds and items (2000 resamples)",
            "rows": rows, "headline": headline}


def _cost(members: list[dict]) -> dict[str, float | None]:
    """Seconds per training step (sample + score + update, mean over the method's jobs, compile excluded) and
    the update's peak memory per device (bytes, the largest over the method's jobs)."""
    stages = ("mean_time/sample_s", "mean_time/score_s", "mean_time/update_s")
    steps = [sum(j["metrics"][s] for s in stages) for j in members if all(s in j["metrics"] for s in stages)]
    peaks = [j["metrics"]["update_peak_bytes"] for j in members if "update_peak_bytes" in j["metrics"]]
    return {"step_s": float(np.mean(steps)) if steps else None,
            "peak_mem_bytes": int(max(peaks)) if peaks else None}


def _row(method: str, task: str, x: np.ndarray, samples: int, key: str | None = None) -> dict[str, Any]:
    mean, low, high = mean_ci(x)
    return {"method": method, "key": key, "task": task, "mean": mean, "ci_low": low, "ci_high": high,
            "seeds": int(x.shape[0]), "items": int(x.shape[1]), "samples": samples}


def markdown(table: dict[str, Any]) -> str:
    """The table as markdown (percent), its protocol and the headline, as RESULTS.md shows it."""
    lines = [f"### {table['title']}", "",
             f"`{table['command']}` at revision `{table['revision']}`, {table['date']}; {table['jobs']} jobs. "
             f"Cells: final held-out sampled pass@1 (%), mean [{table['interval']}].", "",
             "| Method | Task | Score | 95% interval | Seeds | Items × samples | s / step | update peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        cost = "–" if r.get("step_s") is None else f"{r['step_s']:.2f}"
        peak = "–" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['method']} | {r['task']} | {100 * r['mean']:.1f} | [{100 * r['ci_low']:.1f}, "
                     f"{100 * r['ci_high']:.1f}] | {r['seeds']} | {r['items']} × {r['samples']} | {cost} | {peak} |")
    for h in table["headline"]:
        gain = "n/a" if h["relative_gain"] is None else f"{h['relative_gain']:+.1%}"
        lines += ["", f"**{h['a']} − {h['b']}** on {h['task']}, paired by seed and item: "
                      f"{100 * h['paired_diff']:+.1f} points [{100 * h['paired_ci_low']:+.1f}, "
                      f"{100 * h['paired_ci_high']:+.1f}]; relative gain {gain} (the paper: +19.8% on its Table 2)."]
    if table["failed_jobs"]:
        lines += ["", "Failed jobs (no results): " + ", ".join(f"`{f}`" for f in table["failed_jobs"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--table", required=True, choices=sorted(TABLES))
    ap.add_argument("--min-seeds", type=int, default=5)
    ap.add_argument("--min-items", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "tables", help="directory of <table>.json")
    args = ap.parse_args(argv)
    command = "python paper_figs/tables.py " + " ".join(argv)
    try:
        if not args.sweep_dir.is_dir():
            raise TableError(f"sweep_dir: expected a directory of Hydra jobs, got {args.sweep_dir}")
        table = build(args.table, args.sweep_dir, min_seeds=args.min_seeds, min_items=args.min_items,
                      command=command)
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.table}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(markdown(table))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
