"""Exact moments of OPD gradient estimators by enumerating all V^T sequences (float64, jitted, chunked).

`estimator_moments(student_logits, teacher_logits, gamma)` is the public API of design.md. For a tabular
policy (synthetic.tabular) each step's score g_t = ∇_logits log π(y_t|c_t) is nonzero on one row only
(e_{y_t} − π(·|c_t) on the row of c_t), so an estimator of the form Σ_t u_t(y) — u_t = c_t(y)(e_{y_t} − π)
for the score-function family, u_t = h(c_t) for per-prefix objectives — is a sum of T single-row vectors.

Mean: Σ_y p(y) Σ_t u_t, a scatter-add of [chunk, T, V] terms into the [R, V] table (pass 1).
Variance: Σ_y p(y) ‖ĝ(y) − m‖² (pass 2). The T rows a sequence touches are distinct, so
    ‖ĝ − m‖² = ‖m‖² − Σ_t ‖m_{ρ_t}‖² + Σ_t ‖u_t − m_{ρ_t}‖²
is evaluated exactly per sequence without materializing [V^T, R, V]. With a tied parameterization
(`tie`: prefix row -> parameter row, logits = shared[tie]) the per-sequence gradient is formed densely in
the small parameter space instead. Both passes are `lax.scan`s over sequence chunks, so memory stays
O(chunk · T · V + R · V) for V^T up to 10^6.

The gradient of the sequence-level KL is computed independently by backward dynamic programming over
prefix lengths (KL-to-go), not from the estimators.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from synthetic import tabular
from synthetic.estimators import (
    discounted_coefficients,
    full_return_coefficients,
    full_rkl_prefix_grad,
    lsm_prefix_grad,
    token_costs,
)

DEFAULT_CHUNK = 8192
ESTIMATORS = ("discounted", "full_return", "lsm", "full_rkl")


class Moments(NamedTuple):
    """Exact statistics of one estimator (one sequence per estimate), float64."""

    mean: jax.Array  # E ĝ, same shape as the logits (or [P, V] for a tied model)
    variance: jax.Array  # Σ_y p(y) ‖ĝ(y) − E ĝ‖², Frobenius
    grad: jax.Array  # exact ∇ KL(π‖q) of the sequence-level reverse KL
    bias: jax.Array  # ‖mean − grad‖
    kl: jax.Array  # KL(π‖q) over whole sequences
    b_r: jax.Array  # max |r_t| over the support
    b_g: jax.Array  # max ‖g_t‖ over the support


# ---------------------------------------------------------------------------------------------------------
# Prefix probabilities, KL-to-go and the exact gradient (backward DP, independent of the estimators)
# ---------------------------------------------------------------------------------------------------------


def prefix_probabilities(probs_RxV, vocab: int, horizon: int):
    """P(ρ) [R] of reaching each prefix when tokens are drawn from the per-prefix table probs_RxV."""
    offsets = tabular.prefix_offsets(vocab, horizon)
    # FORWARD: P(child ρv) = P(ρ) p(v|ρ)
    probs = [jnp.ones((1,), probs_RxV.dtype)]
    for t in range(horizon - 1):
        block = probs_RxV[offsets[t] : offsets[t + 1]]
        probs.append((probs[-1][:, None] * block).reshape(-1))
    return probs


def kl_dp(logp_RxV, logq_RxV, vocab: int, horizon: int):
    """(KL(π‖q) over sequences, ∇_logits KL [R, V], prefix probabilities P(ρ) [R]); traceable under jit.

    Backward dynamic programming over prefix lengths (KL-to-go), independent of the estimators."""
    offsets = tabular.prefix_offsets(vocab, horizon)
    pi_RxV = jnp.exp(logp_RxV)
    r_RxV = jnp.where(pi_RxV > 0, token_costs(logp_RxV, logq_RxV), 0.0)
    probs = prefix_probabilities(pi_RxV, vocab, horizon)
    # BACKWARD: A(ρ, v) = r(ρ, v) + W(ρv),  W(ρ) = Σ_v π(v|ρ) A(ρ, v),  ∇_ρ = P(ρ) π (A − W)
    w_next = None
    grads = [None] * horizon
    for t in range(horizon - 1, -1, -1):
        sl = slice(offsets[t], offsets[t + 1])
        a_xV = r_RxV[sl] + (0.0 if w_next is None else w_next.reshape(-1, vocab))
        w = jnp.sum(pi_RxV[sl] * a_xV, axis=-1)
        grads[t] = probs[t][:, None] * pi_RxV[sl] * (a_xV - w[:, None])
        w_next = w
    return w_next[0], jnp.concatenate(grads, axis=0), jnp.concatenate(probs)


def sequence_kl_and_grad(student_logits, teacher_logits):
    """Exact sequence-level KL(π‖q) and its gradient w.r.t. the student logit table (float64)."""
    vocab, horizon = tabular.validate_logits(student_logits, teacher_logits)
    with jax.enable_x64(True):
        s = jnp.asarray(student_logits, jnp.float64)
        q = jnp.asarray(teacher_logits, jnp.float64)
        kl, grad, _ = kl_dp(jax.nn.log_softmax(s, -1), jax.nn.log_softmax(q, -1), vocab, horizon)
        return float(kl), np.asarray(grad, np.float64)


# ---------------------------------------------------------------------------------------------------------
# The enumeration engine
# ---------------------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=("vocab", "horizon", "kind", "k", "num_params", "chunk", "importance_weights"),
)
def moments_traced(student, teacher, gamma, tie=None, behaviour=None, *, vocab, horizon, kind="discounted", k=0,
                   num_params=None, chunk, importance_weights=False):
    """The enumeration engine on float64 arrays, traceable (callers inside jit/vmap, e.g.
    synthetic.sgd_study, use it directly under jax.enable_x64). No validation: the public entry points
    `estimator_moments` / `prefix_estimator_moments` check their arguments first. `behaviour`: per-prefix
    sampling probabilities [R, V] (None: the student itself)."""
    logp_RxV = jax.nn.log_softmax(student, axis=-1)
    logq_RxV = jax.nn.log_softmax(teacher, axis=-1)
    pi_RxV = jnp.exp(logp_RxV)
    kl, grad_RxV, _ = kl_dp(logp_RxV, logq_RxV, vocab, horizon)
    # Tokens are drawn from the behaviour β; with importance weights each estimate is scaled by π(y)/β(y).
    logb_RxV = logp_RxV if behaviour is None else jnp.log(behaviour)
    beta_RxV = pi_RxV if behaviour is None else behaviour
    prefix_prob_R = jnp.concatenate(prefix_probabilities(beta_RxV, vocab, horizon))
    reweight = importance_weights and behaviour is not None
    if kind == "lsm":
        h_RxV = jax.vmap(lambda s, q: lsm_prefix_grad(s, q, k))(student, teacher)
    elif kind == "full_rkl":
        h_RxV = jax.vmap(full_rkl_prefix_grad)(student, teacher)

    n_total = vocab**horizon
    starts = jnp.arange(0, n_total, chunk)

    score_kind = kind in ("discounted", "full_return")
    # Tabular score-function estimators take a scalar path whose cost per sequence is O(T), not O(T·V):
    # u_t = c_t (e_{y_t} − π_ρ) is fixed by the scalar c_t, and every norm or inner product with it is a
    # gather from per-row tables (‖e_y − π‖² = 1 − 2π_y + ‖π‖², ⟨e_y − π, m⟩ = m_y − ⟨π, m⟩).
    scalar_path = score_kind and tie is None

    def chunk_base(start):
        n_C = start + jnp.arange(chunk)
        valid_C = n_C < n_total
        n_C = jnp.minimum(n_C, n_total - 1)
        y_CxT = tabular.sequence_tokens(n_C, vocab, horizon)
        rows_CxT = tabular.sequence_rows(n_C, vocab, horizon)
        lp_CxT = logp_RxV[rows_CxT, y_CxT]
        logb_C = jnp.sum(logb_RxV[rows_CxT, y_CxT], axis=-1)
        p_C = jnp.where(valid_C, jnp.exp(logb_C), 0.0)
        # π(y)/β(y) on β's support (0 elsewhere, never inf·0)
        w_C = jnp.where(p_C > 0, jnp.exp(jnp.sum(lp_CxT, axis=-1) - jnp.where(p_C > 0, logb_C, 0.0)), 0.0)
        c_CxT = None
        if score_kind:
            r_CxT = token_costs(lp_CxT, logq_RxV[rows_CxT, y_CxT])
            if kind == "discounted":
                c_CxT = jax.vmap(discounted_coefficients, (0, None))(r_CxT, gamma)
            else:
                c_CxT = jax.vmap(full_return_coefficients)(r_CxT)
            if reweight:
                c_CxT = w_C[:, None] * c_CxT
        return p_C, rows_CxT, y_CxT, c_CxT, w_C

    def chunk_terms(start):
        p_C, rows_CxT, y_CxT, c_CxT, w_C = chunk_base(start)
        if score_kind:
            score_CxTxV = jax.nn.one_hot(y_CxT, vocab, dtype=pi_RxV.dtype) - pi_RxV[rows_CxT]
            u_CxTxV = c_CxT[..., None] * score_CxTxV
        else:
            u_CxTxV = h_RxV[rows_CxT]
            if reweight:
                u_CxTxV = w_C[:, None, None] * u_CxTxV
        return p_C, rows_CxT, u_CxTxV

    target = (lambda rows: rows) if tie is None else (lambda rows: tie[rows])
    size = student.shape[0] if tie is None else num_params

    # PASS 1: the mean, a probability-weighted scatter-add
    if scalar_path:
        def mean_body(acc, start):
            onehot_acc_RxV, row_acc_R = acc
            p_C, rows_CxT, y_CxT, c_CxT, _ = chunk_base(start)
            w_CxT = p_C[:, None] * c_CxT
            return (onehot_acc_RxV.at[rows_CxT, y_CxT].add(w_CxT), row_acc_R.at[rows_CxT].add(w_CxT)), None

        zeros_R = jnp.zeros((size,), student.dtype)
        (onehot_acc_RxV, row_acc_R), _ = jax.lax.scan(mean_body, (jnp.zeros_like(student), zeros_R), starts)
        mean_xV = onehot_acc_RxV - row_acc_R[:, None] * pi_RxV
    else:
        def mean_body(acc_xV, start):
            p_C, rows_CxT, u_CxTxV = chunk_terms(start)
            return acc_xV.at[target(rows_CxT)].add(p_C[:, None, None] * u_CxTxV), None

        mean_xV, _ = jax.lax.scan(mean_body, jnp.zeros((size, vocab), student.dtype), starts)
    mean_sq = jnp.sum(mean_xV**2)

    # PASS 2: the centred second moment, exactly per sequence:
    #   ‖ĝ − m‖² = ‖m‖² − Σ_t ‖m_{ρ_t}‖² + Σ_t ‖u_t − m_{ρ_t}‖²   (the T rows of a sequence are distinct)
    pi_sq_R = jnp.sum(pi_RxV**2, axis=-1)
    pi_m_R = jnp.sum(pi_RxV * mean_xV, axis=-1) if tie is None else None
    m_sq_R = jnp.sum(mean_xV**2, axis=-1)

    def var_body(acc, start):
        if scalar_path:
            p_C, rows_CxT, y_CxT, c_CxT, _ = chunk_base(start)
            score_sq = 1.0 - 2.0 * pi_RxV[rows_CxT, y_CxT] + pi_sq_R[rows_CxT]
            score_dot_m = mean_xV[rows_CxT, y_CxT] - pi_m_R[rows_CxT]
            dev_sq_CxT = c_CxT**2 * score_sq - 2.0 * c_CxT * score_dot_m + m_sq_R[rows_CxT]
            dev_C = mean_sq - jnp.sum(m_sq_R[rows_CxT], axis=1) + jnp.sum(dev_sq_CxT, axis=1)
        elif tie is None:
            p_C, rows_CxT, u_CxTxV = chunk_terms(start)
            m_CxTxV = mean_xV[rows_CxT]
            dev_C = (
                mean_sq
                - jnp.sum(m_CxTxV**2, axis=(1, 2))
                + jnp.sum((u_CxTxV - m_CxTxV) ** 2, axis=(1, 2))
            )
        else:
            p_C, rows_CxT, u_CxTxV = chunk_terms(start)
            onehot_CxTxP = jax.nn.one_hot(tie[rows_CxT], num_params, dtype=u_CxTxV.dtype)
            g_CxPxV = jnp.einsum("ctp,ctv->cpv", onehot_CxTxP, u_CxTxV)
            dev_C = jnp.sum((g_CxPxV - mean_xV) ** 2, axis=(1, 2))
        return acc + jnp.sum(p_C * dev_C), None

    variance, _ = jax.lax.scan(var_body, jnp.zeros((), student.dtype), starts)

    grad_xV = grad_RxV if tie is None else jax.ops.segment_sum(grad_RxV, tie, num_segments=num_params)
    reachable_RxV = (prefix_prob_R[:, None] > 0) & (beta_RxV > 0)
    b_r = jnp.max(jnp.where(reachable_RxV, jnp.abs(token_costs(logp_RxV, logq_RxV)), 0.0))
    # ‖e_y − π‖² = 1 − 2π_y + ‖π‖²
    score_sq_RxV = 1.0 - 2.0 * pi_RxV + jnp.sum(pi_RxV**2, axis=-1, keepdims=True)
    b_g = jnp.sqrt(jnp.max(jnp.where(reachable_RxV, score_sq_RxV, 0.0)))
    bias = jnp.sqrt(jnp.sum((mean_xV - grad_xV) ** 2))
    return Moments(mean_xV, variance, grad_xV, bias, kl, b_r, b_g)


def _validate_tie(tie, num_rows: int, num_params: int | None) -> tuple[np.ndarray, int]:
    tie = np.asarray(tie)
    if tie.shape != (num_rows,) or not np.issubdtype(tie.dtype, np.integer):
        raise ValueError(f"tie must be an integer array of shape ({num_rows},), got {tie.dtype} {tie.shape}")
    num_params = int(tie.max()) + 1 if num_params is None else int(num_params)
    if tie.min() < 0 or tie.max() >= num_params:
        raise ValueError(f"tie values must lie in [0, {num_params}), got [{tie.min()}, {tie.max()}]")
    return tie, num_params


def _validate_behaviour(behaviour_probs, student_logits, importance_weights: bool) -> np.ndarray:
    """Checks of `behaviour_probs` (before any computation); returns it as float64."""
    shape = tuple(np.shape(student_logits))
    beta = np.asarray(behaviour_probs, np.float64)
    if beta.shape != shape:
        raise ValueError(f"behaviour_probs must have the logits' shape {shape}, got {beta.shape}")
    if not np.all(np.isfinite(beta)) or beta.min() < 0:
        raise ValueError("behaviour_probs must be finite and >= 0")
    sums = beta.sum(-1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > 1e-9:
        raise ValueError(f"behaviour_probs rows must sum to 1 (within 1e-9), row {worst} sums to {sums[worst]!r}")
    if importance_weights:
        logits = np.asarray(student_logits, np.float64)
        pi = np.exp(logits - logits.max(-1, keepdims=True))
        holes = (beta == 0) & (pi > 0)
        if holes.any():
            row, tok = (int(i) for i in np.argwhere(holes)[0])
            raise ValueError(
                f"behaviour_probs is 0 where the student has support (row {row}, token {tok}, and "
                f"{int(holes.sum()) - 1} more); importance weights π/β need β > 0 wherever π > 0"
            )
    return beta


def _run(student_logits, teacher_logits, gamma, *, kind, k=0, tie=None, num_params=None, chunk_size=None,
         behaviour_probs=None, importance_weights=False):
    vocab, horizon = tabular.validate_logits(student_logits, teacher_logits)
    if kind not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {kind!r}")
    if kind == "discounted":
        if gamma is None:
            raise ValueError("gamma must be a float in [0, 1] for the discounted estimator")
        tabular.validate_gamma(gamma)
    if kind == "lsm" and not 1 <= int(k) <= vocab:
        raise ValueError(f"k must satisfy 1 <= k <= V={vocab}, got {k}")
    if tie is not None:
        tie, num_params = _validate_tie(tie, np.shape(student_logits)[0], num_params)
    if not isinstance(importance_weights, bool):
        raise ValueError(f"importance_weights must be True or False, got {importance_weights!r}")
    if behaviour_probs is not None:
        behaviour_probs = _validate_behaviour(behaviour_probs, student_logits, importance_weights)
    n_total = vocab**horizon
    chunk = int(min(chunk_size or DEFAULT_CHUNK, n_total))
    with jax.enable_x64(True):
        out = moments_traced(
            jnp.asarray(student_logits, jnp.float64),
            jnp.asarray(teacher_logits, jnp.float64),
            jnp.asarray(0.0 if gamma is None else gamma, jnp.float64),
            None if tie is None else jnp.asarray(tie),
            None if behaviour_probs is None else jnp.asarray(behaviour_probs, jnp.float64),
            vocab=vocab, horizon=horizon, kind=kind, k=int(k),
            num_params=None if tie is None else num_params, chunk=chunk,
            importance_weights=importance_weights and behaviour_probs is not None,
        )
        # numpy float64 out: jax float64 arrays would silently drop to float32 outside the x64 context
        return Moments(*(np.asarray(x, np.float64) for x in out))


def estimator_moments(student_logits, teacher_logits, gamma, *, behaviour_probs=None, importance_weights=False,
                      tie=None, num_params=None, chunk_size=None):
    """Exact mean, variance, bias of the discounted estimator ĝ_γ (Eq. 3), or of Eq. 1 when gamma is None.

    Args:
        student_logits, teacher_logits: tabular tables [(V^T − 1)/(V − 1), V] in the canonical prefix order.
        gamma: float in [0, 1] (0 token-level, 1 causal sequence-level) or None (full return, Eq. 1).
        behaviour_probs: the distribution tokens are drawn from, per prefix: [R, V] like the logits, rows
            summing to 1 (synthetic.behaviour builds the sampler's top-p / top-k / temperature table and a
            stale student's). None: the student itself (on-policy). r_t and g_t are always the student's.
        importance_weights: with a behaviour, multiply each sequence's estimate by π(y)/β(y), so the mean
            equals the on-policy mean (needs β > 0 wherever π > 0).
        tie: optional int [R] mapping prefix rows to shared parameter rows (logits = shared[tie]); the
            moments are then w.r.t. the shared [num_params, V] parameters. None: the tabular table itself.
    Returns:
        Moments(mean, variance, grad, bias, kl, b_r, b_g) in float64. `mean` and `variance` are under the
        behaviour; `grad`, `bias` and `kl` stay against the student's own sequence-level KL(π‖q); b_r, b_g
        are maxima over the behaviour's support (without the importance weight).
    Raises:
        ValueError before any computation for V < 2, a row count that is no (V^T − 1)/(V − 1), V^T above
        the enumeration limit (use synthetic.markov's Monte Carlo), gamma outside [0, 1], a behaviour of
        another shape, with negative entries or rows not summing to 1, or (importance weights) with
        β = 0 where π > 0.
    """
    kind = "full_return" if gamma is None else "discounted"
    return _run(student_logits, teacher_logits, gamma, kind=kind, tie=tie, num_params=num_params,
                chunk_size=chunk_size, behaviour_probs=behaviour_probs, importance_weights=importance_weights)


def prefix_estimator_moments(student_logits, teacher_logits, kind: str, *, k: int | None = None, tie=None,
                             num_params=None, chunk_size=None, behaviour_probs=None, importance_weights=False):
    """Exact moments of the per-prefix estimators Σ_t ∇L(c_t): kind "lsm" (teacher top-k, through
    opd.losses.topk_reverse_kl) or "full_rkl" (opd.losses.full_reverse_kl). `behaviour_probs` and
    `importance_weights` as in `estimator_moments`."""
    if kind not in ("lsm", "full_rkl"):
        raise ValueError(f"kind must be 'lsm' or 'full_rkl', got {kind!r}")
    if kind == "lsm" and k is None:
        raise ValueError("k is required for kind='lsm'")
    return _run(student_logits, teacher_logits, None, kind=kind, k=k or 0, tie=tie, num_params=num_params,
                chunk_size=chunk_size, behaviour_probs=behaviour_probs, importance_weights=importance_weights)
