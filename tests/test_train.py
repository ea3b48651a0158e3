"""The OPD trainer: diagnostics against numpy references, the loss depends on the teacher, a student equal
to its teacher has zero divergence, updates lower the objective and never touch the teacher, special-token
masking, the SFT checkpoint cache is reused, and metrics rows carry every required key.

Everything runs on tiny models (D=16) and the 1-digit arithmetic task so the file stays fast on CPU."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

from opd import diagnostics, objectives
from opd.model import ModelConfig, Transformer
from opd.tasks.arithmetic import ArithmeticTask
from opd.teacher import score
from opd.train import checkpoints
from opd.train.opd_step import (
    Batch,
    OPDStepper,
    build_batch,
    positions_from_mask,
    target_aligned_logits,
    update_peak_bytes,
)

LOSS_NAMES = ("sampled_token", "lsm", "lsm_no_renorm", "full_rkl", "topk_tail", "topk_fkl")
V, K = 24, 4


def _model(seed: int, vocab: int = V, hidden: int = 16) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, max_seq_len=64)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _loss_cfg(name: str, **kw):
    """The config schema's loss section (every objective's constants at their defaults) for `name`."""
    from opd.train.config import LossConfig

    base = {"name": name, "k": K, "aggregation": "sequence_mean", "mask_special_tokens": False, "rollout_top_p": 1.0}
    return OmegaConf.merge(OmegaConf.structured(LossConfig), {**base, **kw})


def _opt_cfg(**kw):
    base = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
            "grad_clip": 1.0, "minibatches_per_step": 1}
    return OmegaConf.create({**base, **kw})


def _batch(student, teacher, *, b=4, p=3, n=8, seed=0, k=K, vocab_size=None) -> Batch:
    """A rollout-like batch: random prompt + response tokens, student log-probs from a forward pass."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, size=(b, p + n)).astype(np.int32)
    attn = np.ones((b, p + n), np.int32)
    attn[0, 0] = 0  # left padding in one row
    tokens[0, 0] = 0
    resp = np.zeros((b, p + n), np.int32)
    resp[:, p:] = 1
    resp[1, p + 5:] = 0  # a shorter response
    attn[1, p + 5:] = 0
    tokens[1, p + 5:] = 0
    tokens, attn, resp = map(jnp.asarray, (tokens, attn, resp))
    logits = target_aligned_logits(student, tokens, positions_from_mask(attn), attn)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0] * resp

    class R:  # a Rollout stand-in with the interface's fields
        tokens_BxL, attention_mask_BxL, response_mask_BxL, logprobs_BxL = tokens, attn, resp, logp

    return build_batch(R, score(teacher, tokens, attn, k, vocab_size=vocab_size))


def _loss(stepper: OPDStepper, batch: Batch, teacher=None) -> float:
    _, params, rest = nnx.split(stepper.student, nnx.Param, ...)
    t_state = nnx.state(teacher) if teacher is not None and stepper.loss_cfg.name == "full_rkl" else None
    return float(stepper.loss_fn(params, rest, batch, t_state)[0])


def _stepper(student, name, teacher, **opt):
    gd = nnx.graphdef(teacher) if name == "full_rkl" else None
    return OPDStepper(student, _loss_cfg(name), _opt_cfg(**opt), teacher_graphdef=gd)


# ---------------------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------------------


