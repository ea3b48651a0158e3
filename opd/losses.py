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
    _require_no_nan("student_logits", student_logits)
    _require_no_nan("teacher_topk_logprobs", teacher_topk)


def _require_no_nan(name: str, x: Array) -> None:
    """Eager calls only (values are unknown while tracing): NaN input is a caller's bug, refused in one line.
    -inf is allowed (masked or padded vocabulary entries)."""
    if isinstance(x, jax.core.Tracer):
        return
    if np.isnan(np.asarray(x)).any():
        raise ValueError(f"{name}: expected no NaN values (-inf is allowed for masked entries), got "
                         f"{int(np.isnan(np.asarray(x)).sum())} NaN of {np.asarray(x).size}")


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
    of the full reverse KL (Eq. 4) whenever S misses student mass. With K = V it equals `full_reverse_kl`;
    with K = 1 both renormalized distributions are 1 on the one token, so the loss and its gradient are 0.

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
    _require_no_nan("student_logits", student_logits)
    _require_no_nan("teacher_logits", teacher_logits)
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
# Support variants, baselines and controls (issue 13): each a per-position function of what the trainer
# has at a position — student logits [..., V], the sampled token y_t, the sampler's log π_old(y_t), the
# teacher's log q(y_t), the teacher's top-K ids and log-probs, and (full-vocabulary variants only) the
# teacher's logits.
# ---------------------------------------------------------------------------------------------------------

SAMPLED_REWARDS = ("log_ratio", "box_cox")


def _require_sampled(student_logits: Array, sampled_ids: Array, *named: tuple[str, Array]) -> None:
    """sampled_ids int [...] matching the logits' leading axes; each named array of the same shape."""
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have a vocabulary axis [..., V], got a scalar")
    if sampled_ids.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"sampled_ids shape {sampled_ids.shape} must equal student_logits leading axes "
            f"{student_logits.shape[:-1]}"
        )
    if not jnp.issubdtype(sampled_ids.dtype, jnp.integer):
        raise ValueError(f"sampled_ids must be an integer array, got dtype {sampled_ids.dtype}")
    _require_ids_in_range("sampled_ids", sampled_ids, student_logits.shape[-1])
    for name, arr in named:
        _require_same_shape("sampled_ids", sampled_ids, name, arr)


def _gather(x_xV: Array, ids: Array) -> Array:
    """x[..., ids] for ids of shape [...] (one id per position)."""
    return jnp.take_along_axis(x_xV, ids[..., None], axis=-1)[..., 0]


def _in_support(support_ids_xK: Array, sampled_ids: Array) -> Array:
    return jnp.any(support_ids_xK == sampled_ids[..., None], axis=-1)


def student_topk_support(
    student_logits: Float[ArrayLike, "*B V"], teacher_logits: Float[ArrayLike, "*B V"], k: int
) -> tuple[Int[Array, "*B K"], Float[Array, "*B K"]]:
    """The student's top-k ids (of the detached logits) and the teacher's full-vocabulary log-probs there.

    The support of the paper's V2 and V4 variants (App. G.3). It needs the teacher's log-probs at ids the
    *student* chooses, so the teacher must supply its full logits (or score arbitrary student ids): a
    teacher that ships only its own top-K cannot serve these variants.
    """
    student_logits, teacher_logits = jnp.asarray(student_logits), jnp.asarray(teacher_logits)
    _require_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.ndim < 1:
        raise ValueError("student_logits must have a vocabulary axis [..., V], got a scalar")
    vocab = student_logits.shape[-1]
    if int(k) != k or not 1 <= int(k) <= vocab:
        raise ValueError(f"k must be an integer with 1 <= k <= V={vocab}, got {k}")
    _, ids_xK = jax.lax.top_k(jax.lax.stop_gradient(_f32(student_logits)), int(k))
    logq_xV = jax.nn.log_softmax(_f32(teacher_logits), axis=-1)
    return ids_xK, jnp.take_along_axis(logq_xV, ids_xK, axis=-1)


