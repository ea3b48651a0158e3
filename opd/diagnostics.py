"""Per-step OPD diagnostics: small pure functions of rollout / teacher arrays, each reduced under a mask.

All inputs follow docs/interfaces.md (target-aligned [B, L] arrays, `mask_BxL` 1 on the tokens that
count, normally the response mask). Every function returns a float32 scalar; an all-masked input gives
0 rather than NaN, so a degenerate batch never poisons a metrics row. Values are computed in float32.

These are the stability diagnostics of paper.md §7 ("Stability diagnostics") plus the coverage numbers a
reviewer asked for (how often the sampled token lies outside the teacher's top-K support).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int


def _f32(x: ArrayLike) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def masked_mean(values_BxL: Float[ArrayLike, "B L"], mask_BxL: ArrayLike) -> Float[Array, ""]:
    """Σ values·mask / Σ mask over all tokens (a token mean); masked values may be inf/NaN; 0 if empty."""
    m = _f32(mask_BxL)
    v = jnp.where(m > 0, _f32(values_BxL), 0.0)
    return (v * m).sum() / jnp.maximum(m.sum(), 1.0)


def logprob_gap(
    teacher_sampled_BxL: Float[ArrayLike, "B L"], student_sampled_BxL: Float[ArrayLike, "B L"], mask_BxL: ArrayLike
) -> Float[Array, ""]:
    """Mean over sampled tokens of log q(y_t|c_t) − log π(y_t|c_t) (paper Fig. A6's teacher−student gap).

    Its negation is the token-mean sampled-token estimate of the reverse KL; 0 when the student matches
    the teacher on its own rollouts."""
    return masked_mean(_f32(teacher_sampled_BxL) - _f32(student_sampled_BxL), mask_BxL)


def neg_reward_frac(
    teacher_sampled_BxL: Float[ArrayLike, "B L"], student_sampled_BxL: Float[ArrayLike, "B L"], mask_BxL: ArrayLike
) -> Float[Array, ""]:
    """Fraction of sampled tokens whose sampled-token reward log q − log π is negative (failure mode 1:
    the teacher is *less* confident than the student on the student's own choice)."""
    neg = (_f32(teacher_sampled_BxL) - _f32(student_sampled_BxL) < 0).astype(jnp.float32)
    return masked_mean(neg, mask_BxL)


def not_in_topk_frac(
    tokens_BxL: Int[ArrayLike, "B L"], topk_ids_BxLxK: Int[ArrayLike, "B L K"], mask_BxL: ArrayLike
) -> Float[Array, ""]:
    """Fraction of sampled tokens y_t that are not among the teacher's top-K ids at their position."""
    hit_BxL = jnp.any(jnp.asarray(topk_ids_BxLxK) == jnp.asarray(tokens_BxL)[..., None], axis=-1)
    return masked_mean(1.0 - hit_BxL.astype(jnp.float32), mask_BxL)


def teacher_topk_mass(teacher_topk_logprobs_BxLxK: Float[ArrayLike, "B L K"], mask_BxL: ArrayLike) -> Float[Array, ""]:
    """Mean over positions of Σ_{v∈S} q(v|c_t): how much teacher probability the top-K support holds."""
    mass_BxL = jnp.exp(jax.nn.logsumexp(_f32(teacher_topk_logprobs_BxLxK), axis=-1))
    return masked_mean(mass_BxL, mask_BxL)


def student_topk_mass(
    student_logits_BxLxV: Float[ArrayLike, "B L V"], topk_ids_BxLxK: Int[ArrayLike, "B L K"], mask_BxL: ArrayLike
) -> Float[Array, ""]:
    """Mean over positions of Σ_{v∈S} π(v|c_t): the student's mass on the *teacher's* top-K support
    (what renormalized LSM cannot see: 1 − this is the mass LSM leaves unconstrained)."""
    logp_BxLxV = jax.nn.log_softmax(_f32(student_logits_BxLxV), axis=-1)
    at_ids = jnp.take_along_axis(logp_BxLxV, jnp.asarray(topk_ids_BxLxK), axis=-1)
    return masked_mean(jnp.exp(jax.nn.logsumexp(at_ids, axis=-1)), mask_BxL)


def entropy(student_logits_BxLxV: Float[ArrayLike, "B L V"], mask_BxL: ArrayLike) -> Float[Array, ""]:
    """Mean full-vocabulary entropy −Σ_v π log π of the student at the masked positions (nats)."""
    logp = jax.nn.log_softmax(_f32(student_logits_BxLxV), axis=-1)
    p = jnp.exp(logp)
    ent_BxL = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    return masked_mean(ent_BxL, mask_BxL)


def response_stats(response_len_B: ArrayLike, truncated_B: ArrayLike) -> dict[str, Array]:
    """Mean response length (tokens) and the fraction of responses cut at the length limit."""
    return {
        "response_len": jnp.mean(_f32(response_len_B)),
        "truncated_frac": jnp.mean(_f32(truncated_B)),
    }


def rollout_diagnostics(
    tokens_BxL: Int[ArrayLike, "B L"],
    mask_BxL: ArrayLike,
    student_sampled_BxL: Float[ArrayLike, "B L"],
    teacher_sampled_BxL: Float[ArrayLike, "B L"],
    topk_ids_BxLxK: Int[ArrayLike, "B L K"],
    teacher_topk_logprobs_BxLxK: Float[ArrayLike, "B L K"],
) -> dict[str, Array]:
    """The diagnostics that need only the rollout and the teacher payload (no student forward pass)."""
    return {
        "logprob_gap": logprob_gap(teacher_sampled_BxL, student_sampled_BxL, mask_BxL),
        "neg_reward_frac": neg_reward_frac(teacher_sampled_BxL, student_sampled_BxL, mask_BxL),
        "not_in_topk_frac": not_in_topk_frac(tokens_BxL, topk_ids_BxLxK, mask_BxL),
        "teacher_topk_mass": teacher_topk_mass(teacher_topk_logprobs_BxLxK, mask_BxL),
    }


STEP_METRICS = (
    "loss", "grad_norm", "entropy", "response_len", "truncated_frac", "logprob_gap", "neg_reward_frac",
    "not_in_topk_frac", "teacher_topk_mass", "student_topk_mass", "clip_frac",
)
"""Keys every OPD metrics row carries (plus time/sample_s, time/score_s, time/update_s)."""
