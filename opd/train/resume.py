"""Run-state checkpoints of an OPD run, so a killed or preempted job continues where it stopped.

A checkpoint is `<run dir>/checkpoints/step_<NNNNNNN>/` holding `state/` (orbax: the student's parameters and
the optimizer state, exactly as the update leaves them) and `run_state.json` (the step, every random key and
data cursor the loop draws from, per-route step counts, and the configuration that wrote it). It is written
into a temporary directory and renamed into place, so a checkpoint is either complete or absent; the newest
`keep` are kept. Rows already in metrics.jsonl past the checkpoint's step are dropped on resume (they would
be recomputed identically).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

RUN_STATE = "run_state.json"
PREFIX = "step_"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / RUN_STATE).is_file() and (path / "state").is_dir()


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and is_complete(p))
    return done[-1] if done else None


def key_to_json(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).tolist()


def key_from_json(data: list[int]) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))


def save(run_dir: str | Path, step: int, train_state: Any, run_state: dict[str, Any], *, keep: int) -> Path:
    """Write the checkpoint of `step` atomically and delete all but the newest `keep`."""
    import orbax.checkpoint as ocp

    root = checkpoints_dir(run_dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "state", nnx.to_pure_dict(train_state))
            ckptr.wait_until_finished()
        (tmp / RUN_STATE).write_text(json.dumps({"step": int(step), **run_state}, indent=1, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    done = sorted(p for p in root.iterdir() if p.name.startswith(PREFIX))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore(path: Path, train_state: Any) -> tuple[Any, dict[str, Any]]:
    """(train state with the checkpoint's values, placed like `train_state`; the run_state.json dict)."""
    import orbax.checkpoint as ocp

    target = nnx.to_pure_dict(train_state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    with ocp.StandardCheckpointer() as ckptr:
        values = ckptr.restore(Path(path).absolute() / "state", abstract)
    nnx.replace_by_pure_dict(train_state, values)
    return train_state, json.loads((Path(path) / RUN_STATE).read_text())


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for the 'what differs' message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({a!r} vs {b!r})"]
