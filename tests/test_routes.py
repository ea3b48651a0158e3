"""Routes through the one loop: refusals before training, mapped teacher scoring, multi-turn rollouts with
environment tokens masked and the sampler's log-probs stitched in, special-token masking of the batch, and a
two-task run alternating routes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from opd.cli import ConfigError
from opd.model import ModelConfig, Transformer, forward_logprobs
from opd.sampling import Rollout
from opd.tasks import Tokenizer, TokenMapping, make_task
from opd.tasks.common import Rollouts
from opd.teacher import TeacherPayload
from opd.train.batch import build_batch
from opd.train.config import make_tokenizer, register_configs, validate
from opd.train.loop import Route, run_opd, score_mapped

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="opd", overrides=["experiment=multitask", *overrides])


def _tiny(vocab, seed=0, layers=1):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_seq_len=512)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------------------
# Refusals before training
# ---------------------------------------------------------------------------------------------------------


def test_multitask_preset_validates_with_one_teacher_per_task():
    built = validate(_compose([]))
    assert set(built["routes"]) == {"arithmetic", "textworld"}
    assert all(r["mapping"] is None for r in built["routes"].values())
    assert built["routes"]["arithmetic"]["teacher"].hidden_size > built["student"].hidden_size


def test_route_without_teacher_is_refused():
    from opd.train.config import RouteConfig

    cfg = _compose([])
    with open_dict(cfg):
        cfg.tasks["extra"] = RouteConfig(task={"name": "arithmetic"})  # e.g. a YAML route that names no teacher
    with pytest.raises(ConfigError, match=r"^tasks\.extra\.teacher: expected a teacher model section"):
        validate(cfg)


def test_different_vocabulary_without_mapping_is_refused():
    with pytest.raises(ConfigError, match=r"^tasks\.arithmetic\.token_mapping: .*no token mapping is declared"):
        validate(_compose(["tasks.arithmetic.teacher_tokenizer=variant"]))


def test_declared_mapping_is_accepted_for_sampled_objectives_only():
    built = validate(_compose(["tasks.arithmetic.teacher_tokenizer=variant", "tasks.arithmetic.token_mapping=surface"]))
    route = built["routes"]["arithmetic"]
    assert route["mapping"] is not None and not route["mapping"].is_identity
    assert route["teacher_task"].tokenizer.vocab_size == route["mapping"].teacher_vocab_size
    for loss in ("lsm", "full_rkl", "topk_tail"):
        with pytest.raises(ConfigError, match=rf"^tasks\.arithmetic\.token_mapping: .*loss\.name={loss} needs"):
            validate(_compose([f"loss={loss}", "tasks.arithmetic.teacher_tokenizer=variant",
                               "tasks.arithmetic.token_mapping=surface"]))


def test_full_rkl_validates_in_multitask():
    validate(_compose(["loss=full_rkl"]))


# ---------------------------------------------------------------------------------------------------------
# Mapped teacher scoring
# ---------------------------------------------------------------------------------------------------------


def test_score_mapped_identity_equals_plain_forward():
    tok = Tokenizer()
    model = _tiny(tok.vocab_size)
    tokens = np.array([[0, 0, 1, 10, 12, 2], [1, 11, 13, 14, 15, 2]], np.int32)
    attn = (tokens != 0).astype(np.int32)
    got = score_mapped(model, TokenMapping.identity(tok.vocab_size), tokens, attn, pad_to=8)
    # identity mapping re-packs left padding to the right; per-token log-probs do not depend on padding
    want = np.asarray(forward_logprobs(model, jnp.asarray(tokens[1:]), jnp.asarray(attn[1:])))
    np.testing.assert_allclose(got[1], want[0], atol=1e-5)
    np.testing.assert_allclose(got[0, :2], 0.0)


def test_score_mapped_sums_teacher_pieces_of_a_special_token():
    student, teacher_tok = Tokenizer(), make_tokenizer("basic", "variant")
    mapping = TokenMapping.from_tokenizers(student, teacher_tok, specials="surface")
    teacher = _tiny(teacher_tok.vocab_size, seed=3)
    # student: <bos> 1 2 <think> 3 </think> 4 <eos>
    ids = [student.bos_id] + student.encode("12") + [student.think_open_id] + student.encode("3") + \
        [student.think_close_id] + student.encode("4") + [student.eos_id]
    tokens = np.asarray([ids], np.int32)
    got = score_mapped(teacher, mapping, tokens, np.ones_like(tokens), pad_to=8)[0]
    # by hand: spell each student token in the teacher's vocabulary, score once, sum each token's pieces
    pieces = [list(mapping.table[i]) for i in ids]
    assert pieces[3] == teacher_tok.encode("<think>") and len(pieces[3]) == 3        # "<", "think", ">"
    flat = [t for p in pieces for t in p]
    lp = np.asarray(forward_logprobs(teacher, jnp.asarray([flat]), jnp.ones((1, len(flat)), jnp.int32)))[0]
    want, j = [], 0
    for p in pieces:
        want.append(lp[j:j + len(p)].sum())
        j += len(p)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Multi-turn rollouts: environment tokens are not student tokens; π_old is the sampler's own record
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
            ids = task.action_ids(plans[b][t] if t < len(plans[b]) else "look")
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
    rb = task.rollout(None, seeds, jax.random.key(0), temperature=1.0, top_p=1.0,
                      sample_fn=_scripted_sampler(task, plans))
    np.testing.assert_array_equal(rb.score, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(rb.truncated, [False, False, True])
    for b in range(2):  # expert rows reproduce the expert conversation and its student mask exactly
        tokens, mask = task.demonstration_conversation(seeds[b])
        n = len(tokens)
        np.testing.assert_array_equal(rb.tokens[b, :n], tokens)
        np.testing.assert_array_equal(rb.response_mask[b, 1:n], mask[1:])
        assert rb.response_mask[b, n:].sum() == 0 and rb.attention_mask[b, n:].sum() == 0
    assert not np.any((rb.tokens == task.tokenizer.obs_id) & (rb.response_mask > 0))
    student2 = rb.tokens[2][rb.response_mask[2] > 0].tolist()
    turns = student2.count(task.eot_id)
    assert 1 <= turns <= task.max_turns and rb.response_len[2] == len(student2)
    actions = (plans[2] + ["look"] * task.max_turns)[:turns]
    assert student2 == [t for a in actions for t in task.action_ids(a)]


def test_textworld_stitched_sampler_logprobs_equal_a_forward_pass():
    """π_old is defined once, as the sampler's record: for a multi-turn rollout, the per-turn records stitched
    into the conversation equal one forward pass over the finished conversation."""
    task = make_task("textworld", max_action_len=6)
    model = _tiny(task.tokenizer.vocab_size, seed=5, layers=2)
    rb = task.rollout(model, task.episodes("train", 2, 1), jax.random.key(2), temperature=1.0, top_p=1.0)
    want = np.asarray(forward_logprobs(model, jnp.asarray(rb.tokens), jnp.asarray(rb.attention_mask)))
    student = rb.response_mask > 0
    assert student.sum() > 10 and np.all(rb.logprobs[~student] == 0)
    np.testing.assert_allclose(rb.logprobs[student], want[student], atol=1e-5)


def test_build_batch_masks_first_special_tokens_only_on_student_tokens():
    tok = Tokenizer()
    eos, think = tok.eos_id, tok.think_open_id
    tokens = np.array([[tok.bos_id, think, 20, eos, think, 21, eos]], np.int32)
    resp = np.array([[0, 0, 1, 1, 1, 1, 1]], np.int32)  # the first <think> is a prompt token
    z = np.zeros(tokens.shape, np.float32)
    rb = Rollouts(tokens, np.ones_like(tokens), resp, z, resp.sum(1), np.zeros(1, bool), np.zeros(1))
    payload = TeacherPayload(np.zeros(tokens.shape + (2,), np.int32), np.zeros(tokens.shape + (2,), np.float32), z)
    batch = build_batch(rb, payload, special_ids=[think, eos], mask_special_tokens=True)
    np.testing.assert_array_equal(np.asarray(batch.loss_mask_BxL), [[0, 0, 1, 0, 0, 1, 1]])
    off = build_batch(rb, payload, special_ids=[think, eos], mask_special_tokens=False)
    np.testing.assert_array_equal(np.asarray(off.loss_mask_BxL), resp)


# ---------------------------------------------------------------------------------------------------------
# The loop over two routes
# ---------------------------------------------------------------------------------------------------------


def _run_cfg(loss: str, **loss_fields):
    loss_cfg = {"name": loss, "k": 4, "aggregation": "sequence_mean", "clip_eps": 0.2, "dual_clip": 3.0,
                "mask_special_tokens": True, "rollout_top_p": 0.9, **loss_fields}
    opt = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "grad_clip": 1.0,
           "warmup_steps": 0, "minibatches_per_step": 2}
    ns = SimpleNamespace
    return ns(loss=ns(**loss_cfg), optimizer=ns(**opt), seed=0, eval_seed=1, steps=2, eval_every=2, eval_samples=1,
              eval_batch_size=4, log_every=1, diagnostics_every=1, diag_bucket_size=8,
              rollout=ns(prompts_per_step=2, group_size=2, temperature=1.0, top_p=None, pad_multiple=8,
                         first_window=64))


def test_loop_alternates_routes_with_one_teacher_each(tmp_path):
    """full_rkl: the objective that needs the most from each route's teacher (its logits, in the update)."""
    tok = Tokenizer.spaced()
    arith = make_task("arithmetic", min_terms=2, max_terms=2, tokenizer=tok)
    world = make_task("textworld", max_turns=6, max_action_len=6, tokenizer=tok)
    routes = [Route("arithmetic", arith, _tiny(tok.vocab_size, seed=1), train_items=arith.items("train", 8, 0),
                    eval_items=arith.items("eval", 2, 0)),
              Route("textworld", world, _tiny(tok.vocab_size, seed=2), train_items=world.items("train", 4, 0),
                    eval_items=world.items("eval", 2, 0))]
    student = _tiny(tok.vocab_size, seed=0)
    out = run_opd(_run_cfg("full_rkl"), student, routes, log=lambda _m: None, diagnostics_path=tmp_path / "d.json")
    rows = out["rows"]
    assert [r["task"] for r in rows] == ["arithmetic", "textworld"]
    assert [r["task_step"] for r in rows] == [1, 1]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert {"eval/arithmetic/accuracy", "eval/textworld/success"} <= set(rows[-1])
    records = json.loads((tmp_path / "d.json").read_text())["records"]
    assert {r["task"] for r in records} == {"arithmetic", "textworld"} and all(r["n_tokens"] > 0 for r in records)


