"""Behaviour policies for the exact engine: the distribution the trainer's sampler actually draws from.

The trainer's rollouts are not drawn from π_θ itself: `opd.sampling.select_tokens` applies temperature,
top-k and an exact top-p nucleus, and PPO minibatches after the first are stale (drawn from an older θ).
`behaviour_table` turns a student logit table into the per-prefix probabilities of the transformed
sampler, in float64, by the same rule as `opd.sampling.select_tokens`:

  temperature 0     greedy: all mass on the first argmax (jnp.argmax's tie rule);
  x = logits / temperature;
  0 < top_k < V     keep the k largest x (ties: lower token id first, as jax.lax.top_k), then, if
                    top_p < 1, `opd.sampling.nucleus_keep` on those k: renormalize over the k and keep a
                    token while the strictly more likely kept tokens hold < top_p;
  else top_p < 1    `opd.sampling.nucleus_threshold_keep`: keep {i : π_i ≥ τ*} with
                    τ* = max{τ : Σ_{π_j ≥ τ} π_j ≥ top_p} (exact ties at τ* all kept);
  the draw is softmax(x) renormalized over the kept tokens.

The sampler computes in float32 and this table in float64, so a row whose cumulative mass lands within
float32 rounding of top_p can keep one token more or less; tests use rows away from that boundary.
The result is the `behaviour_probs` argument of `synthetic.exact.estimator_moments`.
"""

from __future__ import annotations

import numpy as np

from opd.sampling import SamplingConfig
from synthetic import tabular


def _softmax(x_RxV: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x_RxV)
    x = np.where(finite, x_RxV, -np.inf)
    z = x - np.max(x, axis=-1, keepdims=True)
    e = np.where(finite, np.exp(z), 0.0)
    return e / e.sum(-1, keepdims=True)


def _top_k_keep(x_RxV: np.ndarray, k: int) -> np.ndarray:
    """The k largest per row; ties broken towards the lower index (jax.lax.top_k)."""
    order = np.argsort(-x_RxV, axis=-1, kind="stable")[:, :k]
    keep = np.zeros(x_RxV.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return keep


def _sorted_nucleus_keep(x_RxV: np.ndarray, candidates_RxV: np.ndarray, top_p: float) -> np.ndarray:
    """`opd.sampling.nucleus_keep` on the candidates, in descending order (stable): renormalized over
    the candidates, keep a token while the mass strictly before it is < top_p."""
    probs = _softmax(np.where(candidates_RxV, x_RxV, -np.inf))
    order = np.argsort(-np.where(candidates_RxV, x_RxV, -np.inf), axis=-1, kind="stable")
    sorted_p = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p
    keep_sorted = (before < top_p) & np.take_along_axis(candidates_RxV, order, axis=-1)
    keep = np.zeros_like(candidates_RxV)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def _threshold_nucleus_keep(x_RxV: np.ndarray, top_p: float) -> np.ndarray:
    """`opd.sampling.nucleus_threshold_keep`: {i : π_i ≥ τ*}, the largest τ* holding mass ≥ top_p."""
    probs = _softmax(x_RxV)
    sorted_p = -np.sort(-probs, axis=-1)
    before = np.cumsum(sorted_p, axis=-1) - sorted_p
    n = np.sum(before < top_p, axis=-1)  # >= 1: the first token has nothing before it
    tau = np.take_along_axis(sorted_p, (n - 1)[:, None], axis=-1)
    return probs >= tau


def behaviour_table(student_logits, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> np.ndarray:
    """Per-prefix sampling distribution [R, V] (rows sum to 1, float64) of `opd.sampling.select_tokens`
    with this temperature / top-k / top-p applied to the student's logit table [R, V].

    Raises ValueError (the sampler's own one-line messages) for temperature < 0, top_p outside (0, 1],
    top_k not an integer >= 0, and for a table that is not [R, V] with R = (V^T − 1)/(V − 1).
    """
    SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k)
    tabular.validate_logits(student_logits)
    logits = np.asarray(student_logits, np.float64)
    vocab = logits.shape[-1]
    if temperature == 0:
        probs = np.zeros_like(logits)
        np.put_along_axis(probs, np.argmax(logits, axis=-1)[:, None], 1.0, axis=-1)
        return probs
    x = logits / temperature
    if 0 < top_k < vocab:
        keep = _top_k_keep(x, top_k)
        if top_p < 1.0:
            keep = _sorted_nucleus_keep(x, keep, top_p)
    elif top_p < 1.0:
        keep = _threshold_nucleus_keep(x, top_p)
    else:
        keep = np.ones(x.shape, bool)
    return _softmax(np.where(keep, x, -np.inf))


def stale_table(old_student_logits) -> np.ndarray:
    """Behaviour of a stale PPO minibatch: the softmax of an older student's logit table [R, V]."""
    tabular.validate_logits(old_student_logits)
    return _softmax(np.asarray(old_student_logits, np.float64))
