"""The JSONL task (opd.tasks.jsonl): lines -> chat-rendered prompts, verifiers, splits, rollouts, SFT
demonstrations, and one clear line naming file:line:key for every bad input. A tiny byte-level tokenizer with
SmolLM2's chat template stands in for a checkpoint's (built by opd.model.bpe, read by hf.load_tokenizer)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd.model import bpe, hf
from opd.sampling import Rollout
from opd.tasks.jsonl import JsonlTask, exact_match, final_answer, normalize_answer, read_jsonl

TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    chars = bpe._bytes_to_unicode()
    tokens = SPECIALS + [chars[b] for b in range(256)]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [bpe.TOKEN_CONTROL] * 3 + [1] * 256}
    d = tmp_path_factory.mktemp("tok")
    bpe.tokenizer_from_gguf_metadata(meta).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|im_end|>",
        "added_tokens_decoder": {str(i): {"content": s, "special": True} for i, s in enumerate(SPECIALS)}}))
    return hf.load_tokenizer(d)


def _write(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return p


GOOD = [
    {"prompt": "What is 2 + 3?", "answer": "5"},
    "",
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"}],
     "answer": "Lima", "id": "q2"},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}], "answer": 7},
]


def test_lines_become_chat_prompts(tmp_path, tok):
    path = _write(tmp_path, GOOD)
    items = read_jsonl(path, tok, max_prompt_len=200, needs_answer=True)
    assert [it.source for it in items] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert items[0].prompt_ids == tuple(tok.encode_chat([{"role": "user", "content": "What is 2 + 3?"}]))
    text = tok.tokenizer.decode(list(items[1].prompt_ids), skip_special_tokens=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Peru?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert items[2].target == "Hi!" and items[2].answer == "7" and items[0].target is None
    assert [m["role"] for m in items[2].messages] == ["user"]  # the assistant turn is the target, not prompt


BAD_LINES = {
    "invalid_json": ('{"prompt": "x"', "invalid JSON"),
    "not_object": ('["x"]', "expected a JSON object, got list"),
    "neither": ({"question": "x", "answer": "1"}, "exactly one of 'prompt' or 'messages'"),
    "both": ({"prompt": "x", "messages": [], "answer": "1"}, "(both given)"),
    "empty_prompt": ({"prompt": "  ", "answer": "1"}, "prompt: expected a non-empty string"),
    "unknown_role": ({"messages": [{"role": "tool", "content": "x"}], "answer": "1"}, "messages[0].role"),
    "content": ({"messages": [{"role": "user", "content": 3}], "answer": "1"}, "messages[0].content"),
    "no_messages": ({"messages": [], "answer": "1"}, "messages: expected a non-empty list"),
    "answer_type": ({"prompt": "x", "answer": [1]}, "answer: expected a string or a number"),
    "missing_answer": ({"prompt": "x"}, "missing 'answer'"),
    "assistant_only": ({"messages": [{"role": "assistant", "content": "x"}], "answer": "1"}, "needs a user turn"),
    "too_long": ({"prompt": "word " * 60, "answer": "1"}, "tokens after the chat template > max_prompt_len=128"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_lines_name_file_line_and_key(tmp_path, tok, kind):
    line, needle = BAD_LINES[kind]
    path = _write(tmp_path, [GOOD[0], line])
    with pytest.raises(ValueError) as err:
        JsonlTask(path, tok, max_prompt_len=128, max_response_len=16)
    msg = str(err.value)
    assert msg.startswith(f"{path}:2: ") and needle in msg and "\n" not in msg, msg


def test_reward_free_lines_need_no_answer(tmp_path, tok):
    task = JsonlTask(_write(tmp_path, [{"prompt": "Tell me a story."}]), tok, max_prompt_len=128,
                     max_response_len=16, verifier="none", eval_fraction=0.0)
    assert task.metric == "none" and task.verifier is None
    assert task.score(task.items("train", 1, 0)[0], "anything") == 0.0


def test_bad_options(tmp_path, tok):
    path = _write(tmp_path, GOOD)
    cases = [
        (dict(path=tmp_path / "missing.jsonl"), "is not a file"),
        (dict(path=_write(tmp_path, ["", " "], "empty.jsonl")), "no items"),
        (dict(max_prompt_len=0), "max_prompt_len: expected a positive integer"),
        (dict(eval_fraction=0.5), "eval_fraction: expected a number in [0, 0.5)"),
        (dict(context_len=100), "exceeds the model's context_len=100"),
        (dict(verifier="fuzzy"), "verifier: expected one of ['exact_match', 'none']"),
        (dict(verifier="no_such_module_xyz:f"), "verifier: cannot import"),
    ]
    for kw, needle in cases:
        args = dict(path=path, max_prompt_len=128, max_response_len=16) | kw
        with pytest.raises(ValueError) as err:
            JsonlTask(args.pop("path"), tok, **args)
        assert needle in str(err.value), (kw, str(err.value))
    no_template = hf.HFTokenizer(tok.tokenizer, tok.special_tokens, tok.special_ids, None)
    with pytest.raises(ValueError, match="no chat template"):
        JsonlTask(path, no_template, max_prompt_len=128, max_response_len=16)


@pytest.mark.parametrize(("response", "answer", "expected"), [
    ("The sum is 5.\n#### 5", "5", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", 1.0),
    ("Final answer: **Lima**.", "lima", 1.0),
    ("The answer is: 3.50", "3.5", 1.0),
    ("So the answer is 42.\nDone", "42", 1.0),
    ("Answer: -7", "-7", 1.0),
    ("I think\nLima", "Lima", 1.0),
    ("#### 6", "5", 0.0),
    ("5 apples, then 6", "5", 0.0),
    ("", "5", 0.0),
])
def test_exact_match_on_the_final_answer(response, answer, expected):
    assert exact_match(response, answer) == expected, (final_answer(response), normalize_answer(answer))


def test_pluggable_verifiers(tmp_path, tok):
    path = _write(tmp_path, GOOD)
    by_name = JsonlTask(path, tok, max_prompt_len=128, max_response_len=16, verifier="opd.tasks.jsonl:exact_match")
    assert by_name.verifier is exact_match
    lenient = JsonlTask(path, tok, max_prompt_len=128, max_response_len=16,
                        verifier=lambda text, answer: float(answer in text))
    item = lenient.items("train", 1, 0)[0]
    assert lenient.score(item, f"well, {item.answer} apples") == 1.0
    assert by_name.score(item, f"well, {item.answer} apples") == 0.0  # the last line is not just the answer


def test_splits_are_stable_disjoint_and_seeded(tmp_path, tok):
    lines = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(60)]
    task = JsonlTask(_write(tmp_path, lines), tok, max_prompt_len=128, max_response_len=16, eval_fraction=0.25)
    train = {it.source for it in task.items("train", len(task._splits["train"]), 0)}
    evals = {it.source for it in task.items("eval", len(task._splits["eval"]), 0)}
    val = {it.source for it in task.items("validation", len(task._splits["validation"]), 0)}
    assert not train & evals and not val & (train | evals) and len(train | evals | val) == 60
    assert 5 <= len(evals) <= 25 and 5 <= len(val) <= 25
    assert task.items("train", 5, 3) == task.items("train", 5, 3) != task.items("train", 5, 4)
    many = task.items("eval", 3 * len(evals), 1)  # repeats the split when asked for more
    assert len(many) == 3 * len(evals) and {it.source for it in many} == evals
    again = JsonlTask(_write(tmp_path, lines[::-1], "rev.jsonl"), tok, max_prompt_len=128, max_response_len=16,
                      eval_fraction=0.25)  # the partition depends on content, not on line order
    assert {it.answer for it in again._splits["eval"]} == {it.answer for it in task._splits["eval"]}
    with_eval = JsonlTask(_write(tmp_path, lines[:4], "a.jsonl"), tok, max_prompt_len=128, max_response_len=16,
                          eval_path=_write(tmp_path, lines[4:6], "b.jsonl"))
    assert len(with_eval._splits["train"]) + len(with_eval._splits["validation"]) == 4
    assert len(with_eval._splits["eval"]) == 2
    with pytest.raises(ValueError, match="split: expected one of"):
        task.items("test", 1, 0)


def test_rollout_scores_responses_with_the_verifier(tmp_path, tok):
    task = JsonlTask(_write(tmp_path, GOOD), tok, max_prompt_len=96, max_response_len=12, eval_fraction=0.0)
    items = task.items("train", 3, 0)
    responses = [tok.encode(f"#### {it.answer}") + [tok.eos_id] if b != 1 else tok.encode("#### 0")
                 for b, it in enumerate(items)]

    def fake_sample(model, prompt_BxP, mask_BxP, rng, cfg, *, eos_id):
        assert eos_id == tok.eos_id and cfg.max_new_tokens == 12 and prompt_BxP.shape == (3, 96)
        b, p = prompt_BxP.shape
        resp = np.full((b, cfg.max_new_tokens), tok.pad_id, np.int32)
        rmask = np.zeros_like(resp)
        for i, r in enumerate(responses):
            resp[i, : len(r)], rmask[i, : len(r)] = r[: cfg.max_new_tokens], 1
        rmask = np.concatenate([np.zeros_like(mask_BxP), rmask], axis=1)
        lengths = rmask.sum(1)
        return Rollout(np.concatenate([prompt_BxP, resp], 1), np.concatenate([mask_BxP, rmask[:, p:]], 1), rmask,
                       -0.5 * np.ones(rmask.shape, np.float32), lengths, np.array([False, True, False]))

    out = task.rollout(None, items, jax.random.key(0), temperature=1.0, top_p=1.0, sample_fn=fake_sample)
    np.testing.assert_array_equal(out.score, [1.0, 0.0, 1.0])
    assert np.all(out.logprobs[out.response_mask == 0] == 0) and np.all(out.logprobs[out.response_mask > 0] == -0.5)
    prompt, mask = task.prompt_batch(items)
    np.testing.assert_array_equal(out.tokens[:, :96], prompt)
    assert np.all(prompt[mask == 0] == tok.pad_id) and np.all(mask[:, -1] == 1)


def test_rollout_runs_the_real_sampler(tmp_path, tok):
    from flax import nnx

    from opd.model.config import ModelConfig
    from opd.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, max_seq_len=128)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    task = JsonlTask(_write(tmp_path, GOOD), tok, max_prompt_len=96, max_response_len=8, eval_fraction=0.0,
                     context_len=cfg.max_seq_len)
    out = task.rollout(model, task.items("train", 2, 0), jax.random.key(1), temperature=1.0, top_p=0.9)
    assert out.tokens.shape == (2, 104) and out.score.shape == (2,)
    assert np.all(out.response_mask[:, :96] == 0) and np.all(out.response_len >= 1)
    assert np.all(np.asarray(jnp.isfinite(out.logprobs)))


def test_demonstrations_from_assistant_turns(tmp_path, tok):
    task = JsonlTask(_write(tmp_path, GOOD), tok, max_prompt_len=96, max_response_len=8, eval_fraction=0.0)
    demo = [it for it in task.items("train", 3, 0) if it.target is not None]
    tokens, attn, target = task.demonstrations(demo)
    assert tokens.shape == attn.shape == target.shape == (1, 104)
    ids = tokens[0][target[0] > 0].tolist()
    assert ids == tok.encode("Hi!") + [tok.eos_id]
    np.testing.assert_array_equal(tokens[0, :96][attn[0, :96] > 0], demo[0].prompt_ids)
    plain = [it for it in task.items("train", 3, 0) if it.target is None][:1]
    with pytest.raises(ValueError, match=r":1: no demonstration"):
        task.demonstrations(plain)


def test_special_ids_for_the_mask(tmp_path, tok):
    task = JsonlTask(_write(tmp_path, GOOD), tok, max_prompt_len=96, max_response_len=8)
    ids = task.special_ids()
    assert ids["eos"] == ids["im_end"] == 2 and ids["im_start"] == 1
    assert set(ids.values()) == set(tok.mask_ids)
