"""Per-sequence estimators: closed forms, agreement with jax.grad and opd.losses, Monte Carlo convergence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd.losses import full_reverse_kl
from synthetic import estimators, exact, markov, tabular


def test_tabular_score_matches_jax_grad():
    with jax.enable_x64(True):
        row = jnp.asarray(np.random.default_rng(0).normal(size=5))
        for y in range(5):
            ref = jax.grad(lambda x, y=y: jax.nn.log_softmax(x)[y])(row)
            np.testing.assert_allclose(estimators.tabular_score(row, y), ref, atol=1e-14)


def test_tabular_score_on_the_whole_table_matches_jax_grad():
    """g_t w.r.t. the full logit table is one-hot(row) × (e_y − π): zero on every other row."""
    with jax.enable_x64(True):
        table = jnp.asarray(np.random.default_rng(1).normal(size=(7, 2)))
        seq = jnp.asarray([[1, 0, 1]])
        for t in range(3):
            ref = jax.grad(lambda x, t=t: tabular.sequence_log_probs(x, seq)[0, t])(table)
            row = int(tabular.prefix_index_table(2, 3)[5, t])  # sequence 101 is id 5
            expected = np.zeros((7, 2))
            expected[row] = estimators.tabular_score(table[row], int(seq[0, t]))
            np.testing.assert_allclose(ref, expected, atol=1e-14)


def test_discounted_family_endpoints():
    rng = np.random.default_rng(2)
    r, g = rng.normal(size=6), rng.normal(size=(6, 4))
    np.testing.assert_allclose(estimators.discounted_estimator(r, g, 0.0), (r[:, None] * g).sum(0), rtol=1e-6)
    causal = sum(r[t:].sum() * g[t] for t in range(6))
    np.testing.assert_allclose(estimators.discounted_estimator(r, g, 1.0), causal, rtol=1e-5)
    np.testing.assert_allclose(estimators.full_return_estimator(r, g), r.sum() * g.sum(0), rtol=1e-5)
    half = sum(sum(0.5 ** (s - t) * r[s] for s in range(t, 6)) * g[t] for t in range(6))
    np.testing.assert_allclose(estimators.discounted_estimator(r, g, 0.5), half, rtol=1e-5)


def test_prefix_estimators_through_opd_losses():
    """full-RKL prefix gradient = E[r g | c] (closed form); LSM with K = V equals it; K < V differs."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        s, q = jnp.asarray(rng.normal(size=6)), jnp.asarray(rng.normal(size=6))
        pi = jax.nn.softmax(s)
        r = jax.nn.log_softmax(s) - jax.nn.log_softmax(q)
        cond_mean = sum(pi[y] * r[y] * estimators.tabular_score(s, y) for y in range(6))
        np.testing.assert_allclose(estimators.full_rkl_prefix_grad(s, q), cond_mean, atol=1e-12)
        np.testing.assert_allclose(estimators.full_rkl_prefix_grad(s, q), jax.grad(full_reverse_kl)(s, q), atol=1e-12)
        np.testing.assert_allclose(estimators.lsm_prefix_grad(s, q, 6), cond_mean, atol=1e-12)
        assert np.abs(estimators.lsm_prefix_grad(s, q, 2) - cond_mean).max() > 1e-3


def test_full_rkl_is_rao_blackwellized_token_level():
    """Same mean as γ = 0 (E[r_t g_t | c_t] = ∇KL_t), never more variance."""
    rng = np.random.default_rng(4)
    for _ in range(5):
        s, q = rng.normal(size=(13, 3)), rng.normal(size=(13, 3))
        tok = exact.estimator_moments(s, q, 0.0)
        rb = exact.prefix_estimator_moments(s, q, "full_rkl")
        lsm = exact.prefix_estimator_moments(s, q, "lsm", k=3)
        np.testing.assert_allclose(rb.mean, tok.mean, atol=1e-12)
        np.testing.assert_allclose(lsm.mean, tok.mean, atol=1e-12)
        assert rb.variance <= tok.variance + 1e-12
        lsm2 = exact.prefix_estimator_moments(s, q, "lsm", k=2)
        assert lsm2.bias > 0


@pytest.mark.parametrize("gamma", [0.0, 0.5, None])
def test_monte_carlo_tabular_converges_to_exact(gamma):
    vocab, horizon, num = 2, 3, 40_000
    rng = np.random.default_rng(5)
    s, q = rng.normal(size=(7, 2)), rng.normal(size=(7, 2))
    m = exact.estimator_moments(s, q, gamma)
    with jax.enable_x64(True):
        tok, rows = tabular.sample_tabular(jax.random.key(0), jnp.asarray(s), horizon, num)
        logp, logq = jax.nn.log_softmax(jnp.asarray(s)), jax.nn.log_softmax(jnp.asarray(q))
        r = logp[rows, tok] - logq[rows, tok]
        score = jax.nn.one_hot(tok, vocab, dtype=jnp.float64) - jnp.exp(logp[rows])
        g_NxTxRxV = jax.nn.one_hot(rows, 7, dtype=jnp.float64)[..., None] * score[:, :, None, :]
        if gamma is None:
            est = jax.vmap(estimators.full_return_estimator)(r, g_NxTxRxV)
        else:
            est = jax.vmap(estimators.discounted_estimator, (0, 0, None))(r, g_NxTxRxV, gamma)
        est = np.asarray(est)
    mc_mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(num)
    z = np.abs(mc_mean - m.mean) / np.maximum(se, 1e-12)
    assert z.max() < 5.0, z.max()
    mc_var = ((est - mc_mean) ** 2).sum(axis=(1, 2)).mean()
    assert mc_var == pytest.approx(m.variance, rel=0.05)


def test_markov_monte_carlo_matches_exact_tied_moments():
    rng = np.random.default_rng(6)
    student, teacher = rng.normal(size=(4, 3, 3)), rng.normal(size=(4, 3, 3))
    s_tab, tie = markov.to_tabular(student)
    q_tab, _ = markov.to_tabular(teacher)
    for gamma in (0.0, 1.0):
        m = exact.estimator_moments(s_tab, q_tab, gamma, tie=tie, num_params=12)
        with jax.enable_x64(True):
            mean, var = markov.mc_moments(jax.random.key(1), jnp.asarray(student), jnp.asarray(teacher), gamma,
                                          num_samples=65_536, batch=8192)
        used = np.ones((4, 3), bool)
        used[0, 1:] = False  # start step uses row [0, 0] only
        exact_mean = m.mean.reshape(4, 3, 3)
        np.testing.assert_allclose(np.asarray(mean)[~used], 0.0)
        se = np.sqrt(m.variance / 65_536)  # crude: total-variance scale per component
        assert np.abs(np.asarray(mean) - exact_mean).max() < 5 * se
        assert float(var) == pytest.approx(m.variance, rel=0.05)


def test_markov_long_horizon_runs_and_validates():
    student = np.zeros((200, 4, 4))
    mean, var = markov.mc_moments(jax.random.key(0), student, student + 1.0, 0.5, num_samples=256, batch=128)
    assert mean.shape == (200, 4, 4) and np.isfinite(float(var))
    with pytest.raises(ValueError, match="\\[T, V, V\\]"):
        markov.mc_moments(jax.random.key(0), np.zeros((5, 3, 2)), np.zeros((5, 3, 2)), 0.5, num_samples=8)
    with pytest.raises(ValueError, match="gamma"):
        markov.mc_moments(jax.random.key(0), student, student, 2.0, num_samples=8)
