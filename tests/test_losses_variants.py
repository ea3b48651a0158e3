"""Issue 13 objectives (support variants V2-V5, vOPD, constant-advantage control, stop-gradient top-K,
PowerOPD's Box-Cox reward) against NumPy float64 references, finite differences and exact expectations
over the sampled token.

References are written from the docstring formulas with no code shared with opd/losses.py. Gradients
of functions with stop-gradients are checked against finite differences of the reference with the
detached factors frozen at the evaluation point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd import losses

# ---------------------------------------------------------------------------------------------------------
# NumPy float64 references
# ---------------------------------------------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_kl(logp, logq):
    p = np.exp(logp)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p > 0, p * (logp - logq), 0.0).sum(axis=-1)


def case(seed, *, shape=(3,), vocab=7, k=3, y_in_support=None):
    """Student/teacher logits, teacher top-k (ids, full-vocab log-probs), a sampled token per position."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=shape + (vocab,)) * 1.5
    t = rng.normal(size=shape + (vocab,)) * 1.5
    lq = np_log_softmax(t)
    ids = np.argsort(-lq, axis=-1)[..., :k]
    y = rng.integers(0, vocab, size=shape)
    if y_in_support is not None:  # force y inside / outside the teacher's top-k at every position
        for idx in np.ndindex(*shape):
            pool = ids[idx] if y_in_support else np.setdiff1d(np.arange(vocab), ids[idx])
            y[idx] = rng.choice(pool)
    t_lp = np.take_along_axis(lq, ids, -1)
    t_y = np.take_along_axis(lq, y[..., None], -1)[..., 0]
    return s, t, ids, t_lp, y, t_y


def ref_union(s, ids, t_lp, y, t_y):
    lp = np_log_softmax(s)
    out = np.zeros(s.shape[:-1])
    for idx in np.ndindex(*s.shape[:-1]):
        sup, q = list(ids[idx]), list(t_lp[idx])
        if y[idx] not in sup:
            sup.append(y[idx])
            q.append(t_y[idx])
        p_s = lp[idx][sup]
        out[idx] = np_kl(p_s - np.log(np.exp(p_s).sum()), np.asarray(q) - np.log(np.exp(q).sum()))
    return out


def ref_partial_sum(s, ids, t_lp):
    return np_kl(np.take_along_axis(np_log_softmax(s), ids, -1), t_lp)


def ref_ema_value(s, ids, t_lp, y, old, t_y, is_clip=None):
    lp = np_log_softmax(s)
    lp_y = np.take_along_axis(lp, y[..., None], -1)[..., 0]
    outside = ~np.any(ids == y[..., None], -1)
    w = np.exp(lp_y - old)
    if is_clip is not None:
        w = np.minimum(w, is_clip)
    return ref_partial_sum(s, ids, t_lp) + np.where(outside, w * (lp_y - t_y), 0.0)


def numeric_grad(f, x, eps=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def full_kl_grad(s, t):
    """∇_z KL(π‖q) = Σ_v (log π_v − log q_v) π_v (e_v − π), exact float64."""
    lp, lq = np_log_softmax(s), np_log_softmax(t)
    p = np.exp(lp)
    c = lp - lq
    return p * c - p * np.sum(p * c, -1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("y_in_support", [None, True, False])
def test_union_sampled_reverse_kl_matches_reference(jit, y_in_support):
    s, _, ids, t_lp, y, t_y = case(1, shape=(2, 3), y_in_support=y_in_support)
    fn = jax.jit(losses.union_sampled_reverse_kl) if jit else losses.union_sampled_reverse_kl
    got = fn(s, ids, t_lp, y, t_y)
    np.testing.assert_allclose(got, ref_union(s, ids, t_lp, y, t_y), atol=1e-5)


def test_union_with_y_inside_is_lsm_and_full_support_is_full_kl():
    s, t, ids, t_lp, y, t_y = case(2, y_in_support=True)
    np.testing.assert_allclose(losses.union_sampled_reverse_kl(s, ids, t_lp, y, t_y),
                               losses.topk_reverse_kl(s, ids, t_lp), atol=1e-6)
    s, t, ids, t_lp, y, t_y = case(3, vocab=6, k=6)
    np.testing.assert_allclose(losses.union_sampled_reverse_kl(s, ids, t_lp, y, t_y),
                               np_kl(np_log_softmax(s), np_log_softmax(t)), atol=1e-5)


def test_student_topk_support_picks_student_ids_and_teacher_logprobs():
    s, t, *_ = case(4, vocab=9)
    ids, lq = losses.student_topk_support(s, t, 4)
    want = np.argsort(-s, axis=-1)[..., :4]
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(want, -1))
    np.testing.assert_allclose(lq, np.take_along_axis(np_log_softmax(t), np.asarray(ids), -1), atol=1e-6)


def test_stop_gradient_topk_value_is_the_partial_sum():
    s, _, ids, t_lp, _, _ = case(5)
    np.testing.assert_allclose(losses.stop_gradient_topk_reverse_kl(s, ids, t_lp),
                               ref_partial_sum(s, ids, t_lp), atol=1e-5)


@pytest.mark.parametrize("is_clip", [None, 1.1])
def test_ema_pg_value_matches_reference(is_clip):
    s, _, ids, t_lp, y, t_y = case(6, shape=(4,))
    old = np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0] + np.array([0.0, 0.3, -0.4, 0.1])
    got = losses.ema_pg_loss(s, ids, t_lp, y, old, t_y, is_clip=is_clip)
    np.testing.assert_allclose(got, ref_ema_value(s, ids, t_lp, y, old, t_y, is_clip), atol=1e-5)


