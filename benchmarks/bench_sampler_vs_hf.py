"""Our sampler (`opd.sampling.sample`, one jitted while_loop over the KV cache) vs Hugging Face `generate`
(PyTorch, CPU) on the same tiny Qwen2 weights, measured side by side in one run.

The weights are built with `transformers` (random, at a scale that gives peaked logits), saved as
safetensors and loaded with `opd.model.hf.load_pretrained`, so both sides run the very same model. Same
batch, left-padded prompts, number of new tokens, temperature and top-p. EOS is made unreachable (its LM-head
column is zero while the other logits spread over several units, so it never enters the top-p nucleus) so
that both sides generate exactly `--new` tokens per row; the script checks this and says so.

Warm-up (our compile, HF's first call) is excluded from the timings and reported separately; then the two
are timed alternately, `--repeats` times each, and the medians compared, for each batch size in `--batch`.
Both sides use every core (torch.set_num_threads(os.cpu_count()); XLA's CPU client does by default).

Each side's compute-floor fraction: the matmul FLOPs the generation needs (projections, MLP, LM head, and
attention over the real context only), timed at the machine's jitted float32 matmul rate measured here,
divided by the median wall time. The last line is the ratio per batch size.

    python benchmarks/bench_sampler_vs_hf.py                       # the shapes of bench_vs_trl.py, batch 16, 32
    python benchmarks/bench_sampler_vs_hf.py --batch 8 --hidden 64 --vocab 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from opd.model import hf
from opd.sampling import SamplingConfig, sample


def build_weights(args) -> tuple[transformers.PreTrainedModel, str]:
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, intermediate_size=args.hidden * 2,
        max_position_embeddings=args.prompt + args.new, rope_theta=1e6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=args.eos, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.5 * torch.randn_like(p))
        model.lm_head.weight[args.eos] = 0.0
    path = tempfile.mkdtemp(prefix="bench_sampler_")
    model.save_pretrained(path)
    return model, path


def generation_flops(args, B: int) -> float:
    """Matmul FLOPs of prefilling B prompts of --prompt tokens and decoding --new tokens, attention over the
    real (causal) context only."""
    D, L, V, H, K = args.hidden, args.layers, args.vocab, args.heads, args.kv_heads
    E, F, P, N = D // H, 2 * D, args.prompt, args.new
    weights = L * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * F) + D * V
    context = P * (P + 1) / 2 + sum(P + t for t in range(1, N))  # keys each query attends to
    return 2.0 * B * (P + N - 1) * weights + 4.0 * B * L * H * E * context


def matmul_peak_flops(n: int = 1024, repeats: int = 10) -> float:
    """The best jitted float32 matmul rate of this machine (FLOP/s), [n, n] x [n, n]."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="16,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eos", type=int, default=1)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    batches = [int(b) for b in args.batch.split(",")]

    ref, path = build_weights(args)
    ours = hf.load_pretrained(path)
    print(f"device: jax {jax.default_backend()} ({jax.devices()[0].device_kind}), torch CPU threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"Qwen2 vocab={args.vocab} hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads}; "
          f"prompt={args.prompt} new={args.new} temperature={args.temperature} top_p={args.top_p}")
    peak = matmul_peak_flops()
    print(f"compute floor: jitted float32 matmul peak {peak / 1e9:.0f} GFLOP/s (1024^3, best of 10)")
    ratios = {B: run_batch(args, B, ref, ours, peak) for B in batches}
    print("speedup ours vs HF generate (median wall time per call, same work): "
          + ", ".join(f"batch {B} {r:.1f}x" for B, r in ratios.items()))


def run_batch(args, B: int, ref, ours, peak: float) -> float:
    P, N = args.prompt, args.new
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, args.vocab, (B, P)).astype(np.int32)
    mask = np.ones((B, P), np.int32)
    for b in range(B):  # left padding of varying length (the last column is real)
        mask[b, : b % (P // 2)] = 0
    prompt[mask == 0] = 0
    scfg = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=N)
    prompt_j, mask_j = jnp.asarray(prompt), jnp.asarray(mask)
    prompt_t, mask_t = torch.tensor(prompt, dtype=torch.long), torch.tensor(mask)

    def run_ours(seed: int):
        out = sample(ours, prompt_j, mask_j, jax.random.key(seed), scfg, eos_id=args.eos)
        jax.block_until_ready(out.tokens_BxL)
        return np.asarray(out.response_len_B)

    def run_hf(seed: int):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = ref.generate(prompt_t, attention_mask=mask_t, do_sample=True, temperature=args.temperature,
                               top_p=args.top_p, top_k=0, max_new_tokens=N, min_new_tokens=0,
                               eos_token_id=args.eos, pad_token_id=0)
        gen = out[:, P:].numpy()
        return np.array([int(np.argmax(g == args.eos)) + 1 if (g == args.eos).any() else gen.shape[1] for g in gen])

    t0 = time.perf_counter()
    lens_ours = run_ours(0)
    warm_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    lens_hf = run_hf(0)
    warm_hf = time.perf_counter() - t0
    print(f"batch {B}: warm-up (excluded): ours {warm_ours:.2f} s (includes jit compile), HF {warm_hf:.2f} s")

    t_ours, t_hf = [], []
    for r in range(1, args.repeats + 1):
        t0 = time.perf_counter()
        lens_ours = run_ours(r)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lens_hf = run_hf(r)
        t_hf.append(time.perf_counter() - t0)
    full = bool((lens_ours == N).all() and (lens_hf == N).all())
    print(f"batch {B}: generated tokens per row {'all equal to --new' if full else 'NOT all equal to --new'} "
          f"(ours min {lens_ours.min()}, HF min {lens_hf.min()})")
    m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
    floor = generation_flops(args, B) / peak
    print(f"batch {B}: ours median {m_ours * 1e3:.1f} ms/call ({B * N / m_ours:,.0f} tokens/s, "
          f"{100 * floor / m_ours:.1f}% of the compute floor {floor * 1e3:.2f} ms); runs "
          + ", ".join(f"{t * 1e3:.1f}" for t in t_ours))
    print(f"batch {B}: HF   median {m_hf * 1e3:.1f} ms/call ({B * N / m_hf:,.0f} tokens/s, "
          f"{100 * floor / m_hf:.1f}% of the compute floor); runs " + ", ".join(f"{t * 1e3:.1f}" for t in t_hf))
    return m_hf / m_ours


if __name__ == "__main__":
    main()
