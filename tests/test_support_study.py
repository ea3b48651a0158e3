"""synthetic/support_study.py: its exact moments against the independent engine of synthetic.exact, Monte
Carlo, and closed forms (bias 0 at K = V, baselines keep the mean, EMA-PG's bias is ∇π(S))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthetic import exact, tabular
from synthetic import support_study as S

V, T = 3, 2


@pytest.fixture(scope="module")
def pair():
    return S.make_pair("multimodal", V, T, seed=3)


@pytest.mark.parametrize(("name", "k"), [("sampled_token", None), ("lsm", 2), ("full_rkl", None)])
def test_engine_matches_the_exact_engine(pair, name, k):
    s, q = pair
    mean, var = S.moments(s, S.position_grads(s, q, name, k))
    if name == "sampled_token":
        ref = exact.estimator_moments(s, q, 0.0)  # γ = 0 is the sampled-token estimator
    else:
        ref = exact.prefix_estimator_moments(s, q, name, k=k)
    np.testing.assert_allclose(mean, ref.mean, atol=1e-12)
    np.testing.assert_allclose(var, ref.variance, rtol=1e-10, atol=1e-14)


def test_monte_carlo_agrees_with_enumeration(pair):
    s, q = pair
    grads = S.position_grads(s, q, "vopd_full")
    mean, var = S.moments(s, grads)
    with jax.enable_x64(True):
        tokens, rows = tabular.sample_tabular(jax.random.PRNGKey(0), jnp.asarray(s), T, 40_000)
    tokens, rows = np.asarray(tokens), np.asarray(rows)
    g = np.zeros((tokens.shape[0],) + s.shape)
    n = np.broadcast_to(np.arange(tokens.shape[0])[:, None], rows.shape)
    g[n, rows] = grads[rows, tokens]
    se = g.std(axis=0) / np.sqrt(g.shape[0])
    assert np.all(np.abs(g.mean(axis=0) - mean) <= 5 * se + 1e-12)
    mc_var = np.mean(np.sum((g - g.mean(axis=0)) ** 2, axis=(1, 2)))
    assert abs(mc_var - var) / var < 0.05


@pytest.mark.parametrize("name", ["lsm", "lsm_no_renorm", "stop_grad_topk", "v3", "v5"])
def test_support_bias_is_zero_at_full_support(pair, name):
    s, q = pair
    (row,) = S.estimator_rows(s, q, [name], ks=[V])
    assert row["bias_tok"] < 1e-12
    assert row["bias_seq"] == pytest.approx(row["grad_seq_norm"] * row["rel_bias_seq"], abs=1e-12)


def test_lsm_bias_below_full_support(pair):
    s, q = pair
    rows = {r["k"]: r for r in S.estimator_rows(s, q, ["lsm"], ks=[1, 2])}
    assert rows[1]["rel_bias_tok"] == pytest.approx(1.0, abs=1e-12)  # K = 1 renormalized: no gradient at all
    assert rows[1]["mean_sq"] < 1e-24 and rows[1]["variance"] < 1e-24
    assert rows[2]["bias_tok"] > 1e-3


def test_baselines_keep_the_mean_and_the_constant_control_has_none(pair):
    s, q = pair
    rows = S.estimator_rows(s, q, ["sampled_token", "vopd_full", "vopd_topk_teacher", "vopd_topk_student",
                                   "constant"], ks=[1, 2])
    for r in rows:
        if r["estimator"] == "constant":
            assert r["mean_sq"] < 1e-24 and r["rel_bias_tok"] == pytest.approx(1.0)
        else:
            assert r["bias_tok"] < 1e-12


def test_ema_pg_bias_is_the_gradient_of_the_support_mass(pair):
    """V5 on-policy: E ĝ − ∇_tok = Σ_c P(c) ∇π(S_c), S_c the teacher's top-k at c (closed form, NumPy)."""
    s, q = pair
    k = 2
    mean, _ = S.moments(s, S.position_grads(s, q, "v5", k))
    tok, _ = S.moments(s, S.position_grads(s, q, "full_rkl"))
    pi = np.exp(s - s.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    ids = np.argsort(-q, axis=1)[:, :k]
    in_s = np.zeros_like(pi)
    np.put_along_axis(in_s, ids, 1.0, 1)
    mass = (pi * in_s).sum(1, keepdims=True)
    grad_mass = pi * in_s - pi * mass  # ∇_z Σ_{v∈S} π_v
    np.testing.assert_allclose(mean - tok, S.prefix_probs(s)[:, None] * grad_mass, atol=1e-12)


def test_multimodal_teacher_has_top1_mass_in_range():
    _, q = S.make_pair("multimodal", 6, 3, seed=1, top1_mass=(0.5, 0.9))
    p = np.exp(q - q.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.sort(p, 1)[:, ::-1]
    assert np.all((top[:, 0] >= 0.5 - 1e-12) & (top[:, 0] <= 0.9 + 1e-12))
    assert np.all(top[:, 1] >= 0.5 * (1 - top[:, 0]) - 1e-12)  # a real second mode


def test_run_study_rows():
    rows = S.run_study(vocab=V, horizon=T, seeds=1, families=(("multimodal", (0.5, 0.9)),),
                       estimators=["lsm", "sampled_token"])
    assert {r["horizon"] for r in rows} == {1, T}
    assert len(rows) == 2 * (V + 1)
    for key in ("family", "seed", "estimator", "k", "variance", "rel_bias_tok", "rel_bias_seq"):
        assert all(key in r for r in rows)
    root = [r for r in rows if r["horizon"] == 1]
    assert all(r["bias_tok"] == pytest.approx(r["bias_seq"], abs=1e-12) for r in root)  # T = 1: one target


def test_bad_input_raises_one_clear_line(pair):
    s, q = pair
    with pytest.raises(ValueError, match="estimator must be one of"):
        S.position_grads(s, q, "nope")
    with pytest.raises(ValueError, match="needs an integer k"):
        S.position_grads(s, q, "lsm", V + 1)
    with pytest.raises(ValueError, match="takes no k"):
        S.position_grads(s, q, "sampled_token", 2)
    with pytest.raises(ValueError, match="ks must lie in"):
        S.estimator_rows(s, q, ["lsm"], ks=[0])
    with pytest.raises(ValueError, match="family must be one of"):
        S.make_pair("uniform", V, T, 0)
    with pytest.raises(ValueError, match="top1_mass"):
        S.make_pair("multimodal", V, T, 0, top1_mass=(0.5, 1.0))