def test_box_cox_reward_formula_bounds_and_log_ratio_limit():
    rng = np.random.default_rng(7)
    lp, lq = -rng.exponential(2.0, 50), -rng.exponential(2.0, 50)
    for alpha in (0.3, 1.0, 5.0):
        got = np.asarray(losses.box_cox_reward(lp, lq, alpha))
        np.testing.assert_allclose(got, (np.exp(alpha * lq) - np.exp(alpha * lp)) / alpha, atol=1e-6)
        assert np.all(np.abs(got) <= 1 / alpha + 1e-7)
        assert np.all(got * (lq - lp) >= 0)  # sign-consistent with the log ratio (0 only on underflow)
    with jax.enable_x64(True):
        small = losses.box_cox_reward(jnp.asarray(lp), jnp.asarray(lq), 1e-7)
        np.testing.assert_allclose(small, lq - lp, rtol=1e-5, atol=1e-6)


def test_sampled_token_advantage_values_and_detached():
    rng = np.random.default_rng(8)
    lp, lq, kl = -rng.exponential(1.0, 5), -rng.exponential(1.0, 5), rng.exponential(1.0, 5)
    np.testing.assert_allclose(losses.sampled_token_advantage(lp, lq), lq - lp, atol=1e-6)
    np.testing.assert_allclose(losses.sampled_token_advantage(lp, lq, kl_baseline=kl), lq - lp + kl, atol=1e-6)
    np.testing.assert_allclose(losses.sampled_token_advantage(lp, lq, reward="box_cox", alpha=2.0, kl_baseline=kl),
                               (np.exp(2 * lq) - np.exp(2 * lp)) / 2 + kl, atol=1e-6)
    grads = jax.grad(lambda a, b, c: losses.sampled_token_advantage(a, b, kl_baseline=c).sum(), argnums=(0, 1, 2))(
        jnp.asarray(lp), jnp.asarray(lq), jnp.asarray(kl))
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_constant_advantage():
    a = losses.constant_advantage(np.zeros((2, 3), np.float32), -0.5)
    assert a.shape == (2, 3) and a.dtype == jnp.float32 and np.all(np.asarray(a) == -0.5)


# ---------------------------------------------------------------------------------------------------------
# Gradients: finite differences with the detached factors frozen
# ---------------------------------------------------------------------------------------------------------

WEIGHTS = np.array([1.0, 2.0, 3.0])  # distinct per-position weights catch axis mix-ups


@pytest.mark.parametrize("y_in", [True, False])
def test_union_gradient_matches_finite_differences(y_in):
    s, _, ids, t_lp, y, t_y = case(9, y_in_support=y_in)
    got = jax.grad(lambda x: jnp.sum(losses.union_sampled_reverse_kl(x, ids, t_lp, y, t_y) * WEIGHTS))(
        jnp.asarray(s))
    want = numeric_grad(lambda x: np.sum(ref_union(x, ids, t_lp, y, t_y) * WEIGHTS), s)
    np.testing.assert_allclose(got, want, atol=2e-4)
    support = np.zeros_like(s, bool)
    np.put_along_axis(support, ids, True, -1)
    np.put_along_axis(support, y[..., None], True, -1)
    assert np.all(np.asarray(got)[~support] == 0.0)  # renormalized: only S ∪ {y} logits move


