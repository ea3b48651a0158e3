"""Behaviour policies in the exact engine (issue 14, item 1): tokens drawn from β ≠ π, against brute force.

The sampler's transform (synthetic.behaviour) is checked against opd.sampling's own nucleus helpers and
draws; the engine's moments under β against a plain loop over every sequence (float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tabular_cases import brute_force_estimates, log_softmax, random_pair

from opd.sampling import SamplingConfig, nucleus_keep, nucleus_threshold_keep, select_tokens
from synthetic import behaviour, exact, tabular


def _brute_force(student, teacher, gamma, beta, weighted):
    """Plain loop: every sequence's probability under β and its dense estimate (× π(y)/β(y) if weighted)."""
    p_pi, probs, ests = brute_force_estimates(student, teacher, gamma, beta)
    if weighted:
        scale = np.where(probs > 0, p_pi / np.where(probs > 0, probs, 1.0), 1.0)
        ests = ests * scale[:, None, None]
    mean = np.einsum("n,nrv->rv", probs, ests)
    var = np.einsum("n,n->", probs, ((ests - mean) ** 2).sum(axis=(1, 2)))
    return mean, var


# --- the sampler's transform as a table ----------------------------------------------------------------


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.85, 0.95])
def test_top_p_table_keeps_the_samplers_nucleus(top_p):
    student, _ = random_pair(0, 6, 3, scale=2.0)
    table = behaviour.behaviour_table(student, top_p=top_p)
    keep = np.asarray(nucleus_threshold_keep(jnp.asarray(student, jnp.float32), top_p))
    np.testing.assert_array_equal(table > 0, keep)
    pi = np.exp(log_softmax(student))
    np.testing.assert_allclose(table, np.where(keep, pi, 0) / np.where(keep, pi, 0).sum(-1, keepdims=True),
                               rtol=1e-12)
    assert (table > 0).sum(-1).min() >= 1 and (table > 0).sum(-1).max() < 6  # truncation happened


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, 1.0, 1.0), (4, 0.7, 1.0), (3, 0.8, 0.5), (6, 1.0, 2.0)])
def test_top_k_and_temperature_table(top_k, top_p, temperature):
    student, _ = random_pair(1, 6, 3, scale=2.0)
    table = behaviour.behaviour_table(student, top_k=top_k, top_p=top_p, temperature=temperature)
    x = student / temperature
    if top_k < 6:
        x_sorted, idx = jax.lax.top_k(jnp.asarray(x, jnp.float32), top_k)
        keep_k = np.asarray(nucleus_keep(x_sorted, top_p)) if top_p < 1 else np.ones((x.shape[0], top_k), bool)
        keep = np.zeros(x.shape, bool)
        np.put_along_axis(keep, np.asarray(idx), keep_k, axis=-1)
    else:
        keep = np.ones(x.shape, bool)
    np.testing.assert_array_equal(table > 0, keep)
    e = np.where(keep, np.exp(x - x.max(-1, keepdims=True)), 0.0)
    np.testing.assert_allclose(table, e / e.sum(-1, keepdims=True), rtol=1e-12)


def test_greedy_table_is_the_argmax():
    student, _ = random_pair(2, 4, 3)
    table = behaviour.behaviour_table(student, temperature=0.0)
    np.testing.assert_array_equal(np.argmax(table, -1), np.argmax(student, -1))
    np.testing.assert_array_equal(table.max(-1), 1.0)


@pytest.mark.parametrize("cfg", [dict(top_p=0.7), dict(top_k=2, top_p=0.9, temperature=0.8)])
def test_table_matches_sampler_draw_frequencies(cfg):
    """`opd.sampling.select_tokens` draws, 40k per row: frequencies within 5 binomial standard errors."""
    rng = np.random.default_rng(3)
    logits = 1.5 * rng.normal(size=(4, 5))
    rows = tabular.num_prefixes(5, 1)
    table = behaviour.behaviour_table(logits[:rows], **cfg)
    n = 40_000
    x = jnp.asarray(np.repeat(logits[:rows], n, axis=0), jnp.float32)
    draws = np.asarray(select_tokens(x, jax.random.PRNGKey(0), SamplingConfig(**cfg)))
    freq = np.bincount(draws, minlength=5) / n
    se = np.sqrt(np.maximum(table[0] * (1 - table[0]), 1e-12) / n)
    assert np.all(np.abs(freq - table[0]) <= 5 * se + 1e-12), (freq, table[0])
    assert np.all(freq[table[0] == 0] == 0)