def test_diagnostics_match_numpy_references():
    rng = np.random.default_rng(0)
    b, l_, v, k = 3, 5, 7, 2
    logits = rng.normal(size=(b, l_, v)).astype(np.float32)
    tokens = rng.integers(0, v, size=(b, l_)).astype(np.int32)
    mask = (rng.random((b, l_)) < 0.7).astype(np.float32)
    t_logp = np.log(np.exp(logits[::-1]) / np.exp(logits[::-1]).sum(-1, keepdims=True))  # another dist
    s_logp = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-t_logp, axis=-1)[..., :k]
    t_topk = np.take_along_axis(t_logp, ids, -1)
    t_s = np.take_along_axis(t_logp, tokens[..., None], -1)[..., 0]
    s_s = np.take_along_axis(s_logp, tokens[..., None], -1)[..., 0]
    m = mask > 0
    np.testing.assert_allclose(diagnostics.logprob_gap(t_s, s_s, mask), (t_s - s_s)[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(diagnostics.neg_reward_frac(t_s, s_s, mask), ((t_s - s_s) < 0)[m].mean(), rtol=1e-6)
    in_topk = (ids == tokens[..., None]).any(-1)
    np.testing.assert_allclose(diagnostics.not_in_topk_frac(tokens, ids, mask), (~in_topk)[m].mean(), rtol=1e-6)
    np.testing.assert_allclose(diagnostics.teacher_topk_mass(t_topk, mask), np.exp(t_topk).sum(-1)[m].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(diagnostics.student_topk_mass(logits, ids, mask),
                               np.take_along_axis(np.exp(s_logp), ids, -1).sum(-1)[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(diagnostics.entropy(logits, mask), (-(np.exp(s_logp) * s_logp).sum(-1))[m].mean(),
                               rtol=1e-5)
    assert float(diagnostics.logprob_gap(t_s, s_s, np.zeros_like(mask))) == 0.0  # empty mask: 0, not NaN


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_depends_on_the_teacher(name):
    student, teacher_a, teacher_b = _model(0), _model(1), _model(2)
    stepper = _stepper(student, name, teacher_a)
    batch_a = _batch(student, teacher_a)
    batch_b = _batch(student, teacher_b)
    stepper_b = _stepper(student, name, teacher_b)
    la, lb = _loss(stepper, batch_a, teacher_a), _loss(stepper_b, batch_b, teacher_b)
    assert np.isfinite(la) and np.isfinite(lb)
    assert abs(la - lb) > 1e-4, (name, la, lb)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_a_teacher_padded_past_the_students_vocabulary_acts_as_itself_without_those_rows(name):
    """A teacher's LM head may have rows past the student's vocabulary (Qwen2.5-7B has 152,064, Qwen2.5-0.5B
    151,936, one tokenizer). Scored with the student's vocab_size and used by the update (full_rkl reads its
    logits), it gives every objective the loss of the same teacher with those rows cut off."""
    student, padded = _model(0), _model(1, vocab=V + 8)
    cut = _model(2)
    nnx.update(cut, jax.tree.map(lambda small, big: big[tuple(slice(0, n) for n in small.shape)],
                                 nnx.state(cut, nnx.Param), nnx.state(padded, nnx.Param)))
    got = _loss(_stepper(student, name, padded), _batch(student, padded, vocab_size=V), padded)
    want = _loss(_stepper(student, name, cut), _batch(student, cut), cut)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lsm", "full_rkl", "topk_tail", "lsm_no_renorm"])
def test_student_equal_to_teacher_has_zero_divergence(name):
    """π = q: every divergence term π(log π − log q) is 0 (LSM without renormalization: the top-K partial
    sum of zeros). A different teacher gives a clearly positive value, so the zero is not trivial."""
    student = _model(3)
    assert abs(_loss(_stepper(student, name, _model(3)), _batch(student, _model(3)), _model(3))) < 1e-5
    other = _model(4)
    assert abs(_loss(_stepper(student, name, other), _batch(student, other), other)) > 1e-3


def test_sampled_token_loss_is_minus_mean_advantage_on_policy():
    """At ratio 1 the PPO surrogate is −A = log π_old − log q, so the loss is minus the logprob gap."""
    student, teacher = _model(4), _model(5)
    stepper = _stepper(student, "sampled_token", teacher)
    batch = _batch(student, teacher)
    expected = -np.mean([  # sequence_mean of −(log q − log π)
        float(diagnostics.logprob_gap(batch.teacher_sampled_BxL[i:i + 1], batch.old_logprobs_BxL[i:i + 1],
                                      batch.loss_mask_BxL[i:i + 1])) for i in range(batch.tokens_BxL.shape[0])])
    np.testing.assert_allclose(_loss(stepper, batch), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["lsm", "full_rkl", "sampled_token"])
def test_updates_lower_the_objective_and_leave_the_teacher_alone(name):
    student, teacher = _model(6), _model(7)
    teacher_before = jax.tree.map(np.array, nnx.state(teacher, nnx.Param))
    stepper = _stepper(student, name, teacher, lr=3e-2)
    batch = _batch(student, teacher)
    t_state = nnx.state(teacher) if name == "full_rkl" else None
    start = _loss(stepper, batch, teacher)
    first = stepper.update(batch, t_state)
    for _ in range(14):
        stepper.update(batch, t_state)
    assert set(diagnostics.STEP_METRICS) - {"response_len", "truncated_frac"} <= set(first)
    assert np.isfinite(float(first["grad_norm"])) and float(first["grad_norm"]) > 0
    np.testing.assert_allclose(float(first["loss"]), start, rtol=1e-5, atol=1e-6)  # loss before the update
    if name == "sampled_token":  # the surrogate is relative to π_old: check the rollout log-prob gap instead
        logits = target_aligned_logits(student, batch.tokens_BxL, batch.positions_BxL, batch.attention_mask_BxL)
        new_lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch.tokens_BxL[..., None], -1)[..., 0]
        before = float(diagnostics.masked_mean(batch.old_logprobs_BxL - batch.teacher_sampled_BxL, batch.loss_mask_BxL))
        after = float(diagnostics.masked_mean(new_lp - batch.teacher_sampled_BxL, batch.loss_mask_BxL))
        assert after < before
    else:
        assert _loss(stepper, batch, teacher) < 0.7 * start
    after = jax.tree.map(np.array, nnx.state(teacher, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, teacher_before, after)


def test_minibatches_take_several_optimizer_steps():
    student, teacher = _model(8), _model(9)
    stepper = _stepper(student, "lsm", teacher, minibatches_per_step=2)
    stepper.update(_batch(student, teacher))
    assert int(stepper.optimizer.step[...]) == 2


def test_warmup_starts_from_zero_learning_rate():
    student, teacher = _model(8), _model(9)
    before = jax.tree.map(np.asarray, nnx.state(student, nnx.Param))
    stepper = _stepper(student, "lsm", teacher, warmup_steps=3)
    batch = _batch(student, teacher)
    stepper.update(batch)  # lr 0 at the first step: parameters unchanged
    jax.tree.map(np.testing.assert_array_equal, before, nnx.state(student, nnx.Param))
    stepper.update(batch)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - np.asarray(b)))), before, nnx.state(student, nnx.Param))
    assert max(jax.tree.leaves(moved)) > 0


def test_second_minibatch_ratio_is_not_one():
    """π_old is the sampler's record for every minibatch: on an on-policy batch the first minibatch's ratio is
    1 (no clip), and after one optimizer step the second one's is not (clip active on some tokens)."""
    student, teacher = _model(10), _model(11)
    batch = _batch(student, teacher, b=4)
    batch = jax.tree.map(lambda x: jnp.concatenate([x[:2], x[:2]]), batch)  # the second half repeats the first
    one = _stepper(_model(10), "sampled_token", teacher, lr=0.3, minibatches_per_step=1).update(batch)
    two = _stepper(student, "sampled_token", teacher, lr=0.3, minibatches_per_step=2).update(batch)
    assert float(one["clip_frac"]) == 0.0
    assert float(two["clip_frac"]) > 0.0
    # metrics average the two minibatches: the first one's loss is the on-policy one, the second's differs
    assert abs(float(two["loss"]) - float(one["loss"])) > 1e-4


def test_batch_must_split_into_equal_minibatches():
    student, teacher = _model(8), _model(9)
    stepper = _stepper(student, "lsm", teacher, minibatches_per_step=3)
    with pytest.raises(ValueError, match=r"batch \(rollouts per step\): 4 rows must be divisible by 3 minibatches"):
        stepper.update(_batch(student, teacher, b=4))
    with pytest.raises(ValueError, match=r"optimizer\.minibatches_per_step"):
        _stepper(student, "lsm", teacher, minibatches_per_step=0)


# tests/test_sharding.py compares whole chunked and unchunked updates for lsm, sampled_token and full_rkl;
# here each registered objective's values and gradients, one in the default suite, the rest under `slow`.
FAST_NAMES = ("lsm",)


@pytest.mark.parametrize("name", [n if n in FAST_NAMES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in objectives.NAMES])
def test_chunked_loss_equals_unchunked(name):
    """Every registered objective and the per-chunk diagnostics: chunks of 3 over L=11 (one padded chunk)
    give the one-block values and gradients."""
    student, teacher = _model(12), _model(13)
    batch = _batch(student, teacher)
    gd = nnx.graphdef(teacher)
    t_state = nnx.state(teacher)
    student_gd, params, rest = nnx.split(student, nnx.Param, ...)
    from opd.train.opd_step import make_loss_fn

    def run(chunk_size):
        f = make_loss_fn(student_gd, _loss_cfg(name), gd, chunk_size=chunk_size)
        return jax.value_and_grad(f, has_aux=True)(params, rest, batch, t_state)

    (l0, aux0), g0 = run(None)
    (l1, aux1), g1 = run(3)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-6)
    assert set(aux0) == {"entropy", "student_topk_mass", "clip_frac"} == set(aux1)
    for k in aux0:
        np.testing.assert_allclose(float(aux1[k]), float(aux0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 0


def test_diagnostics_per_chunk_equal_the_full_logits_ones():
    student, teacher = _model(14), _model(15)
    batch = _batch(student, teacher)
    stepper = OPDStepper(student, _loss_cfg("lsm"), _opt_cfg(), chunk_size=4)
    logits = target_aligned_logits(student, batch.tokens_BxL, batch.positions_BxL, batch.attention_mask_BxL)
    _, params, rest = nnx.split(student, nnx.Param, ...)
    aux = stepper.loss_fn(params, rest, batch)[1]
    np.testing.assert_allclose(float(aux["entropy"]), float(diagnostics.entropy(logits, batch.response_mask_BxL)),
                               rtol=1e-5)
    np.testing.assert_allclose(float(aux["student_topk_mass"]), float(diagnostics.student_topk_mass(
        logits, batch.topk_ids_BxLxK, batch.response_mask_BxL)), rtol=1e-5)


def _largest_f32_temporary(chunk_size, name, *, b=2, length=96, vocab=1024):
    """Elements of the largest float32 array in the compiled update's optimized HLO, and the update's peak
    memory as the stepper reports it (update_peak_bytes)."""
    student, teacher = _model(0, vocab=vocab, hidden=32), _model(1, vocab=vocab, hidden=32)
    stepper = OPDStepper(student, _loss_cfg(name), _opt_cfg(), chunk_size=chunk_size,
                         teacher_graphdef=nnx.graphdef(teacher))
    t_state = nnx.state(teacher) if name == "full_rkl" else None
    fn = stepper._update_fn(stepper.teacher_graphdef if t_state is not None else None, t_state)[0]
    spec = Batch(*(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in (
        ((b, length), jnp.int32), ((b, length), jnp.int32), ((b, length), jnp.int32),
        ((b, length), jnp.float32), ((b, length), jnp.float32), ((b, length), jnp.float32),
        ((b, length), jnp.float32), ((b, length, K), jnp.int32), ((b, length, K), jnp.float32))))
    hlo = fn.lower(stepper.state, spec, t_state).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"\bf32\[([\d,]*)\]", hlo)]
    return max(sizes), update_peak_bytes(fn, stepper.state, spec, t_state)


