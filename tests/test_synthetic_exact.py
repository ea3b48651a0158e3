"""Exact engine of the theory sandbox against independent references (float64, enumerated)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tabular_cases import brute_force_estimates, log_softmax, random_pair

from synthetic import bounds, exact, tabular

SIZES = [(2, 1), (2, 3), (3, 3), (2, 6), (4, 2), (3, 4)]
GAMMAS = [0.0, 0.25, 0.5, 0.75, 1.0, None]


def _brute_force(student, teacher, gamma):
    """Plain-loop reference: every sequence's dense ĝ [R, V]; returns (probs, estimates)."""
    probs, _, ests = brute_force_estimates(student, teacher, gamma)
    return probs, ests


def _enumerated_kl_grad(student, teacher):
    """jax.grad of the enumerated sequence-level KL(π‖q) — independent of the estimators and the DP."""
    vocab = student.shape[1]
    horizon = tabular.horizon_from_rows(student.shape[0], vocab)
    with jax.enable_x64(True):
        seqs = jnp.asarray(tabular.enumerate_sequences(vocab, horizon))
        logq_seq = tabular.sequence_log_probs(jnp.asarray(teacher), seqs).sum(-1)

        def kl(x):
            logp_seq = tabular.sequence_log_probs(x, seqs).sum(-1)
            return jnp.sum(jnp.exp(logp_seq) * (logp_seq - logq_seq))

        return np.asarray(jax.grad(kl)(jnp.asarray(student)))


# --- canonical prefix order -------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab,horizon", [(2, 4), (3, 3), (5, 2)])
def test_canonical_prefix_order(vocab, horizon):
    expected = [p for k in range(horizon) for p in itertools.product(range(vocab), repeat=k)]
    assert [tabular.prefix_row(p, vocab) for p in expected] == list(range(tabular.num_prefixes(vocab, horizon)))
    seqs = tabular.enumerate_sequences(vocab, horizon)
    assert [tuple(s) for s in seqs] == list(itertools.product(range(vocab), repeat=horizon))
    table = tabular.prefix_index_table(vocab, horizon)
    ref = [[tabular.prefix_row(tuple(s[:t]), vocab) for t in range(horizon)] for s in seqs]
    np.testing.assert_array_equal(table, np.array(ref))


# --- exact means, gradient, bias identity -----------------------------------------------------------------


@pytest.mark.parametrize("vocab,horizon", [(2, 1), (3, 3), (2, 6)])
def test_unbiased_means_equal_enumerated_kl_gradient(vocab, horizon):
    for seed in range(3):
        student, teacher = random_pair(seed, vocab, horizon)
        ref = _enumerated_kl_grad(student, teacher)
        kl, dp_grad = exact.sequence_kl_and_grad(student, teacher)
        np.testing.assert_allclose(dp_grad, ref, atol=1e-6, rtol=0)
        for gamma in (1.0, None):
            m = exact.estimator_moments(student, teacher, gamma)
            np.testing.assert_allclose(m.mean, ref, atol=1e-6, rtol=0)
            np.testing.assert_allclose(m.grad, ref, atol=1e-6, rtol=0)
            assert m.bias < 1e-6
            assert m.kl == pytest.approx(kl, abs=1e-12)


@pytest.mark.parametrize("vocab,horizon", SIZES)
def test_token_level_bias_is_the_future_coupling_term(vocab, horizon):
    """Paper App. B.1: E[ĝ_seq] − E[ĝ_tok] = E[Σ_t Σ_{t'>t} r_{t'} g_t], computed here by a plain loop."""
    for seed in range(3):
        student, teacher = random_pair(100 + seed, vocab, horizon)
        logp, logq = log_softmax(student), log_softmax(teacher)
        coupling = np.zeros_like(student)
        for seq in itertools.product(range(vocab), repeat=horizon):
            rows = [tabular.prefix_row(seq[:t], vocab) for t in range(horizon)]
            r = [logp[rows[t], seq[t]] - logq[rows[t], seq[t]] for t in range(horizon)]
            p = np.exp(sum(logp[rows[t], seq[t]] for t in range(horizon)))
            for t in range(horizon):
                coupling[rows[t]] += p * sum(r[t + 1 :]) * (np.eye(vocab)[seq[t]] - np.exp(logp[rows[t]]))
        m = exact.estimator_moments(student, teacher, 0.0)
        np.testing.assert_allclose(m.grad - m.mean, coupling, atol=1e-12, rtol=0)
        assert m.bias == pytest.approx(np.linalg.norm(coupling), abs=1e-12)
        if horizon == 1:
            assert m.bias < 1e-12  # no future terms


