"""Held-out evaluation, the same for every task: roll out with the task's own `rollout` (one turn or many)
and average its verifier.

Sampled pass@1 is the mean over `samples` draws per item at top-p 0.9, T = 1 (as the paper evaluates);
greedy is one decode per item. Batches have a fixed size (the last one is padded by repeating items, whose
scores are dropped) so the sampler compiles once per model and setting. Every outcome is kept per item and
sample, so tables can pair methods item by item.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

EVAL_TOP_P = 0.9  # paper.md §6: evaluation samples with top-p 0.9, temperature 1


def outcomes(model, task, items: list[Any], rng: jax.Array, *, greedy: bool, batch_size: int = 64,
             sample_fn=None) -> np.ndarray:
    """Verifier score of one rollout per item, in item order ([N] float)."""
    top_p, top_k = (1.0, 1) if greedy else (EVAL_TOP_P, 0)
    scores: list[float] = []
    n = len(items)
    for start in range(0, n, batch_size):
        chunk = items[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk)) if n > batch_size else chunk
        key = jax.random.fold_in(rng, start)
        rollouts = task.rollout(model, padded, key, temperature=1.0, top_p=top_p, top_k=top_k,
                                sample_fn=sample_fn)
        scores.extend(np.asarray(rollouts.score[:len(chunk)], np.float64).tolist())
    return np.asarray(scores)


def evaluate(model, task, items: list[Any], rng: jax.Array, *, samples: int = 1, batch_size: int = 64,
             prefix: str = "eval/", sample_fn=None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """({prefix+metric: sampled pass@1 (mean over `samples` per item), prefix+'greedy_'+metric: greedy},
    per-item rows [{'item', 'sample', 'correct'} ..., sample -1 = greedy])."""
    if samples < 1:
        raise ValueError(f"samples: expected an integer >= 1, got {samples}")
    keys = jax.random.split(rng, samples + 1)
    sampled = np.stack([outcomes(model, task, items, keys[s], greedy=False, batch_size=batch_size,
                                 sample_fn=sample_fn) for s in range(samples)])
    greedy = outcomes(model, task, items, keys[samples], greedy=True, batch_size=batch_size, sample_fn=sample_fn)
    per_item = [{"item": i, "sample": s, "correct": float(sampled[s, i])}
                for s in range(samples) for i in range(len(items))]
    per_item += [{"item": i, "sample": -1, "correct": float(greedy[i])} for i in range(len(items))]
    metric = task.metric
    return {f"{prefix}{metric}": float(sampled.mean()), f"{prefix}greedy_{metric}": float(greedy.mean())}, per_item
