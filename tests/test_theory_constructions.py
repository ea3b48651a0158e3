"""Worst-case constructions that make each variance bound's order visible, and wrong bounds that fail
(issue 14, items 2-3). Exact float64 moments (synthetic.exact); constructions in synthetic/bounds.py.

Each slope test fits log Var against log T (or log 1/(1−γ²)) and asserts the bound's order within ±0.3;
each negative test shows a deliberately wrong bound — one order lower, γ-independent, or the on-policy
bound applied to off-policy rollouts — violated on a construction, so the bound tests can fail.
The ratio variance / bound is printed (pytest -s) and recorded in docs/theory.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from synthetic import behaviour, bounds, exact

TOL = 0.3
OFF_POLICY_TOP_P = 0.55  # in (½, 1 − ε]: the start row keeps both tokens, every later row only one


def _report(name, horizon, variance, bound_name, bound):
    print(f"{name} T={horizon}: variance {variance:.4g}, {bound_name} {bound:.4g}, ratio {variance / bound:.3g}")


def test_token_level_grows_as_T2_and_a_T1_bound_fails():
    """worst_token (rows shared, tied by the first token), γ = 0, on-policy."""
    horizons, var, ratio = [6, 12], [], []
    for horizon in horizons:
        s, q, tie = bounds.worst_token(horizon)
        m = exact.estimator_moments(s, q, 0.0, tie=tie)
        bound = bounds.token_bound(horizon, m.b_r, m.b_g)
        _report("token", horizon, m.variance, "T²B_r²B_g²", bound)
        assert m.variance <= bound
        var.append(m.variance)
        ratio.append(m.variance / bound)
    slope = bounds.fit_loglog_slope(horizons, var)
    assert abs(slope - 2.0) <= TOL, slope
    # one order lower, T·B_r²B_g², is violated
    assert var[-1] > horizons[-1] * m.b_r**2 * m.b_g**2


@pytest.mark.parametrize("gamma", [None, 1.0])
def test_on_policy_causal_and_full_return_grow_as_T3(gamma):
    """worst_causal (tabular), on-policy: γ = 1 and the full return (Eq. 1) both reach the T³ order of the
    martingale bound; the paper's T⁴ is not reached. For the full return T²B_r²B_g² (one order lower) is
    violated; for γ = 1 see test_gamma_independent_bound_fails_at_gamma_one."""
    horizons, var = [6, 12], []
    for horizon in horizons:
        s, q, _ = bounds.worst_causal(horizon)
        m = exact.estimator_moments(s, q, gamma)
        bound = bounds.martingale_gamma_bound(horizon, m.b_r, m.b_g, gamma)
        _report(f"causal γ={gamma}", horizon, m.variance, "T³B_r²B_g²", bound)
        assert m.variance <= bound <= bounds.sequence_bound(horizon, m.b_r, m.b_g)
        var.append(m.variance)
    slope = bounds.fit_loglog_slope(horizons, var)
    assert abs(slope - 3.0) <= TOL, slope
    if gamma is None:
        assert var[-1] > 2 * bounds.token_bound(horizons[-1], m.b_r, m.b_g)  # T²B_r²B_g² fails, ratio ∝ T


@pytest.mark.parametrize("gamma", [None, 1.0])
def test_off_policy_full_return_grows_as_T4_and_breaks_the_on_policy_bound(gamma):
    """worst_off_policy under the student's own top-p behaviour: the paper's T⁴ order is reached, and the
    on-policy T³ bound (martingale argument) is violated — it needs tokens drawn from π."""
    horizons, var = [6, 12], []
    for horizon in horizons:
        s, q, tie = bounds.worst_off_policy(horizon)
        beta = behaviour.behaviour_table(s, top_p=OFF_POLICY_TOP_P)
        m = exact.estimator_moments(s, q, gamma, tie=tie, behaviour_probs=beta)
        bound = bounds.sequence_bound(horizon, m.b_r, m.b_g)
        _report(f"off-policy γ={gamma}", horizon, m.variance, "T⁴B_r²B_g²", bound)
        assert m.variance <= bound
        var.append(m.variance)
    slope = bounds.fit_loglog_slope(horizons, var)
    assert abs(slope - 4.0) <= TOL, slope
    over_T3 = [v / bounds.martingale_gamma_bound(t, m.b_r, m.b_g, gamma) for t, v in zip(horizons, var)]
    assert over_T3[1] / over_T3[0] > 1.7  # var / (on-policy T³ bound) grows ∝ T: the bound fails for large T
    if gamma is None:
        assert over_T3[1] > 1.0  # and for the full return it already fails at T = 12
    # on-policy (behaviour None), the same model stays within the martingale bound
    on = exact.estimator_moments(s, q, gamma, tie=tie)
    assert on.variance <= bounds.martingale_gamma_bound(horizons[-1], on.b_r, on.b_g, gamma)


def test_discounted_variance_grows_as_one_over_one_minus_gamma_squared():
    """worst_gamma (V = 3, T = 8, on-policy): across γ ∈ {0, ½, ¾, ⅞} the variance grows as 1/(1−γ²) (the
    martingale bound's γ factor) and stays within a constant factor of the bound; a bound with the
    (1−γ) factor dropped one order, T²B_r²B_g²/(1−γ²)^0 (γ-independent), is exceeded at γ = 1."""
    horizon, gammas, var = 8, [0.0, 0.5, 0.75, 0.875], []
    for gamma in gammas:
        s, q, tie = bounds.worst_gamma(horizon, gamma)
        m = exact.estimator_moments(s, q, gamma, tie=tie)
        bound = bounds.martingale_gamma_bound(horizon, m.b_r, m.b_g, gamma)
        _report(f"gamma family γ={gamma}", horizon, m.variance, "T²min(T,1/(1−γ²))B_r²B_g²", bound)
        assert 0.1 * bound <= m.variance <= bound
        var.append(m.variance)
    slope = bounds.fit_loglog_slope([1.0 / (1.0 - g * g) for g in gammas], var)
    assert abs(slope - 1.0) <= TOL, slope
    assert np.all(np.diff(var) > 0)


def test_gamma_independent_bound_fails_at_gamma_one():
    """The paper's T²B_r²B_g², applied to every γ (as random-model tests would allow), fails at γ = 1 on
    worst_causal, while the martingale bound T²B_r²B_g²·min(T, 1/(1−γ²)) holds at every γ."""
    horizon = 12
    s, q, _ = bounds.worst_causal(horizon, p=0.5, delta=1e-6)  # uniform student: E‖g‖² = B_g²
    for gamma in (0.0, 0.5, 0.9, 1.0):
        m = exact.estimator_moments(s, q, gamma)
        assert m.variance <= bounds.martingale_gamma_bound(horizon, m.b_r, m.b_g, gamma)
    _report("γ-independent, γ=1", horizon, m.variance, "T²B_r²B_g²", bounds.token_bound(horizon, m.b_r, m.b_g))
    assert m.variance > bounds.token_bound(horizon, m.b_r, m.b_g)


def test_constructions_refuse_bad_parameters():
    with pytest.raises(ValueError, match="eps"):
        bounds.worst_off_policy(4, eps=0.6)
    with pytest.raises(ValueError, match="p and delta"):
        bounds.worst_causal(4, p=1.0)
    with pytest.raises(ValueError, match="delta must lie in"):
        bounds.worst_gamma(4, 0.5, delta=0.5)
    with pytest.raises(ValueError, match="gamma must lie in"):
        bounds.worst_gamma(4, 1.5)
