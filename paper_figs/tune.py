"""The protocol's validation choice, made and recorded: the learning rate of each objective from a tuning sweep.

    python -m experiments.opd -m experiment=tune_regime hydra/launcher=joblib hydra.launcher.n_jobs=2
    python paper_figs/tune.py multirun/opd/<date>/<time> --name regime
    python paper_figs/tune.py results/tuning/baselines.jsonl.gz multirun/tune_vopd --name baselines   # add one
    python paper_figs/tune.py multirun/tune_k --name lsm_k --over loss.k   # LSM's K at its chosen rate

A tuning sweep runs every objective at several learning rates (`tuning=true`, evaluated on the validation
split), or, with `--over loss.k`, at several support sizes K (every other setting fixed, e.g. the rate chosen
before). For each objective (`loss.name`; its masked and top-p variants share the choice) this picks the
`optimizer.lr` (or K) with the highest final validation score -- the mean over seeds, items and samples, exactly the
quantity a table reports -- and writes

    conf/tuned/<name>.yaml       `tuned_lr: {objective: lr}`, what a table preset reads (defaults: tuned/<name>)
    results/tuning/<name>.json   every learning rate's mean and 95% interval per objective, and the choice
    results/tuning/<name>.jsonl.gz   the tuning jobs it read, packed (paper_figs/rows.py)

A K choice (`--over loss.k`) is recorded in results/tuning/<name>.json only: the configuration has no
`tuned_k`, so a cell at the chosen K names it (`loss.k=<K>`), citing that record.

The sources are tuning sweeps or packed rows, so objectives tuned in different sessions (one sweep each)
join one choice: pass the committed rows beside the new sweep.

Refused with one line (exit status 2, nothing written): a job evaluated on the test split (a choice made on
test), rows from different code revisions, an objective with fewer values than --min-values (the
protocol: 3), values of one objective run on different seeds, or jobs that differ in the other key (a K
sweep at several learning rates, or the reverse). Never imports `opd`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs import rows as packed_rows
from paper_figs.common import get
from paper_figs.stats import mean_ci
from paper_figs.tables import TableError, load, score_matrix

ROOT = Path(__file__).resolve().parents[1]
# what a tuning sweep may choose: the config key, and the field its rows carry in results/tuning/<name>.json
CHOOSABLE = {"optimizer.lr": "lr", "loss.k": "k"}


def choose(jobs: list[dict[str, Any]], failed: list[str], *, min_values: int, command: str,
           over: str = "optimizer.lr") -> dict[str, Any]:
    """{'choices': {objective: value}, 'objectives': {objective: [{'lr' (or 'k'), 'mean', 'per_task': {task:
    {'mean', 'ci_low', 'ci_high'}}, 'seeds', 'items'}, ...]}, ...} from tuning jobs (tables.load of sweeps or
    packed rows), choosing the config key `over` (CHOOSABLE); 'mean' is the macro mean over tasks, as the
    trainer's final/score."""
    on_test = [str(j["dir"]) for j in jobs if get(j["config"], "eval_split", "eval") == "eval"]
    if on_test:
        raise TableError(f"sweep_dir: {len(on_test)} jobs were evaluated on the test split (e.g. {on_test[0]}); "
                         "choices are made on validation (tuning=true eval_split=validation)")
    revisions = sorted({j["revision"] for j in jobs})
    if len(revisions) > 1:
        raise TableError(f"sweep_dir: rows from {len(revisions)} code revisions are mixed ({', '.join(revisions)}); "
                         "a choice is made on one revision")
    tasks = list(get(jobs[0]["config"], "tasks", {}) or {})
    field = CHOOSABLE[over]
    kind = "learning rates" if field == "lr" else f"values of {over}"
    groups: dict[str, dict[float, list[dict]]] = {}
    for j in jobs:
        if get(j["config"], over) is None:
            raise TableError(f"sweep_dir: job {j['dir']} has no {over} to choose ({get(j['config'], 'loss.name')})")
        groups.setdefault(str(get(j["config"], "loss.name")), {}).setdefault(
            float(get(j["config"], over)), []).append(j)
    choices, table = {}, {}
    for objective, by_value in sorted(groups.items()):
        if len(by_value) < min_values:
            raise TableError(f"sweep_dir: objective {objective!r} ran {len(by_value)} {kind} "
                             f"({sorted(by_value)}); the protocol chooses from >= {min_values} (--min-values)")
        for held in (key for key in CHOOSABLE if key != over):  # the other choosable keys stay fixed
            fixed = {get(j["config"], held) for members in by_value.values() for j in members}
            if len(fixed) > 1:
                raise TableError(f"sweep_dir: objective {objective!r} ran its {kind} at several {held} "
                                 f"({', '.join(sorted(map(str, fixed)))}); a choice of {over} holds {held} fixed")
        rows, seeds_of = [], {}
        for value, members in sorted(by_value.items()):
            # the macro mean over tasks, as the trainer's final/score: one [seeds, items] matrix per task
            mats = {task: score_matrix(members, "final", task) for task in tasks}
            seeds_of[value] = mats[tasks[0]][1]
            per_task = {task: dict(zip(("mean", "ci_low", "ci_high"), mean_ci(m[0]), strict=True))
                        for task, m in mats.items()}
            rows.append({field: int(value) if field == "k" else value,
                         "mean": sum(t["mean"] for t in per_task.values()) / len(per_task),
                         "per_task": per_task, "seeds": len(seeds_of[value]),
                         "items": int(mats[tasks[0]][0].shape[1])})
        if len({tuple(s) for s in seeds_of.values()}) > 1:
            raise TableError(f"sweep_dir: objective {objective!r} ran its {kind} on different seeds "
                             f"({seeds_of}); the choice compares them on the same seeds")
        best = max(rows, key=lambda r: (r["mean"], -r[field]))  # a tie goes to the smaller step or support
        choices[objective] = best[field]
        table[objective] = rows
    return {"command": command, "revision": revisions[0], "date": datetime.date.today().isoformat(),
            "split": "validation", "over": over, "tasks": tasks, "jobs": len(jobs), "failed_jobs": failed,
            "interval": "per task: 95% two-way bootstrap over seeds and items (2000 resamples)",
            "choices": choices, "objectives": table}


