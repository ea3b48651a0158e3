"""Per-position on-policy distillation objectives, shared by the theory sandbox and the trainer.

Every function here is pure `jax.numpy`, computes in at least float32 whatever the input dtype (KL
arithmetic in bf16 goes negative and wrong, cf. ms-swift #10156; float64 inputs stay float64 so the
sandbox's exact enumeration stays exact), keeps all leading axes, and returns one value per position.
Choosing masks and aggregation is the caller's job (`aggregate`, `mask_first_occurrences`).

Notation (paper arXiv 2603.25562, §2-3): student π_θ, teacher q, context c_t = (x, y_<t).
Shapes live in the names: `..._xV` has the vocabulary last, `..._xK` the teacher's top-K support last.

Conventions for impossible tokens: a term with π(v) = 0 contributes 0 (lim p log p = 0), so -inf student
logits (padded vocabulary) are safe; a token with π(v) > 0 and q(v) = 0 gives +inf, which is the true
divergence. Gradients stay finite wherever the value is finite ("double where").

Bad arguments raise `ValueError` naming the argument while the function is traced (shapes, K, modes,
constants). Token-id ranges can only be checked on concrete arrays: they are checked eagerly; under
`jax.jit` the caller owns them (the trainer's ids come from `lax.top_k` and are in range by construction).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

AGGREGATION_MODES = ("token_mean", "sequence_mean")

# ---------------------------------------------------------------------------------------------------------
# Validation helpers: one clear line naming the argument, raised at trace time.
# ---------------------------------------------------------------------------------------------------------


def _f32(x: ArrayLike) -> Array:
    """Promote to at least float32: bf16/f16/ints become float32, float64 stays float64."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _require_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")


def _require_topk_shapes(student_logits: Array, topk_ids: Array, teacher_topk: Array) -> None:
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have a vocabulary axis [..., V], got a scalar")
    _require_same_shape("topk_ids", topk_ids, "teacher_topk_logprobs", teacher_topk)
    if topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"topk_ids leading axes {topk_ids.shape[:-1]} must equal student_logits leading axes "
            f"{student_logits.shape[:-1]}"
        )
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"topk_ids: K must satisfy 1 <= K <= V={vocab}, got K={k}")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        raise ValueError(f"topk_ids must be an integer array, got dtype {topk_ids.dtype}")
    _require_ids_in_range("topk_ids", topk_ids, vocab)


def _require_ids_in_range(name: str, ids: Array, vocab: int) -> None:
    if isinstance(ids, jax.core.Tracer):
        return  # values unknown while tracing; see the module docstring
    ids_np = np.asarray(ids)
    if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= vocab):
        raise ValueError(
            f"{name} must lie in [0, {vocab}), got values in [{ids_np.min()}, {ids_np.max()}]"
        )


# ---------------------------------------------------------------------------------------------------------
# Safe entropy-style sums
# ---------------------------------------------------------------------------------------------------------


def _kl_terms(logp: Array, logq: Array) -> Array:
    """Elementwise p (log p − log q) with 0·(anything) = 0 and finite gradients where p = 0."""
    p = jnp.exp(logp)
    alive = p > 0
    safe_logp = jnp.where(alive, logp, 0.0)
    safe_logq = jnp.where(alive, logq, 0.0)
    return jnp.where(alive, p * (safe_logp - safe_logq), 0.0)


def _kl(logp: Array, logq: Array) -> Array:
    """KL(p ‖ q) along the last axis from log-probabilities."""
    return jnp.sum(_kl_terms(logp, logq), axis=-1)