def union_sampled_reverse_kl(
    student_logits: Float[ArrayLike, "*B V"],
    support_ids: Int[ArrayLike, "*B K"],
    teacher_support_logprobs: Float[ArrayLike, "*B K"],
    sampled_ids: Int[ArrayLike, "*B"],
    teacher_sampled_logprobs: Float[ArrayLike, "*B"],
) -> Float[Array, "*B"]:
    """Reverse KL renormalized over a top-K support joined with the sampled token (paper App. G.3, V2/V3):

        S' = S ∪ {y_t},   L(c) = Σ_{v∈S'} π̂(v) (log π̂(v) − log q̂(v)),   x̂ = x / Σ_{S'} x   (x = π, q).

    V3: S = the teacher's top-K (`topk_ids`, `topk_logprobs` of the payload; log q(y_t) is the teacher's
    sampled-token log-prob). V2: S = the student's top-K with the teacher's log-probs there
    (`student_topk_support`). When y_t ∈ S the support is S itself (the extra slot is masked out).

    Source: arXiv 2603.25562 v2, App. G.3 (support variants). Deterministic given the prefix *and* y_t, so
    unlike LSM it depends on the sample; like LSM it is a biased surrogate of the full reverse KL (Eq. 4)
    whenever S' misses student mass, and its gradient reaches only the logits in S'.
    """
    student_logits, support_ids = jnp.asarray(student_logits), jnp.asarray(support_ids)
    teacher_support_logprobs = jnp.asarray(teacher_support_logprobs)
    sampled_ids, teacher_sampled_logprobs = jnp.asarray(sampled_ids), jnp.asarray(teacher_sampled_logprobs)
    _require_topk_shapes(student_logits, support_ids, teacher_support_logprobs)
    _require_sampled(student_logits, sampled_ids, ("teacher_sampled_logprobs", teacher_sampled_logprobs))
    logits_xV = _f32(student_logits)
    extra_valid = ~_in_support(support_ids, sampled_ids)
    ids_xS = jnp.concatenate([support_ids, sampled_ids[..., None]], axis=-1)
    valid_xS = jnp.concatenate([jnp.ones_like(support_ids, bool), extra_valid[..., None]], axis=-1)
    student_xS = jnp.where(valid_xS, jnp.take_along_axis(logits_xV, ids_xS, axis=-1), -jnp.inf)
    teacher_xS = jnp.concatenate(
        [_f32(teacher_support_logprobs), _f32(teacher_sampled_logprobs)[..., None]], axis=-1)
    teacher_xS = jnp.where(valid_xS, teacher_xS, -jnp.inf)
    return _kl(_renormalize(student_xS), _renormalize(teacher_xS))


def stop_gradient_topk_reverse_kl(
    student_logits: Float[ArrayLike, "*B V"],
    topk_ids: Int[ArrayLike, "*B K"],
    teacher_topk_logprobs: Float[ArrayLike, "*B K"],
) -> Float[Array, "*B"]:
    """Stop-gradient top-K reverse KL (the fix of arXiv 2605.11182 for biased top-K gradients):

        L(c) = Σ_{v∈S} π(v) · sg(log π(v) − log q(v)),   ∇L = Σ_{v∈S} (log π(v) − log q(v)) ∇π(v).

    Its value is the no-renormalization partial sum (`topk_reverse_kl(..., renormalize=False)`); its
    gradient drops the Σ_{v∈S} π(v)∇log π(v) = ∇π(S) term ("+1") that the plain partial sum keeps and
    that does not vanish when S ≠ V. What remains is exactly the full-vocabulary gradient
    ∇KL = Σ_v (log π(v) − log q(v)) ∇π(v) restricted to S, so the estimator is deterministic given the
    prefix and biased only by the tokens outside S (−Σ_{v∉S} (log π − log q)∇π), 0 at K = V.

    The paper's text was not retrievable here; this is the formula as the issue and paper.md §8 describe
    it (detaching the log-ratio on the unnormalized support removes the surviving "+1" term).
    """
    student_logits, topk_ids = jnp.asarray(student_logits), jnp.asarray(topk_ids)
    teacher_topk_logprobs = jnp.asarray(teacher_topk_logprobs)
    _require_topk_shapes(student_logits, topk_ids, teacher_topk_logprobs)
    logp_xV = jax.nn.log_softmax(_f32(student_logits), axis=-1)
    logp_xK = jnp.take_along_axis(logp_xV, topk_ids, axis=-1)
    logq_xK = _f32(teacher_topk_logprobs)
    p_xK = jnp.exp(logp_xK)
    alive = p_xK > 0
    cost_xK = jax.lax.stop_gradient(jnp.where(alive, logp_xK, 0.0) - jnp.where(alive, logq_xK, 0.0))
    return jnp.sum(jnp.where(alive, p_xK * cost_xK, 0.0), axis=-1)


