"""The paper's tables from a sweep's rows, with their protocol: a JSON table in results/tables/<name>.json
(what RESULTS.md is generated from, `python paper_figs/results_md.py`), the same table as markdown, and the
rows it was built from, packed in results/rows/<name>.jsonl.gz (paper_figs/rows.py) so it regenerates from
the repository.

    python paper_figs/tables.py <sweep_dir> --table table1            # Table 1: single task
    python paper_figs/tables.py <sweep_dir> --table table2            # Table 2: multi-task, a column per task
    python paper_figs/tables.py <table1 sweep> <sweep_dir> --table table3   # objective vs rollout top-p
    python paper_figs/tables.py <table1 sweep> <sweep_dir> --table ablation_renorm   # LSM without renormalization
    python paper_figs/tables.py <table1 sweep> <sweep_dir> --table baselines   # every objective, with its cost
    python paper_figs/tables.py <baselines rows> <K sweeps ...> --table ablation_k   # K=4 and full RKL reused
    python paper_figs/tables.py <table3 rows> <sweep_dir> --table ablation_top_p   # top-p 1 and 0.9 reused
    python paper_figs/tables.py <table1 rows> <sweep_dir> --table support_variants   # V1 = table1's LSM
    python paper_figs/tables.py <confirmation sweeps ...> --table confirm_k   # as preregistered, or refused
    python paper_figs/tables.py --table table1                        # again, from the committed rows
    python paper_figs/tables.py <sweep_dir> --table NAME --min-seeds 1 --min-items 16   # a smaller analysis

Reads every job under each <sweep_dir> (metrics.json, eval_items.jsonl, metrics.jsonl), or, with no sweep
directory, results/rows/<name>.jsonl.gz; never imports `opd`. A method is the objective, + mask when special
tokens are masked, + K when the jobs vary K, + the rollout top-p (the explicit `rollout.top_p`, else the
objective's `loss.rollout_top_p`) when one objective ran at several. table3 compares the unmasked objectives
(a table1 sweep's masked jobs are left out) and pairs LSM with sampled-token OPD at each rollout top-p;
ablation_renorm reads table1's unmasked LSM beside LSM without renormalization and pairs the two; baselines
reads table1's unmasked objectives beside the other objectives' cells; ablation_k reads LSM and full reverse KL
(the full vocabulary as support) from the baselines rows beside LSM at the other K, pairs each K with the
regime's K = 4, and gives each K's coverage: the teacher's top-K mass on the student's rollouts and the
fraction of sampled tokens outside the teacher's top-K (means over steps and seeds); when LSM's K was chosen on
validation (results/tuning/lsm_k.json, `paper_figs/tune.py --over loss.k`) it also pairs that K with table1's
sampled-token OPD, the one LSM-vs-sampled-token claim the block makes; ablation_top_p reads
table3's four unmasked cells (both objectives at top-p 1 and 0.9) beside the other top-p, pairs LSM with
sampled-token OPD at each top-p and each objective with itself at its paper top-p; support_variants reads
table1's unmasked LSM (V1) beside V2-V5 and pairs each with it; confirm_k reads only jobs that match its
preregistration record (results/preregistered/confirm_k.json: objectives, settings, every seed, revision) and
says whether the recorded prediction held.

A cell is the final held-out sampled pass@1 of one method on one task: the mean over seeds, items and samples,
with a 95% two-way bootstrap interval over seeds and items (so evaluation noise is in it). Teacher and student
rows come from the same jobs' evaluations. The headline is LSM − sampled-token OPD, paired by seed and item,
with its interval and the relative gain as the paper computes its +19.8%.

Refused with one line (exit status 2, nothing written): fewer seeds per method or fewer items than the
protocol asks (--min-seeds, --min-items; defaults 5 and 1000), rows from different code revisions, methods
that do not share seeds and items, a job whose rows record rollouts at another top-p than its config names.
Jobs that failed (a job directory without metrics.json) are listed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs import rows as packed_rows
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
    "confirm_k": "Preregistered: LSM at the validation-chosen K against sampled-token OPD, on new seeds",
}
NAMES = {"sampled_token": "Sampled-token OPD", "lsm": "LSM (teacher top-K)",
         "lsm_no_renorm": "LSM without renormalization", "constant_negative": "Constant negative advantage (control)",
         "vopd": "vOPD", "vopd_topk": "vOPD, top-K baseline", "full_rkl": "Full reverse KL",
         "topk_tail": "Top-K + tail", "stop_grad_topk": "Stop-gradient top-K",
         "support_v2": "V2: student top-K ∪ {y}", "support_v3": "V3: teacher top-K ∪ {y}",
         "support_v4": "V4: EMA-PG head (student top-K) + tail", "support_v5": "V5: EMA-PG head (teacher top-K) + tail"}
# Objectives whose loss never reads loss.k (their support is the sampled token or the whole vocabulary): a K in
# their config is only the diagnostics' K, so it never names their method or their coverage.
SUPPORT_FREE = {"sampled_token", "full_rkl", "vopd", "power_opd", "constant_negative"}
COVERAGE_TABLES = {"ablation_k"}  # tables with the coverage columns (teacher top-K mass, not_in_topk_frac)
HEADLINES = {  # A − B, paired; by default both without mask at the paper's top-p
    "table3": [("lsm @ top-p 0.9", "sampled_token @ top-p 0.9"), ("lsm @ top-p 1", "sampled_token @ top-p 1")],
    "ablation_renorm": [("lsm_no_renorm", "lsm")],
    # the paper's headline; the variance-reduced estimators against the one they reduce; the top-K objectives
    # against LSM (same rollout top-p 0.9: the objective alone differs); each against the control (how much
    # of a gain is the teacher's at all). Pairs whose cells are not measured yet are left out.
    "baselines": [("lsm", "sampled_token"), ("vopd", "sampled_token"), ("vopd_topk", "sampled_token"),
                  ("topk_tail", "lsm"), ("stop_grad_topk", "lsm"), ("full_rkl", "lsm")] + [
        (objective, "constant_negative") for objective in ("sampled_token", "lsm", "vopd", "vopd_topk", "full_rkl",
                                                           "topk_tail", "stop_grad_topk")],
    # each K against the regime's K = 4 (Table 1's LSM); the full vocabulary against K = 4 and against the
    # largest truncated support (what the last sliver of teacher mass, and the student's mass outside it, do)
    "ablation_k": [(f"lsm K={k}", "lsm K=4") for k in (2, 8, 16, 32)] + [("full_rkl", "lsm K=4"),
                                                                           ("full_rkl", "lsm K=32")],
    # the objective at each top-p, then each top-p against the objective's own (LSM 0.9, sampled-token 1)
    "ablation_top_p": [(f"lsm @ top-p {p}", f"sampled_token @ top-p {p}") for p in ("1", "0.95", "0.9", "0.8")] + [
        (f"{objective} @ top-p {p}", f"{objective} @ top-p {own}") for objective, own in (("lsm", "0.9"),
                                                                                          ("sampled_token", "1"))
        for p in ("1", "0.95", "0.9", "0.8") if p != own],
    "support_variants": [(f"support_v{v}", "lsm") for v in (2, 3, 4, 5)],  # each against V1
}
# A table that adds cells to table1's sweep reads from it only the unmasked jobs of these objectives (None: all)
READS_FROM_TABLE1 = {"table3": None, "ablation_renorm": {"lsm", "lsm_no_renorm"}, "baselines": None,
                     "ablation_k": {"lsm", "full_rkl", "sampled_token"}, "ablation_top_p": {"lsm", "sampled_token"},
                     "support_variants": {"lsm", "support_v2", "support_v3", "support_v4", "support_v5"}}
DEFAULT_HEADLINE = [("lsm", "sampled_token")]
# A table whose ablated variable was also chosen on validation (paper_figs/tune.py --over) adds the protocol's
# claim: the chosen value against sampled-token OPD.
# {table: (objective, key in the method name, config key the record chose over, tuning record)}
VALIDATION_CHOICE = {"ablation_k": ("lsm", "K", "loss.k", ROOT / "results" / "tuning" / "lsm_k.json")}
PAPER_HEADLINE = (NAMES["lsm"], NAMES["sampled_token"])  # the comparison of the paper's +19.8%
# A preregistered table reads only jobs that match a record committed before they ran: the objectives and
# their settings, the seeds (all of them: none dropped) and the revision; its headline states whether the
# recorded prediction (the paired interval of A − B lies above 0) held. {table: record}
PREREGISTERED = {"confirm_k": ROOT / "results" / "preregistered" / "confirm_k.json"}


class TableError(ValueError):
    """A sweep the protocol cannot summarize; the message is one line."""


# ---------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------


def rollout_top_p(config: dict[str, Any]) -> float:
    """The top-p the job's rollouts used: `rollout.top_p` when set, else the objective's own."""
    explicit = get(config, "rollout.top_p")
    return float(explicit if explicit is not None else get(config, "loss.rollout_top_p", 1.0))


def method_key(config: dict[str, Any], *, with_k: bool = False, with_top_p: bool = False) -> str:
    """loss name, + ' K=k' when the sweep varies K, + ' + mask', + ' @ top-p P' when the sweep runs an
    objective at several rollout top-p."""
    key = str(get(config, "loss.name", "?"))
    if with_k and key not in SUPPORT_FREE:
        key += f" K={get(config, 'loss.k')}"
    if get(config, "loss.mask_special_tokens", False):
        key += " + mask"
    if with_top_p:
        key += f" @ top-p {rollout_top_p(config):g}"
    return key


def method_keys(jobs: list[dict[str, Any]]) -> list[str]:
    """Each job's method key, naming K and the rollout top-p only where the jobs vary them (K: among the
    objectives that read it)."""
    with_k = len({get(j["config"], "loss.k") for j in jobs
                  if get(j["config"], "loss.name") not in SUPPORT_FREE}) > 1
    top_ps: dict[str, set[float]] = {}
    for j in jobs:
        top_ps.setdefault(str(get(j["config"], "loss.name")), set()).add(rollout_top_p(j["config"]))
    with_top_p = any(len(v) > 1 for v in top_ps.values())
    return [method_key(j["config"], with_k=with_k, with_top_p=with_top_p) for j in jobs]


def natural(key: str) -> list[Any]:
    """Sort key that orders the numbers in a method key by value ("lsm K=2" before "lsm K=16")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def label(key: str) -> str:
    base, _, rest = key.partition(" ")
    return NAMES.get(base, base) + (" " + rest if rest else "")


