"""Checkpoint cache for prepared (SFT) models: orbax parameters + a meta.json, keyed by a config hash.

Layout: `<root>/<key>/{params/, meta.json}` where key = sha256 of (model config, task config, SFT config,
cache format version, and a fingerprint of the SFT data itself, so a change in how the task writes or
tokenizes its demonstrations invalidates old checkpoints). A rerun or any job of a sweep that asks for the
same key reuses the checkpoint.

Concurrency: a sweep's parallel jobs may prepare the same key at once. Each writes into its own temporary
directory under `<root>` and publishes it with one atomic `os.rename`; the loser of the race deletes its
copy and loads the winner's. A directory without meta.json (meta is written last, before the rename) is
never considered complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from flax import nnx

CACHE_VERSION = 1
META = "meta.json"


def cache_key(*parts: Any) -> str:
    """Stable hex key of JSON-serializable parts (dict keys sorted)."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def data_fingerprint(*arrays: Any) -> str:
    """Short hash of sample SFT batches (token ids and masks): part of the cache key, so checkpoints trained
    on demonstrations that the task code no longer writes are never reused."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return (path / META).is_file() and (path / "params").is_dir()


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


def save_model(model: nnx.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write `model`'s state to `path` atomically (temp dir + rename). Returns the final path.

    If `path` already holds a complete checkpoint (another job won the race), keep it and drop ours."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        state = nnx.to_pure_dict(nnx.state(model))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", state)
            ckptr.wait_until_finished()
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        publish(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished checkpoint directory `tmp` to `path`, unless another job already put a complete
    checkpoint there (then `tmp` stays for the caller to remove); a stale partial `path` is replaced."""
    try:
        os.rename(tmp, path)
    except OSError:
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            os.rename(tmp, path)


EVALS = "held_out"


def read_eval(path: str | Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """A held-out evaluation of the checkpoint at `path` stored under `spec` (everything its numbers depend
    on besides the model), or None."""
    f = Path(path) / EVALS / f"{cache_key(spec)}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def write_eval(path: str | Path, spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Store a held-out evaluation beside the checkpoint (atomically: parallel sweep jobs may race), so every
    job of a sweep that evaluates the same cached model the same way reads it instead of decoding again."""
    d = Path(path) / EVALS
    d.mkdir(exist_ok=True)
    tmp = d / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"spec": spec, **result}, default=str) + "\n")  # rows keep their key order
    os.replace(tmp, d / f"{cache_key(spec)}.json")


def load_model(model: nnx.Module, path: str | Path) -> nnx.Module:
    """Restore parameters saved by `save_model` into `model` (same architecture) in place; returns it."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    state = nnx.state(model)
    abstract = nnx.to_pure_dict(state)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / "params", abstract)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
