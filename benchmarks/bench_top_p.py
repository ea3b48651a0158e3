"""Cost of exact top-p per decode step: greedy vs top-p, one `select_tokens` call and one whole decode step.

Times (1) `select_tokens` alone on [B, V] logits (greedy, top-p, top-k + top-p) at the bench model's vocab
and at Qwen2's V = 151,936, and (2) `sample` per generated token (greedy vs top-p) on the tiny Qwen2-shaped
model of benchmarks/bench_sampler_vs_hf.py (random weights, EOS unreachable, so every call draws --new
tokens). `--impl DIR` imports `opd` from DIR instead (e.g. a copy of an older tree), for before/after
comparisons run back to back. One thread:

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python benchmarks/bench_top_p.py [--impl path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _median_ms(fn, repeats: int) -> float:
    fn()  # compile / warm
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="", help="directory to import `opd` from (default: this tree)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--big-vocab", type=int, default=151_936)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.impl:
        sys.path.insert(0, args.impl)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from opd import sampling
    from opd.model import ModelConfig, Transformer

    print(f"opd.sampling from {sampling.__file__}; jax {jax.__version__} {jax.default_backend()}")
    B = args.batch
    cfgs = {
        "greedy": sampling.SamplingConfig(temperature=0.0, max_new_tokens=args.new),
        "top-p": sampling.SamplingConfig(temperature=0.8, top_p=args.top_p, max_new_tokens=args.new),
        "top-k50+top-p": sampling.SamplingConfig(temperature=0.8, top_p=args.top_p, top_k=50,
                                                 max_new_tokens=args.new),
    }
    rng = np.random.default_rng(0)
    for V in (args.vocab, args.big_vocab):
        logits = jnp.asarray(rng.standard_t(3, (B, V)) * 2.0, jnp.float32)
        for name, cfg in cfgs.items():
            f = jax.jit(lambda x, k, cfg=cfg: sampling.select_tokens(x, k, cfg))
            ms = _median_ms(lambda f=f, x=logits: f(x, jax.random.key(0)).block_until_ready(), args.repeats)
            print(f"select_tokens B={B} V={V:>6} {name:>14}: {ms:8.3f} ms")

    mcfg = ModelConfig(vocab_size=args.vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, max_seq_len=args.prompt + args.new, family="qwen2",
                       attention_bias=True, rope_theta=1e6)
    model = Transformer(mcfg, rngs=nnx.Rngs(0))
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 200.0  # logits spread over several units
    eos = 1
    model.lm_head.kernel[...] = model.lm_head.kernel[...].at[:, eos].set(0.0)  # EOS (logit 0) ~never sampled
    prompt = jnp.asarray(rng.integers(2, args.vocab, (B, args.prompt)), jnp.int32)
    mask = jnp.ones_like(prompt)
    for name, cfg in list(cfgs.items())[:2]:
        def run(cfg=cfg):
            out = sampling.sample(model, prompt, mask, jax.random.key(1), cfg, eos_id=eos)
            out.tokens_BxL.block_until_ready()
            return int(out.response_len_B.min())
        ms = _median_ms(run, args.repeats)
        assert run() == args.new, "a row stopped early: per-step times would be off"
        print(f"sample B={B} V={args.vocab} new={args.new} {name:>7}: {ms:8.2f} ms/call, "
              f"{ms / args.new:6.3f} ms/decode step")


if __name__ == "__main__":
    main()
