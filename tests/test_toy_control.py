"""Tests for the paper's 1-D toy (synthetic/toy_control.py) and its Hydra entry point."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from opd.cli import ConfigError
from synthetic import toy_control as tc

REPO = Path(__file__).resolve().parents[1]


def _small_cfg(**kw) -> tc.ToyControlConfig:
    base = dict(
        horizon=6,
        hidden=16,
        iterations=4,
        batch_size=16,
        micro_batches=4,
        teacher_iterations=2,
        teacher_batch=16,
        eval_rollouts=8,
        seeds=[0],
        gammas=[0.0, 1.0],
        heatmap_gammas=[0.0],
    )
    base.update(kw)
    return tc.ToyControlConfig(**base)


# ---------------------------------------------------------------- Gaussian log-density ratio and KL
def test_gaussian_log_ratio_matches_closed_form():
    rng = np.random.default_rng(0)
    a, mp, mq = rng.normal(size=(3, 50))
    sp, sq = rng.uniform(0.1, 2.0, size=(2, 50))
    got = np.asarray(tc.gaussian_log_ratio(a, mp, np.log(sp), mq, np.log(sq)))
    want = np.log(sq / sp) - (a - mp) ** 2 / (2 * sp**2) + (a - mq) ** 2 / (2 * sq**2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and log π itself against the textbook density
    dens = np.exp(-((a - mp) ** 2) / (2 * sp**2)) / (sp * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(np.asarray(tc.gaussian_logpdf(a, mp, np.log(sp))), np.log(dens), rtol=1e-5)


def test_gaussian_kl_is_expected_log_ratio():
    """KL(p‖q) in closed form equals E_{a~p}[log p(a) − log q(a)] by quadrature."""
    for mp, sp, mq, sq in ((0.3, 0.5, -1.0, 0.2), (2.0, 1.5, 2.1, 1.0), (0.0, 0.1, 0.0, 0.1)):
        a = np.linspace(mp - 12 * sp, mp + 12 * sp, 200001)
        p = np.exp(-((a - mp) ** 2) / (2 * sp**2)) / (sp * math.sqrt(2 * math.pi))
        r = np.log(sq / sp) - (a - mp) ** 2 / (2 * sp**2) + (a - mq) ** 2 / (2 * sq**2)
        want = np.trapezoid(p * r, a)
        got = float(tc.gaussian_kl(jnp.float32(mp), jnp.log(sp), jnp.float32(mq), jnp.log(sq)))
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (got, want)


# ---------------------------------------------------------------- the discounted estimator ĝ_γ
def _one_trajectory(cfg, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    student, teacher = tc.init_mlp(k1, cfg.hidden), tc.init_mlp(k2, cfg.hidden)
    traj = tc.rollout(student, 0, k3, 1, cfg)
    t_T = jnp.arange(cfg.horizon)
    mq, lq = tc.policy(teacher, 0, traj.states_NxT, t_T[None], cfg)
    logq_NxT = tc.gaussian_logpdf(traj.actions_NxT, mq, lq)
    return student, traj, logq_NxT


def _per_step_scores_and_costs(cfg, params, traj, logq_NxT):
    """g_t = ∇ log π(a_t|s_t) one step at a time (flattened), r_t = log π − log q; no scan, no vmap."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def logp(f, s, a, t):
        m, ls = tc.policy(unravel(f), 0, s, t, cfg)
        return tc.gaussian_logpdf(a, m, ls)

    value_and_score = jax.jit(jax.value_and_grad(logp))
    gs, rs = [], []
    for t in range(cfg.horizon):
        lp, g = value_and_score(flat, traj.states_NxT[0, t], traj.actions_NxT[0, t], jnp.float32(t))
        gs.append(np.asarray(g, np.float64))
        rs.append(float(lp) - float(logq_NxT[0, t]))
    return np.stack(gs), np.array(rs), flat


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_estimator_equals_explicit_double_sum(gamma):
    """∇ of the surrogate = Σ_t (Σ_{t'≥t} γ^{t'−t} r_{t'}) g_t; at γ = 0 it is Σ_t r_t g_t (token-level)."""
    cfg = _small_cfg()
    params, traj, logq = _one_trajectory(cfg)
    g_TxP, r_T, _ = _per_step_scores_and_costs(cfg, params, traj, logq)
    T = cfg.horizon
    coeff = np.array([sum(gamma ** (u - t) * r_T[u] for u in range(t, T)) for t in range(T)])
    want = (coeff[:, None] * g_TxP).sum(0)
    grads = jax.grad(tc.opd_surrogate)(
        params, lambda p, k, s, t: tc.policy(p, k, s, t, cfg), traj, logq, 0, jnp.float32(gamma)
    )
    got = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    # the estimator is not trivially γ-independent
    if gamma == 1.0:
        tok = (r_T[:, None] * g_TxP).sum(0)
        assert np.abs(tok - want).max() > 1e-3 * np.abs(want).max()


