"""The OPD trainer: diagnostics against numpy references, the loss depends on the teacher, a student equal
to its teacher has zero divergence, updates lower the objective and never touch the teacher, special-token
masking, the SFT checkpoint cache is reused, and metrics rows carry every required key.

Everything runs on tiny models (D=16) and the 1-digit arithmetic task so the file stays fast on CPU."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from omegaconf import OmegaConf

from opd import diagnostics
from opd.model import ModelConfig, Transformer
from opd.tasks.arithmetic import ArithmeticTask
from opd.train import checkpoints
from opd.train.opd_step import Batch, OPDStepper, build_batch, positions_from_mask, target_aligned_logits

LOSS_NAMES = ("sampled_token", "lsm", "lsm_no_renorm", "full_rkl", "topk_tail", "topk_fkl")
V, K = 24, 4


def _model(seed: int, vocab: int = V, hidden: int = 16) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, max_seq_len=64)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _loss_cfg(name: str, **kw):
    base = {"name": name, "k": K, "aggregation": "sequence_mean", "clip_eps": 0.2,
            "dual_clip": 3.0, "mask_special_tokens": False, "rollout_top_p": 1.0}
    return OmegaConf.create({**base, **kw})


def _opt_cfg(**kw):
    base = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
            "grad_clip": 1.0, "minibatches_per_step": 1}
    return OmegaConf.create({**base, **kw})


def _score(teacher, tokens_BxL, attention_mask_BxL, k):
    """opd.teacher.score, or (before it exists) a stand-in with the interface's payload from a forward pass."""
    try:
        from opd.teacher import score
    except ImportError:
        from typing import NamedTuple

        class TeacherPayload(NamedTuple):
            topk_ids_BxLxK: jax.Array
            topk_logprobs_BxLxK: jax.Array
            sampled_logprobs_BxL: jax.Array

        logits = target_aligned_logits(teacher, tokens_BxL, positions_from_mask(attention_mask_BxL),
                                       attention_mask_BxL)
        logp = jax.nn.log_softmax(logits, -1)
        top_lp, top_ids = jax.lax.top_k(logp, k)
        sampled = jnp.take_along_axis(logp, tokens_BxL[..., None], -1)[..., 0]
        return TeacherPayload(top_ids.astype(jnp.int32), top_lp, sampled)
    return score(teacher, tokens_BxL, attention_mask_BxL, k)


def _batch(student, teacher, *, b=4, p=3, n=8, seed=0, k=K) -> Batch:
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

    return build_batch(R, _score(teacher, tokens, attn, k))


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


@pytest.mark.parametrize("name", ["lsm", "full_rkl", "topk_tail", "lsm_no_renorm"])
def test_student_equal_to_teacher_has_zero_divergence(name):
    student = _model(3)
    teacher = _model(3)
    value = _loss(_stepper(student, name, teacher), _batch(student, teacher), teacher)
    if name == "lsm_no_renorm":
        assert abs(value) < 1e-5  # π = q on S: every term π(log π − log q) is 0
    else:
        assert abs(value) < 1e-5, value


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


def test_special_token_mask_zeroes_first_occurrence_in_response_only():
    task = ArithmeticTask(digits=1, min_terms=2, max_terms=2)
    tok = task.tokenizer
    from opd.train.loop import special_ids

    ids = special_ids(tok)
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


# ---------------------------------------------------------------------------------------------------------
# SFT cache and the loop
# ---------------------------------------------------------------------------------------------------------


def _tiny_task():
    return ArithmeticTask(digits=1, min_terms=2, max_terms=2)


def _sft_cfg(**kw):
    base = {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.01, "grad_clip": 1.0,
            "train_problems": 16, "eval_problems": 4, "log_every": 1, "seed": 0}
    return OmegaConf.create({**base, **kw})