@pytest.mark.parametrize("vocab,horizon,chunk", [(2, 3, 3), (3, 3, 5), (2, 5, None)])
@pytest.mark.parametrize("gamma", [0.0, 0.6, 1.0, None])
def test_moments_match_plain_loop(vocab, horizon, chunk, gamma):
    """Mean and centred variance equal a per-sequence dense loop (odd chunk sizes exercise padding)."""
    student, teacher = random_pair(7, vocab, horizon)
    probs, ests = _brute_force(student, teacher, gamma)
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    mean = np.einsum("n,nrv->rv", probs, ests)
    var = np.einsum("n,n->", probs, ((ests - mean) ** 2).sum(axis=(1, 2)))
    m = exact.estimator_moments(student, teacher, gamma, chunk_size=chunk)
    np.testing.assert_allclose(m.mean, mean, atol=1e-12, rtol=0)
    assert m.variance == pytest.approx(var, rel=1e-10)


def test_tied_moments_match_plain_loop():
    """Shared parameters: the per-sequence estimate is the tabular one summed over tied rows."""
    student, teacher, tie = bounds.worst_token(4)
    rng = np.random.default_rng(3)
    student = student + rng.normal(size=3)[tie][:, None]  # break the symmetry a little, keep the tie
    teacher = teacher + rng.normal(size=(3, 2))[tie]
    student = student + rng.normal(size=(3, 2))[tie]
    for gamma in (0.0, 0.5, None):
        probs, ests = _brute_force(student, teacher, gamma)
        tied = np.stack([np.stack([e[tie == p].sum(0) for p in range(3)]) for e in ests])
        mean = np.einsum("n,npv->pv", probs, tied)
        var = np.einsum("n,n->", probs, ((tied - mean) ** 2).sum(axis=(1, 2)))
        m = exact.estimator_moments(student, teacher, gamma, tie=tie, chunk_size=5)
        np.testing.assert_allclose(m.mean, mean, atol=1e-12, rtol=0)
        assert m.variance == pytest.approx(var, rel=1e-10)
        _, grad = exact.sequence_kl_and_grad(student, teacher)
        np.testing.assert_allclose(m.grad, np.stack([grad[tie == p].sum(0) for p in range(3)]), atol=1e-12)


# --- bounds ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab,horizon", [(2, 1), (3, 3), (2, 6), (4, 2)])
def test_exact_variance_below_bounds(vocab, horizon):
    for seed in range(20):
        student, teacher = random_pair(1000 + seed, vocab, horizon, scale=0.5 + 0.25 * (seed % 8))
        for gamma in GAMMAS:
            m = exact.estimator_moments(student, teacher, gamma)
            args = (horizon, m.b_r, m.b_g)
            assert m.variance <= bounds.gamma_bound(*args, gamma) * (1 + 1e-12)
            assert m.variance <= bounds.tabular_gamma_bound(*args, gamma) * (1 + 1e-12)
            assert m.variance <= bounds.martingale_gamma_bound(*args, gamma) * (1 + 1e-12)
            if gamma == 0.0:
                assert m.variance <= bounds.token_bound(*args) * (1 + 1e-12)
            if gamma is None or gamma == 1.0:
                assert m.variance <= bounds.sequence_bound(*args) * (1 + 1e-12)
                assert m.variance <= bounds.full_return_tight_bound(*args) * (1 + 1e-12)


def test_shared_parameter_variance_below_bounds():
    """Random models with rows shared across steps (Markov, time-homogeneous and per-step; first-token tie):
    the paper's bounds and our martingale bound hold w.r.t. the shared parameters too."""
    rng = np.random.default_rng(11)
    horizon = 5
    ties = [tabular.markov_tie(2, horizon, per_step=False), tabular.markov_tie(2, horizon, per_step=True),
            bounds.worst_token(horizon)[2]]
    for tie in ties:
        num_params = int(tie.max()) + 1
        for scale in (0.5, 1.5, 3.0):
            shared_s, shared_q = scale * rng.normal(size=(2, num_params, 2))
            for gamma in GAMMAS:
                m = exact.estimator_moments(shared_s[tie], shared_q[tie], gamma, tie=tie)
                args = (horizon, m.b_r, m.b_g)
                assert m.variance <= bounds.martingale_gamma_bound(*args, gamma) * (1 + 1e-12)
                assert m.variance <= bounds.gamma_bound(*args, gamma) * (1 + 1e-12)