def test_token_level_estimator_is_unbiased_for_the_per_state_kl_gradient():
    """Score-function identity at fixed states: E_{a~π(·|s)}[r(a) ∇log π(a|s)] = ∇_θ KL(π_θ(·|s) ‖ q(·|s)).
    Left: the surrogate's γ = 0 gradient averaged over sampled actions (gaussian_logpdf, the shared
    r_t, the REINFORCE form). Right: jax.grad of the closed-form gaussian_kl. Independent arithmetic, so a
    wrong sign of r, a wrong density or a wrong KL fails; tolerance 5 Monte Carlo standard errors.
    (The batch gradient is the mean of these per-sample ones: test_micro_batch_gradients_... .)"""
    cfg = _small_cfg(horizon=3, hidden=4)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
    student, teacher = tc.init_mlp(k1, cfg.hidden), tc.init_mlp(k2, cfg.hidden)
    states_T = jnp.array([0.5, -1.0, 2.0])
    t_T = jnp.arange(cfg.horizon)
    n = 4_000

    def fn(p, k, s, t):
        return tc.policy(p, k, s, t, cfg)

    @jax.jit
    def sample_grads_and_exact(key):
        mp, lp = fn(student, 0, states_T, t_T)
        actions_NxT = mp + jnp.exp(lp) * jax.random.normal(key, (n, cfg.horizon))
        mq, lq = fn(teacher, 0, states_T, t_T)
        logq_NxT = tc.gaussian_logpdf(actions_NxT, mq, lq)

        def one(a_T, lq_T):
            t1 = tc.Trajectory(states_T[None], a_T[None], jnp.zeros((1, cfg.horizon + 1)))
            g = jax.grad(tc.opd_surrogate)(student, fn, t1, lq_T[None], 0, jnp.float32(0.0))
            return jax.flatten_util.ravel_pytree(g)[0]

        def kl_sum(p):
            m, ls = fn(p, 0, states_T, t_T)
            return jnp.sum(tc.gaussian_kl(m, ls, mq, lq))

        exact_P = jax.flatten_util.ravel_pytree(jax.grad(kl_sum)(student))[0]
        return jax.vmap(one)(actions_NxT, logq_NxT), exact_P

    per_sample_NxP, exact_grad = (np.asarray(x, np.float64) for x in sample_grads_and_exact(k3))
    mc = per_sample_NxP.mean(0)
    se = per_sample_NxP.std(0) / np.sqrt(n)
    assert np.linalg.norm(exact_grad) > 10 * np.linalg.norm(se)  # the check has power
    assert np.all(np.abs(mc - exact_grad) <= 5 * se + 1e-6 * np.abs(exact_grad).max())