def test_chunked_update_never_holds_batch_by_vocabulary_logits():
    """The compiled update (forward, backward, AdamW) of full_rkl (student and teacher heads) with chunks of
    8 positions has no float32 array a quarter the size of [B·L, V]; the unchunked one has [B·L, V] (so the
    check can fail). The peak memory the stepper reports falls by more than one such array."""
    name, n_by_v = "full_rkl", 2 * 96 * 1024
    (whole, whole_peak), (chunked, chunked_peak) = _largest_f32_temporary(None, name), _largest_f32_temporary(8, name)
    assert whole >= n_by_v and chunked < n_by_v // 4
    assert 0 < chunked_peak < whole_peak - 4 * n_by_v


def test_special_token_mask_zeroes_first_occurrence_in_response_only():
    task = ArithmeticTask(digits=1, min_terms=2, max_terms=2)
    tok = task.tokenizer
    ids = [tok.think_open_id, tok.think_close_id, tok.eos_id]
    assert tok.eos_id in ids and tok.think_open_id in ids and tok.think_close_id in ids
    prompt = [tok.think_open_id, 5, 6]  # a special id inside the prompt must not count
    resp = [tok.think_open_id, 7, tok.think_open_id, tok.think_close_id, 8, tok.eos_id, 0]
    tokens = jnp.asarray([prompt + resp], jnp.int32)
    rmask = jnp.asarray([[0, 0, 0] + [1, 1, 1, 1, 1, 1, 0]], jnp.int32)

    class R:
        tokens_BxL, attention_mask_BxL, response_mask_BxL = tokens, jnp.maximum(rmask, 1), rmask
        logprobs_BxL = jnp.zeros(tokens.shape)

    class P:
        topk_ids_BxLxK = jnp.zeros((*tokens.shape, 2), jnp.int32)
        topk_logprobs_BxLxK = jnp.zeros((*tokens.shape, 2))
        sampled_logprobs_BxL = jnp.zeros(tokens.shape)

    b = build_batch(R, P, special_ids=ids, mask_special_tokens=True)
    np.testing.assert_array_equal(np.asarray(b.loss_mask_BxL[0]), [0, 0, 0, 0, 1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(b.response_mask_BxL), np.asarray(rmask))


def _padded_rollouts(student, *, b=4, p=3, n=8, pad=13, seed=0):
    """Task-style `Rollouts` whose last `pad` columns are padding in every row, the sampler's log-probs
    from a forward pass."""
    from opd.tasks.common import Rollouts

    rng = np.random.default_rng(seed)
    width = p + n + pad
    tokens = np.zeros((b, width), np.int32)
    tokens[:, :p + n] = rng.integers(1, V, size=(b, p + n))
    attn = np.zeros((b, width), np.int32)
    attn[:, :p + n] = 1
    attn[0, 0] = tokens[0, 0] = 0  # left padding in one row
    attn[1, p + 5:] = tokens[1, p + 5:] = 0  # a shorter response
    resp = attn.copy()
    resp[:, :p] = 0
    tok, mask = jnp.asarray(tokens), jnp.asarray(attn)
    logits = target_aligned_logits(student, tok, positions_from_mask(mask), mask)
    logp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[..., None], -1)[..., 0]) * resp
    return Rollouts(tokens=tokens, attention_mask=attn, response_mask=resp, logprobs=logp.astype(np.float32),
                    response_len=resp.sum(1), truncated=np.zeros(b, bool), score=np.zeros(b, np.float32))


