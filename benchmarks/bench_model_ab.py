"""Before/after timings of the three model programs an OPD step runs, for A/B comparisons of the model and
sampler code: `sample` (prefill + decode loop, top-p), a teacher-sized forward pass (scoring), and the
student's forward + backward (the update's gradient), at the shapes of benchmarks/bench_vs_trl.py.

`--impl DIR` imports `opd` from DIR (e.g. `git archive HEAD opd | tar -x -C ../base`), so two trees can
be timed in alternating processes on a shared machine:

    for i in 1 2 3; do python benchmarks/bench_model_ab.py --impl ../base; python benchmarks/bench_model_ab.py; done

Prints one line per program (median ms over --repeats calls, compile excluded) and, for the sampler, the
number of instructions XLA runs per decode step (the while-loop body of the optimized HLO).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    """Median wall and median process CPU time (all threads) per call, in ms. On a shared machine the CPU
    time is the steadier of the two."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def while_body_instructions(hlo_text: str) -> int:
    """Instructions of the largest while-loop body in optimized HLO text (the decode step)."""
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo_text))
    best = 0
    for name in bodies:
        m = re.search(r"\n%?" + re.escape(name) + r" [^\n]*\{\n(.*?)\n\}", hlo_text, re.S)
        if m:
            lines = [ln for ln in m.group(1).splitlines() if "=" in ln and " parameter(" not in ln
                     and " get-tuple-element(" not in ln and " constant(" not in ln and " tuple(" not in ln]
            best = max(best, len(lines))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impl", default="", help="directory to import `opd` from (default: this tree)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", default="sample,forward,grad")
    ap.add_argument("--flat", action="store_true", help="initialization-scale logits (flat rows, wide nuclei)")
    args = ap.parse_args()
    if args.impl:
        sys.path.insert(0, args.impl)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from opd import sampling
    from opd.model import ModelConfig, Transformer, forward_logprobs

    B, P, N, V = args.batch, args.prompt, args.new, args.vocab
    L = P + N

    def build(layers, hidden, seed):
        cfg = ModelConfig(vocab_size=V, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                          intermediate_size=2 * hidden, max_seq_len=L, family="qwen2", attention_bias=True,
                          rope_theta=1e6)
        m = Transformer(cfg, rngs=nnx.Rngs(seed))
        if not args.flat:
            m.lm_head.kernel[...] = m.lm_head.kernel[...] * 100.0  # logits spread over several units
        m.lm_head.kernel[...] = m.lm_head.kernel[...].at[:, 1].set(0.0)  # EOS (id 1) ~never in the nucleus
        return m

    student, teacher = build(2, 128, 0), build(4, 256, 1)
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, V, (B, P)).astype(np.int32)
    mask = np.ones((B, P), np.int32)
    for b in range(B):
        mask[b, : b % (P // 2)] = 0
    prompt = jnp.asarray(prompt * mask)
    mask = jnp.asarray(mask)
    scfg = sampling.SamplingConfig(temperature=1.0, top_p=args.top_p, max_new_tokens=N)
    roll = sampling.sample(student, prompt, mask, jax.random.key(0), scfg, eos_id=1)
    tokens, amask = roll.tokens_BxL, roll.attention_mask_BxL
    where = args.impl or "this tree"
    only = set(args.only.split(","))

    if "sample" in only:
        def run_sample():
            out = sampling.sample(student, prompt, mask, jax.random.key(1), scfg, eos_id=1)
            out.tokens_BxL.block_until_ready()
        ms, cpu = _median_ms(run_sample, args.repeats)
        graphdef, params = nnx.split(student)
        hlo = sampling._sample_jit.lower(graphdef, params, prompt, mask, jax.random.key(1),
                                         jnp.full((8,), 1, jnp.int32), cfg=scfg).compile().as_text()
        print(f"sample  B={B} P={P} N={N} {'flat' if args.flat else 'peaked'}: {ms:8.2f} ms wall, {cpu:8.2f} ms "
              f"CPU ({B * N / ms * 1e3:,.0f} tok/s); "
              f"{while_body_instructions(hlo)} instructions per decode step  [{where}]")

    if "forward" in only:
        score = nnx.jit(lambda m, t, a: m(t, attention_mask_BxT=a))
        ms, cpu = _median_ms(lambda: score(teacher, tokens, amask).block_until_ready(), args.repeats)
        print(f"forward teacher 4x256 [B={B}, L={L}]: {ms:8.2f} ms wall, {cpu:8.2f} ms CPU  [{where}]")

    if "grad" in only:
        @nnx.jit
        def grad(m, t, a):
            return nnx.grad(lambda m: -jnp.mean(forward_logprobs(m, t, a)))(m)

        ms, cpu = _median_ms(lambda: jax.block_until_ready(grad(student, tokens, amask)), args.repeats)
        print(f"grad    student 2x128 [B={B}, L={L}]: {ms:8.2f} ms wall, {cpu:8.2f} ms CPU  [{where}]")


if __name__ == "__main__":
    main()
