"""A persistent XLA compilation cache, so that a second run of the same configuration does not compile.

JAX keys each compiled program by its HLO, the compile options, the backend and the jax/jaxlib versions, so
a cached executable is reused only for an identical program on the same kind of device; anything else
compiles as usual and is added. Python tracing and lowering still run on every start (they are cheap next
to XLA's compilation of the sampler, the teacher scoring and the update).

    from opd import compile_cache
    compile_cache.enable(".cache/opd/xla")      # before the first jitted call
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable(path: str | os.PathLike, *, min_compile_time_s: float = 0.0) -> Path:
    """Store compiled programs under `path` (created if missing) and reuse them in later processes.

    `min_compile_time_s`: programs that compile faster than this are not written (JAX's default is 1 s,
    which on a CPU skips most of this project's programs; 0 caches every one). Returns the resolved path.
    Call before the first compilation: programs compiled earlier in the process are not written back.
    """
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise ValueError(f"path: expected a non-empty directory path, got {path!r}")
    if not (isinstance(min_compile_time_s, int | float) and min_compile_time_s >= 0):
        raise ValueError(f"min_compile_time_s: expected a number >= 0, got {min_compile_time_s!r}")
    root = Path(path).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f"path: {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(root))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return root