def load(sources: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """(finished jobs, failed job directories) from sweep directories (every directory Hydra made, i.e. one
    holding .hydra/) and packed rows files (*.jsonl.gz)."""
    jobs, failed = [], []
    for source in sources:
        if source.is_file():
            jobs += packed_rows.read(source)
            continue
        for hydra_dir in sorted(source.rglob(".hydra")):
            job = packed_rows.read_job(hydra_dir.parent)
            if job is None:
                failed.append(str(hydra_dir.parent.relative_to(source)))
            else:
                jobs.append(job)
    if not jobs:
        raise TableError(f"sweep_dir: no finished jobs (metrics.json + eval_items.jsonl) under "
                         f"{', '.join(map(str, sources))}")
    return jobs, failed


def score_matrix(jobs: list[dict], phase: str, task: str) -> tuple[np.ndarray, list[int], int]:
    """[seeds, items] per-item sampled scores (mean over samples) of `phase` on `task`, rows sorted by seed;
    also the seeds and the number of samples per item. Two jobs of one cell with the same seed (a sweep passed
    twice, or committed rows beside a sweep that reran them) are refused: their samples would merge."""
    by_seed: dict[int, dict[int, list[float]]] = {}
    dirs: dict[int, str] = {}
    for j in jobs:
        seed = int(get(j["config"], "seed", 0))
        if seed in dirs:
            raise TableError(f"sweep_dir: {dirs[seed]} and {j['dir']} ran the same cell with seed {seed}; "
                             "pass each job once")
        dirs[seed] = str(j["dir"])
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


def select(name: str, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs table `name` reads: a table that adds cells to table1's sweep compares objectives unmasked (that
    sweep also ran the mask), and only its own objectives (READS_FROM_TABLE1)."""
    if name not in READS_FROM_TABLE1:
        return jobs
    objectives = READS_FROM_TABLE1[name]
    return [j for j in jobs if not get(j["config"], "loss.mask_special_tokens", False)
            and (objectives is None or get(j["config"], "loss.name") in objectives)]


def build(name: str, sources: Path | list[Path], *, min_seeds: int, min_items: int, command: str) -> dict[str, Any]:
    """The table `name` from the jobs in `sources` (sweep directories or packed rows files)."""
    jobs, failed = load([sources] if isinstance(sources, Path) else sources)
    return from_jobs(name, select(name, jobs), failed, min_seeds=min_seeds, min_items=min_items, command=command)


def from_jobs(name: str, jobs: list[dict[str, Any]], failed: list[str], *, min_seeds: int, min_items: int,
              command: str) -> dict[str, Any]:
    registration = _registration(name, jobs)
    tuning = [str(j["dir"]) for j in jobs if get(j["config"], "eval_split", "eval") != "eval"]
    if tuning:
        raise TableError(f"sweep_dir: {len(tuning)} jobs were evaluated on the validation split (tuning runs, e.g. "
                         f"{tuning[0]}); a reported table reads the test split (eval_split=eval)")
    revisions = sorted({j["revision"] for j in jobs})
    if len(revisions) > 1:
        raise TableError(f"sweep_dir: rows from {len(revisions)} code revisions are mixed ({', '.join(revisions)}); "
                         "a table summarizes one revision")
    for j in jobs:  # a job is labelled by the top-p its config asks for; its rows say what the rollouts used
        ran = {r["rollout_top_p"] for r in j["rows"] if r.get("rollout_top_p") is not None}
        if ran and ran != {rollout_top_p(j["config"])}:
            raise TableError(f"sweep_dir: {j['dir']} asks for rollout top-p {rollout_top_p(j['config']):g} but its "
                             f"rollouts ran at {', '.join(f'{x:g}' for x in sorted(ran))} (metrics.jsonl); its "
                             "method cannot be named")
    tasks = list(get(jobs[0]["config"], "tasks", {}) or {})
    groups: dict[str, list[dict]] = {}
    for j, key in zip(jobs, method_keys(jobs), strict=True):
        groups.setdefault(key, []).append(j)
    rows: list[dict[str, Any]] = []
    matrices: dict[tuple[str, str], tuple[np.ndarray, list[int]]] = {}
    for task in tasks:
        for phase, who in (("teacher", "Teacher"), ("initial", "Student before OPD")):
            # the same checkpoints in every job: one job's evaluation is the row (interval over items only)
            x, _, samples = score_matrix(jobs[:1], phase, task)
            if x.size:
                rows.append(_row(who, task, x, samples))
        for key, members in sorted(groups.items(), key=lambda kv: natural(kv[0])):
            x, seeds, samples = score_matrix(members, "final", task)
            if len(seeds) < min_seeds or x.shape[1] < min_items:
                raise TableError(f"sweep_dir: method {key!r} on task {task!r} has {len(seeds)} seeds x {x.shape[1]} "
                                 f"items; the protocol asks for >= {min_seeds} seeds and >= {min_items} items "
                                 "(--min-seeds, --min-items)")
            matrices[(key, task)] = (x, seeds)
            rows.append({**_row(label(key), task, x, samples, key=key), **_cost(members),
                         **(_coverage(members, task) if name in COVERAGE_TABLES else {})})
    headline = []
    chosen = _validation_pairs(name)  # reads the tuning record once
    pairs = HEADLINES.get(name, DEFAULT_HEADLINE) + chosen
    for task in tasks:
        for key_a, key_b in pairs:
            a, b = matrices.get((key_a, task)), matrices.get((key_b, task))
            if a is None or b is None:
                continue
            if a[1] != b[1]:
                raise TableError(f"sweep_dir: {key_a} and {key_b} ran different seeds ({a[1]} vs {b[1]}) on task "
                                 f"{task!r}; the paired difference needs the same seeds")
            headline.append({"task": task, "a": label(key_a), "b": label(key_b), **paired_diff(a[0], b[0]),
                             **({"chosen_on": _rel(VALIDATION_CHOICE[name][3])}
                                if (key_a, key_b) in chosen else {})})
    if registration is not None:
        _judge(registration, headline)
    return {"name": name, "title": TABLES[name], "command": command, "revision": revisions[0],
            "date": max(j["date"] for j in jobs), "jobs": len(jobs), **_wall(jobs),
            "failed_jobs": failed,
            "interval": "95% two-way bootstrap over seeds and items (2000 resamples)",
            "rows": rows, "headline": headline}


def _validation_pairs(name: str) -> list[tuple[str, str]]:
    """[(the validation-chosen method, sampled-token OPD)] when table `name` has a choice on record, else []."""
    if name not in VALIDATION_CHOICE or not VALIDATION_CHOICE[name][3].exists():
        return []
    objective, key, over, record = VALIDATION_CHOICE[name]
    choice = json.loads(record.read_text())
    if choice.get("over") != over or objective not in choice.get("choices", {}):
        # a record of another choice (e.g. the learning rate) must not pass for the K choice, nor vanish silently
        raise TableError(f"{_rel(record)}: records a choice of {choice.get('over')!r} for "
                         f"{sorted(choice.get('choices', {}))}; table {name} needs {objective}'s choice of {over}")
    chosen = choice["choices"][objective]
    return [(f"{objective} {key}={chosen:g}", "sampled_token")]


def _registration(name: str, jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Table `name`'s preregistration record, after checking that the jobs are what it registered; None for a
    table without one."""
    if name not in PREREGISTERED:
        return None
    path = PREREGISTERED[name]
    if not path.exists():
        raise TableError(f"{_rel(path)}: table {name} is preregistered and its record is missing")
    record = json.loads(path.read_text())
    seeds: dict[str, set[int]] = {}
    for j in jobs:
        objective = str(get(j["config"], "loss.name"))
        if objective not in record["config"]:
            raise TableError(f"sweep_dir: {j['dir']} ran {objective}; {_rel(path)} registered only "
                             f"{', '.join(sorted(record['config']))}")
        for key, want in record["config"][objective].items():
            if get(j["config"], key) != want:
                raise TableError(f"sweep_dir: {j['dir']} ran {key}={get(j['config'], key)!r}; {_rel(path)} "
                                 f"registered {objective} at {key}={want!r}")
        if not j["revision"].startswith(record["revision"]):
            raise TableError(f"sweep_dir: {j['dir']} ran revision {j['revision'][:12]}; {_rel(path)} registered "
                             f"{record['revision'][:12]}")
        seeds.setdefault(objective, set()).add(int(get(j["config"], "seed", 0)))
    for objective in record["config"]:
        if seeds.get(objective) != set(record["seeds"]):
            raise TableError(f"sweep_dir: {objective} ran seeds {sorted(seeds.get(objective, []))}; {_rel(path)} "
                             f"registered seeds {record['seeds']} (every one, none left out)")
    return {**record, "path": _rel(path)}


def _judge(record: dict[str, Any], headline: list[dict[str, Any]]) -> None:
    """Marks the registered comparison in the headline with its record and whether the prediction held."""
    a, b = label(record["a"]), label(record["b"])
    for h in headline:
        if (h["a"], h["b"]) == (a, b):
            h.update(preregistered=record["path"], registered_on=record["registered_on"],
                     prediction=record["prediction"], prediction_holds=bool(h["paired_ci_low"] > 0))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sweep_wall_s(jobs: list[dict]) -> dict[str, float] | None:
    """Wall time of each sweep the jobs came from (by the sweep directory's last two path parts, e.g.
    multirun/table1 or <date>/<time>, the same whether the sweep was read from disk or from packed rows):
    from the earliest job's start (its finish minus its preparation and OPD time) to the last finish. A table
    that reuses another table's cells counts that sweep's span too, named, so a reader sees which part it
    re-ran."""
    spans: dict[str, list[float]] = {}
    for j in jobs:
        took = j["metrics"].get("time/prepare_s", 0.0) + j["metrics"].get("time/opd_s", 0.0)
        if j.get("finished_s") is None or not took:
            return None
        span = spans.setdefault("/".join(Path(j["dir"]).parent.parts[-2:]), [math.inf, -math.inf])
        span[0], span[1] = min(span[0], j["finished_s"] - took), max(span[1], j["finished_s"])
    return {name: float(hi - lo) for name, (lo, hi) in sorted(spans.items())}


def _wall(jobs: list[dict]) -> dict[str, Any]:
    by_sweep = sweep_wall_s(jobs)
    return {"wall_s": None if by_sweep is None else float(sum(by_sweep.values())), "wall_s_by_sweep": by_sweep}


def _cost(members: list[dict]) -> dict[str, float | None]:
    """Seconds per training step (sample + score + update, mean over the method's jobs, compile excluded) and
    the update's peak memory per device (bytes, the largest over the method's jobs)."""
    stages = ("mean_time/sample_s", "mean_time/score_s", "mean_time/update_s")
    steps = [sum(j["metrics"][s] for s in stages) for j in members if all(s in j["metrics"] for s in stages)]
    peaks = [j["metrics"]["update_peak_bytes"] for j in members if "update_peak_bytes" in j["metrics"]]
    return {"step_s": float(np.mean(steps)) if steps else None,
            "peak_mem_bytes": int(max(peaks)) if peaks else None}


def _coverage(members: list[dict], task: str) -> dict[str, float | None]:
    """The teacher's top-K mass on the student's rollouts and the fraction of sampled tokens outside the
    teacher's top-K, means over the method's training steps and jobs; None for an objective whose support is
    not the teacher's top-K (SUPPORT_FREE: full reverse KL's support holds all of the mass)."""
    if get(members[0]["config"], "loss.name") in SUPPORT_FREE:
        return {"teacher_topk_mass": None, "not_in_topk_frac": None}
    out = {}
    for key in ("teacher_topk_mass", "not_in_topk_frac"):
        values = [r[key] for j in members for r in j["rows"] if r.get("task") == task and r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def _row(method: str, task: str, x: np.ndarray, samples: int, key: str | None = None) -> dict[str, Any]:
    mean, low, high = mean_ci(x)
    return {"method": method, "key": key, "task": task, "mean": mean, "ci_low": low, "ci_high": high,
            "seeds": int(x.shape[0]), "items": int(x.shape[1]), "samples": samples}


def _wall_md(table: dict[str, Any]) -> str:
    """" (N min of sweep wall time)", split by sweep when the table's jobs came from several."""
    if table.get("wall_s") is None:
        return ""
    by_sweep = table.get("wall_s_by_sweep") or {}
    split = "" if len(by_sweep) < 2 else ": " + ", ".join(f"{k} {v / 60:.0f}" for k, v in by_sweep.items())
    return f" ({table['wall_s'] / 60:.0f} min of sweep wall time{split})"


def markdown(table: dict[str, Any]) -> str:
    """The table as markdown (percent), its protocol and the headline, as RESULTS.md shows it."""
    coverage = any("teacher_topk_mass" in r for r in table["rows"])
    lines = [f"### {table['title']}", "",
             f"`{table['command']}` at revision `{table['revision']}`, {table['date']}; {table['jobs']} jobs"
             + _wall_md(table)
             + ". "
             f"Cells: final held-out sampled pass@1 (%), mean [{table['interval']}].", "",
             "| Method | Task | Score | 95% interval | Seeds | Items × samples | s / step | update peak MiB |"
             + (" teacher top-K mass | sampled outside top-K |" if coverage else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if coverage else "")]
    for r in table["rows"]:
        cost = "–" if r.get("step_s") is None else f"{r['step_s']:.2f}"
        peak = "–" if r.get("peak_mem_bytes") is None else f"{r['peak_mem_bytes'] / 2**20:.1f}"
        cells = "".join(" – |" if r.get(k) is None else f" {100 * r[k]:.1f}% |"
                        for k in ("teacher_topk_mass", "not_in_topk_frac")) if coverage else ""
        lines.append(f"| {r['method']} | {r['task']} | {100 * r['mean']:.1f} | [{100 * r['ci_low']:.1f}, "
                     f"{100 * r['ci_high']:.1f}] | {r['seeds']} | {r['items']} × {r['samples']} | {cost} | {peak} |"
                     + cells)
    if coverage:
        lines += ["", "Coverage columns: means over training steps and seeds of the teacher's top-K mass on the "
                      "student's rollouts and of the sampled tokens outside the teacher's top-K; – where the support "
                      "is not the teacher's top-K (full reverse KL's is the whole vocabulary)."]
    for h in table["headline"]:
        gain = "n/a" if h["relative_gain"] is None else f"{h['relative_gain']:+.1%}"
        lines += ["", f"**{h['a']} − {h['b']}** on {h['task']}, paired by seed and item: "
                      f"{100 * h['paired_diff']:+.1f} points [{100 * h['paired_ci_low']:+.1f}, "
                      f"{100 * h['paired_ci_high']:+.1f}]; relative gain {gain}"
                      + (" (the paper: +19.8% on its Table 2)." if (h["a"], h["b"]) == PAPER_HEADLINE else ".")
                      + (f" The first method's setting was chosen on validation ({h['chosen_on']})."
                         if h.get("chosen_on") else "")
                      + (f" Preregistered on {h['registered_on']} ({h['preregistered']}): {h['prediction']} — "
                         + ("**held**." if h["prediction_holds"] else "**did not hold**.")
                         if h.get("preregistered") else "")]
    if table["failed_jobs"]:
        lines += ["", "Failed jobs (no results): " + ", ".join(f"`{f}`" for f in table["failed_jobs"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, nargs="*",
                    help="sweep directories (default: the committed rows, results/rows/<table>.jsonl.gz)")
    ap.add_argument("--table", required=True, choices=sorted(TABLES))
    ap.add_argument("--min-seeds", type=int, default=5)
    ap.add_argument("--min-items", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "tables", help="directory of <table>.json")
    ap.add_argument("--rows", type=Path, default=ROOT / "results" / "rows", help="directory of <table>.jsonl.gz")
    args = ap.parse_args(argv)
    rows_path = args.rows / f"{args.table}.jsonl.gz"
    sources = args.sweep_dir or [rows_path]
    # the command that regenerates the table from what is committed
    command = f"python paper_figs/tables.py --table {args.table}" + "".join(
        f" --{k} {v}" for k, v in (("min-seeds", args.min_seeds), ("min-items", args.min_items))
        if v != ap.get_default(k.replace("-", "_")))
    try:
        missing = [str(s) for s in sources if not s.exists()]
        if missing:
            raise TableError(f"sweep_dir: expected a sweep directory or a rows file, got {', '.join(missing)}"
                             + ("" if args.sweep_dir else " (no committed rows for this table: pass its sweep)"))
        jobs, failed = load(sources)
        jobs = select(args.table, jobs)
        table = from_jobs(args.table, jobs, failed, min_seeds=args.min_seeds, min_items=args.min_items,
                          command=command)
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.sweep_dir:  # pack what the table was built from, so it regenerates from the repository
        packed_rows.write(rows_path, jobs, ROOT)
        print(f"wrote {rows_path}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.table}.json"
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(markdown(table))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