def test_teacher_sigma_floor_and_unbounded_mean_are_config_values():
    """Ablation switches: `teacher_sigma_min` moves only the teachers' σ floor; `mean_max=None` removes the
    tanh bound on the action mean."""
    params = tc.init_mlp(jax.random.PRNGKey(0), 8)
    params = {**params, "b3": jnp.array([50.0, -50.0])}  # saturate: huge mean, σ at its floor
    base = _small_cfg(hidden=8)
    ablated = _small_cfg(hidden=8, teacher_sigma_min=1e-4, mean_max=None)
    s, t = jnp.array([0.3]), jnp.array([1])
    mean_b, ls_student = tc.policy(params, 0, s, t, base)
    _, ls_teacher = tc.policy(params, 0, s, t, base, teacher=True)
    mean_a, ls_teacher_a = tc.policy(params, 0, s, t, ablated, teacher=True)
    _, ls_student_a = tc.policy(params, 0, s, t, ablated)
    np.testing.assert_allclose(np.exp(ls_student), 0.1, rtol=1e-5)
    np.testing.assert_allclose(np.exp(ls_teacher), 0.1, rtol=1e-5)  # default: the student's floor
    np.testing.assert_allclose(np.exp(ls_teacher_a), 1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.exp(ls_student_a), 0.1, rtol=1e-5)  # the student keeps its floor
    assert abs(float(mean_b[0])) <= base.mean_max and abs(float(mean_a[0])) > 40.0


# ---------------------------------------------------------------- the paper's micro-batch variance proxy
def test_micro_batch_variance_matches_numpy():
    g = np.random.default_rng(1).normal(size=(8, 130)).astype(np.float32) * 3.0
    gbar = g.mean(0)
    want = np.mean([np.sum((g[m] - gbar) ** 2) for m in range(8)])
    np.testing.assert_allclose(float(tc.micro_batch_variance(jnp.asarray(g))), want, rtol=1e-5)
    assert float(tc.micro_batch_variance(jnp.tile(jnp.asarray(g[:1]), (8, 1)))) < 1e-9 * want  # fp32 rounding


def test_micro_batch_gradients_are_per_micro_batch_output_layer_gradients():
    """The study's vmapped per-micro-batch grads equal gradients computed micro-batch by micro-batch."""
    cfg = _small_cfg()
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    student, teacher = tc.init_mlp(k1, cfg.hidden), tc.init_mlp(k2, cfg.hidden)
    traj = tc.rollout(student, 1, k3, cfg.batch_size, cfg)
    mq, lq = tc.policy(teacher, 1, traj.states_NxT, jnp.arange(cfg.horizon)[None], cfg)
    logq = tc.gaussian_logpdf(traj.actions_NxT, mq, lq)

    def fn(p, k, s, t):
        return tc.policy(p, k, s, t, cfg)

    M, n = cfg.micro_batches, cfg.batch_size // cfg.micro_batches
    grad_fn = jax.jit(jax.grad(tc.opd_surrogate), static_argnums=1)
    direct = []
    for m in range(M):
        sub = jax.tree.map(lambda x, m=m: x[m * n : (m + 1) * n], traj)
        gm = grad_fn(student, fn, sub, logq[m * n : (m + 1) * n], 1, 0.5)
        direct.append(np.concatenate([np.ravel(gm["w3"]), np.ravel(gm["b3"])]))
    direct = np.stack(direct)
    mb = jax.tree.map(lambda x: x.reshape((M, n) + x.shape[1:]), (traj, logq))
    grads_M = jax.vmap(jax.grad(tc.opd_surrogate), in_axes=(None, None, 0, 0, None, None))(
        student, fn, mb[0], mb[1], 1, 0.5
    )
    flat = np.asarray(tc.flatten_subset(grads_M, tc.OUTPUT_LAYER))
    np.testing.assert_allclose(flat, direct, rtol=1e-4, atol=1e-4 * np.abs(direct).max())
    want = np.mean(np.sum((direct - direct.mean(0)) ** 2, axis=1))
    np.testing.assert_allclose(float(tc.micro_batch_variance(jnp.asarray(flat))), want, rtol=1e-4)