def ema_pg_loss(
    student_logits: Float[ArrayLike, "*B V"],
    support_ids: Int[ArrayLike, "*B K"],
    teacher_support_logprobs: Float[ArrayLike, "*B K"],
    sampled_ids: Int[ArrayLike, "*B"],
    old_logprobs: Float[ArrayLike, "*B"],
    teacher_sampled_logprobs: Float[ArrayLike, "*B"],
    *,
    is_clip: float | None = None,
) -> Float[Array, "*B"]:
    """The paper's EMA-PG support variants V4/V5 (arXiv 2603.25562 v2, App. G.3): head + tail,

        ℓ_head = Σ_{v∈S} π(v) log(π(v)/q(v))                      (full-vocabulary probabilities, no renorm)
        ℓ_tail = s · 1[y_t ∉ S] · ρ · sg(log π(y_t) − log q(y_t)),  ρ = π(y_t)/sg(π(y_t)),
        s = sg(π(y_t)/π_old(y_t)), clipped above at `is_clip` when given (None: unclipped).

    V4: S = the student's top-K (`student_topk_support`); V5: S = the teacher's top-K. The tail is a
    REINFORCE term for the tokens outside S, so on-policy (s = 1)
        E_y ∇ℓ = Σ_{v∈S} (log π − log q)∇π + ∇π(S) + Σ_{v∉S} (log π − log q)∇π = ∇KL(π‖q) + ∇π(S):
    the head's "+1" term ∇π(S) = Σ_{v∈S} ∇π(v) survives, so the estimator is *biased* unless S = V (then
    ∇π(V) = 0 and the tail never fires) — our derivation, checked exactly in synthetic/support_study.py.
    Variance: only from the tail, i.e. from samples outside S.
    """
    student_logits = jnp.asarray(student_logits)
    sampled_ids, old_logprobs = jnp.asarray(sampled_ids), jnp.asarray(old_logprobs)
    teacher_sampled_logprobs = jnp.asarray(teacher_sampled_logprobs)
    support_ids = jnp.asarray(support_ids)
    _require_sampled(student_logits, sampled_ids, ("old_logprobs", old_logprobs),
                     ("teacher_sampled_logprobs", teacher_sampled_logprobs))
    if is_clip is not None and not float(is_clip) > 0:
        raise ValueError(f"is_clip must be > 0 (or None to disable), got {is_clip}")
    head = topk_reverse_kl(student_logits, support_ids, teacher_support_logprobs, renormalize=False)
    logp_y = _gather(jax.nn.log_softmax(_f32(student_logits), axis=-1), sampled_ids)
    outside = ~_in_support(support_ids, sampled_ids)
    s = jax.lax.stop_gradient(jnp.exp(logp_y - _f32(old_logprobs)))
    if is_clip is not None:
        s = jnp.minimum(s, float(is_clip))
    rho = jnp.exp(logp_y - jax.lax.stop_gradient(logp_y))
    cost = jax.lax.stop_gradient(jnp.where(outside, logp_y - _f32(teacher_sampled_logprobs), 0.0))
    return head + jnp.where(outside, s * rho * cost, 0.0)


def box_cox_reward(
    student_logprobs: Float[ArrayLike, "*B"], teacher_logprobs: Float[ArrayLike, "*B"], alpha: float
) -> Float[Array, "*B"]:
    """PowerOPD's bounded reward (arXiv 2606.17199): the Box–Cox transform BC_α(p) = (p^α − 1)/α applied
    to both sampled-token probabilities,

        R_α(y) = BC_α(q(y)) − BC_α(π(y)) = (q(y)^α − π(y)^α) / α  ∈ [−1/α, 1/α],   α > 0,

    sign-consistent with the log ratio log q − log π, which is its α → 0 limit. The authors' released code
    (EIT-NLP/PowerOPD, `sampled_power_diff`) uses q^α − π^α, i.e. α·R_α: the same reward up to a constant
    factor (a learning-rate rescaling). As a gradient coefficient it is *biased* for ∇KL(π‖q) at any α > 0
    (it no longer is the per-token cost), in exchange for a bounded, lower-variance signal.
    """
    student_logprobs, teacher_logprobs = jnp.asarray(student_logprobs), jnp.asarray(teacher_logprobs)
    _require_same_shape("student_logprobs", student_logprobs, "teacher_logprobs", teacher_logprobs)
    if not (np.isfinite(alpha) and float(alpha) > 0):
        raise ValueError(f"alpha must be a finite number > 0 (alpha -> 0 is reward='log_ratio'), got {alpha}")
    a = float(alpha)
    # expm1 keeps (q^α − π^α)/α accurate for small α, where both powers are close to 1.
    return (jnp.expm1(a * _f32(teacher_logprobs)) - jnp.expm1(a * _f32(student_logprobs))) / a


