"""OPD gradient estimators on one sequence (paper arXiv 2603.25562, §3.1, App. B). Small, pure, unbatched:
the caller vmaps. Notation: r_t = log π(y_t|c_t) − log q(y_t|c_t) (a cost), g_t = ∇ log π(y_t|c_t).

The objective is the sequence-level reverse KL J = KL(π‖q) = E_{y~π}[Σ_t r_t]; its score-function
gradient is ∇J = E[(Σ_t r_t)(Σ_t g_t)]. Statistics stated below are for one sequence per estimate;
"variance" is E‖ĝ − Eĝ‖² (Frobenius), orders are in the horizon T with |r_t| ≤ B_r, ‖g_t‖ ≤ B_g.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from opd.losses import full_reverse_kl, sampled_token_log_ratio, topk_reverse_kl


def _check_rank(name: str, x: Array, rank: int) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}")


def token_costs(student_logprobs: Float[Array, "*B"], teacher_logprobs: Float[Array, "*B"]) -> Float[Array, "*B"]:
    """r_t = log π(y_t|c_t) − log q(y_t|c_t), elementwise: the trainer's per-token reward
    `opd.losses.sampled_token_log_ratio` with its sign flipped (a cost), so the sandbox and the trainer share
    one definition. float64 inputs stay float64."""
    return -sampled_token_log_ratio(student_logprobs, teacher_logprobs)


def discounted_coefficients(r_T: Float[Array, " T"], gamma: float | Array) -> Float[Array, " T"]:
    """c_t = Σ_{t'≥t} γ^{t'−t} r_{t'}  (the per-step weight of g_t in Eq. 3); γ may be traced."""
    r_T = jnp.asarray(r_T)
    _check_rank("r_T", r_T, 1)
    horizon = r_T.shape[0]
    lag_TxT = jnp.arange(horizon)[None, :] - jnp.arange(horizon)[:, None]  # [t, t'] = t' − t
    gamma = jnp.asarray(gamma, dtype=r_T.dtype)
    weights_TxT = jnp.where(lag_TxT >= 0, gamma ** jnp.maximum(lag_TxT, 0), 0.0)  # 0**0 = 1
    return weights_TxT @ r_T


def full_return_coefficients(r_T: Float[Array, " T"]) -> Float[Array, " T"]:
    """c_t = Σ_{t'} r_{t'} = R for every t (Eq. 1)."""
    r_T = jnp.asarray(r_T)
    _check_rank("r_T", r_T, 1)
    return jnp.full_like(r_T, jnp.sum(r_T))


def discounted_estimator(r_T: Float[Array, " T"], g_TxD: Float[Array, "T ..."], gamma: float | Array) -> Array:
    """ĝ_γ = Σ_t (Σ_{t'≥t} γ^{t'−t} r_{t'}) g_t   (paper Eq. 3).

    γ = 1 (causal, return-to-go): unbiased for ∇KL(π‖q); the paper's worst-case bound is T⁴ B_r² B_g², but
      with tokens drawn from π itself the order is T³ (martingale bound, synthetic/bounds.py); T⁴ is reached
      off-policy (top-p / greedy / stale rollouts). γ = 0 (token level, Eq. 2): biased (it drops
      E[Σ_t Σ_{t'>t} r_{t'} g_t], App. B.1) with variance O(T²) (T² B_r² B_g²). 0 < γ < 1: biased, variance
      ≤ B_r² B_g² T² min(T, 1/(1−γ²)) on-policy (ours, not in the paper).
    """
    g = jnp.asarray(g_TxD)
    c_T = discounted_coefficients(r_T, gamma)
    return jnp.tensordot(c_T, g, axes=1)


def full_return_estimator(r_T: Float[Array, " T"], g_TxD: Float[Array, "T ..."]) -> Array:
    """ĝ_seq = (Σ_t r_t)(Σ_t g_t)   (paper Eq. 1): REINFORCE with the whole-sequence cost.

    Unbiased for ∇KL(π‖q). Variance O(T⁴) by the paper's bound T⁴ B_r² B_g²; on-policy Σ_t g_t is a
    martingale (E[g_t | c_t] = 0) and the tight order is O(T³): Var ≤ E[R²‖G‖²] ≤ T² B_r² · T B_g² (ours).
    Off-policy (tokens from a behaviour β ≠ π) E_β[g_t | c_t] ≠ 0 and T⁴ is reached.
    """
    g = jnp.asarray(g_TxD)
    return jnp.sum(r_T) * jnp.sum(g, axis=0)


def tabular_score(logits_V: Float[Array, " V"], token: Int[Array, ""]) -> Float[Array, " V"]:
    """Closed-form g_t for a tabular row: ∇_row log softmax(row)[y] = e_y − π. (Zero on every other row.)"""
    logits_V = jnp.asarray(logits_V)
    _check_rank("logits_V", logits_V, 1)
    return jax.nn.one_hot(token, logits_V.shape[0], dtype=logits_V.dtype) - jax.nn.softmax(logits_V)


def lsm_prefix_grad(
    student_logits_V: Float[Array, " V"], teacher_logits_V: Float[Array, " V"], k: int
) -> Float[Array, " V"]:
    """∇ of the teacher top-K LSM loss at one prefix, through `opd.losses.topk_reverse_kl` (Eq. 6–8).

    Deterministic given the prefix (no variance from y_t) but only prefix-level: summed over a rollout,
    Σ_t ∇L_LSM(c_t) ignores how θ changes the prefix distribution, so it is biased for ∇KL(π‖q) even at
    K = V, and additionally biased by the support truncation when K < V. Variance comes only from the
    prefixes: O(T) for a tabular model (one row per step), O(T²) at worst with shared parameters.
    """
    student_logits_V = jnp.asarray(student_logits_V)
    _check_rank("student_logits_V", student_logits_V, 1)
    logq_V = jax.nn.log_softmax(jnp.asarray(teacher_logits_V))
    top_logq_K, top_ids_K = jax.lax.top_k(logq_V, k)
    return jax.grad(lambda x: topk_reverse_kl(x, top_ids_K, top_logq_K))(student_logits_V)


def full_rkl_prefix_grad(
    student_logits_V: Float[Array, " V"], teacher_logits_V: Float[Array, " V"]
) -> Float[Array, " V"]:
    """∇ of the full-vocabulary per-prefix reverse KL (Eq. 4), through `opd.losses.full_reverse_kl`.

    The exact conditional mean of the token-level term: E[r_t g_t | c_t] = ∇ KL(π(·|c_t)‖q(·|c_t)). So it is
    the Rao-Blackwellized γ = 0 estimator: the same bias as γ = 0, with lower variance.
    """
    student_logits_V = jnp.asarray(student_logits_V)
    _check_rank("student_logits_V", student_logits_V, 1)
    return jax.grad(lambda x: full_reverse_kl(x, teacher_logits_V))(student_logits_V)