# ---------------------------------------------------------------- teachers learn their task
def test_short_teacher_training_moves_toward_target():
    cfg = _small_cfg(horizon=8, hidden=16, teacher_iterations=120, teacher_batch=32)
    _, parts = tc.make_study(cfg)
    teachers, returns_KxI = jax.jit(parts["train_teachers"])(jax.random.PRNGKey(7))
    init = tc.init_mlp(jax.random.PRNGKey(8), cfg.hidden)
    for task in (tc.LEFT, tc.RIGHT):
        _, target = tc.task_start_target(task, cfg)
        trained = jax.tree.map(lambda x, task=task: x[task], teachers)
        key = jax.random.PRNGKey(100 + task)
        d_before = float(jnp.mean(jnp.abs(parts["rollout"](init, task, key, 256).positions_NxT1[:, -1] - target)))
        d_after = float(jnp.mean(jnp.abs(parts["rollout"](trained, task, key, 256).positions_NxT1[:, -1] - target)))
        assert d_after < 1.0 and d_after < 0.25 * d_before, (task, d_before, d_after)
        ret = np.asarray(returns_KxI[task])
        assert ret[-10:].mean() > ret[:10].mean()


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize(
    "override, key",
    [
        (dict(gammas=[0.0, 1.5]), "gammas"),
        (dict(gammas=[-0.1]), "gammas"),
        (dict(horizon=0), "horizon"),
        (dict(micro_batches=7), "micro_batches"),
        (dict(sigma_min=3.0), "sigma_min"),
        (dict(heatmap_gammas=[0.3]), "heatmap_gammas"),
        (dict(seeds=[]), "seeds"),
        (dict(student_optimizer="rmsprop"), "student_optimizer"),
        (dict(mean_max=-1.0), "mean_max"),
        (dict(teacher_sigma_min=0.0), "teacher_sigma_min"),
        (dict(teacher_sigma_min=5.0), "teacher_sigma_min"),
    ],
)
def test_bad_config_raises_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected"):
        tc.validate(tc.ToyControlConfig(**override))
    with pytest.raises(ConfigError):
        tc.make_study(tc.ToyControlConfig(**override))


def test_default_config_composes_and_validates():
    from hydra import compose, initialize_config_dir

    import experiments.toy_coupling  # noqa: F401  (registers base_toy_coupling)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="toy_coupling", return_hydra_config=True)
    tc.validate(cfg)
    assert list(cfg.gammas) == [0.0, 0.25, 0.5, 0.75, 1.0] and list(cfg.seeds) == [42, 43, 2026]
    assert cfg.iterations == 2000 and cfg.horizon == 20 and cfg.batch_size == 64 and cfg.micro_batches == 8
    assert cfg.hydra.run.dir == "results/sandbox/toy_coupling"
    assert 3500 <= tc.num_params(tc.init_mlp(jax.random.PRNGKey(0), cfg.hidden)) <= 5000  # paper: ~4K


def test_cli_bad_gamma_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.toy_coupling", "gammas=[0,1.5]", f"hydra.run.dir={tmp_path / 'job'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: gammas: expected values in [0, 1], got 1.5"
    assert not (tmp_path / "job").exists()


# ---------------------------------------------------------------- the whole vmapped study, tiny
@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    from experiments.toy_coupling import run_study
    from paper_figs.common import load_jobs

    cfg = _small_cfg(seeds=[1, 2], gammas=[0.0, 0.5, 1.0], heatmap_gammas=[0.0, 1.0], iterations=6)
    final = run_study(cfg, tmp_path)
    job = load_jobs(tmp_path)[0]
    assert [r["step"] for r in job["rows"]] == list(range(1, 7))
    assert [r["task"] for r in job["rows"][:2]] == ["left", "right"]
    var = np.array([r["grad_var"] for r in job["rows"]])  # [I, S, G]
    assert var.shape == (6, 2, 3) and np.all(np.isfinite(var)) and np.all(var > 0)
    # common random numbers: at step 1 every γ sees the same rollouts, so the reverse KL agrees across γ
    kl1 = np.array(job["rows"][0]["reverse_kl"])
    np.testing.assert_allclose(kl1, kl1[:, :1].repeat(3, 1), rtol=1e-6)
    heat = np.array(final["heatmaps"])
    assert heat.shape == (2, 3, 2, cfg.horizon + 1, cfg.heatmap_bins)
    assert np.all(heat.sum(-1) == cfg.eval_rollouts)
