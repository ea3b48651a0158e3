"""The sandbox's estimators are the trainer's objectives (issue 11, item 6), checked exactly.

The trainer's baseline is PPO on the sampled-token reward: per position
    L_t = ppo_clip_loss(log π(y_t|c_t), stop_gradient(log π(y_t|c_t)), sampled_token_log_ratio(log π, log q)).
On the first minibatch the ratio is 1 and ∇L_t = −A_t ∇log π = r_t g_t, so the expected gradient over
sequences is the γ = 0 estimator's exact mean (synthetic.exact). Enumerating every sequence of a tabular
model and weighting by its probability makes that an identity to float64 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd.losses import ppo_clip_loss, sampled_token_log_ratio
from synthetic import estimators, exact, tabular


def _pair(seed, vocab, horizon, scale=1.5):
    rng = np.random.default_rng(seed)
    rows = tabular.num_prefixes(vocab, horizon)
    return scale * rng.normal(size=(rows, vocab)), scale * rng.normal(size=(rows, vocab))


def _expected_ppo_gradient(student, teacher):
    """Σ_y p(y) ∇_θ Σ_t ppo_clip_loss(log π_θ(y_t), log π_old(y_t), log q − log π_old) at θ_old = θ, enumerated."""
    vocab = student.shape[1]
    horizon = tabular.horizon_from_rows(student.shape[0], vocab)
    old_student = student
    with jax.enable_x64(True):
        seqs = jnp.asarray(tabular.enumerate_sequences(vocab, horizon))
        logq_NxT = tabular.sequence_log_probs(jnp.asarray(teacher), seqs)
        old_NxT = tabular.sequence_log_probs(jnp.asarray(old_student), seqs)  # the sampler's recorded log-probs
        p_N = jnp.exp(old_NxT.sum(-1))

        def objective(theta):
            logp_NxT = tabular.sequence_log_probs(theta, seqs)
            adv_NxT = sampled_token_log_ratio(old_NxT, logq_NxT)
            loss_NxT = ppo_clip_loss(logp_NxT, old_NxT, adv_NxT)
            return jnp.sum(p_N * loss_NxT.sum(-1))

        return np.asarray(jax.grad(objective)(jnp.asarray(student)), np.float64)


@pytest.mark.parametrize("vocab,horizon", [(2, 4), (3, 3)])
def test_ppo_baseline_gradient_at_ratio_one_is_the_token_level_estimator(vocab, horizon):
    student, teacher = _pair(vocab * 10 + horizon, vocab, horizon)
    got = _expected_ppo_gradient(student, teacher)
    m0 = exact.estimator_moments(student, teacher, 0.0)
    np.testing.assert_allclose(got, m0.mean, atol=1e-12, rtol=0)
    # and not the unbiased sequence-level gradient: the baseline carries γ = 0's bias
    m1 = exact.estimator_moments(student, teacher, 1.0)
    assert np.abs(got - m1.mean).max() > 1e-3
    assert np.linalg.norm(got - m0.grad) == pytest.approx(float(m0.bias), rel=1e-9)


def test_token_costs_are_the_trainers_reward_negated():
    rng = np.random.default_rng(0)
    lp, lq = np.log(rng.uniform(0.01, 1.0, size=(2, 5, 7)))
    with jax.enable_x64(True):
        r = np.asarray(estimators.token_costs(jnp.asarray(lp), jnp.asarray(lq)))
    assert r.dtype == np.float64
    np.testing.assert_array_equal(r, lp - lq)
