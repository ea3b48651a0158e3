"""Multi-task OPD plumbing: routing refusals before training, mapped teacher scoring, multi-turn rollouts
with environment tokens masked out, special-token masking of the batch."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from opd.cli import ConfigError
from opd.model import ModelConfig, Transformer, forward_logprobs
from opd.sampling import Rollout
from opd.tasks import Tokenizer, TokenMapping, make_task
from opd.train import multitask as mt

CONF = Path(__file__).resolve().parents[1] / "conf"
mt.register_multitask_configs()


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="multitask", overrides=overrides)


def _variant():
    return mt.make_tokenizer("variant")


# ---------------------------------------------------------------------------------------------------------
# Refusals before training
# ---------------------------------------------------------------------------------------------------------


def test_default_config_validates_with_one_teacher_per_task():
    built = mt.validate_multitask(_compose([]))
    assert set(built["teachers"]) == {"arithmetic", "textworld"}
    assert built["mappings"] == {"arithmetic": None, "textworld": None}
    assert built["teachers"]["arithmetic"].hidden_size > built["student"].hidden_size


def test_task_without_teacher_is_refused():
    with pytest.raises(ConfigError, match=r"no teacher configured for task\(s\) \['webshop'\]"):
        mt.validate_multitask(_compose(["tasks=[arithmetic,webshop]"]))


def test_different_vocabulary_without_mapping_is_refused():
    cfg = _compose(["teachers.arithmetic.tokenizer=variant"])
    with pytest.raises(ConfigError, match=r"teachers\.arithmetic: .*no token mapping is declared"):
        mt.validate_multitask(cfg)


def test_declared_mapping_is_accepted_for_sampled_token_only():
    built = mt.validate_multitask(_compose(["teachers.arithmetic.tokenizer=variant",
                                            "teachers.arithmetic.token_mapping=surface"]))
    mapping = built["mappings"]["arithmetic"]
    assert mapping is not None and not mapping.is_identity
    assert built["teacher_tasks"]["arithmetic"].tokenizer.vocab_size == mapping.teacher_vocab_size
    with pytest.raises(ConfigError, match="supports only loss=sampled_token"):
        mt.validate_multitask(_compose(["loss=lsm", "teachers.arithmetic.tokenizer=variant",
                                        "teachers.arithmetic.token_mapping=surface"]))


def test_check_routes_direct():
    student = Tokenizer()
    assert mt.check_routes(["arithmetic"], {"arithmetic": Tokenizer()}, student, {}, "lsm") == {"arithmetic": None}
    with pytest.raises(ValueError, match="no teacher configured"):
        mt.check_routes(["arithmetic", "textworld"], {"arithmetic": Tokenizer()}, student, {}, "lsm")


# ---------------------------------------------------------------------------------------------------------
# Mapped teacher scoring
# ---------------------------------------------------------------------------------------------------------


def _tiny(vocab, seed=0):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_seq_len=128)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def test_score_mapped_identity_equals_plain_forward():
    tok = Tokenizer()
    model = _tiny(tok.vocab_size)
    tokens = np.array([[0, 0, 1, 10, 12, 2], [1, 11, 13, 14, 15, 2]], np.int32)
    attn = (tokens != 0).astype(np.int32)
    got = mt.score_mapped(model, TokenMapping.identity(tok.vocab_size), tokens, attn, pad_to=8)
    # identity mapping re-packs left padding to the right; per-token log-probs do not depend on padding
    want = np.asarray(forward_logprobs(model, jnp.asarray(tokens[1:]), jnp.asarray(attn[1:])))
    np.testing.assert_allclose(got[1], want[0], atol=1e-5)
    np.testing.assert_allclose(got[0, :2], 0.0)


def test_score_mapped_sums_teacher_pieces_of_a_special_token():
    student, teacher_tok = Tokenizer(), _variant()
    mapping = TokenMapping.from_tokenizers(student, teacher_tok, specials="surface")
    teacher = _tiny(teacher_tok.vocab_size, seed=3)
    # student: <bos> 1 2 <think> 3 </think> 4 <eos>
    ids = [student.bos_id] + student.encode("12") + [student.think_open_id] + student.encode("3") + \
        [student.think_close_id] + student.encode("4") + [student.eos_id]
    tokens = np.asarray([ids], np.int32)
    attn = np.ones_like(tokens)
    got = mt.score_mapped(teacher, mapping, tokens, attn, pad_to=8)[0]
    # by hand: spell each student token in the teacher's vocabulary, score once, sum each token's pieces
    pieces = [list(mapping.table[i]) for i in ids]
    assert pieces[3] == teacher_tok.encode("<think>") and len(pieces[3]) == 3        # "<", "think", ">"
    assert len(pieces[-1]) == 5                                                      # "<", "e", "o", "s", ">"
    flat = [t for p in pieces for t in p]
    lp = np.asarray(forward_logprobs(teacher, jnp.asarray([flat]), jnp.ones((1, len(flat)), jnp.int32)))[0]
    want, j = [], 0
    for p in pieces:
        want.append(lp[j:j + len(p)].sum())
        j += len(p)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Multi-turn rollouts: environment tokens are not student tokens
# ---------------------------------------------------------------------------------------------------------


def _scripted_sampler(task, plans):
    """A stand-in for opd.sampling.sample that emits, for row b at turn t, plans[b][t] + EOT."""
    calls = {"t": 0}

    def sample_fn(model, ctx, cmask, key, scfg, *, eos_id, stop_ids=()):
        assert task.eot_id in stop_ids
        t = calls["t"]
        calls["t"] += 1
        B, P = ctx.shape
        N = scfg.max_new_tokens
        gen = np.zeros((B, N), np.int32)
        gm = np.zeros((B, N), np.int32)
        for b in range(B):
            plan = plans[b]
            ids = task.action_ids(plan[t] if t < len(plan) else "look")
            gen[b, :len(ids)], gm[b, :len(ids)] = ids, 1
        tokens = np.concatenate([np.asarray(ctx), gen], 1)
        resp = np.concatenate([np.zeros((B, P), np.int32), gm], 1)
        attn = np.concatenate([np.asarray(cmask), gm], 1)
        return Rollout(tokens, attn, resp, np.zeros((B, P + N), np.float32), gm.sum(1), np.zeros(B, bool))

    return sample_fn


def test_textworld_rollouts_mask_environment_and_score_success():
    task = make_task("textworld")
    seeds = task.episodes("train", 3, 0)
    plans = [task.expert_actions(task.reset(s)[0]) for s in seeds]
    plans[2] = ["look", "inventory", "open nothing"]  # never reaches the goal -> turn limit
    rb = mt.textworld_rollouts(None, task, seeds, jax.random.key(0), 1.0,
                               sample_fn=_scripted_sampler(task, plans))
    np.testing.assert_array_equal(rb.score, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(rb.truncated, [False, False, True])
    for b in range(2):  # expert rows reproduce the expert conversation and its student mask exactly
        tokens, mask = task.demonstration_conversation(seeds[b])
        n = len(tokens)
        np.testing.assert_array_equal(rb.tokens[b, :n], tokens)
        np.testing.assert_array_equal(rb.response_mask[b, 1:n], mask[1:])
        assert rb.response_mask[b, n:].sum() == 0 and rb.attention_mask[b, n:].sum() == 0
    # student tokens are exactly the action tokens + EOT; no OBS token is ever a student token
    assert not np.any((rb.tokens == task.tokenizer.obs_id) & (rb.response_mask > 0))
    student2 = rb.tokens[2][rb.response_mask[2] > 0].tolist()
    turns = student2.count(task.eot_id)
    assert 1 <= turns <= task.max_turns and rb.response_len[2] == len(student2)
    actions = (plans[2] + ["look"] * task.max_turns)[:turns]
    assert student2 == [t for a in actions for t in task.action_ids(a)]


def test_make_batch_masks_first_special_tokens_only_on_student_tokens():
    tok = Tokenizer()
    eos, think = tok.eos_id, tok.think_open_id
    tokens = np.array([[tok.bos_id, think, 20, eos, think, 21, eos]], np.int32)
    resp = np.array([[0, 0, 1, 1, 1, 1, 1]], np.int32)  # the first <think> is a prompt token
    rb = mt.RolloutBatch(tokens, np.ones_like(tokens), resp, resp.sum(1), np.zeros(1, bool), np.zeros(1))
    z = np.zeros(tokens.shape, np.float32)
    zk = np.zeros(tokens.shape + (2,), np.float32)
    batch = mt.make_batch(rb, z, z, zk.astype(np.int32), zk, special_ids=[think, eos], mask_special=True)
    np.testing.assert_array_equal(np.asarray(batch.loss_mask_BxL), [[0, 0, 1, 0, 0, 1, 1]])
    off = mt.make_batch(rb, z, z, zk.astype(np.int32), zk, special_ids=[think, eos], mask_special=False)
    np.testing.assert_array_equal(np.asarray(off.loss_mask_BxL), resp)


# ---------------------------------------------------------------------------------------------------------
# End to end (slow): the whole multitask job at toy size
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_multitask_job_end_to_end(tmp_path):
    import json

    from experiments.multitask import run_experiment

    cfg = _compose(["teachers.arithmetic.sft.steps=2", "teachers.textworld.sft.steps=2", "sft_student.steps=2",
                    "teachers.arithmetic.sft.train_problems=32", "teachers.textworld.sft.train_problems=8",
                    "sft_student.train_problems=8", "steps=2", "eval_every=2", "eval_problems=2",
                    "train_problems=8", "rollout.prompts_per_step=1", "rollout.group_size=2",
                    "diagnostics_every=1", f"checkpoint_root={tmp_path / 'ckpt'}",
                    "++task_args.arithmetic={digits:1,min_terms:2,max_terms:2}"])  # ++: the conf has {}
    built = mt.validate_multitask(cfg)
    final = run_experiment(cfg, built, tmp_path, log=lambda _m: None)
    assert {"final/arithmetic/accuracy", "final/textworld/success", "teacher/textworld/success"} <= set(final)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["arithmetic", "textworld"]  # one task per step, in turn
    records = json.loads((tmp_path / "diagnostics.json").read_text())["records"]
    assert {r["task"] for r in records} == {"arithmetic", "textworld"}
    assert all(r["n_tokens"] > 0 and "coverage" in r for r in records)
