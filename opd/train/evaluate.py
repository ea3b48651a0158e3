"""Held-out pass@1: sample one response per problem (top-p 0.9, T = 1, as the paper evaluates) or decode
greedily, and score it with the task's exact verifier.

Batches have a fixed size (the last one is padded by repeating problems, whose scores are dropped) so
the sampler compiles once per model and setting.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

EVAL_TOP_P = 0.9  # paper.md §6: evaluation samples with top-p 0.9, temperature 1


def _sampling():
    from opd import sampling

    return sampling


def encode_prompts(task, prompts: list[str]):
    from opd.tasks import encode_prompts as enc

    return enc(task.tokenizer, prompts, task.max_prompt_len)


def generate(model, task, prompts: list[str], rng: jax.Array, cfg, *, batch_size: int = 64,
             sample_fn=None) -> list[str]:
    """Decoded responses (text after the prompt, up to EOS) for `prompts`, in order."""
    sample_fn = sample_fn or _sampling().sample
    tok = task.tokenizer
    texts: list[str] = []
    n = len(prompts)
    for start in range(0, n, batch_size):
        chunk = prompts[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk)) if n > batch_size else chunk
        prompt_BxP, mask_BxP = encode_prompts(task, padded)
        rng, key = jax.random.split(rng)
        out = sample_fn(model, prompt_BxP, mask_BxP, key, cfg, eos_id=tok.eos_id)
        width = np.asarray(prompt_BxP).shape[1]
        resp = np.asarray(out.tokens_BxL)[:, width:]
        rmask = np.asarray(out.response_mask_BxL)[:, width:]
        for row, m in zip(resp[: len(chunk)], rmask[: len(chunk)]):
            # Ids past the tokenizer (a checkpoint's padded embedding rows) decode to nothing, as HF's do.
            texts.append(tok.decode([int(t) for t, keep in zip(row, m) if keep and t < tok.vocab_size]))
    return texts


def accuracy(model, task, problems: list[Any], rng: jax.Array, *, greedy: bool, max_new_tokens: int,
             top_p: float = EVAL_TOP_P, batch_size: int = 64, sample_fn=None) -> float:
    """Mean verifier score of one response per problem (pass@1)."""
    sampling = _sampling()
    if greedy:
        cfg = sampling.SamplingConfig(temperature=1.0, top_p=1.0, top_k=1, max_new_tokens=max_new_tokens)
    else:
        cfg = sampling.SamplingConfig(temperature=1.0, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens)
    texts = generate(model, task, [p.prompt for p in problems], rng, cfg, batch_size=batch_size,
                     sample_fn=sample_fn)
    return float(np.mean([task.score(p, t) for p, t in zip(problems, texts)]))


def evaluate(model, task, problems, rng: jax.Array, *, max_new_tokens: int, batch_size: int = 64,
             prefix: str = "eval/") -> dict[str, float]:
    """{prefix+'accuracy': sampled pass@1, prefix+'greedy_accuracy': greedy pass@1}."""
    k1, k2 = jax.random.split(rng)
    return {
        f"{prefix}accuracy": accuracy(model, task, problems, k1, greedy=False, max_new_tokens=max_new_tokens,
                                      batch_size=batch_size),
        f"{prefix}greedy_accuracy": accuracy(model, task, problems, k2, greedy=True,
                                             max_new_tokens=max_new_tokens, batch_size=batch_size),
    }
