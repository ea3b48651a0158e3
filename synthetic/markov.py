"""Markov parameterization for horizons too long to enumerate; Monte Carlo replaces enumeration.

Logits [T, V, V]: step t ≥ 1 draws y_t from row logits[t, y_{t-1}]; step 0 uses the start row logits[0, 0]
(logits[0, 1:] are unused). For small T, `to_tabular` expands a Markov model into the canonical tabular
table (logits = flat[tie], tie = tabular.markov_tie(..., per_step=True)), so exact moments w.r.t. the
Markov parameters come from `synthetic.exact.estimator_moments(..., tie=tie)` and Monte Carlo estimates
here can be checked against them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from synthetic import tabular
from synthetic.estimators import discounted_coefficients, full_return_coefficients, token_costs


def validate_markov(logits_TxVxV, teacher_TxVxV=None) -> tuple[int, int]:
    shape = tuple(np.shape(logits_TxVxV))
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"Markov logits must have shape [T, V, V], got {shape}")
    horizon, vocab = shape[0], shape[1]
    if vocab < 2:
        raise ValueError(f"vocab V must be an integer >= 2, got V={vocab}")
    if horizon < 1:
        raise ValueError(f"horizon T must be an integer >= 1, got T={horizon}")
    if teacher_TxVxV is not None and tuple(np.shape(teacher_TxVxV)) != shape:
        raise ValueError(f"teacher logits must have shape {shape}, got {tuple(np.shape(teacher_TxVxV))}")
    return vocab, horizon


def to_tabular(logits_TxVxV):
    """The equivalent canonical tabular table [(V^T-1)/(V-1), V] (small T only) and the tie map."""
    vocab, horizon = validate_markov(logits_TxVxV)
    tie = tabular.markov_tie(vocab, horizon, per_step=True)
    return np.asarray(logits_TxVxV).reshape(horizon * vocab, vocab)[tie], tie


def sample(rng: jax.Array, logits_TxVxV, num: int):
    """`num` sequences [num, T] and the row each step used (previous token; 0 at t = 0) [num, T]."""
    horizon = logits_TxVxV.shape[0]

    # SAMPLE ONE STEP from the row of the previous token
    def step(prev_N, inputs):
        t, key = inputs
        tok_N = jax.random.categorical(key, logits_TxVxV[t, prev_N], axis=-1).astype(prev_N.dtype)
        return tok_N, (tok_N, prev_N)

    keys = jax.random.split(rng, horizon)
    _, (tok_TxN, prev_TxN) = jax.lax.scan(step, jnp.zeros((num,), jnp.int32), (jnp.arange(horizon), keys))
    return tok_TxN.T, prev_TxN.T


def per_sample_estimates(student_TxVxV, teacher_TxVxV, tokens_NxT, prev_NxT, gamma):
    """ĝ_γ (gamma=None: Eq. 1) of each sampled sequence w.r.t. the Markov logits: [N, T, V, V]."""
    horizon, vocab = student_TxVxV.shape[0], student_TxVxV.shape[1]
    logp = jax.nn.log_softmax(student_TxVxV, -1)
    logq = jax.nn.log_softmax(teacher_TxVxV, -1)
    t_T = jnp.arange(horizon)
    r_NxT = token_costs(logp[t_T, prev_NxT, tokens_NxT], logq[t_T, prev_NxT, tokens_NxT])
    if gamma is None:
        c_NxT = jax.vmap(full_return_coefficients)(r_NxT)
    else:
        c_NxT = jax.vmap(discounted_coefficients, (0, None))(r_NxT, gamma)
    score_NxTxV = jax.nn.one_hot(tokens_NxT, vocab, dtype=logp.dtype) - jnp.exp(logp[t_T, prev_NxT])
    u_NxTxV = c_NxT[..., None] * score_NxTxV
    row_NxTxV = jax.nn.one_hot(prev_NxT, vocab, dtype=logp.dtype)  # which row of step t
    return row_NxTxV[..., :, None] * u_NxTxV[..., None, :]


@functools.partial(jax.jit, static_argnames=("num_batches", "batch", "full_return"))
def _mc(rng, student, teacher, gamma, *, num_batches, batch, full_return):
    def body(carry, key):
        s1, s2 = carry
        tok, prev = sample(key, student, num=batch)
        g = per_sample_estimates(student, teacher, tok, prev, None if full_return else gamma)
        return (s1 + g.sum(0), s2 + jnp.sum(g**2)), None

    zeros = jnp.zeros_like(student)
    (s1, s2), _ = jax.lax.scan(body, (zeros, jnp.zeros((), student.dtype)), jax.random.split(rng, num_batches))
    n = num_batches * batch
    mean = s1 / n
    variance = (s2 / n - jnp.sum(mean**2)) * n / (n - 1)
    return mean, variance


def mc_moments(rng, student_TxVxV, teacher_TxVxV, gamma, *, num_samples: int, batch: int = 1024):
    """Monte Carlo mean [T, V, V] and variance E‖ĝ − Eĝ‖² of ĝ_γ (gamma=None: Eq. 1), streaming in batches."""
    validate_markov(student_TxVxV, teacher_TxVxV)
    tabular.validate_gamma(gamma)
    batch = min(batch, num_samples)
    num_batches = max(1, num_samples // batch)
    gamma_arr = jnp.asarray(0.0 if gamma is None else gamma)
    return _mc(rng, jnp.asarray(student_TxVxV), jnp.asarray(teacher_TxVxV), gamma_arr, num_batches=num_batches,
               batch=batch, full_return=gamma is None)