def test_checkpoint_cache_is_reused_not_retrained(tmp_path):
    from opd.train.sft import prepare

    task = _tiny_task()
    mc = ModelConfig(vocab_size=task.tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=32, max_seq_len=64)
    sft = _sft_cfg()
    calls = []
    logs: list[str] = []
    args = ("student", mc, mc.to_dict(), task, {"name": "arithmetic", "digits": 1}, sft, dict(sft))
    m1, meta1 = prepare(*args, root=tmp_path, eval_fn=lambda m: calls.append(1) or {"acc": 0.5}, log=logs.append)
    assert meta1["trained"] and calls == [1]
    assert any("[sft student] step 3/3" in x for x in logs)
    m2, meta2 = prepare(*args, root=tmp_path, eval_fn=lambda m: calls.append(1) or {}, log=logs.append)
    assert not meta2["trained"] and calls == [1] and meta2["path"] == meta1["path"]
    assert meta2["sft_eval"] == {"acc": 0.5}
    jax.tree.map(np.testing.assert_array_equal, nnx.state(m1, nnx.Param), nnx.state(m2, nnx.Param))
    # a different SFT config is a different key
    sft2 = _sft_cfg(steps=2)
    _, meta3 = prepare("student", mc, mc.to_dict(), task, {"name": "arithmetic", "digits": 1}, sft2, dict(sft2),
                       root=tmp_path, log=logs.append)
    assert meta3["trained"] and meta3["path"] != meta1["path"]
    # same config sections but demonstrations the task code now writes differently: a different key
    original = task.demonstration
    task.demonstration = lambda p: original(p).replace("\n</think>", "</think>")
    _, meta4 = prepare(*args, root=tmp_path, log=logs.append)
    assert meta4["trained"] and meta4["path"] != meta1["path"]
    # no temporary directories are left behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []


def test_sft_targets_end_with_exactly_one_eos():
    from opd.train.sft import demonstration_batch

    task = _tiny_task()
    problems = task.problems("train", 8, 0)
    tokens, _, target = demonstration_batch(task, problems)
    eos = task.tokenizer.eos_id
    for b in range(len(problems)):
        fitted = tokens[b][target[b] > 0]
        assert fitted[-1] == eos and (fitted == eos).sum() == 1


def test_save_is_atomic_when_the_key_already_exists(tmp_path):
    m = _model(0)
    p1 = checkpoints.save_model(m, tmp_path / "k", {"who": "first"})
    checkpoints.save_model(_model(1), tmp_path / "k", {"who": "second"})  # lost the race: keeps the first
    assert json.loads((p1 / "meta.json").read_text())["who"] == "first"
    assert checkpoints.is_complete(p1)
    restored = checkpoints.load_model(_model(5), p1)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(m, nnx.Param), nnx.state(restored, nnx.Param))


def test_run_opd_rows_have_every_required_key(tmp_path):
    from opd.results import RunRecorder, read_rows
    from opd.train.loop import TaskSpec, run_opd

    task = _tiny_task()
    vocab = task.tokenizer.vocab_size
    student, teacher = _model(0, vocab), _model(1, vocab, hidden=32)
    cfg = OmegaConf.create({
        "loss": dict(_loss_cfg("lsm", rollout_top_p=0.9)), "optimizer": dict(_opt_cfg()),
        "rollout": {"prompts_per_step": 2, "group_size": 2, "temperature": 1.0, "top_p": None, "max_new_tokens": None},
        "steps": 2, "eval_every": 2, "seed": 0, "eval_seed": 1, "log_every": 1,
    })
    spec = TaskSpec(task=task, teacher=teacher, train_problems=task.problems("train", 8, 0),
                    eval_problems=task.problems("eval", 4, 0), max_new_tokens=12)
    rec = RunRecorder(tmp_path, {})
    logs: list[str] = []
    out = run_opd(cfg, student, spec, recorder=rec, log=logs.append, score_fn=_score)
    rec.finish({})
    rows = read_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    required = set(diagnostics.STEP_METRICS) | {"time/sample_s", "time/score_s", "time/update_s"}
    for row in rows:
        assert required <= set(row), required - set(row)
        assert all(row[k] is not None for k in required)
    assert {"eval/accuracy", "eval/greedy_accuracy"} <= set(rows[-1])
    assert out["evals"][2]["eval/accuracy"] == rows[-1]["eval/accuracy"]
    assert any(x.startswith("[opd lsm] step 2/2 loss") for x in logs)


def test_generate_drops_ids_past_the_tokenizer():
    """A checkpoint's padded embedding rows (vocab_size > tokenizer's) decode to nothing, not a crash."""
    from types import SimpleNamespace

    from opd.train import evaluate as ev

    task = _tiny_task()
    tok = task.tokenizer
    answer = tok.encode("7")

    def fake_sample(model, prompt_BxP, mask_BxP, key, cfg, eos_id):
        b, p = np.asarray(prompt_BxP).shape
        resp = np.array([[answer[0], tok.vocab_size + 2, eos_id]] * b)
        return SimpleNamespace(tokens_BxL=np.concatenate([prompt_BxP, resp], 1),
                               response_mask_BxL=np.concatenate([np.zeros((b, p)), np.ones((b, 3))], 1))

    texts = ev.generate(None, task, ["1+2=", "3+4="], jax.random.key(0), None, sample_fn=fake_sample)
    assert texts == [tok.decode(answer + [tok.eos_id])] * 2
