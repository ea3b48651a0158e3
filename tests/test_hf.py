"""Hugging Face checkpoint parity: tiny random Qwen2 / Qwen3 / Llama models built with `transformers`
(PyTorch, CPU), saved as safetensors, loaded with `opd.model.hf.load_pretrained`, and compared on random
tokens: float32 logits within 1e-4 and identical greedy generations. Plus sharded loading, the
save -> load round trip (also back into transformers), the tokenizer, and one clear error per bad input.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from opd import sharding  # noqa: E402
from opd.model import ModelConfig, hf  # noqa: E402
from opd.sampling import SamplingConfig, sample  # noqa: E402

pytestmark = pytest.mark.hf


V = 101
# name -> (architecture, config kwargs). Every case is GQA or MHA with distinctive options:
CASES = {
    # Qwen2: q/k/v bias, GQA 4:2, untied, non-default rope theta (Qwen2.5 uses 1e6).
    "qwen2_gqa_untied": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6)),
    # Qwen2 with tied embeddings and plain multi-head attention.
    "qwen2_tied_mha": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    # Qwen3: qk-norm, head_dim 16 != hidden/heads = 8, GQA 4:1, tied.
    "qwen3_headdim_tied": (
        "Qwen3",
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, rope_theta=2e4),
    ),
    # Llama: GQA 4:2, untied, Llama-3 rope theta (no rope_scaling).
    "llama_gqa": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5)),
    # Llama with head_dim 12 != hidden/heads = 32/4 = 8.
    "llama_headdim": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12)),
}


def _hf_model(arch: str, seed: int = 0, **kw):
    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, intermediate_size=48, rms_norm_eps=1e-6,
                max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(kw)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**base)).eval()
    # HF's init (std 0.02, zero biases, unit norms) gives near-uniform logits; randomize everything at a
    # scale that makes logits O(1-10) and norms/biases non-trivial, so parity is a real check.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    model = _hf_model(arch, **kw)
    d = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(d)  # safetensors (the default)
    assert (d / "model.safetensors").is_file()
    return request.param, model, d


def _left_padded(seed=0, B=3, T=10):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, V, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    for b in range(B):
        mask[b, : 2 * b] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def _hf_logits(model, tokens, mask=None):
    with torch.no_grad():
        if mask is None:
            return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()


def test_logits_match_transformers(case):
    name, ref, d = case
    model = hf.load_pretrained(d)
    cfg = model.cfg
    arch = CASES[name][0].lower()
    assert cfg.family == arch and cfg.dtype == "float32"
    assert cfg.tie_embeddings == bool(ref.config.tie_word_embeddings)
    assert cfg.resolved_head_dim == getattr(ref.config, "head_dim", None) or cfg.hidden_size // cfg.num_heads
    tokens = np.random.default_rng(1).integers(0, V, (2, 12)).astype(np.int32)
    expected = _hf_logits(ref, tokens)
    got = np.asarray(model(jnp.asarray(tokens)))
    assert np.abs(expected).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_left_padded_logits_match_transformers(case):
    _, ref, d = case
    model = hf.load_pretrained(d)
    tokens, mask = _left_padded()
    expected = _hf_logits(ref, tokens, mask)
    got = np.asarray(model(jnp.asarray(tokens), attention_mask_BxT=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], rtol=0, atol=1e-4)


def test_greedy_generation_matches_transformers(case):
    _, ref, d = case
    model = hf.load_pretrained(d)
    prompt, mask = _left_padded(seed=3, B=3, T=7)
    n_new, eos = 8, 1
    out = sample(model, jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(0),
                 SamplingConfig(temperature=0.0, max_new_tokens=n_new), eos_id=eos)
    with torch.no_grad():
        hf_out = ref.generate(
            torch.tensor(prompt, dtype=torch.long), attention_mask=torch.tensor(mask), do_sample=False,
            max_new_tokens=n_new, min_new_tokens=0, eos_token_id=eos, pad_token_id=0,
        ).numpy()[:, prompt.shape[1]:]
    ours = np.asarray(out.tokens_BxL)[:, prompt.shape[1]:]
    resp = np.asarray(out.response_mask_BxL)[:, prompt.shape[1]:].astype(bool)
    assert resp.sum() > 0
    for b in range(prompt.shape[0]):
        n = int(resp[b].sum())
        np.testing.assert_array_equal(ours[b, :n], hf_out[b, :n], err_msg=f"row {b}")
        assert n == n_new or ours[b, n - 1] == eos


def test_sharded_index_loading(tmp_path):
    ref = _hf_model("Qwen2", num_attention_heads=4, num_key_value_heads=2)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    model = hf.load_pretrained(tmp_path)
    tokens = np.random.default_rng(2).integers(0, V, (2, 9)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), _hf_logits(ref, tokens), rtol=0, atol=1e-4)


def test_save_load_round_trip(case, tmp_path):
    name, ref, d = case
    max_shard_size = 16_000 if name in ("qwen3_headdim_tied", "llama_gqa") else None  # both layouts covered
    model = hf.load_pretrained(d)
    out = tmp_path / "saved"
    hf.save_pretrained(model, out, max_shard_size=max_shard_size)
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    if max_shard_size is not None:
        assert (out / "model.safetensors.index.json").is_file()
    again = hf.load_pretrained(out)
    assert again.cfg == model.cfg
    a = jax.tree.leaves(jax.tree.map(np.asarray, jax.tree_util.tree_leaves(hf.nnx.state(model))))
    b = jax.tree.leaves(jax.tree.map(np.asarray, jax.tree_util.tree_leaves(hf.nnx.state(again))))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # What we write loads back into transformers with the same logits.
    back = type(ref).from_pretrained(out).eval()
    tokens = np.random.default_rng(4).integers(0, V, (2, 8)).astype(np.int32)
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(ref, tokens), rtol=0, atol=1e-5)


def test_dtype_option_and_mesh_placement(tmp_path):
    ref = _hf_model("Qwen2", num_attention_heads=4, num_key_value_heads=2)
    d = tmp_path / "ckpt"
    ref.save_pretrained(d)
    bf = hf.load_pretrained(d, dtype="bfloat16")
    assert bf.cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(hf.nnx.state(bf))} == {jnp.dtype(jnp.bfloat16)}
    tokens = np.random.default_rng(5).integers(0, V, (2, 8)).astype(np.int32)
    assert np.all(np.isfinite(np.asarray(bf(jnp.asarray(tokens)))))
    placed = hf.load_pretrained(d, mesh=sharding.make_mesh())
    np.testing.assert_allclose(np.asarray(placed(jnp.asarray(tokens))), _hf_logits(ref, tokens), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one clear line, raised before anything is built
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
    ref = _hf_model("Qwen2", num_attention_heads=4, num_key_value_heads=2)
    d = tmp_path / "ckpt"
    ref.save_pretrained(d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(d, fn):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    fn(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _one_line_error(d, match, **kw):
    with pytest.raises(ValueError, match=match) as err:
        hf.load_pretrained(d, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_error_not_a_directory(tmp_path):
    _one_line_error(tmp_path / "nope", "not a checkpoint directory")


def test_error_no_config(tmp_path):
    _one_line_error(tmp_path, "no config.json")


def test_error_unknown_architecture(ckpt):
    _edit_config(ckpt, architectures=["GPT2LMHeadModel"])
    _one_line_error(ckpt, "unsupported architecture 'GPT2LMHeadModel'")


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "rms_norm_eps"])
def test_error_missing_config_field(ckpt, field):
    _edit_config(ckpt, **{field: None})
    _one_line_error(ckpt, f"missing required field '{field}'")


def test_error_missing_rope_theta(ckpt):
    _edit_config(ckpt, rope_parameters=None, rope_theta=None)
    _one_line_error(ckpt, "rope_theta")


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_error_unsupported_option(ckpt, changes, match):
    _edit_config(ckpt, **changes)
    _one_line_error(ckpt, match)


def test_export_refuses_a_logit_scale_config_json_cannot_hold():
    cfg = ModelConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, logit_scale=2.0)
    with pytest.raises(ValueError, match="logit_scale=2 has no field"):
        hf.config_to_hf(cfg)
    assert "logit_scale" not in hf.config_to_hf(cfg.replace(logit_scale=1.0))


def test_error_llama_attention_bias(tmp_path):
    ref = _hf_model("Llama", num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    ref.save_pretrained(tmp_path)
    _one_line_error(tmp_path, "attention_bias=true")


def test_error_missing_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    _one_line_error(ckpt, r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'")


def test_error_unexpected_tensor(ckpt):
    _rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)}))
    _one_line_error(ckpt, "unexpected tensor 'model.layers.0.mlp.extra.weight'")


def test_error_shape_mismatch(ckpt):
    _edit_config(ckpt, intermediate_size=40)
    _one_line_error(
        ckpt, r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[32, 48\], expected \[32, 40\]"
    )


def test_error_dtype_mismatch(ckpt):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    _rewrite_tensors(ckpt, to_int)
    _one_line_error(ckpt, "'model.norm.weight' has dtype I32")


def test_error_pickle_only(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    _one_line_error(ckpt, "pickle files .*pytorch_model.bin.* are never loaded")


def test_error_index_with_missing_shard(tmp_path):
    ref = _hf_model("Qwen2", num_attention_heads=4, num_key_value_heads=2)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    sorted(tmp_path.glob("model-*.safetensors"))[-1].unlink()
    _one_line_error(tmp_path, "missing shard")


def test_error_bad_dtype_option(ckpt):
    _one_line_error(ckpt, "dtype: expected one of", dtype="int8")


def test_error_vocabulary_mismatch(ckpt, tmp_path):
    """A teacher head padded past the student's (as Qwen2.5-7B's against Qwen2.5-0.5B's) is one vocabulary;
    a teacher with fewer rows than the student is not."""
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    _edit_config(other, vocab_size=V + 1)
    hf.require_same_vocabulary(ckpt, ckpt)
    hf.require_same_vocabulary(ckpt, other)  # student ckpt, teacher padded by one row
    with pytest.raises(ValueError, match="no token mapping is declared"):
        hf.require_same_vocabulary(other, ckpt)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_load_tokenizer_matches_transformers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["hello", "world", "the", "answer", "is", "<", "think", ">", "4", "2"]
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.add_tokens(["<think>", "</think>"])  # ordinary added tokens, as in Qwen3
    fast.chat_template = template
    fast.save_pretrained(tmp_path)

    ours = hf.load_tokenizer(tmp_path)
    text = "hello <think> the answer is 4 </think> world"
    assert ours.encode(text) == fast.encode(text, add_special_tokens=False)
    assert ours.eos_id == fast.convert_tokens_to_ids("<|im_end|>")
    assert ours.pad_id == fast.convert_tokens_to_ids("<|endoftext|>")
    assert ours.think_open_id == fast.convert_tokens_to_ids("<think>")
    assert ours.think_close_id == fast.convert_tokens_to_ids("</think>")
    assert ours.vocab_size == len(fast)
    assert set(ours.chat_template_ids) == {"<|im_start|>", "<|im_end|>"}  # <|endoftext|> is not in the template
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= set(ours.special_tokens)
    assert ours.mask_ids == sorted({ours.special_ids["im_start"], ours.eos_id, ours.think_open_id,
                                    ours.think_close_id})
    ids = ours.encode(text) + [ours.eos_id] + ours.encode("world")
    assert ours.decode(ids) == fast.decode(ours.encode(text))  # decode stops at EOS


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no tokenizer\.json"):
        hf.load_tokenizer(tmp_path)
