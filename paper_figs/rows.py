"""Committed rows: a sweep's finished jobs packed into one small file, so a table and its curves regenerate
from the repository without the sweep directories (which stay local under multirun/).

    results/rows/<table>.jsonl.gz     one JSON line per job, gzip (written by paper_figs/tables.py)

A job's line keeps everything a table or a curve reads: the resolved config, the final metrics, the code
revision, its training rows (metrics.jsonl) and its per-item held-out outcomes (eval_items.jsonl), the latter
as one 0/1 string per (phase, task, sample) over the item ids, which makes 1000 items x 5 samples x 3 phases
a few kilobytes. Never imports `opd`.
"""

from __future__ import annotations

import datetime
import gzip
import json
from pathlib import Path
from typing import Any


def read_job(job: Path) -> dict[str, Any] | None:
    """A finished job directory as {'dir', 'config', 'metrics', 'revision', 'date', 'items', 'rows'}, or None
    when it never wrote its results (metrics.json and eval_items.jsonl). 'date': the day it finished;
    'finished_s': when (epoch seconds, for a sweep's wall time)."""
    summary, items = job / "metrics.json", job / "eval_items.jsonl"
    if not summary.exists() or not items.exists():
        return None
    payload = json.loads(summary.read_text())
    curve = job / "metrics.jsonl"
    return {"dir": job, "config": payload["config"], "metrics": payload["metrics"],
            "revision": payload.get("git_revision", "unknown"),
            "date": datetime.date.fromtimestamp(summary.stat().st_mtime).isoformat(),
            "finished_s": summary.stat().st_mtime,
            "items": [json.loads(x) for x in items.read_text().splitlines() if x.strip()],
            "rows": [json.loads(x) for x in curve.read_text().splitlines() if x.strip()] if curve.exists() else []}


def _pack_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str, int], dict[int, float]] = {}
    for r in items:
        cells.setdefault((r["phase"], r["task"], int(r["sample"])), {})[int(r["item"])] = float(r["correct"])
    packed = []
    for (phase, task, sample), by_item in sorted(cells.items()):
        ids = sorted(by_item)
        if any(by_item[i] not in (0.0, 1.0) for i in ids):  # a graded verifier: keep the numbers
            packed.append({"phase": phase, "task": task, "sample": sample, "items": ids,
                           "scores": [by_item[i] for i in ids]})
        else:
            packed.append({"phase": phase, "task": task, "sample": sample, "items": _ranges(ids),
                           "bits": "".join("1" if by_item[i] else "0" for i in ids)})
    return packed


def _ranges(ids: list[int]) -> list[list[int]] | list[int]:
    """Item ids as [[first, last], ...] runs (held-out ids are contiguous)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


def _unpack_items(packed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for cell in packed:
        if "bits" in cell:
            ids = [i for first, last in cell["items"] for i in range(first, last + 1)]
            scores = [float(b == "1") for b in cell["bits"]]
        else:
            ids, scores = cell["items"], cell["scores"]
        rows += [{"phase": cell["phase"], "task": cell["task"], "item": i, "sample": cell["sample"], "correct": s}
                 for i, s in zip(ids, scores)]
    return rows


def write(path: Path, jobs: list[dict[str, Any]], root: Path) -> None:
    """Pack `jobs` (read_job's dicts) into `path`; each job is named by its directory relative to `root`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for j in jobs:
        name = Path(j["dir"]).relative_to(root) if Path(j["dir"]).is_relative_to(root) else Path(j["dir"])
        record = {"dir": str(name), "config": j["config"], "metrics": j["metrics"], "revision": j["revision"],
                  "date": j["date"], "finished_s": j.get("finished_s"), "rows": j["rows"],
                  "items": _pack_items(j["items"])}
        lines.append(json.dumps(record, sort_keys=True))
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same rows give the same bytes
        f.write(("\n".join(lines) + "\n").encode())


def read(path: Path) -> list[dict[str, Any]]:
    """The jobs packed in `path`, as read_job returns them (dir: the packed name)."""
    with gzip.open(path, "rt") as f:
        jobs = [json.loads(x) for x in f if x.strip()]
    return [{**j, "dir": Path(j["dir"]), "items": _unpack_items(j["items"])} for j in jobs]
