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

    def __init__(self, output_dir: str | Path, config: dict[str, Any], *, resume_step: int | None = None):
        """`resume_step`: continue a run resumed after that step: rows up to it are kept (later ones, written
        after the checkpoint and recomputed identically now, are dropped) and new rows are appended."""
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self._rows_path = self.output_dir / "metrics.jsonl"
        if resume_step is not None and self._rows_path.exists():
            kept = []
            for line in self._rows_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if row["step"] <= resume_step:
                    kept.append(row)
            write_jsonl(self._rows_path, kept)
            self._rows = self._rows_path.open("a")
        else:
            self._rows = self._rows_path.open("w")
        self._start = time.time()
        # the code that runs is the code at the start: a commit made while a sweep runs must not relabel it
        self._revision = git_revision()
        self._tb = _tensorboard_writer(self.output_dir / "tensorboard")
        self._wandb = None
        if config.get("wandb"):
            import wandb  # optional: validated to be installed when asked for

            self._wandb = wandb.init(project="opd", config=config, dir=str(self.output_dir),
                                     resume="allow", id=self.output_dir.name)
        write_provenance(self.output_dir, config)

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        row = {"step": int(step), "time_s": round(time.time() - self._start, 3), **to_jsonable(metrics)}
        self._rows.write(json.dumps(row) + "\n")
        self._rows.flush()
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        return row

    def finish(self, final: dict[str, Any]) -> Path:
        self._rows.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.summary.update(to_jsonable(final))
            self._wandb.finish()
        payload = {
            "metrics": to_jsonable(final),
            "config": to_jsonable(self.config),
            "git_revision": self._revision,
            "wall_time_s": round(time.time() - self._start, 3),
        }
        path = self.output_dir / "metrics.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)  # atomic: readers never see a half-written file
        return path


def _tensorboard_writer(path: Path):
    """A TensorBoard event-file writer in the job directory (tensorboardX), or None when not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """What a job ran with: the resolved config, the git revision, package versions, devices."""
    import importlib.metadata as md
    import platform

    import jax

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "numpy", "hydra-core", "orbax-checkpoint", "opd"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    devices = jax.devices()
    return {"config": to_jsonable(config), "git_revision": git_revision(), "python": platform.python_version(),
            "packages": versions, "device_kind": devices[0].device_kind, "device_count": len(devices),
            "process_count": jax.process_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_provenance(output_dir: str | Path, config: dict[str, Any]) -> Path:
    """provenance.json, once per job (a resumed job keeps the first one and adds provenance.<n>.json)."""
    out = Path(output_dir) / "provenance.json"
    n = 1
    while out.exists():
        out = Path(output_dir) / f"provenance.{n}.json"
        n += 1
    out.write_text(json.dumps(provenance(config), indent=1) + "\n")
    return out


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
