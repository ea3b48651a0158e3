"""The environment of the experiment processes tests start (`python -m experiments.*`).

They run on the CPU with the repository importable, and share one persistent XLA compilation cache per test
session (`OPD_TEST_XLA_CACHE`, created by conftest.py): the smoke configuration's programs are compiled by the
first test process that needs them and loaded by every later one. The test process itself does not use it
(its many small programs are rarely repeated, and the compile-cache tests need JAX's default)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def experiment_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cache = env.get("OPD_TEST_XLA_CACHE")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env