def test_stop_gradient_topk_gradient_matches_frozen_finite_differences():
    s, _, ids, t_lp, _, _ = case(10)
    cost = np.take_along_axis(np_log_softmax(s), ids, -1) - t_lp  # frozen at the evaluation point

    def frozen(x):
        return np.sum(np.sum(np.exp(np.take_along_axis(np_log_softmax(x), ids, -1)) * cost, -1) * WEIGHTS)

    got = jax.grad(lambda x: jnp.sum(losses.stop_gradient_topk_reverse_kl(x, ids, t_lp) * WEIGHTS))(
        jnp.asarray(s))
    np.testing.assert_allclose(got, numeric_grad(frozen, s), atol=2e-4)
    # ...and it is not the plain partial sum's gradient (which keeps the "+1" term ∇π(S))
    raw = jax.grad(lambda x: jnp.sum(losses.topk_reverse_kl(x, ids, t_lp, renormalize=False) * WEIGHTS))(
        jnp.asarray(s))
    assert np.max(np.abs(np.asarray(raw) - np.asarray(got))) > 1e-2


def test_ema_pg_gradient_matches_frozen_finite_differences():
    s, _, ids, t_lp, y, t_y = case(11, y_in_support=False)
    lp_y = np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0]
    old = lp_y + np.array([0.2, -0.1, 0.0])
    w, cost = np.exp(lp_y - old), lp_y - t_y  # frozen

    def frozen(x):
        lpx_y = np.take_along_axis(np_log_softmax(x), y[..., None], -1)[..., 0]
        return np.sum((ref_partial_sum(x, ids, t_lp) + w * np.exp(lpx_y - lp_y) * cost) * WEIGHTS)

    got = jax.grad(lambda x: jnp.sum(losses.ema_pg_loss(x, ids, t_lp, y, old, t_y) * WEIGHTS))(jnp.asarray(s))
    np.testing.assert_allclose(got, numeric_grad(frozen, s), atol=2e-4)


def test_vopd_surrogate_gradient_matches_frozen_finite_differences():
    s, t, ids, t_lp, y, t_y = case(12)
    lp_y = np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0]
    for kl in (losses.full_reverse_kl(s, t), losses.topk_reverse_kl(s, ids, t_lp, renormalize=False)):
        adv = np.asarray(losses.sampled_token_advantage(lp_y, t_y, kl_baseline=kl), np.float64)

        def surrogate(x, adv=adv):
            lpx_y = np.take_along_axis(np_log_softmax(x), y[..., None], -1)[..., 0]
            return np.sum(-adv * np.exp(lpx_y - lp_y) * WEIGHTS)

        def loss(x, kl=kl):
            lpx = jnp.take_along_axis(jax.nn.log_softmax(x), jnp.asarray(y)[..., None], -1)[..., 0]
            a = losses.sampled_token_advantage(lp_y, t_y, kl_baseline=kl)
            return jnp.sum(losses.ppo_clip_loss(lpx, lp_y, a) * WEIGHTS)

        np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(s)), numeric_grad(surrogate, s), atol=2e-4)


# ---------------------------------------------------------------------------------------------------------
# Exact expectations over the sampled token (float64 enumeration of y at one position)
# ---------------------------------------------------------------------------------------------------------


def _per_y_grads(fn, s_V, vocab):
    """[V(y), V] gradients of fn(logits, y) for every sampled token y (one jitted vmap), float64."""
    return np.asarray(jax.jit(jax.vmap(jax.grad(fn), in_axes=(None, 0)))(jnp.asarray(s_V), jnp.arange(vocab)))