def _renormalize(logp_xK: Array) -> Array:
    """log of p restricted to the support and renormalized: log p − log Σ_S p (Eq. 7)."""
    return logp_xK - jax.nn.logsumexp(logp_xK, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# Objectives on the teacher's top-K support
# ---------------------------------------------------------------------------------------------------------


def topk_reverse_kl(
    student_logits: Float[ArrayLike, "*B V"],
    topk_ids: Int[ArrayLike, "*B K"],
    teacher_topk_logprobs: Float[ArrayLike, "*B K"],
    *,
    renormalize: bool = True,
) -> Float[Array, "*B"]:
    """Teacher top-K local support matching (LSM): reverse KL on the teacher's top-K support S.

    renormalize=True (paper Eq. 6-8): both distributions renormalized over S,
        L(c) = Σ_{v∈S} π̂(v) (log π̂(v) − log q̂(v)),  π̂ = π / Σ_S π,  q̂ = q / Σ_S q.
    π̂ is a softmax over the K gathered student logits, so the student's full-vocabulary normalizer never
    enters and gradients reach only the K support logits (the paper's "separate softmax"). It is an exact,
    deterministic per-prefix divergence: no sampling variance at this position, but a *biased* surrogate
    of the full reverse KL (Eq. 4) whenever S misses student mass. With K = V it equals `full_reverse_kl`.

    renormalize=False (the paper's no-renormalization ablation, Fig. 6a):
        L(c) = Σ_{v∈S} π(v) (log π(v) − log q(v))  with full-vocabulary probabilities.
    A partial sum of a KL is not a divergence: it can be negative and its gradient keeps a "+1" term
    (Σ_S ∇π ≠ 0), which is the collapse mechanism the paper reports.

    Args:
        student_logits: [..., V] student logits at each position.
        topk_ids: [..., K] int, the teacher's top-K token ids at each position.
        teacher_topk_logprobs: [..., K] the teacher's *full-vocabulary* log-probabilities at those ids.
    Returns:
        [...] float32, one value per position.
    """
    student_logits, topk_ids = jnp.asarray(student_logits), jnp.asarray(topk_ids)
    teacher_topk_logprobs = jnp.asarray(teacher_topk_logprobs)
    _require_topk_shapes(student_logits, topk_ids, teacher_topk_logprobs)
    logits_xV = _f32(student_logits)
    teacher_xK = _f32(teacher_topk_logprobs)
    if renormalize:
        student_xK = jnp.take_along_axis(logits_xV, topk_ids, axis=-1)
        return _kl(_renormalize(student_xK), _renormalize(teacher_xK))
    logp_xV = jax.nn.log_softmax(logits_xV, axis=-1)
    return _kl(jnp.take_along_axis(logp_xV, topk_ids, axis=-1), teacher_xK)


def topk_forward_kl(
    student_logits: Float[ArrayLike, "*B V"],
    topk_ids: Int[ArrayLike, "*B K"],
    teacher_topk_logprobs: Float[ArrayLike, "*B K"],
) -> Float[Array, "*B"]:
    """Forward KL truncated to the teacher's top-K, unnormalized (verl's `forward_kl_topk`):

        L(c) = Σ_{v∈S} q(v) (log q(v) − log π(v))  with full-vocabulary probabilities.

    Mode-covering counterpart of LSM. The truncation makes it a biased surrogate of KL(q ‖ π) that is
    exact when S carries all teacher mass; it is deterministic given the prefix (no sampling variance).
    """
    student_logits, topk_ids = jnp.asarray(student_logits), jnp.asarray(topk_ids)
    teacher_topk_logprobs = jnp.asarray(teacher_topk_logprobs)
    _require_topk_shapes(student_logits, topk_ids, teacher_topk_logprobs)
    logp_xV = jax.nn.log_softmax(_f32(student_logits), axis=-1)
    student_xK = jnp.take_along_axis(logp_xV, topk_ids, axis=-1)
    return _kl(_f32(teacher_topk_logprobs), student_xK)


def _log_tail(logp_xK: Array) -> Array:
    """log(max(1 − Σ_K p, floor)), floor = 16 ulp of the compute dtype.

    A tail mass below rounding error is noise (the top-K of a full support sums to 1 ± ulp), and
    comparing such noise against an exact 0 on the other side would give a spurious +inf.
    """
    floor = 16 * jnp.finfo(logp_xK.dtype).eps
    log_mass = jnp.minimum(jax.nn.logsumexp(logp_xK, axis=-1), 0.0)
    return jnp.log(jnp.maximum(-jnp.expm1(log_mass), floor))


def topk_reverse_kl_with_tail(
    student_logits: Float[ArrayLike, "*B V"],
    topk_ids: Int[ArrayLike, "*B K"],
    teacher_topk_logprobs: Float[ArrayLike, "*B K"],
) -> Float[Array, "*B"]:
    """Reverse KL over the K support tokens plus one "tail" bucket holding the rest (TRL's default top-K):

        L(c) = Σ_{v∈S} π(v) log(π(v)/q(v)) + π_tail log(π_tail/q_tail),  x_tail = 1 − Σ_{v∈S} x(v).

    Tail masses are floored at 16 ulp of the compute dtype (see `_log_tail`).
    A proper divergence between two (K+1)-bin distributions, so it is ≥ 0 and 0 iff they agree on the
    bins; it lower-bounds the full reverse KL (data processing) and is therefore biased low, without the
    renormalized version's blindness to how much mass the student puts outside S.
    """
    student_logits, topk_ids = jnp.asarray(student_logits), jnp.asarray(topk_ids)
    teacher_topk_logprobs = jnp.asarray(teacher_topk_logprobs)
    _require_topk_shapes(student_logits, topk_ids, teacher_topk_logprobs)
    logp_xV = jax.nn.log_softmax(_f32(student_logits), axis=-1)
    student_xK = jnp.take_along_axis(logp_xV, topk_ids, axis=-1)
    teacher_xK = _f32(teacher_topk_logprobs)
    student_bins = jnp.concatenate([student_xK, _log_tail(student_xK)[..., None]], axis=-1)
    teacher_bins = jnp.concatenate([teacher_xK, _log_tail(teacher_xK)[..., None]], axis=-1)
    return _kl(student_bins, teacher_bins)


# ---------------------------------------------------------------------------------------------------------
# Full-vocabulary objectives
# ---------------------------------------------------------------------------------------------------------


def full_reverse_kl(
    student_logits: Float[ArrayLike, "*B V"], teacher_logits: Float[ArrayLike, "*B V"]
) -> Float[Array, "*B"]:
    """Full-vocabulary reverse KL, paper Eq. 4:  L(c) = Σ_v π(v) (log π(v) − log q(v)).

    The exact per-prefix divergence the sampled-token reward estimates with one sample (Eq. 5); it has
    no sampling variance at the position and no truncation bias, at the cost of the full [.., V] teacher.
    """
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _require_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    logp = jax.nn.log_softmax(_f32(student_logits), axis=-1)
    logq = jax.nn.log_softmax(_f32(teacher_logits), axis=-1)
    return _kl(logp, logq)


def generalized_jsd(
    student_logits: Float[ArrayLike, "*B V"],
    teacher_logits: Float[ArrayLike, "*B V"],
    beta: float = 0.5,
) -> Float[Array, "*B"]:
    """Generalized Jensen-Shannon divergence JSD(β) over the full vocabulary (GKD, Agarwal et al. 2024):

        M = β q + (1 − β) π,   JSD_β(c) = β KL(q ‖ M) + (1 − β) KL(π ‖ M),   β ∈ (0, 1).

    Symmetric at β = 0.5 and bounded by log 2 there. Small β weights the teacher's side (forward-KL-like
    gradients), large β the student's (reverse-KL-like). At the endpoints it degenerates to 0, so they
    are refused: use `full_reverse_kl` or a forward KL instead. Exact per position (no sampling variance).
    """
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _require_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if not 0.0 < float(beta) < 1.0:
        raise ValueError(f"beta must lie in the open interval (0, 1), got {beta}")
    logp = jax.nn.log_softmax(_f32(student_logits), axis=-1)
    logq = jax.nn.log_softmax(_f32(teacher_logits), axis=-1)
    log_m = jnp.logaddexp(logq + jnp.log(beta), logp + jnp.log1p(-beta))
    return beta * _kl(logq, log_m) + (1.0 - beta) * _kl(logp, log_m)


# ---------------------------------------------------------------------------------------------------------
# Sampled-token OPD (the paper's baseline)
# ---------------------------------------------------------------------------------------------------------


def sampled_token_log_ratio(
    student_logprobs: Float[ArrayLike, "*B"], teacher_logprobs: Float[ArrayLike, "*B"]
) -> Float[Array, "*B"]:
    """Sampled-token OPD reward  −r_t = log q(y_t | c_t) − log π(y_t | c_t)  (paper Eq. 2 and 5).

    Used as the per-token advantage of the baseline. As an estimate of the negative per-prefix reverse
    KL it is unbiased but single-sample (high variance); as a gradient coefficient it is the γ = 0
    (token-level) member of Eq. 3, biased against the sequence-level objective but O(T²) in variance.
    """
    student_logprobs, teacher_logprobs = jnp.asarray(student_logprobs), jnp.asarray(teacher_logprobs)
    _require_same_shape("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs)
    return _f32(teacher_logprobs) - _f32(student_logprobs)


def ppo_clip_loss(
    logprobs: Float[ArrayLike, "*B"],
    old_logprobs: Float[ArrayLike, "*B"],
    advantages: Float[ArrayLike, "*B"],
    *,
    clip_eps: float = 0.2,
    dual_clip: float | None = 3.0,
) -> Float[Array, "*B"]:
    """PPO clipped surrogate with dual clip, per position (verl defaults, used by the paper's baseline).

        ρ = exp(logprobs − old_logprobs)
        L = max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))
        L = min(L, −A c)      where A < 0   (dual clip; c = `dual_clip`, None disables it)

    Gradients flow through `logprobs` only; `old_logprobs` and `advantages` are treated as constants.
    """
    logprobs, old_logprobs = jnp.asarray(logprobs), jnp.asarray(old_logprobs)
    advantages = jnp.asarray(advantages)
    _require_same_shape("logprobs", logprobs, "old_logprobs", old_logprobs)
    _require_same_shape("logprobs", logprobs, "advantages", advantages)
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    adv = jax.lax.stop_gradient(_f32(advantages))
    ratio = jnp.exp(_f32(logprobs) - jax.lax.stop_gradient(_f32(old_logprobs)))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return loss


# ---------------------------------------------------------------------------------------------------------
# Masks and aggregation
# ---------------------------------------------------------------------------------------------------------


def mask_first_occurrences(
    tokens: Int[ArrayLike, "*B T"], special_ids: Sequence[int], mask: ArrayLike
) -> Array:
    """Zero `mask` at the first occurrence, along the last axis, of each id in `special_ids`.

    The paper's special-token masking (its code masks the first `<`, `think` and `<|im_end|>` of each
    response). Pass response tokens (or prompt positions replaced by a negative pad id) so that the first
    occurrence is the first one the student generated. Returns an array of `mask`'s shape and dtype.
    """
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    _require_same_shape("tokens", tokens, "mask", mask)
    if tokens.ndim < 1:
        raise ValueError("tokens must have a sequence axis [..., T], got a scalar")
    ids = [int(i) for i in special_ids]
    if not ids:
        return mask
    hit_xTxS = tokens[..., None] == jnp.asarray(ids, dtype=tokens.dtype)
    # First occurrence: a hit with no earlier hit of the same id (exclusive cumulative count == 0).
    earlier_hits = jnp.cumsum(hit_xTxS, axis=-2) - hit_xTxS
    first_xT = jnp.any(hit_xTxS & (earlier_hits == 0), axis=-1)
    return jnp.where(first_xT, jnp.zeros_like(mask), mask)


def aggregate(values: Float[ArrayLike, "*B T"], mask: ArrayLike, mode: str) -> Float[Array, ""]:
    """Reduce per-position values to a scalar under a 0/1 mask.

    token_mean:    Σ values·mask / Σ mask over everything (the paper's Eq. 8, 1/Σ_i |o_i|).
    sequence_mean: token mean within each sequence (last axis), then the mean over sequences that have
                   at least one unmasked token (what the paper's code effectively does, paper.md §5).
    Masked positions never contribute, even when they hold inf or NaN; an all-masked input gives 0.
    A float mask acts as weights (Σ values·mask / Σ mask).
    """
    values, mask = jnp.asarray(values), jnp.asarray(mask)
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}")
    _require_same_shape("values", values, "mask", mask)
    if values.ndim < 1:
        raise ValueError("values must have a sequence axis [..., T], got a scalar")
    m = _f32(mask)
    v = jnp.where(m > 0, _f32(values), 0.0) * m  # where first: 0 * inf would be NaN
    if mode == "token_mean":
        return v.sum() / jnp.maximum(m.sum(), 1.0)
    tokens_per_seq = m.sum(axis=-1)
    per_seq = v.sum(axis=-1) / jnp.maximum(tokens_per_seq, 1.0)
    has_tokens = (tokens_per_seq > 0).astype(m.dtype)
    return (per_seq * has_tokens).sum() / jnp.maximum(has_tokens.sum(), 1.0)


OBJECTIVES = (
    "topk_reverse_kl",
    "topk_forward_kl",
    "topk_reverse_kl_with_tail",
    "full_reverse_kl",
    "generalized_jsd",
    "sampled_token_log_ratio",
    "ppo_clip_loss",
)