def test_trim_padding_cuts_to_the_rounded_longest_rollout():
    from opd.train.batch import trim_padding

    r = _padded_rollouts(_model(0))  # 11 used columns of 24
    for multiple, width in ((0, 24), (1, 11), (4, 12), (8, 16), (11, 11), (20, 20), (64, 24)):
        t = trim_padding(r, multiple)
        assert t.tokens.shape == t.attention_mask.shape == t.response_mask.shape == t.logprobs.shape == (4, width)
        for name in ("tokens", "attention_mask", "response_mask", "logprobs"):
            full, cut = getattr(r, name), getattr(t, name)
            np.testing.assert_array_equal(cut, full[:, :width])
            assert not np.any(full[:, width:])  # only padding was dropped
        np.testing.assert_array_equal(t.score, r.score)


@pytest.mark.parametrize("name", ["lsm", "sampled_token"])
def test_an_update_on_trimmed_rollouts_equals_the_full_width_one(name):
    """Scoring, the objective's gradient and one update's metrics (2 minibatches: the clip acts) on rollouts
    cut to their longest row equal the full-width ones up to float addition order. (Parameters after the
    update are not compared: Adam divides each gradient coordinate by its own magnitude, so a coordinate
    whose gradient is at rounding level moves by a rounding-dependent share of the learning rate.)"""
    from opd.train.batch import trim_padding

    teacher = _model(3)
    runs = []
    for multiple in (0, 4):
        student = _model(2)
        r = trim_padding(_padded_rollouts(student), multiple)
        batch = build_batch(r, score(teacher, jnp.asarray(r.tokens), jnp.asarray(r.attention_mask), K))
        stepper = _stepper(student, name, teacher, lr=3e-2, minibatches_per_step=2)
        _, params, rest = nnx.split(student, nnx.Param, ...)
        grads = jax.grad(lambda p_, b_=batch, s_=stepper, r_=rest: s_.loss_fn(p_, r_, b_, None)[0])(params)
        metrics = stepper.update(batch)
        runs.append((batch, jax.tree.map(np.asarray, grads), {k: float(v) for k, v in metrics.items()}))
    (b_full, g_full, m_full), (b_cut, g_cut, m_cut) = runs
    assert (b_full.tokens_BxL.shape[1], b_cut.tokens_BxL.shape[1]) == (24, 12)
    np.testing.assert_array_equal(np.asarray(b_cut.loss_mask_BxL), np.asarray(b_full.loss_mask_BxL)[:, :12])
    # on response positions (a query whose keys are all padding, like a left-padded row's first slot, sees
    # whatever the width holds; no objective reads it)
    resp = np.asarray(b_cut.response_mask_BxL) > 0
    for name_ in ("topk_ids_BxLxK", "topk_logprobs_BxLxK", "teacher_sampled_BxL"):
        cut, full = np.asarray(getattr(b_cut, name_))[resp], np.asarray(getattr(b_full, name_))[:, :12][resp]
        np.testing.assert_allclose(cut, full, rtol=1e-6, atol=1e-6, err_msg=name_)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(g_full)) > 1e-3  # a gradient worth comparing
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_cut, g_full)
    assert m_full["loss"] != 0 and m_full.keys() == m_cut.keys()
    for key in m_full:
        if key != "update_peak_bytes":  # the one metric that is about the width
            np.testing.assert_allclose(m_cut[key], m_full[key], rtol=1e-5, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------------------------------------------------
# SFT cache and the loop
# ---------------------------------------------------------------------------------------------------------


def _tiny_task():
    return ArithmeticTask(digits=1, min_terms=2, max_terms=2)


def _sft_cfg(**kw):
    base = {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.01, "grad_clip": 1.0,
            "eps": 1e-8, "optimizer": "adamw", "train_problems": 16, "eval_problems": 4, "log_every": 1,
            "seed": 0}
    return OmegaConf.create({**base, **kw})


def test_a_second_sft_phase_starts_from_the_first_and_is_cached_under_its_own_key(tmp_path):
    """sft_then: the first phase is the one-phase model (same key, reused), the second starts from its weights
    with the replaced fields, under a key naming the first's; a rerun trains neither."""
    from opd.train.sft import prepare, prepare_then

    task = _tiny_task()
    mc = ModelConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=32, max_seq_len=64)
    sft = _sft_cfg()
    sections = {"model": mc.to_dict(), "task": {"name": "arithmetic", "digits": 1}, "sft": dict(sft)}
    first, first_meta = prepare("teacher", mc, [task], sections, sft, root=tmp_path, log=lambda _: None)
    logs: list[str] = []
    then = {"optimizer": "lion", "steps": 2, "lr": 1e-3}
    model, meta = prepare_then("teacher", mc, [task], sections, sft, then, root=tmp_path, log=logs.append)
    assert meta["trained"] and meta["init_from"] == first_meta["path"] and meta["key"] != first_meta["key"]
    assert meta["sft"]["optimizer"] == "lion" and meta["sft"]["steps"] == 2 and meta["sft"]["seed"] == sft.seed
    assert any("[sft teacher] reusing cached checkpoint" in x for x in logs)
    assert any("[sft teacher then] step 2/2" in x for x in logs)
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(nnx.state(first, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param)), strict=True)]
    assert 0 < max(moved) <= 2 * 1e-3 * (1 + 1e-4)  # two Lion steps of at most lr each, from the first's weights
    _, again = prepare_then("teacher", mc, [task], sections, sft, then, root=tmp_path, log=lambda _: None)
    assert not again["trained"] and again["path"] == meta["path"]
    _, one = prepare_then("teacher", mc, [task], sections, sft, None, root=tmp_path, log=lambda _: None)
    assert one["path"] == first_meta["path"]