def test_expected_gradients_over_the_sampled_token():
    """On-policy, exactly: vOPD (full or top-k baseline) and sampled-token OPD share the mean ∇KL;
    the constant control has mean 0; EMA-PG's mean is ∇KL + ∇π(S); stop-gradient top-K at K = V is ∇KL."""
    vocab, k = 6, 2
    with jax.enable_x64(True):
        rng = np.random.default_rng(13)
        s, t = rng.normal(size=vocab) * 1.5, rng.normal(size=vocab) * 1.5
        lp, lq = np_log_softmax(s), np_log_softmax(t)
        p = np.exp(lp)
        ids = np.argsort(-lq)[:k]
        lp_j, lq_j = jnp.asarray(lp), jnp.asarray(lq)
        grad_kl = full_kl_grad(s, t)

        def opd(x, y, kl=None):
            a = losses.sampled_token_advantage(lp_j[y], lq_j[y], kl_baseline=kl)
            return losses.ppo_clip_loss(jax.nn.log_softmax(x)[y], lp_j[y], a)

        def vopd_full(x, y):
            return opd(x, y, losses.full_reverse_kl(x, jnp.asarray(t)))

        def vopd_topk(x, y):
            return opd(x, y, losses.topk_reverse_kl(x, ids, lq[ids], renormalize=False))

        def const(x, y):
            return losses.ppo_clip_loss(jax.nn.log_softmax(x)[y], lp_j[y], losses.constant_advantage(lp_j[y], -1.0))

        def ema(x, y):
            return losses.ema_pg_loss(x, ids, lq[ids], y, lp_j[y], lq_j[y])

        per_y = {name: _per_y_grads(fn, s, vocab)
                 for name, fn in (("opd", opd), ("vopd_full", vopd_full), ("vopd_topk", vopd_topk),
                                  ("const", const), ("ema", ema))}
        means = {name: p @ g for name, g in per_y.items()}
        for name in ("opd", "vopd_full", "vopd_topk"):
            np.testing.assert_allclose(means[name], grad_kl, atol=1e-12)
        np.testing.assert_allclose(means["const"], 0.0, atol=1e-12)
        grad_pi_s = p[ids] @ (np.eye(vocab)[ids] - p)  # ∇_z π(S) = Σ_{v∈S} π_v (e_v − π)
        np.testing.assert_allclose(means["ema"], grad_kl + grad_pi_s, atol=1e-12)
        all_ids = np.arange(vocab)
        sg_full = jax.grad(lambda x: losses.stop_gradient_topk_reverse_kl(x, all_ids, lq))(jnp.asarray(s))
        np.testing.assert_allclose(sg_full, grad_kl, atol=1e-12)
        # the exact value baseline lowers the variance of the per-token gradient here
        var = {name: p @ np.sum((per_y[name] - grad_kl) ** 2, -1) for name in ("opd", "vopd_full")}
        assert var["vopd_full"] < var["opd"]


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear ValueError naming the argument
# ---------------------------------------------------------------------------------------------------------