def tuned_yaml(result: dict[str, Any]) -> str:
    lines = ["# @package _global_",
             f"# Generated by `{result['command']}` at revision {result['revision']}, {result['date']}:",
             "# the learning rate of each objective chosen on the validation split (results/tuning/ has every",
             "# value's score). Do not edit by hand; rerun the command.",
             "tuned_lr:"]
    lines += [f"  {objective}: {lr!r}" for objective, lr in sorted(result["choices"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, nargs="+", help="tuning sweep directories or packed rows (*.jsonl.gz)")
    ap.add_argument("--name", required=True, help="the choice's name: conf/tuned/<name>.yaml")
    ap.add_argument("--min-values", type=int, default=3)
    ap.add_argument("--over", default="optimizer.lr",
                    help=f"the config key chosen: one of {', '.join(CHOOSABLE)} (default optimizer.lr)")
    ap.add_argument("--conf-out", type=Path, default=ROOT / "conf" / "tuned")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "tuning")
    args = ap.parse_args(argv)
    try:
        if args.over not in CHOOSABLE:
            raise TableError(f"over: expected one of {', '.join(CHOOSABLE)}, got {args.over!r}")
        if not args.name.isidentifier():
            raise TableError(f"name: expected a plain name (letters, digits, _), got {args.name!r}")
        missing = [str(s) for s in args.sweep_dir if not s.exists()]
        if missing:
            raise TableError(f"sweep_dir: expected a directory of Hydra jobs or a rows file, got {', '.join(missing)}")
        jobs, failed = load(args.sweep_dir)
        result = choose(jobs, failed, min_values=args.min_values, over=args.over,
                        command="python paper_figs/tune.py " + " ".join(argv))
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    field = CHOOSABLE[args.over]
    wrote = [args.out / f"{args.name}.json"]
    args.out.mkdir(parents=True, exist_ok=True)
    if field == "lr":  # the table presets read a learning rate choice (tuned_lr); a K choice is cited
        args.conf_out.mkdir(parents=True, exist_ok=True)
        (args.conf_out / f"{args.name}.yaml").write_text(tuned_yaml(result))
        wrote.insert(0, args.conf_out / f"{args.name}.yaml")
    packed_rows.write(args.out / f"{args.name}.jsonl.gz", jobs, ROOT)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    for objective, rows in result["objectives"].items():
        scores = ", ".join(f"{r[field]:g}: {100 * r['mean']:.1f}" for r in rows)
        print(f"{objective}: {field} {result['choices'][objective]:g} (validation score % by {field}: {scores})")
    print(f"wrote {', '.join(map(str, wrote))} and its rows")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
