"""A real-model OPD run through `python -m experiments.opd` (issue 15 item 5): the student checkpoint's own
tokenizer (`tokenizer=hf`) with a JSONL task, a teacher SFT'd from a Hugging Face checkpoint's weights
(`tasks.<r>.teacher_sft=true`, cached by config hash and the checkpoint's fingerprint), the generated chat
data (opd/tasks/chat_data.py), and the HF analog of failure mode 3 (a teacher whose turns end with
"<|endoftext|>", connected by a declared mapping). A tiny random checkpoint with a byte-level tokenizer and
SmolLM2's chat template stands in for SmolLM2 in the default suite; the real model runs under slow/hf."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from opd.cli import ConfigError
from opd.model import ModelConfig, Transformer, bpe, hf
from opd.tasks import chat_data
from opd.tasks.jsonl import exact_match
from opd.train.config import register_configs, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()

TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPEC = {"kind": "sums", "n": 60, "seed": 0, "min_terms": 2, "max_terms": 2, "max_value": 9}


def _save_checkpoint(path: Path, seed: int) -> Path:
    """A 1-layer random Llama with a byte-level tokenizer (3 specials + 256 bytes) and a chat template."""
    chars = bpe._bytes_to_unicode()
    tokens = SPECIALS + [chars[b] for b in range(256)]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [bpe.TOKEN_CONTROL] * 3 + [1] * 256}
    cfg = ModelConfig(vocab_size=len(tokens), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_seq_len=192, tie_embeddings=True, family="llama")
    hf.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(seed)), path)
    bpe.tokenizer_from_gguf_metadata(meta).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|im_end|>",
        "added_tokens_decoder": {str(i): {"content": s, "special": True} for i, s in enumerate(SPECIALS)}}))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", seed=3)


def _overrides(ckpt: Path, root: Path) -> list[str]:
    """The smollm2_smoke preset on the tiny checkpoint, sized to run in seconds."""
    return ["experiment=smollm2_smoke", f"student.path={ckpt}", f"tasks.arithmetic.teacher.path={ckpt}",
            f"checkpoint_root={root / 'ckpt'}", f"tasks.arithmetic.task.data_dir={root / 'data'}",
            "tasks.arithmetic.task.generate.n=60", "tasks.arithmetic.task.generate.max_value=9",
            "tasks.arithmetic.task.generate.max_terms=2", "tasks.arithmetic.task.generate.min_terms=2",
            "tasks.arithmetic.task.max_prompt_len=128", "tasks.arithmetic.task.max_response_len=24",
            "tasks.arithmetic.sft.steps=2",
            "tasks.arithmetic.sft.train_problems=16", "tasks.arithmetic.sft.lr=1e-3",
            "train_problems=8", "eval_problems=4", "eval_batch_size=4", "steps=2", "eval_every=2",
            "diagnostics_every=1", "optimizer.lr=1e-3"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="opd", overrides=overrides)


# ---------------------------------------------------------------------------------------------------------
# The generated data
# ---------------------------------------------------------------------------------------------------------


def test_generated_lines_are_correct_worked_sums():
    lines = chat_data.generate_lines({"kind": "sums", "n": 50, "seed": 1, "min_terms": 2, "max_terms": 5})
    assert len(lines) == 50 and len({json.dumps(x) for x in lines}) == 50
    for line in lines:
        user, assistant = line["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        terms = [int(t) for t in user["content"].split(". ")[0][len("Add "):].replace(" and", ",").split(", ")]
        assert 2 <= len(terms) <= 5 and all(1 <= t <= 99 for t in terms)
        steps = assistant["content"].splitlines()
        assert len(steps) == len(terms) and steps[-1] == f"Answer: {sum(terms)}"
        assert line["answer"] == str(sum(terms)) and exact_match(assistant["content"], line["answer"]) == 1.0
        running = terms[0]
        for t, step in zip(terms[1:], steps, strict=False):  # each line adds the next term to the running sum
            assert step == f"{running} + {t} = {running + t}"
            running += t


def test_generated_file_is_written_once_per_spec(tmp_path):
    path = chat_data.write_jsonl_data(SPEC, tmp_path)
    text = path.read_text()
    assert [json.loads(x) for x in text.splitlines()] == chat_data.generate_lines(SPEC)
    assert chat_data.write_jsonl_data(dict(SPEC), tmp_path) == path  # same spec -> same file, not rewritten
    assert chat_data.write_jsonl_data({**SPEC, "seed": 1}, tmp_path) != path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, chat_data.write_jsonl_data(
        {**SPEC, "seed": 1}, tmp_path).name])  # no partial files left


@pytest.mark.parametrize("spec, key", [
    ({**SPEC, "kind": "products"}, "generate.kind"), ({**SPEC, "colour": 1}, "generate.colour"),
    ({**SPEC, "min_terms": 1}, "generate.min_terms"), ({**SPEC, "max_terms": 1}, "generate.max_terms"),
    ({**SPEC, "n": "many"}, "generate.n"), ({"kind": "sums", "seed": 0}, "generate.n"),
    ({**SPEC, "n": 1000, "max_value": 2}, "generate.n"),
])
def test_bad_data_specs_are_one_line_naming_the_key(spec, key, tmp_path):
    with pytest.raises(ValueError, match=rf"^{key}: ") as err:
        chat_data.write_jsonl_data(spec, tmp_path)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------
# tokenizer=hf route validation
# ---------------------------------------------------------------------------------------------------------


def test_hf_tokenizer_route_validates(ckpt, tmp_path):
    built = validate(_compose(_overrides(ckpt, tmp_path)))
    route = built["routes"]["arithmetic"]
    tok = hf.load_tokenizer(ckpt)
    assert built["tokenizer"].tokenizer.get_vocab() == tok.tokenizer.get_vocab()
    assert route["task"].tokenizer.eos_id == tok.eos_id and route["mapping"] is None and route["teacher_sft"]
    assert built["student"] == hf.load_config(ckpt)
    first = route["task"].items("train", 1, 0)[0]
    assert first.prompt_ids == tuple(tok.encode_chat(list(first.messages)))

    # failure mode 3 on real tokens: the variant teacher ends its turns with <|endoftext|> (id 0)
    role = validate(_compose([*_overrides(ckpt, tmp_path), "loss=sampled_token",
                              "tasks.arithmetic.teacher_tokenizer=variant", "tasks.arithmetic.token_mapping=role"]))
    r = role["routes"]["arithmetic"]
    assert r["teacher_task"].tokenizer.eos_id == 0 and r["task"].tokenizer.eos_id == tok.eos_id == 2
    assert r["mapping"].table[2] == (0,) and r["mapping"].table[5] == (5,)
    assert sum(seq != (i,) for i, seq in enumerate(r["mapping"].table)) == 1
    surface = validate(_compose([*_overrides(ckpt, tmp_path), "tasks.arithmetic.teacher_tokenizer=variant",
                                 "tasks.arithmetic.token_mapping=surface"]))
    assert surface["routes"]["arithmetic"]["mapping"] is None  # spelled as itself: the teacher scores <|im_end|>
    assert surface["routes"]["arithmetic"]["teacher_task"].tokenizer.eos_id == 0


@pytest.mark.parametrize("extra, key", [
    (["tokenizer=hf"], "tokenizer"),                                         # hf needs an HF student
    (["tokenizer=basic"], "tokenizer"),                                      # jsonl needs tokenizer=hf
    (["tasks.arithmetic.teacher_sft=true"], "tasks.arithmetic.teacher_sft"),  # only an HF teacher is SFT'd
    (["tasks.arithmetic.teacher_tokenizer=variant"], "tasks.arithmetic.token_mapping"),
    (["tasks.arithmetic.teacher_tokenizer=variant", "tasks.arithmetic.token_mapping=role"],
     "tasks.arithmetic.token_mapping"),                                     # lsm needs the teacher's top-K
    (["tasks.arithmetic.task.max_response_len=400"], "tasks.arithmetic.task.name"),  # > context
])
def test_bad_hf_routes_are_one_line_naming_the_key(ckpt, tmp_path, extra, key):
    with pytest.raises(ConfigError) as err:
        smoke = extra in (["tokenizer=hf"], ["tasks.arithmetic.teacher_sft=true"])  # the generated-task preset
        base = ["experiment=smoke"] if smoke else _overrides(ckpt, tmp_path)
        validate(_compose([*base, *extra]))
    assert str(err.value).startswith(f"{key}: ") and "\n" not in str(err.value), str(err.value)


def test_basic_tokenizer_routes_are_unchanged():
    built = validate(_compose(["experiment=smoke"]))
    assert type(built["tokenizer"]).__name__ == "Tokenizer" and built["hf_student"] is None


# ---------------------------------------------------------------------------------------------------------
# SFT from a Hugging Face checkpoint's weights
# ---------------------------------------------------------------------------------------------------------


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_sft_from_hf_init_cache_key_and_start(ckpt, tmp_path):
    from opd.train import sft

    cfg = validate(_compose(_overrides(ckpt, tmp_path)))
    task = cfg["routes"]["arithmetic"]["task"]
    sections = {"model": cfg["student"].to_dict(), "sft": {"steps": 1}}
    key = sft.sft_cache_key(sections, [task], 0, ckpt)
    assert key == sft.sft_cache_key(sections, [task], 0, str(ckpt))
    assert key != sft.sft_cache_key(sections, [task], 0)  # random init is another model
    other = _save_checkpoint(tmp_path / "other", seed=4)  # same config, other weights
    assert (other / "config.json").read_text() == (ckpt / "config.json").read_text()
    assert key != sft.sft_cache_key(sections, [task], 0, other)

    class Tiny:  # one step at a negligible learning rate: the SFT'd model is the checkpoint's, not random
        steps, batch_size, lr, warmup_steps, weight_decay, grad_clip, eps, train_problems, log_every, seed = (
            1, 2, 1e-12, 0, 0.0, 1.0, 1e-8, 4, 1, 0)
        optimizer = "adamw"

    model, meta = sft.prepare("t", cfg["student"], [task], sections, Tiny, root=tmp_path / "c", init_from=ckpt,
                              log=lambda _: None)
    assert meta["trained"] and meta["init_from"] == str(ckpt) and Path(meta["path"]).name == key
    start = _params(hf.load_pretrained(ckpt))
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(start, _params(model), strict=True))
    random = _params(sft.new_model(cfg["student"], 0))
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(random, _params(model), strict=True))
    _, meta2 = sft.prepare("t", cfg["student"], [task], sections, Tiny, root=tmp_path / "c", init_from=ckpt,
                            log=lambda _: None)
    assert not meta2["trained"] and meta2["path"] == meta["path"]


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


def _run(overrides: list[str], out: Path):
    import experiments.opd as exp

    cfg = _compose(overrides)
    lines: list[str] = []
    final = exp.run_experiment(cfg, validate(cfg), out, log=lines.append)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return final, rows, json.loads((out / "diagnostics.json").read_text()), lines


def test_real_tokenizer_opd_end_to_end_on_a_tiny_checkpoint(ckpt, tmp_path):
    final, rows, diag, lines = _run(_overrides(ckpt, tmp_path), tmp_path / "lsm")
    assert any(x.startswith("[sft teacher/arithmetic] saved") for x in lines), lines
    assert any(x.startswith("[hf student] loaded") for x in lines)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        for k in ("loss", "neg_reward_frac", "not_in_topk_frac", "time/sample_s", "time/score_s", "time/update_s"):
            assert np.isfinite(r[k]), k
    record = diag["records"][0]
    assert record["gap_by_bucket"] and "eos" in record["special_tokens"]
    assert np.isfinite(final["final/loss"])


@pytest.mark.slow
def test_variant_teacher_with_a_role_mapping_end_to_end(ckpt, tmp_path):
    """Failure mode 3 on a real tokenizer: the role-mapped variant teacher (its turns end with <|endoftext|>),
    sampled-token; its SFT is a separate cache entry, and the EOS log-prob it gives is reported."""
    _, rows, diag, lines = _run([*_overrides(ckpt, tmp_path), "loss=sampled_token",
                                 "tasks.arithmetic.teacher_tokenizer=variant",
                                 "tasks.arithmetic.token_mapping=role", "diagnostics_every=1"], tmp_path / "fm3")
    assert any(x.startswith("[sft teacher/arithmetic] saved") for x in lines), lines
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) and "not_in_topk_frac" not in r for r in steps)
    eos = diag["records"][0]["special_tokens"]["eos"]
    assert eos["id"] == 2 and len(eos["teacher_logprob"]) == len(eos["student_logprob"])


@pytest.mark.slow
@pytest.mark.hf
def test_smollm2_smoke_runs_on_the_real_model(tmp_path):
    """The preset as documented, on SmolLM2-135M-Instruct (minutes on 2 CPU cores)."""
    final, rows, diag, lines = _run(["experiment=smollm2_smoke", f"checkpoint_root={tmp_path / 'ckpt'}"],
                                    tmp_path / "run")
    assert any(x.startswith("[sft teacher/arithmetic] saved") for x in lines)
    assert diag["records"][0]["gap_by_bucket"] and "eos" in diag["records"][0]["special_tokens"]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4 and all(np.isfinite(r["loss"]) and np.isfinite(r["neg_reward_frac"]) for r in steps)
    assert 0.0 <= final["teacher/arithmetic/accuracy"] <= 1.0