def test_exact_constants():
    student, teacher = random_pair(5, 3, 3)
    m = exact.estimator_moments(student, teacher, 0.0)
    logp, logq = log_softmax(student), log_softmax(teacher)
    assert m.b_r == pytest.approx(np.abs(logp - logq).max(), abs=1e-12)
    pi = np.exp(logp)
    norms = [np.linalg.norm(np.eye(3)[y] - pi[r]) for r in range(pi.shape[0]) for y in range(3)]
    assert m.b_g == pytest.approx(max(norms), abs=1e-12)


def _slopes(horizons):
    tok, full = [], []
    for horizon in horizons:
        student, teacher, tie = bounds.worst_token(horizon)
        m = exact.estimator_moments(student, teacher, 0.0, tie=tie)
        assert m.variance <= bounds.token_bound(horizon, m.b_r, m.b_g)
        tok.append(m.variance)
        student, teacher, _ = bounds.worst_full_return(horizon)
        m = exact.estimator_moments(student, teacher, None)
        assert m.variance <= bounds.full_return_tight_bound(horizon, m.b_r, m.b_g)
        full.append(m.variance)
    return bounds.fit_loglog_slope(horizons, tok), bounds.fit_loglog_slope(horizons, full)


def test_worst_case_slopes():
    """Two horizons only (default suite); the fitted version over five is marked slow below."""
    slope_tok, slope_full = _slopes([6, 12])
    assert 1.8 <= slope_tok <= 2.3, slope_tok
    assert 2.6 <= slope_full <= 3.0, slope_full


@pytest.mark.slow
def test_worst_case_slopes_fitted():
    """Token level (shared rows tied by the first token): slope near 2. Full return: the T⁴ order of the
    paper's bound is not attainable (martingale argument, synthetic/bounds.py); the tabular worst case
    approaches T³ from below."""
    slope_tok, slope_full = _slopes([6, 8, 11, 14, 18])
    assert 1.8 <= slope_tok <= 2.3, slope_tok
    assert 2.6 <= slope_full <= 3.0, slope_full


def test_tabular_token_variance_is_linear_in_T():
    """With one row per step the token-level variance is O(T) (‖ĝ_tok‖² = Σ_t r_t²‖g_t‖²)."""
    horizons = [4, 6, 8, 10]
    student_fn = [bounds.worst_full_return(t) for t in horizons]
    var = np.array([exact.estimator_moments(s, q, 0.0).variance for s, q, _ in student_fn])
    steps = np.diff(var)  # constant increments <=> linear growth (an offset would bias a log-log fit)
    assert np.all(np.abs(steps / steps[-1] - 1) < 0.05), steps


# --- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_raises_before_computing():
    ok_s, ok_q = random_pair(0, 2, 3)
    with pytest.raises(ValueError, match="vocab V"):
        exact.estimator_moments(np.zeros((3, 1)), np.zeros((3, 1)), 0.0)
    with pytest.raises(ValueError, match="horizon T"):
        tabular.validate_sizes(2, 0)
    with pytest.raises(ValueError, match=r"not \(V\^T-1\)/\(V-1\)"):
        exact.estimator_moments(np.zeros((6, 2)), np.zeros((6, 2)), 0.0)
    with pytest.raises(ValueError, match="tabular table"):
        exact.estimator_moments(np.zeros((2, 3, 2)), np.zeros((2, 3, 2)), 0.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        exact.estimator_moments(ok_s, ok_q[:-1], 0.0)
    with pytest.raises(ValueError, match=r"Monte Carlo path in synthetic\.markov"):
        big = np.zeros((tabular.num_prefixes(2, 20), 2))
        exact.estimator_moments(big, big, 0.0)
    for gamma in (-0.1, 1.5):
        with pytest.raises(ValueError, match="gamma must lie in"):
            exact.estimator_moments(ok_s, ok_q, gamma)
    with pytest.raises(ValueError, match="tie"):
        exact.estimator_moments(ok_s, ok_q, 0.0, tie=np.zeros(3, int))