def test_checkpoint_cache_is_reused_not_retrained(tmp_path):
    from opd.train.sft import prepare, sft_cache_key

    task = _tiny_task()
    mc = ModelConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=32, max_seq_len=64)
    sft = _sft_cfg()
    calls = []
    logs: list[str] = []
    sections = {"model": mc.to_dict(), "task": {"name": "arithmetic", "digits": 1}, "sft": dict(sft)}
    args = ("student", mc, [task], sections, sft)
    m1, meta1 = prepare(*args, root=tmp_path, eval_fn=lambda m: calls.append(1) or ({"acc": 0.5}, {}), log=logs.append)
    assert meta1["trained"] and calls == [1]
    assert meta1["provenance"]["packages"]["jax"] and meta1["provenance"]["device_kind"]  # where it was trained
    assert any("[sft student] step 3/3" in x for x in logs)
    m2, meta2 = prepare(*args, root=tmp_path, eval_fn=lambda m: calls.append(1) or ({}, {}), log=logs.append)
    assert not meta2["trained"] and calls == [1] and meta2["path"] == meta1["path"]
    assert meta2["sft_eval"] == {"acc": 0.5}
    jax.tree.map(np.testing.assert_array_equal, nnx.state(m1, nnx.Param), nnx.state(m2, nnx.Param))
    # a different SFT config is a different key
    sft2 = _sft_cfg(steps=2)
    _, meta3 = prepare("student", mc, [task], {**sections, "sft": dict(sft2)}, sft2, root=tmp_path, log=logs.append)
    assert meta3["trained"] and meta3["path"] != meta1["path"]
    # Adam's epsilon and the optimizer at their defaults are left out of the key (models stored before the
    # fields keep theirs); any other value is another key
    older = {**sections, "sft": {k: v for k, v in sections["sft"].items() if k not in ("eps", "optimizer")}}
    assert sft_cache_key(older, [task], 0) == meta1["key"]
    assert sft_cache_key({**sections, "sft": dict(_sft_cfg(eps=1e-16))}, [task], 0) != meta1["key"]
    assert sft_cache_key({**sections, "sft": dict(_sft_cfg(optimizer="lion"))}, [task], 0) != meta1["key"]
    # same config sections but demonstrations the task code now writes differently: a different key
    original = task.demonstration
    task.demonstration = lambda p: original(p).replace("\n</think>", "</think>")
    _, meta4 = prepare(*args, root=tmp_path, log=logs.append)
    assert meta4["trained"] and meta4["path"] != meta1["path"]
    # no temporary directories are left behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []


def test_a_model_in_the_committed_store_is_unpacked_on_a_fresh_machine_not_retrained(tmp_path):
    import subprocess
    import sys

    from opd.train import checkpoints, store
    from opd.train.sft import prepare

    task = _tiny_task()
    mc = ModelConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=32, max_seq_len=64)
    sft = _sft_cfg()
    sections = {"model": mc.to_dict(), "task": {"name": "arithmetic", "digits": 1}, "sft": dict(sft)}
    args = ("student", mc, [task], sections, sft)
    m1, meta1 = prepare(*args, root=tmp_path / "machine1", eval_fn=lambda m: ({"acc": 0.5}, {}))
    checkpoints.write_eval(meta1["path"], {"items": 3}, {"scores": {"acc": 0.25}, "items": {}})
    packed = store.add(meta1["path"], tmp_path / "store")
    assert packed.name == f"{meta1['key']}.tar.gz"
    assert store.add(meta1["path"], tmp_path / "store").read_bytes() == packed.read_bytes()  # reproducible
    calls, logs = [], []
    m2, meta2 = prepare(*args, root=tmp_path / "machine2", store=tmp_path / "store",
                        eval_fn=lambda m: calls.append(1) or ({}, {}), log=logs.append)
    assert not meta2["trained"] and calls == [] and meta2["sft_eval"] == {"acc": 0.5}
    assert any("unpacked" in x for x in logs)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(m1, nnx.Param), nnx.state(m2, nnx.Param))
    assert checkpoints.read_eval(meta2["path"], {"items": 3})["scores"] == {"acc": 0.25}  # evaluations travel
    # another config is another key: the store does not hold it, so it trains
    sft2 = _sft_cfg(steps=2)
    _, meta3 = prepare("student", mc, [task], {**sections, "sft": dict(sft2)}, sft2, root=tmp_path / "machine2",
                       store=tmp_path / "store")
    assert meta3["trained"]
    # packing a directory that is not a checkpoint: one line, nothing written
    proc = subprocess.run([sys.executable, "-m", "opd.train.store", "add", str(tmp_path), "--store",
                           str(tmp_path / "store2")], capture_output=True, text=True)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "not a complete checkpoint" in lines[0], lines
    assert not (tmp_path / "store2").exists()