def test_bad_input_raises_one_clear_line():
    s, t, ids, t_lp, y, t_y = case(14)
    with pytest.raises(ValueError, match="sampled_ids shape"):
        losses.union_sampled_reverse_kl(s, ids, t_lp, y[:2], t_y[:2])
    with pytest.raises(ValueError, match="sampled_ids must be an integer"):
        losses.union_sampled_reverse_kl(s, ids, t_lp, y.astype(np.float32), t_y)
    with pytest.raises(ValueError, match="sampled_ids must lie in"):
        losses.union_sampled_reverse_kl(s, ids, t_lp, y + 100, t_y)
    with pytest.raises(ValueError, match="teacher_sampled_logprobs"):
        losses.union_sampled_reverse_kl(s, ids, t_lp, y, t_y[:2])
    with pytest.raises(ValueError, match="k must be"):
        losses.student_topk_support(s, t, 0)
    with pytest.raises(ValueError, match="is_clip"):
        losses.ema_pg_loss(s, ids, t_lp, y, t_y, t_y, is_clip=0.0)
    with pytest.raises(ValueError, match="alpha must be"):
        losses.box_cox_reward(t_y, t_y, 0.0)
    with pytest.raises(ValueError, match="reward must be one of"):
        losses.sampled_token_advantage(t_y, t_y, reward="tanh")
    with pytest.raises(ValueError, match="alpha is required"):
        losses.sampled_token_advantage(t_y, t_y, reward="box_cox")
    with pytest.raises(ValueError, match="alpha applies only"):
        losses.sampled_token_advantage(t_y, t_y, alpha=1.0)
    with pytest.raises(ValueError, match="kl_baseline"):
        losses.sampled_token_advantage(t_y, t_y, kl_baseline=t_y[:2])
    with pytest.raises(ValueError, match="value must be"):
        losses.constant_advantage(t_y, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Registry entries (opd/objectives.py): each adapter is the direct opd.losses call on the trainer's inputs
# ---------------------------------------------------------------------------------------------------------

ISSUE13 = ("vopd", "vopd_topk", "power_opd", "constant_negative", "stop_grad_topk",
           "support_v2", "support_v3", "support_v4", "support_v5")


class _Cfg:  # the LossConfig fields the adapters read (opd/train/config.py defaults)
    clip_eps, dual_clip, k = 0.2, 3.0, 3
    box_cox_alpha, constant_advantage, is_clip = 1.0, -1.0, None


def _direct(name, s, t, ids, t_lp, y, old, t_y):
    lp_y = np.take_along_axis(np.asarray(jax.nn.log_softmax(jnp.asarray(s, jnp.float32)), np.float64),
                              y[..., None], -1)[..., 0]

    def pg(adv):
        return losses.ppo_clip_loss(lp_y, old, adv)

    s_ids, s_lq = losses.student_topk_support(s, t, 3)
    return {
        "vopd": lambda: pg(losses.sampled_token_advantage(old, t_y, kl_baseline=losses.full_reverse_kl(s, t))),
        "vopd_topk": lambda: pg(losses.sampled_token_advantage(
            old, t_y, kl_baseline=losses.topk_reverse_kl(s, ids, t_lp, renormalize=False))),
        "power_opd": lambda: pg(losses.sampled_token_advantage(old, t_y, reward="box_cox", alpha=1.0)),
        "constant_negative": lambda: pg(losses.constant_advantage(old, -1.0)),
        "stop_grad_topk": lambda: losses.stop_gradient_topk_reverse_kl(s, ids, t_lp),
        "support_v2": lambda: losses.union_sampled_reverse_kl(s, s_ids, s_lq, y, t_y),
        "support_v3": lambda: losses.union_sampled_reverse_kl(s, ids, t_lp, y, t_y),
        "support_v4": lambda: losses.ema_pg_loss(s, s_ids, s_lq, y, old, t_y),
        "support_v5": lambda: losses.ema_pg_loss(s, ids, t_lp, y, old, t_y),
    }[name]()


@pytest.mark.parametrize("name", ISSUE13)
def test_registered_objective_is_the_direct_loss(name):
    from opd import objectives

    obj = objectives.get(name)
    assert obj.teacher in objectives.TEACHER_SUPPLIES and 0 < obj.rollout_top_p <= 1
    # the student-top-K variants and the full-vocabulary baseline need the teacher's logits
    assert (obj.teacher == "logits") == (name in ("vopd", "support_v2", "support_v4"))
    s, t, ids, t_lp, y, t_y = case(15, shape=(2, 3))
    old = np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0] - 0.1
    x = objectives.PositionInputs(tokens=jnp.asarray(y), old_logprobs=jnp.asarray(old, jnp.float32),
                                  teacher_sampled=jnp.asarray(t_y, jnp.float32), topk_ids=jnp.asarray(ids),
                                  topk_logprobs=jnp.asarray(t_lp, jnp.float32))
    teacher = jnp.asarray(t, jnp.float32) if obj.teacher == "logits" else None
    got = obj.fn(jnp.asarray(s, jnp.float32), x, _Cfg(), teacher)
    assert got.shape == y.shape and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _direct(name, s, t, ids, t_lp, y, old.astype(np.float32), t_y), atol=1e-5)


def test_padded_vocabulary_gives_finite_values_and_gradients():
    """-inf student logits (padding) outside S ∪ {y}, and a padded id inside the support: no NaN/inf."""
    s, _, ids, t_lp, y, t_y = case(16, shape=(3,), vocab=8, k=3, y_in_support=False)
    pad = np.ones_like(s, bool)
    np.put_along_axis(pad, ids, False, -1)
    np.put_along_axis(pad, y[..., None], False, -1)
    first_pad = np.argmax(pad, axis=-1)
    s = np.where(pad, -np.inf, s)
    ids_with_pad = ids.copy()
    ids_with_pad[..., -1] = first_pad  # a zero-probability student token inside the support
    lp_y = np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0]
    fns = {
        "union": lambda x: losses.union_sampled_reverse_kl(x, ids, t_lp, y, t_y),
        "sg_topk": lambda x: losses.stop_gradient_topk_reverse_kl(x, ids_with_pad, t_lp),
        "ema": lambda x: losses.ema_pg_loss(x, ids_with_pad, t_lp, y, lp_y, t_y),
    }
    for name, fn in fns.items():
        value = np.asarray(fn(jnp.asarray(s)))
        grad = np.asarray(jax.grad(lambda x, fn=fn: fn(x).sum())(jnp.asarray(s)))
        assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad)), name