# ---------------------------------------------------------------------------------------------------------
# End to end (slow): the whole multi-task job at toy size through experiments.opd
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_multitask_job_end_to_end(tmp_path):
    from experiments.opd import run_experiment

    cfg = _compose(["tasks.arithmetic.sft.steps=2", "tasks.textworld.sft.steps=2", "sft_student.steps=2",
                    "tasks.arithmetic.sft.train_problems=32", "tasks.textworld.sft.train_problems=8",
                    "sft_student.train_problems=8", "steps=2", "eval_every=2", "eval_problems=2",
                    "train_problems=8", "rollout.prompts_per_step=1", "rollout.group_size=2",
                    "diagnostics_every=1", f"checkpoint_root={tmp_path / 'ckpt'}",
                    "tasks.arithmetic.task.min_terms=2", "tasks.arithmetic.task.max_terms=2"])
    final = run_experiment(cfg, validate(cfg), tmp_path, log=lambda _m: None)
    assert {"final/arithmetic/accuracy", "final/textworld/success", "teacher/textworld/success"} <= set(final)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == ["arithmetic", "textworld"]  # one task per step, in turn
    records = json.loads((tmp_path / "diagnostics.json").read_text())["records"]
    assert {r["task"] for r in records} == {"arithmetic", "textworld"}