def test_sft_targets_end_with_exactly_one_eos():
    task = _tiny_task()
    items = task.items("train", 8, 0)
    tokens, _, target = task.demonstrations(items)
    eos = task.tokenizer.eos_id
    for b in range(len(items)):
        fitted = tokens[b][target[b] > 0]
        assert fitted[-1] == eos and (fitted == eos).sum() == 1


@pytest.mark.parametrize("optimizer", ["lion", "adamw"])
def test_lion_steps_every_weight_by_the_learning_rate_and_adamw_does_not(optimizer):
    """sft.optimizer=lion: each step moves every weight with a nonzero momentum by exactly the scheduled lr
    (the sign of its momentum), however small its gradient; AdamW's second step moves them by varied amounts."""
    from opd.train.sft import _schedule, sft_optimizer

    cfg = _sft_cfg(optimizer=optimizer, weight_decay=0.0, warmup_steps=1, steps=10, lr=1e-2, grad_clip=1e9)
    model = _model(0)
    opt = sft_optimizer(model, cfg)
    params = lambda: [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]  # noqa: E731
    rng = np.random.default_rng(0)
    for _ in range(2):  # the schedule's first lr is 0; Adam's first step would be a sign step too
        before = params()
        # gradients spanning six orders of magnitude, as a frequent token's row and a never-seen one's do
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 10.0 ** rng.uniform(-6, 0, p.shape),
                                                   p.dtype), nnx.state(model, nnx.Param))
        opt.update(model, grads)
    moved = np.concatenate([np.abs(a - b).ravel() for a, b in zip(params(), before, strict=True)])
    lr = float(_schedule(cfg)(1))
    if optimizer == "lion":
        np.testing.assert_allclose(moved, lr, rtol=1e-4)
    else:
        assert moved.min() < 0.5 * lr


def test_save_is_atomic_when_the_key_already_exists(tmp_path):
    m = _model(0)
    p1 = checkpoints.save_model(m, tmp_path / "k", {"who": "first"})
    checkpoints.save_model(_model(1), tmp_path / "k", {"who": "second"})  # lost the race: keeps the first
    assert json.loads((p1 / "meta.json").read_text())["who"] == "first"
    assert checkpoints.is_complete(p1)
    restored = checkpoints.load_model(_model(5), p1)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(m, nnx.Param), nnx.state(restored, nnx.Param))


