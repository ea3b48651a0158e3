"""Compiled peak temporary memory of objective + gradient: chunked vs unchunked large-vocabulary objectives.

Paper scale (arXiv 2603.25562, Qwen2.5 student): N = 8,192 positions, V = 151,936, K = 32, hidden 896
(Qwen2.5-0.5B's width; the memory of the [N, V] logits does not depend on it). For each objective of the
registry (opd/objectives.py), run through `opd.chunked.chunked_map` as the trainer's update runs it, the
loss (token mean of the per-position objective) and its gradient with respect to the
hidden states and the LM head are jitted and *compiled only* (`lower().compile()`), and XLA's memory
analysis reports `temp_size_in_bytes` (peak scratch, excluding arguments and outputs). The unchunked
version at full size needs more memory than this machine has, so values are compared by executing both
at a reduced N (`--value-n`), said so in the output.

    python benchmarks/bench_chunked_memory.py            # last line: the LSM memory ratio
    python benchmarks/bench_chunked_memory.py --n 2048   # smaller, faster
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

from opd import chunked, losses, objectives

CFG = SimpleNamespace(clip_eps=0.2, dual_clip=3.0)  # the sampled-token objective's constants (verl defaults)


def make_loss(objective: str, chunk_size: int | None):
    """value_and_grad (hidden states, LM head) of the token mean of a registered objective, chunked or not."""
    fn = objectives.get(objective).fn

    def per_chunk(logits, tokens, old_lp, teacher_lp, ids, lq):
        return fn(logits, objectives.PositionInputs(tokens, old_lp, teacher_lp, ids, lq), CFG, None)

    def loss(h, w, ids, lq, tokens, mask):
        old_lp, teacher_lp = lq[:, 0] - 0.5, lq[:, 0]  # off-policy enough that the clip is not trivial
        values = chunked.chunked_map(per_chunk, h, w, tokens, old_lp, teacher_lp, ids, lq, chunk_size=chunk_size)
        return losses.aggregate(values, mask, "token_mean")

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def shapes(n: int, d: int, v: int, k: int, dtype):
    return (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n, k), jnp.int32),
        jax.ShapeDtypeStruct((n, k), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )


def inputs(n: int, d: int, v: int, k: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    ids = np.stack([rng.choice(v, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    lq = np.sort(rng.normal(size=(n, k)) - np.log(k) - 1.0, axis=-1)[:, ::-1].astype(np.float32)
    tokens = rng.integers(0, v, size=n, dtype=np.int32)
    mask = (rng.random(n) > 0.1).astype(np.float32)
    return h, w, jnp.asarray(ids), jnp.asarray(lq), jnp.asarray(tokens), jnp.asarray(mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--value-n", type=int, default=1024, help="positions for the executed value check")
    ap.add_argument("--value-chunk", type=int, default=128)
    ap.add_argument(
        "--objectives", default="sampled_token,topk_tail,lsm",
        help="comma list; the LAST one's ratio is the last line",
    )
    args = ap.parse_args()
    gib = 2**30
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"N={args.n} V={args.vocab} K={args.k} hidden={args.hidden} chunk={args.chunk}, float32")
    print(f"one [N, V] float32 array: {args.n * args.vocab * 4 / gib:.2f} GiB")
    ratios = {}
    for obj in args.objectives.split(","):
        mem = {}
        for name, cs in (("unchunked", None), ("chunked", args.chunk)):
            t0 = time.perf_counter()
            compiled = make_loss(obj, cs).lower(*shapes(args.n, args.hidden, args.vocab, args.k, jnp.float32)).compile()
            mem[name] = compiled.memory_analysis().temp_size_in_bytes
            print(f"  {obj:28s} {name:9s} temp {mem[name] / gib:8.3f} GiB  (compile {time.perf_counter() - t0:.1f} s)")
        # Executed value check at reduced N (the unchunked one at full N does not fit in this host's RAM).
        x = inputs(args.value_n, args.hidden, args.vocab, args.k, jnp.float32)
        (l0, g0), (l1, g1) = make_loss(obj, None)(*x), make_loss(obj, args.value_chunk)(*x)
        dv = float(abs(l1 - l0))
        dg = max(float(jnp.abs(a - b).max()) for a, b in zip(g1, g0))
        print(
            f"  {obj:28s} values at reduced N={args.value_n} (chunk {args.value_chunk}): "
            f"loss {float(l0):.6f}, |loss diff| {dv:.2e}, max |grad diff| {dg:.2e}"
        )
        ratios[obj] = mem["chunked"] / mem["unchunked"]
        print(f"  {obj:28s} chunked/unchunked temp memory ratio: {ratios[obj]:.4f} (1/{1 / ratios[obj]:.1f})")
    last = args.objectives.split(",")[-1]
    print(f"chunked/unchunked peak temp memory ({last}, objective+grad): {ratios[last]:.4f} = 1/{1 / ratios[last]:.1f}")


if __name__ == "__main__":
    main()