# --- moments under a behaviour, against brute force ------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, None])
@pytest.mark.parametrize("weighted", [False, True])
def test_off_policy_moments_match_brute_force(gamma, weighted):
    student, teacher = random_pair(4, 3, 3)
    old, _ = random_pair(5, 3, 3)
    beta = behaviour.stale_table(old)
    m = exact.estimator_moments(student, teacher, gamma, behaviour_probs=beta, importance_weights=weighted,
                                chunk_size=7)
    mean, var = _brute_force(student, teacher, gamma, beta, weighted)
    np.testing.assert_allclose(m.mean, mean, atol=1e-12, rtol=0)
    assert m.variance == pytest.approx(var, rel=1e-10)
    _, grad = exact.sequence_kl_and_grad(student, teacher)
    np.testing.assert_allclose(m.grad, grad, atol=1e-12)  # the student's own KL, whatever β
    assert m.bias == pytest.approx(np.linalg.norm(mean - grad), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.0, None])
def test_truncated_behaviour_matches_brute_force(gamma):
    """Top-p behaviour (zero mass on some tokens, so some prefixes are never reached), no weights."""
    student, teacher = random_pair(6, 3, 4)
    beta = behaviour.behaviour_table(student, top_p=0.7)
    assert (beta == 0).any()
    m = exact.estimator_moments(student, teacher, gamma, behaviour_probs=beta, chunk_size=11)
    mean, var = _brute_force(student, teacher, gamma, beta, weighted=False)
    np.testing.assert_allclose(m.mean, mean, atol=1e-12, rtol=0)
    assert m.variance == pytest.approx(var, rel=1e-10)


def test_importance_weighted_mean_is_the_on_policy_mean_and_student_behaviour_is_on_policy():
    student, teacher = random_pair(7, 2, 5)
    old, _ = random_pair(8, 2, 5, scale=0.7)
    for gamma in (0.75, None):
        on = exact.estimator_moments(student, teacher, gamma)
        iw = exact.estimator_moments(student, teacher, gamma, behaviour_probs=behaviour.stale_table(old),
                                     importance_weights=True)
        np.testing.assert_allclose(iw.mean, on.mean, atol=1e-12)
        assert iw.variance != pytest.approx(on.variance, rel=1e-3)  # same mean, another variance
        same = exact.estimator_moments(student, teacher, gamma, behaviour_probs=behaviour.stale_table(student))
        np.testing.assert_allclose(same.mean, on.mean, atol=1e-12)
        assert same.variance == pytest.approx(on.variance, rel=1e-10)
        stale = exact.estimator_moments(student, teacher, 1.0 if gamma is None else gamma,
                                        behaviour_probs=behaviour.stale_table(old))
        assert np.abs(stale.mean - on.mean).max() > 1e-3  # unweighted off-policy mean moves


def test_prefix_estimators_take_a_behaviour():
    student, teacher = random_pair(9, 3, 3)
    beta = behaviour.behaviour_table(student, top_k=2)
    m = exact.prefix_estimator_moments(student, teacher, "full_rkl", behaviour_probs=beta)
    on = exact.prefix_estimator_moments(student, teacher, "full_rkl")
    assert np.abs(m.mean - on.mean).max() > 1e-6 and np.isfinite(m.variance)


# --- bad input: one line, before any computation --------------------------------------------------------


def test_bad_behaviour_raises_one_line():
    student, teacher = random_pair(0, 2, 3)
    ok = behaviour.stale_table(student)
    cases = [
        (dict(behaviour_probs=ok[:-1]), r"^behaviour_probs must have the logits' shape \(7, 2\), got \(6, 2\)$"),
        (dict(behaviour_probs=ok * 1.01), r"^behaviour_probs rows must sum to 1 \(within 1e-9\), row \d+ sums"),
        (dict(behaviour_probs=np.where(ok > 0.5, 1.2, -0.2)), r"^behaviour_probs must be finite and >= 0$"),
        (dict(behaviour_probs=behaviour.behaviour_table(student, temperature=0.0), importance_weights=True),
         r"^behaviour_probs is 0 where the student has support \(row \d+, token \d+"),
        (dict(importance_weights=1), r"^importance_weights must be True or False"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as err:
            exact.estimator_moments(student, teacher, 0.5, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"^top_p: expected a number in \(0, 1\]"):
        behaviour.behaviour_table(student, top_p=1.5)
    with pytest.raises(ValueError, match=r"^temperature: expected a number >= 0"):
        behaviour.behaviour_table(student, temperature=-1.0)
    with pytest.raises(ValueError, match="not \\(V\\^T-1\\)/\\(V-1\\)"):
        behaviour.behaviour_table(np.zeros((6, 2)))
