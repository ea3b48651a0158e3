"""The shared objectives against plain NumPy float64 references, finite differences, and hand tables.

Every test here would fail if the corresponding formula in opd/losses.py changed: references are
written independently from the docstring formulas (no code shared with the implementation).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd import losses

TOL = 1e-5

# ---------------------------------------------------------------------------------------------------------
# NumPy float64 references
# ---------------------------------------------------------------------------------------------------------


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
    z = np.exp(x - m)
    return x - m - np.log(z.sum(axis=-1, keepdims=True))


def np_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    p = np.exp(logp)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(p > 0, p * (logp - logq), 0.0)
    return terms.sum(axis=-1)


def np_renorm(logp: np.ndarray) -> np.ndarray:
    return np_log_softmax(logp)  # log p - log sum p over the support


def ref_topk_rkl(s_logits, ids, t_lp, renormalize):
    s_lp = np.take_along_axis(np_log_softmax(s_logits), ids, axis=-1)
    if renormalize:
        return np_kl(np_renorm(s_lp), np_renorm(np.asarray(t_lp, np.float64)))
    return np_kl(s_lp, np.asarray(t_lp, np.float64))


def ref_topk_fkl(s_logits, ids, t_lp):
    s_lp = np.take_along_axis(np_log_softmax(s_logits), ids, axis=-1)
    return np_kl(np.asarray(t_lp, np.float64), s_lp)


def ref_topk_tail(s_logits, ids, t_lp):
    s_p = np.exp(np.take_along_axis(np_log_softmax(s_logits), ids, axis=-1))
    t_p = np.exp(np.asarray(t_lp, np.float64))
    floor = 16 * np.finfo(np.float32).eps  # documented floor on tail masses (float32 compute)
    s_bins = np.concatenate([s_p, np.maximum(1 - s_p.sum(-1, keepdims=True), floor)], -1)
    t_bins = np.concatenate([t_p, np.maximum(1 - t_p.sum(-1, keepdims=True), floor)], -1)
    return np_kl(np.log(s_bins), np.log(t_bins))


def ref_full_rkl(s_logits, t_logits):
    return np_kl(np_log_softmax(s_logits), np_log_softmax(t_logits))


def ref_jsd(s_logits, t_logits, beta):
    p, q = np.exp(np_log_softmax(s_logits)), np.exp(np_log_softmax(t_logits))
    m = beta * q + (1 - beta) * p
    with np.errstate(divide="ignore"):
        return beta * np_kl(np.log(q), np.log(m)) + (1 - beta) * np_kl(np.log(p), np.log(m))


def ref_mask_first(tokens, special_ids, mask):
    out = np.array(mask, copy=True)
    for idx in np.ndindex(*tokens.shape[:-1]):
        for sid in special_ids:
            hits = np.flatnonzero(tokens[idx] == sid)
            if hits.size:
                out[idx + (hits[0],)] = 0
    return out


def ref_aggregate(values, mask, mode):
    v = np.where(mask > 0, values, 0.0) * mask
    if mode == "token_mean":
        return v.sum() / max(mask.sum(), 1.0)
    per_seq_tokens = mask.sum(-1)
    keep = per_seq_tokens > 0
    if not keep.any():
        return 0.0
    return (v.sum(-1)[keep] / per_seq_tokens[keep]).mean()


# ---------------------------------------------------------------------------------------------------------
# Random inputs
# ---------------------------------------------------------------------------------------------------------


def random_case(seed: int, shape=(3, 5), vocab=11, k=4, *, neg_inf=False, ties=False, student_zero=None):
    """Student/teacher logits and the teacher's exact top-K (ids + full-vocabulary log-probs).

    neg_inf pads the vocabulary with -inf logits on both sides; student_zero (default: = neg_inf) also
    rules out token 0 for the student alone, which the teacher may still hold in its top-K.
    """
    student_zero = neg_inf if student_zero is None else student_zero
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(*shape, vocab)) * 2.0
    t = rng.normal(size=(*shape, vocab)) * 2.0
    if ties:  # several teacher logits exactly equal, straddling the top-K boundary
        t[..., :3] = t.max(-1, keepdims=True) + 0.5
        t[..., 3 : k + 2] = t.max(-1, keepdims=True)
    if neg_inf:  # padded vocabulary on both sides, and a token the student alone rules out
        s[..., -2:] = -np.inf
        t[..., -2:] = -np.inf
    if student_zero:
        s[..., 0] = -np.inf
    t_lp = np_log_softmax(t)
    ids = np.argsort(-t_lp, axis=-1, kind="stable")[..., :k]
    return (s.astype(np.float32), t.astype(np.float32), ids.astype(np.int32),
            np.take_along_axis(t_lp, ids, -1).astype(np.float32))


CASES = [
    dict(seed=0),
    dict(seed=1, k=1),
    dict(seed=2, k=11),
    dict(seed=3, neg_inf=True),
    dict(seed=4, ties=True),
    dict(seed=5, shape=(7,), vocab=3, k=2),
    dict(seed=6, shape=(2, 2, 2), vocab=9, k=3, neg_inf=True, ties=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_topk_objectives_match_numpy_reference(case, jit):
    s, _, ids, t_lp = random_case(**case)
    wrap = jax.jit if jit else (lambda f: f)
    rkl = wrap(lambda a, b, c: losses.topk_reverse_kl(a, b, c))
    rkl_raw = wrap(lambda a, b, c: losses.topk_reverse_kl(a, b, c, renormalize=False))
    np.testing.assert_allclose(rkl(s, ids, t_lp), ref_topk_rkl(s, ids, t_lp, True), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(rkl_raw(s, ids, t_lp), ref_topk_rkl(s, ids, t_lp, False), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(
        wrap(losses.topk_forward_kl)(s, ids, t_lp), ref_topk_fkl(s, ids, t_lp), atol=TOL, rtol=TOL
    )
    np.testing.assert_allclose(
        wrap(losses.topk_reverse_kl_with_tail)(s, ids, t_lp), ref_topk_tail(s, ids, t_lp), atol=TOL, rtol=1e-4
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_full_vocabulary_objectives_match_numpy_reference(case):
    s, t, _, _ = random_case(**case)
    np.testing.assert_allclose(losses.full_reverse_kl(s, t), ref_full_rkl(s, t), atol=TOL, rtol=TOL)
    for beta in (0.1, 0.5, 0.9):
        np.testing.assert_allclose(losses.generalized_jsd(s, t, beta), ref_jsd(s, t, beta), atol=TOL, rtol=TOL)


def test_outputs_are_finite_with_padded_vocabulary():
    s, t, ids, t_lp = random_case(3, neg_inf=True)
    for value in (losses.topk_reverse_kl(s, ids, t_lp), losses.topk_reverse_kl(s, ids, t_lp, renormalize=False),
                  losses.topk_reverse_kl_with_tail(s, ids, t_lp), losses.full_reverse_kl(s, t),
                  losses.generalized_jsd(s, t)):
        assert np.all(np.isfinite(value))
    # Forward KL is finite when only padding is ruled out...
    s, t, ids, t_lp = random_case(3, neg_inf=True, student_zero=False)
    assert np.all(np.isfinite(losses.topk_forward_kl(s, ids, t_lp)))
    # ...and +inf, the true value, where the teacher holds mass on a token the student rules out.
    s, t, ids, t_lp = random_case(3, neg_inf=True)
    student_misses = np.any(ids == 0, axis=-1)
    fkl = np.asarray(losses.topk_forward_kl(s, ids, t_lp))
    assert student_misses.any() and np.all(np.isposinf(fkl[student_misses]))
    assert np.all(np.isfinite(fkl[~student_misses]))


def test_full_support_lsm_equals_full_reverse_kl():
    s, t, ids, t_lp = random_case(7, vocab=13, k=13)
    np.testing.assert_allclose(losses.topk_reverse_kl(s, ids, t_lp), losses.full_reverse_kl(s, t), atol=TOL)
    # ...and the tail bucket is empty, so the tail variant agrees as well
    np.testing.assert_allclose(losses.topk_reverse_kl_with_tail(s, ids, t_lp), losses.full_reverse_kl(s, t), atol=TOL)


def test_lsm_over_one_token_has_zero_loss_and_gradient():
    """K = 1: the student and teacher renormalized over one token are both 1, so LSM cannot move the student
    (why config refuses loss=lsm with loss.k=1), while the unrenormalized partial sum still has a gradient."""
    s, _t, ids, t_lp = random_case(10, vocab=13, k=1)
    np.testing.assert_array_equal(np.asarray(losses.topk_reverse_kl(s, ids, t_lp)), 0.0)
    grad = jax.grad(lambda x: losses.topk_reverse_kl(x, ids, t_lp).sum())(jnp.asarray(s))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    grad_partial = jax.grad(lambda x: losses.topk_reverse_kl(x, ids, t_lp, renormalize=False).sum())(jnp.asarray(s))
    assert np.max(np.abs(np.asarray(grad_partial))) > 1e-3


def test_truncated_lsm_differs_from_full_reverse_kl():
    """Guards against an implementation that ignores the support: K < V must change the value."""
    s, t, ids, t_lp = random_case(8, vocab=13, k=4)
    assert np.max(np.abs(losses.topk_reverse_kl(s, ids, t_lp) - losses.full_reverse_kl(s, t))) > 1e-2


def test_every_divergence_is_zero_when_student_equals_teacher():
    _, t, ids, t_lp = random_case(9, neg_inf=True)
    for value in (losses.topk_reverse_kl(t, ids, t_lp), losses.topk_reverse_kl(t, ids, t_lp, renormalize=False),
                  losses.topk_forward_kl(t, ids, t_lp), losses.topk_reverse_kl_with_tail(t, ids, t_lp),
                  losses.full_reverse_kl(t, t), losses.generalized_jsd(t, t, 0.3),
                  losses.sampled_token_log_ratio(t_lp[..., 0], t_lp[..., 0])):
        np.testing.assert_allclose(value, 0.0, atol=TOL)


def test_divergences_are_nonnegative_where_they_are_divergences():
    for seed in range(5):
        s, t, ids, t_lp = random_case(20 + seed)
        for value in (losses.topk_reverse_kl(s, ids, t_lp), losses.topk_reverse_kl_with_tail(s, ids, t_lp),
                      losses.full_reverse_kl(s, t), losses.generalized_jsd(s, t)):
            assert np.all(np.asarray(value) >= -TOL)
    # The unnormalized partial sum is not a divergence; it goes negative on some inputs (paper Fig 6a).
    lowest = []
    for seed in range(30, 35):
        s, _, ids, t_lp = random_case(seed)
        lowest.append(float(np.min(losses.topk_reverse_kl(s, ids, t_lp, renormalize=False))))
    assert min(lowest) < 0


def test_loss_changes_when_teacher_changes():
    """The teacher signal must reach the loss (peers.md §3 item 20: top-K collected then silently dropped)."""
    s, t, ids, t_lp = random_case(10)
    _, t2, ids2, t_lp2 = random_case(11)
    for fn in (losses.topk_reverse_kl, losses.topk_forward_kl, losses.topk_reverse_kl_with_tail):
        assert np.max(np.abs(fn(s, ids, t_lp) - fn(s, ids2, t_lp2))) > 1e-3
    # Same support ids, different teacher probabilities on it
    shifted = t_lp + np.linspace(0.0, 1.0, t_lp.shape[-1], dtype=np.float32)
    assert np.max(np.abs(losses.topk_reverse_kl(s, ids, t_lp) - losses.topk_reverse_kl(s, ids, shifted))) > 1e-3
    assert np.max(np.abs(losses.full_reverse_kl(s, t) - losses.full_reverse_kl(s, t2))) > 1e-3


def test_bf16_inputs_give_float32_outputs_close_to_float32():
    s, t, ids, t_lp = random_case(12)
    s16, t16, tlp16 = (jnp.asarray(x, jnp.bfloat16) for x in (s, t, t_lp))
    pairs = [
        (losses.topk_reverse_kl(s16, ids, tlp16), losses.topk_reverse_kl(s, ids, t_lp)),
        (losses.topk_forward_kl(s16, ids, tlp16), losses.topk_forward_kl(s, ids, t_lp)),
        (losses.full_reverse_kl(s16, t16), losses.full_reverse_kl(s, t)),
        (losses.generalized_jsd(s16, t16), losses.generalized_jsd(s, t)),
    ]
    for low, full in pairs:
        assert low.dtype == jnp.float32
        # bf16 rounding of the *inputs* is the only error source: 8-bit mantissa on logits of size ~4
        np.testing.assert_allclose(low, full, atol=1e-2 * max(1.0, float(np.abs(full).max())))
    assert losses.ppo_clip_loss(*(jnp.zeros(3, jnp.bfloat16),) * 3).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------
# Gradients against finite differences of the float64 reference
# ---------------------------------------------------------------------------------------------------------


def numeric_grad(f, x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        if not np.isfinite(x[idx]):
            continue
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


GRAD_CASES = {
    "topk_rkl": (lambda s, ids, tl: losses.topk_reverse_kl(s, ids, tl),
                 lambda s, ids, tl: ref_topk_rkl(s, ids, tl, True)),
    "topk_rkl_raw": (lambda s, ids, tl: losses.topk_reverse_kl(s, ids, tl, renormalize=False),
                     lambda s, ids, tl: ref_topk_rkl(s, ids, tl, False)),
    "topk_fkl": (losses.topk_forward_kl, ref_topk_fkl),
    "topk_tail": (losses.topk_reverse_kl_with_tail, ref_topk_tail),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
@pytest.mark.parametrize("neg_inf", [False, True])
def test_topk_gradients_match_finite_differences(name, neg_inf):
    fn, ref = GRAD_CASES[name]
    # Forward KL is +inf (no gradient) when the student rules out a teacher top-K token: pad only.
    student_zero = neg_inf and name != "topk_fkl"
    s, _, ids, t_lp = random_case(13, shape=(2,), vocab=7, k=3, neg_inf=neg_inf, student_zero=student_zero)
    weights = np.arange(1.0, 3.0)  # distinct per-position weights catch axis mix-ups
    got = jax.grad(lambda x: jnp.sum(fn(x, ids, t_lp) * weights))(jnp.asarray(s))
    want = numeric_grad(lambda x: np.sum(ref(x, ids, t_lp) * weights), s)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_full_vocabulary_gradients_match_finite_differences():
    s, t, _, _ = random_case(14, shape=(2,), vocab=6)
    for fn, ref in ((losses.full_reverse_kl, ref_full_rkl),
                    (lambda a, b: losses.generalized_jsd(a, b, 0.3), lambda a, b: ref_jsd(a, b, 0.3))):
        got = jax.grad(lambda x, fn=fn: fn(x, t).sum())(jnp.asarray(s))
        np.testing.assert_allclose(got, numeric_grad(lambda x, ref=ref: ref(x, t).sum(), s), atol=2e-4)


def test_renormalized_lsm_gradient_touches_only_the_support():
    """The paper's 'separate softmax': logits outside the teacher's top-K get exactly zero gradient."""
    s, _, ids, t_lp = random_case(15, shape=(4,), vocab=9, k=3)
    g = np.asarray(jax.grad(lambda x: losses.topk_reverse_kl(x, ids, t_lp).sum())(jnp.asarray(s)))
    outside = np.ones_like(g, bool)
    np.put_along_axis(outside, ids, False, axis=-1)
    assert np.all(g[outside] == 0.0) and np.any(g[~outside] != 0.0)
    g_raw = np.asarray(jax.grad(lambda x: losses.topk_reverse_kl(x, ids, t_lp, renormalize=False).sum())(s))
    assert np.any(g_raw[outside] != 0.0)  # unnormalized: the full normalizer couples every logit


# ---------------------------------------------------------------------------------------------------------
# Sampled-token OPD and PPO
# ---------------------------------------------------------------------------------------------------------


def test_sampled_token_log_ratio_is_teacher_minus_student():
    st, te = np.array([-0.5, -2.0, -0.1]), np.array([-1.0, -0.5, -0.1])
    np.testing.assert_allclose(losses.sampled_token_log_ratio(st, te), te - st, atol=1e-7)


# (log ratio, advantage) -> expected loss with eps = 0.2, dual clip c = 3.
PPO_TABLE = [
    # A > 0: min of the two surrogates in reward terms -> max in loss terms
    (np.log(1.1), 2.0, -2.0 * 1.1),     # inside the clip range: unclipped
    (np.log(1.5), 2.0, -2.0 * 1.2),     # ratio above 1+eps: clipped at 1.2
    (np.log(0.5), 2.0, -2.0 * 0.5),     # ratio below 1-eps, A>0: unclipped (pessimistic) term wins
    # A < 0
    (np.log(0.9), -1.0, 1.0 * 0.9),     # inside: unclipped
    (np.log(0.5), -1.0, 1.0 * 0.8),     # ratio below 1-eps: clipped at 0.8
    (np.log(2.0), -1.0, 1.0 * 2.0),     # ratio above 1+eps: unclipped, below dual clip
    (np.log(5.0), -1.0, 1.0 * 3.0),     # beyond the dual clip: capped at -A*c
    (np.log(5.0), 2.0, -2.0 * 1.2),     # dual clip never applies to A > 0
    (0.0, 0.0, 0.0),
]


def test_ppo_clip_loss_hand_table():
    logr, adv, want = map(np.array, zip(*PPO_TABLE))
    old = np.full_like(logr, -1.3)
    got = losses.ppo_clip_loss(old + logr, old, adv, clip_eps=0.2, dual_clip=3.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    without_dual = losses.ppo_clip_loss(old + logr, old, adv, clip_eps=0.2, dual_clip=None)
    assert without_dual[6] == pytest.approx(5.0, abs=1e-5)


def test_ppo_gradient_zero_when_clipped_and_flows_inside():
    old = jnp.zeros(3)
    adv = jnp.array([1.0, 1.0, -1.0])
    lp = jnp.log(jnp.array([1.0, 1.5, 5.0]))  # inside / clipped / dual-clipped
    g = jax.grad(lambda x: losses.ppo_clip_loss(x, old, adv).sum())(lp)
    np.testing.assert_allclose(g, [-1.0, 0.0, 0.0], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Masks and aggregation
# ---------------------------------------------------------------------------------------------------------


def test_mask_first_occurrences_matches_reference():
    rng = np.random.default_rng(16)
    tokens = rng.integers(0, 6, size=(4, 3, 9))
    mask = (rng.random((4, 3, 9)) > 0.2).astype(np.float32)
    for special in ([1], [1, 4], [5, 2, 2], []):
        np.testing.assert_array_equal(
            losses.mask_first_occurrences(tokens, special, mask), ref_mask_first(tokens, special, mask)
        )


def test_mask_first_occurrences_example():
    tokens = np.array([[7, 3, 9, 3, 7, 9], [1, 1, 1, 1, 1, 1]])
    got = losses.mask_first_occurrences(tokens, [3, 9], np.ones((2, 6), np.int32))
    np.testing.assert_array_equal(got, [[1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert got.dtype == jnp.int32


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_aggregate_matches_reference_with_fully_masked_rows(mode):
    rng = np.random.default_rng(17)
    values = rng.normal(size=(5, 8))
    mask = (rng.random((5, 8)) > 0.4).astype(np.float64)
    mask[1] = 0.0  # a fully masked sequence
    values[1, 3] = np.nan  # masked garbage must not leak
    values[mask == 0] = np.where(rng.random((mask == 0).sum()) > 0.5, np.inf, values[mask == 0])
    got = losses.aggregate(values, mask, mode)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, ref_aggregate(values, mask, mode), atol=TOL)


def test_aggregate_modes_differ_and_all_masked_is_zero():
    values = np.array([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    assert float(losses.aggregate(values, mask, "token_mean")) == pytest.approx(9 / 5)
    assert float(losses.aggregate(values, mask, "sequence_mean")) == pytest.approx(3.0)
    for mode in losses.AGGREGATION_MODES:
        assert float(losses.aggregate(values, np.zeros_like(mask), mode)) == 0.0


def test_aggregate_gradient_is_finite_with_masked_infinities():
    values = jnp.array([[1.0, jnp.inf], [2.0, 3.0]])
    mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
    g = jax.grad(lambda v: losses.aggregate(v, mask, "token_mean"))(values)
    np.testing.assert_allclose(g, [[1 / 3, 0.0], [1 / 3, 1 / 3]], atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear ValueError naming the argument, at trace time
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    s, t, ids, t_lp = random_case(18)
    cases = [
        (lambda: losses.topk_reverse_kl(s, ids[..., :2], t_lp), "same shape"),
        (lambda: losses.topk_reverse_kl(s[:2], ids, t_lp), "leading axes"),
        (lambda: losses.topk_reverse_kl(s, np.zeros((3, 5, 12), np.int32), np.zeros((3, 5, 12))), "K must"),
        (lambda: losses.topk_reverse_kl(s, np.zeros((3, 5, 0), np.int32), np.zeros((3, 5, 0))), "K must"),
        (lambda: losses.topk_reverse_kl(s, ids + 11, t_lp), r"\[0, 11\)"),
        (lambda: losses.topk_forward_kl(s, -ids - 1, t_lp), r"\[0, 11\)"),
        (lambda: losses.topk_reverse_kl(s, ids.astype(np.float32), t_lp), "integer"),
        (lambda: losses.full_reverse_kl(s, t[..., :5]), "same shape"),
        (lambda: losses.generalized_jsd(s, t, 1.0), "beta"),
        (lambda: losses.aggregate(np.zeros((2, 3)), np.ones((2, 3)), "mean"), "mode must be one of"),
        (lambda: losses.aggregate(np.zeros((2, 3)), np.ones((3, 2)), "token_mean"), "same shape"),
        (lambda: losses.ppo_clip_loss(np.zeros(3), np.zeros(3), np.zeros(3), clip_eps=0.0), "clip_eps"),
        (lambda: losses.ppo_clip_loss(np.zeros(3), np.zeros(3), np.zeros(3), clip_eps=-0.1), "clip_eps"),
        (lambda: losses.ppo_clip_loss(np.zeros(3), np.zeros(2), np.zeros(3)), "same shape"),
        (lambda: losses.sampled_token_log_ratio(np.zeros(3), np.zeros(4)), "same shape"),
        (lambda: losses.mask_first_occurrences(np.zeros((2, 3), np.int32), [1], np.ones((2, 4))), "same shape"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_shape_errors_raise_under_jit():
    s, _, ids, t_lp = random_case(19)
    with pytest.raises(ValueError, match="same shape"):
        jax.jit(losses.topk_reverse_kl)(s, ids[..., :2], t_lp)
    with pytest.raises(ValueError, match="K must"):
        jax.jit(losses.topk_reverse_kl)(s[..., :3], ids, t_lp)


def test_float64_inputs_stay_float64():
    """The sandbox's exact enumeration calls these functions in float64 and must not be rounded."""
    with jax.enable_x64(True):
        s, t, ids, t_lp = (np.asarray(x, np.float64) if x.dtype != np.int32 else x for x in random_case(21))
        out = losses.topk_reverse_kl(s, ids, t_lp)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, ref_topk_rkl(s, ids, t_lp, True), atol=1e-12)
        full = losses.full_reverse_kl(s, t)
        np.testing.assert_allclose(full, ref_full_rkl(s, t), atol=1e-12)


def test_all_pairs_of_objectives_are_distinct_functions():
    """No two objectives silently share a formula (each answers a different question)."""
    s, t, ids, t_lp = random_case(22)
    values = {
        "lsm": losses.topk_reverse_kl(s, ids, t_lp),
        "lsm_raw": losses.topk_reverse_kl(s, ids, t_lp, renormalize=False),
        "fkl": losses.topk_forward_kl(s, ids, t_lp),
        "tail": losses.topk_reverse_kl_with_tail(s, ids, t_lp),
        "full": losses.full_reverse_kl(s, t),
        "jsd": losses.generalized_jsd(s, t),
    }
    for (a, va), (b, vb) in itertools.combinations(values.items(), 2):
        assert np.max(np.abs(np.asarray(va) - np.asarray(vb))) > 1e-3, (a, b)
