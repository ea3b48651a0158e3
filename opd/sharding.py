"""Device mesh and partition specs as data beside the model (style.md E9).

One code path for one device and many: a `Mesh` with named axes

    data    pure data parallelism: the batch is split, parameters are replicated
    fsdp    fully sharded data parallelism: the batch is split *and* parameters/optimizer state are
            sharded along their hidden (D) dimension; XLA all-gathers them where a matmul needs them
    tensor  tensor (Megatron-style) parallelism: heads, MLP width and vocabulary are split (size 1 = off)

and a rules table mapping parameter-path patterns to `PartitionSpec`s over those axes. The default
mesh is one device (`make_mesh()`), so single-device runs take exactly the multi-device path. The
distributed engine is JAX's own: state is placed with `jax.device_put(x, NamedSharding)` and hot stages are
`jax.jit(..., in_shardings=..., out_shardings=...)`; XLA's SPMD partitioner inserts every collective.
There is no hand-written communication here.

A spec dimension whose size the mesh axis does not divide is left unsharded (replicated) on that axis,
so a tiny test model runs on 8 devices unchanged; `describe` shows what each rule resolved to.

Multi-host: call `jax.distributed.initialize()` in every process before anything touches a device; then
`jax.devices()` lists all hosts' devices and `make_mesh(data=..., fsdp=..., tensor=...)` spans them (keep
`tensor` within a host: its collectives are the most frequent).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# Parameter path (slash-joined, e.g. "layers/3/self_attn/q_proj/kernel") -> spec over its dimensions.
# First match wins; matched with re.search, so optimizer state (".../opt_state/0/mu/<param path>") follows
# the same rules as its parameter. Linear kernels are [in, out] (docs/interfaces.md).
DEFAULT_RULES: tuple[tuple[str, P], ...] = (
    (r"embed_tokens/embedding$", P("tensor", "fsdp")),  # [V, D]: vocabulary over tensor, hidden over fsdp
    (r"lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"self_attn/[qkv]_proj/kernel$", P("fsdp", "tensor")),  # [D, heads*E]: heads over tensor
    (r"self_attn/[qkv]_proj/bias$", P("tensor")),  # [heads*E]
    (r"self_attn/o_proj/kernel$", P("tensor", "fsdp")),  # [H*E, D]
    (r"mlp/(gate|up)_proj/kernel$", P("fsdp", "tensor")),  # [D, F]: MLP width over tensor
    (r"mlp/down_proj/kernel$", P("tensor", "fsdp")),  # [F, D]
    (r".*", P()),  # norms, step counters, anything else: replicated
)


def make_mesh(
    data: int = 1, fsdp: int | None = None, tensor: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: the first data·fsdp·tensor devices).

    `fsdp=None` takes every device the other axes leave: `make_mesh()` on one device is a 1x1x1 mesh,
    on 8 devices a 1x8x1 mesh. The product must not exceed the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("data", data), ("tensor", tensor)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh.{name}: expected a positive integer, got {size!r}")
    if fsdp is None:
        if len(devices) % (data * tensor):
            raise ValueError(f"mesh: data*tensor={data * tensor} must divide the {len(devices)} devices")
        fsdp = len(devices) // (data * tensor)
    if not isinstance(fsdp, int) or fsdp < 1:
        raise ValueError(f"mesh.fsdp: expected a positive integer or None, got {fsdp!r}")
    n = data * fsdp * tensor
    if n > len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor={n} exceeds the {len(devices)} available devices")
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, tensor), AXES)


def path_parts(key_path: Sequence[Any]) -> tuple[str, ...]:
    """Names along a pytree key path of NNX state (the trailing `.value` dropped); shared with hf.py."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":  # nnx Variable leaves end in `.value`
                parts.append(k.name)
        else:
            parts.append(str(getattr(k, "key", k)))
    return tuple(parts)


def _path_str(key_path: Sequence[Any]) -> str:
    return "/".join(path_parts(key_path))


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` cut to the array's rank, with axes the dimension size is not divisible by dropped."""
    if len(spec) > len(shape):
        return P()
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for a in names:
            size = int(np.prod([mesh.shape[b] for b in (*kept, a)]))
            if dim % size == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> P:
    """The first rule whose pattern matches `path`, fitted to `shape` on `mesh`."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return fit_spec(spec, shape, mesh)
    return P()


def state_specs(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> Any:
    """PartitionSpecs for every array leaf of an NNX State (or any pytree), matched by path."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: spec_for(_path_str(kp), np.shape(x), mesh, rules), tree
    )


def state_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> Any:
    """NamedShardings for every leaf: pass as a jit's in/out_shardings or to `jax.device_put`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(tree, mesh, rules))


def shard_state(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> Any:
    """Place every leaf according to the rules (`jax.device_put` with NamedShardings)."""
    return jax.device_put(tree, state_shardings(tree, mesh, rules))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> nnx.Module:
    """Place an NNX module's (or an nnx.Optimizer's) state in place; returns the module."""
    state = nnx.state(module)
    nnx.update(module, shard_state(state, mesh, rules))
    return module


def batch_size_divisor(mesh: Mesh) -> int:
    """data·fsdp: the number of shards of the batch axis."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_divisible(batch_size: int, mesh: Mesh, name: str, parts: int = 1) -> None:
    """ValueError (one line naming `name`) unless `batch_size` splits into `parts` equal slices that each
    divide over the mesh's batch axes (so no row is dropped and no shard is uneven)."""
    n = parts * batch_size_divisor(mesh)
    if batch_size % n:
        what = f"{parts} minibatches x data*fsdp={n // parts}" if parts > 1 else f"data*fsdp={n}"
        raise ValueError(f"{name}: {batch_size} rows must be divisible by {what}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 over ("data", "fsdp"), the rest replicated: one sharding for every leaf of a divisible batch
    (check_batch_divisible), usable as a jit in/out sharding prefix for a whole batch pytree."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_spec(shape: Sequence[int], mesh: Mesh) -> P:
    """Leading (batch) axis over ("data", "fsdp"); the rest replicated. Scalars are replicated."""
    return fit_spec(P(BATCH_AXES), shape, mesh) if len(shape) else P()


def batch_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of batch arrays (every leaf's axis 0 is the batch)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, batch_spec(np.shape(x), mesh)), tree)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of batch arrays with its batch axis split over ("data", "fsdp")."""
    return jax.device_put(tree, batch_shardings(tree, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated placement (scalars: losses, metrics, RNG keys)."""
    return NamedSharding(mesh, P())


def describe(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> list[str]:
    """One line per leaf: path, shape and resolved spec (for logs and debugging)."""
    lines = []
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = _path_str(kp)
        lines.append(f"{path} {tuple(np.shape(x))} {spec_for(path, np.shape(x), mesh, rules)}")
    return lines