def test_run_opd_rows_have_every_required_key(tmp_path):
    """...and every sampler call of the run, its rollouts and its evaluations, runs at rollout.first_window."""
    from types import SimpleNamespace

    from opd import sampling
    from opd.results import RunRecorder, read_rows
    from opd.train.loop import Route, run_opd

    task = _tiny_task()
    vocab = task.tokenizer.vocab_size
    student, teacher = _model(0, vocab), _model(1, vocab, hidden=32)
    cfg = SimpleNamespace(loss=_loss_cfg("lsm", rollout_top_p=0.9), optimizer=_opt_cfg(), seed=0, eval_seed=1, steps=2,
             eval_every=2, eval_samples=1, eval_batch_size=4, log_every=1, diagnostics_every=0, diag_bucket_size=8,
             rollout=SimpleNamespace(prompts_per_step=2, group_size=2, temperature=1.0, top_p=None,
                                      pad_multiple=8, first_window=3))
    route = Route("arithmetic", task, teacher, train_items=task.items("train", 8, 0),
                  eval_items=task.items("eval", 4, 0))
    rec = RunRecorder(tmp_path, {})
    logs: list[str] = []
    windows: list[int] = []

    def spy(model, prompt_BxP, mask_BxP, rng, scfg, **kw):
        windows.append(scfg.first_window)
        return sampling.sample(model, prompt_BxP, mask_BxP, rng, scfg, **kw)

    out = run_opd(cfg, student, [route], recorder=rec, log=logs.append, sample_fn=spy)
    rec.finish({})
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert len(windows) == 2 + 2 and set(windows) == {3}  # two OPD steps; one eval: a sampled and a greedy pass
    required = set(diagnostics.STEP_METRICS) | {"clip_frac", "time/sample_s", "time/score_s", "time/update_s"}
    for row in rows:
        assert required <= set(row), required - set(row)
        bad = {k: row[k] for k in required if not (isinstance(row[k], float) and np.isfinite(row[k]))}
        assert not bad, bad
        assert row["grad_norm"] > 0 and 0 <= row["student_topk_mass"] <= 1 and row["entropy"] > 0
    assert {"eval/arithmetic/accuracy", "eval/arithmetic/greedy_accuracy"} <= set(rows[-1])
    assert out["evals"][2]["eval/arithmetic/accuracy"] == rows[-1]["eval/arithmetic/accuracy"]
    assert len(logs) >= 2


def test_rollout_drops_ids_past_the_tokenizer():
    """A checkpoint's padded embedding rows (vocab_size > tokenizer's) decode to nothing, not a crash."""
    from types import SimpleNamespace

    task = _tiny_task()
    tok = task.tokenizer
    items = task.items("eval", 2, 0)
    demos = [tok.encode(task.demonstration(p)) for p in items]

    def fake_sample(model, prompt_BxP, mask_BxP, key, cfg, eos_id):
        b, p = np.asarray(prompt_BxP).shape
        width = max(len(d) for d in demos) + 1
        resp = np.zeros((b, width), np.int32)
        rmask = np.zeros((b, width), np.int32)
        for i, d in enumerate(demos):  # the correct solution with an id past the tokenizer before its EOS
            row = d[:-1] + [tok.vocab_size + 2, d[-1]]
            resp[i, :len(row)], rmask[i, :len(row)] = row, 1
        return SimpleNamespace(tokens_BxL=np.concatenate([prompt_BxP, resp], 1),
                               attention_mask_BxL=np.concatenate([mask_BxP, rmask], 1),
                               response_mask_BxL=np.concatenate([np.zeros((b, p)), rmask], 1),
                               logprobs_BxL=np.zeros((b, p + width)), response_len_B=rmask.sum(1),
                               truncated_B=np.zeros(b, bool))

    out = task.rollout(None, items, jax.random.key(0), temperature=1.0, top_p=1.0, sample_fn=fake_sample)
    np.testing.assert_array_equal(out.score, [1.0, 1.0])


def test_an_interrupted_sft_resumes_to_the_uninterrupted_model(tmp_path):
    from opd.train.sft import train_sft

    task = _tiny_task()
    mc = ModelConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=32, max_seq_len=64)
    sft = _sft_cfg(steps=6, warmup_steps=2)
    whole = Transformer(mc, rngs=nnx.Rngs(0))
    losses, _ = train_sft(whole, [task], sft, log=lambda _: None)

    class KilledError(Exception):
        pass

    def killed_at_step_4(line):
        if "step 4/6" in line:
            raise KilledError

    first = Transformer(mc, rngs=nnx.Rngs(0))
    with pytest.raises(KilledError):  # checkpoints after every step (save_every_s=0); dies before saving step 4
        train_sft(first, [task], sft, log=killed_at_step_4, resume_dir=tmp_path, save_every_s=0)
    logs: list[str] = []
    resumed = Transformer(mc, rngs=nnx.Rngs(1))  # other initial weights: everything must come from the checkpoint
    resumed_losses, _ = train_sft(resumed, [task], sft, log=logs.append, resume_dir=tmp_path, save_every_s=0)
    assert "resuming after step 3/6" in logs[0]
    assert next(x for x in logs if "step" in x and "loss" in x).startswith("[sft sft] step 4/6")
    assert resumed_losses == losses
    jax.tree.map(np.testing.assert_array_equal, nnx.state(whole, nnx.Param), nnx.state(resumed, nnx.Param))
    untrained = jax.tree.leaves(nnx.state(Transformer(mc, rngs=nnx.Rngs(1)), nnx.Param))
    assert not all(np.array_equal(a, b) for a, b in zip(untrained, jax.tree.leaves(nnx.state(resumed, nnx.Param))))
