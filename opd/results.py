"""Where results land: every job writes `metrics.jsonl` (one row per logged step) and `metrics.json`
(final metrics, the resolved config and the code's git revision) into its own output directory.
Figures read these files and nothing else (paper_figs/)."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

_REPO = Path(__file__).resolve().parents[1]


def git_revision() -> str:
    """HEAD's hash, suffixed with '-dirty' when tracked files differ; 'unknown' outside a checkout."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def to_jsonable(value: Any) -> Any:
    """Plain Python numbers and containers; non-finite floats become None so the JSON stays standard."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
        return to_jsonable(np.asarray(value).tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


class RunRecorder:
    """Appends step rows to metrics.jsonl as they happen and writes metrics.json once at the end.

    Rows are flushed line by line, so a killed job still leaves every finished step on disk.
    """

    def __init__(self, output_dir: str | Path, config: dict[str, Any]):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self._rows_path = self.output_dir / "metrics.jsonl"
        self._rows = self._rows_path.open("w")
        self._start = time.time()

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": int(step), "time_s": round(time.time() - self._start, 3), **to_jsonable(metrics)}
        self._rows.write(json.dumps(row) + "\n")
        self._rows.flush()
        return row

    def finish(self, final: dict[str, Any]) -> Path:
        self._rows.close()
        payload = {
            "metrics": to_jsonable(final),
            "config": to_jsonable(self.config),
            "git_revision": git_revision(),
            "wall_time_s": round(time.time() - self._start, 3),
        }
        path = self.output_dir / "metrics.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)  # atomic: readers never see a half-written file
        return path


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` as JSON lines, atomically (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(to_jsonable(r)) + "\n" for r in rows))
    tmp.replace(path)
    return path


def read_rows(job_dir: str | Path) -> list[dict[str, Any]]:
    """The step rows of one job."""
    path = Path(job_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_jobs(root: str | Path) -> list[Path]:
    """Every finished job (a directory holding metrics.json) under `root`, sorted."""
    return sorted(p.parent for p in Path(root).rglob("metrics.json"))
