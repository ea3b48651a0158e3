"""Does a rerun reproduce a table's rows? Final per-item outcomes and step losses compared cell by cell.

A speed change or a new revision is trusted when its rerun gives the committed outcomes back; this says how
many of them it does, and where it does not:

    python paper_figs/reproduce.py results/rows/table2.jsonl.gz multirun/table2_rerun

Each side is a packed rows file or a sweep directory (read as paper_figs/tables.py reads them). A job is
matched by its cell (the method key with K and the rollout top-p, as tables.py names methods) and seed; for
each matched pair it counts the final held-out outcomes (task, item, sample) that are identical and the
largest difference of a training step's loss. Prints one line per pair that differs, then the totals;
never writes anything. Never imports `opd`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import get
from paper_figs.tables import TableError, load, method_key

PHASE = "final"


def by_cell(name: str, path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """{(method key with K and rollout top-p, seed): job} of the rows at `path`; two jobs of one cell and seed
    are refused. Refusals name the argument `name`, not the loader's own `sweep_dir`."""
    try:
        jobs = load([path])[0]
    except TableError as err:
        raise TableError(f"{name}: {str(err).removeprefix('sweep_dir: ')}") from None
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for job in jobs:
        key = (method_key(job["config"], with_k=True, with_top_p=True), int(get(job["config"], "seed", 0)))
        if key in out:
            raise TableError(f"{name}: two jobs of {key[0]} seed {key[1]}: {out[key]['dir']} and {job['dir']}")
        out[key] = job
    return out


def outcomes(job: dict[str, Any]) -> dict[tuple[str, int, int], float]:
    return {(r["task"], int(r["item"]), int(r["sample"])): float(r["correct"]) for r in job["items"]
            if r["phase"] == PHASE}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Outcomes of `a` found in `b` and how many are identical; the largest step-loss difference over the
    steps both ran (None when either has no losses)."""
    oa, ob = outcomes(a), outcomes(b)
    shared = [k for k in oa if k in ob]
    losses = [(x["loss"], y["loss"]) for x, y in zip(a["rows"], b["rows"]) if "loss" in x and "loss" in y]
    return {"outcomes": len(shared), "identical": sum(oa[k] == ob[k] for k in shared),
            "unmatched": len(oa) - len(shared) + len(ob) - len(shared),
            "max_loss_diff": max((abs(x - y) for x, y in losses), default=None)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", type=Path, help="rows file or sweep directory (e.g. the committed rows)")
    ap.add_argument("rerun", type=Path, help="rows file or sweep directory to compare with it")
    args = ap.parse_args(argv)
    try:
        missing = [str(p) for p in (args.reference, args.rerun) if not p.exists()]
        if missing:
            raise TableError(f"reference/rerun: expected a rows file or a sweep directory, got {', '.join(missing)}")
        ref, new = by_cell("reference", args.reference), by_cell("rerun", args.rerun)
    except TableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shared = sorted(set(ref) & set(new))
    total = identical = unmatched = 0
    for key in shared:
        c = compare(ref[key], new[key])
        total, identical, unmatched = total + c["outcomes"], identical + c["identical"], unmatched + c["unmatched"]
        if c["identical"] < c["outcomes"] or c["unmatched"]:
            loss = "" if c["max_loss_diff"] is None else f"; max step-loss difference {c['max_loss_diff']:.3g}"
            print(f"{key[0]} seed {key[1]}: {c['outcomes'] - c['identical']} of {c['outcomes']} outcomes differ"
                  + (f", {c['unmatched']} without a counterpart" if c["unmatched"] else "") + loss)
    only = [f"{len(set(ref) - set(new))} only in the reference", f"{len(set(new) - set(ref))} only in the rerun"]
    print(f"identical final outcomes: {identical} of {total} in {len(shared)} matched jobs ({', '.join(only)}"
          + (f"; {unmatched} outcomes without a counterpart" if unmatched else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