def sampled_token_advantage(
    student_logprobs: Float[ArrayLike, "*B"],
    teacher_logprobs: Float[ArrayLike, "*B"],
    *,
    reward: str = "log_ratio",
    alpha: float | None = None,
    kl_baseline: Float[ArrayLike, "*B"] | None = None,
) -> Float[Array, "*B"]:
    """Detached per-token advantage of sampled-token OPD, A(y) = sg(R(y) − b(c)), for `ppo_clip_loss`.

    reward="log_ratio":  R = log q(y) − log π(y) (`sampled_token_log_ratio`, paper Eq. 2/5).
    reward="box_cox":    R = PowerOPD's bounded reward (`box_cox_reward`, `alpha` required).
    kl_baseline:         vOPD (arXiv 2605.07865): the value of the per-token reward is V(c) = −KL(π‖q)(c),
                         and b = V is subtracted, A = R + KL. Pass the per-position KL: the full-vocabulary
                         `full_reverse_kl(logits, teacher_logits)`, or its top-k approximation, the partial
                         sum `topk_reverse_kl(logits, ids, q_ids, renormalize=False)` over a top-k support.
                         None: no baseline (b = 0).
    Statistics: the baseline depends only on the prefix, so E_y[b ∇log π(y)] = 0 and the gradient's mean is
    unchanged (log_ratio stays unbiased for the per-token ∇KL, i.e. the γ = 0 estimator of Eq. 3, whichever
    KL approximation is used). The exact KL is the value baseline; it is not the variance-optimal one for a
    vector-valued score (that weights the reward by ‖∇log π(y)‖²), so it lowers the variance only usually,
    and a poor top-k approximation can raise it above no baseline at all (synthetic/support_study.py gives
    the exact numbers). `student_logprobs` is the sampler's log π_old(y).
    """
    if reward not in SAMPLED_REWARDS:
        raise ValueError(f"reward must be one of {SAMPLED_REWARDS}, got {reward!r}")
    if reward == "box_cox":
        if alpha is None:
            raise ValueError("alpha is required for reward='box_cox' (a finite number > 0)")
        advantage = box_cox_reward(student_logprobs, teacher_logprobs, alpha)
    else:
        if alpha is not None:
            raise ValueError(f"alpha applies only to reward='box_cox', got alpha={alpha} with {reward!r}")
        advantage = sampled_token_log_ratio(student_logprobs, teacher_logprobs)
    if kl_baseline is not None:
        kl_baseline = jnp.asarray(kl_baseline)
        _require_same_shape("student_logprobs", jnp.asarray(student_logprobs), "kl_baseline", kl_baseline)
        advantage = advantage + _f32(kl_baseline)
    return jax.lax.stop_gradient(advantage)


def constant_advantage(reference: ArrayLike, value: float = -1.0) -> Float[Array, "*B"]:
    """The constant negative advantage control ("Does OPD really distill?", arXiv 2608.31046): a fixed
    A = `value` < 0 at every position, in place of the teacher's log ratio, shaped like `reference`.

    The paper's text was not retrievable here; this follows the issue's description (a fixed negative
    advantage). Fed to `ppo_clip_loss`, its on-policy gradient −A∇log π(y) has mean exactly 0 at every
    position (E_y ∇log π(y) = 0): it carries no teacher information, so it is biased for ∇KL(π‖q) (relative
    bias 1) and its whole effect is noise that pushes sampled tokens down — the control that says how much
    of a gain is the teacher's at all.
    """
    if not (np.isfinite(value) and float(value) < 0):
        raise ValueError(f"value must be a finite number < 0 (a negative constant advantage), got {value}")
    reference = jnp.asarray(reference)
    return jnp.full(reference.shape, float(value), _f32(reference).dtype)


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
    ids_S = jnp.asarray(ids, dtype=tokens.dtype).reshape((1,) * tokens.ndim + (len(ids),))
    hit_xTxS = tokens[..., None] == ids_S
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
    "union_sampled_reverse_kl",
    "stop_gradient_topk_reverse_kl",
    "ema_pg_loss",
    "box_cox_reward",
    "sampled_token_advantage",
    "constant_advantage",
)
