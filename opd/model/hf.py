"""Hugging Face checkpoints (Qwen2, Qwen3, Llama) <-> the NNX `Transformer`, safetensors only.

    model = load_pretrained("/ckpt/Qwen2.5-7B-Instruct", dtype="bfloat16")   # -> opd.model.Transformer
    save_pretrained(model, "/out/student", max_shard_size=5 * 2**30)
    tok = load_tokenizer("/ckpt/Qwen2.5-7B-Instruct")                       # tokenizers, from tokenizer.json

A checkpoint directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` with its shards. Pickle formats (`pytorch_model.bin`) are never read.

Everything is validated before a single weight is loaded: the directory, config.json (architecture,
required fields, unsupported options such as `rope_scaling`), and every tensor's presence, shape and dtype
from the safetensors headers. Any problem is one `ValueError` line naming it; nothing is half-built.

Mapping (docs/interfaces.md): submodule names are Hugging Face's, so an HF tensor name is the parameter
path with a "model." prefix (except `lm_head`) and `kernel`/`embedding` -> `weight`; Linear kernels are
stored [in, out] here and [out, in] in torch, so they are transposed both ways.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from opd.model.config import ModelConfig
from opd.model.transformer import Transformer
from opd.sharding import path_parts

# architecture -> family; the options each family fixes are checked in `config_from_hf`.
ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama"}
_FAMILY_TO_ARCH = {v: k for k, v in ARCHITECTURES.items()}
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_FLOAT_SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "F64")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "rms_norm_eps")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _fail(path: Any, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


# ---------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------


def _read_config_json(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise _fail(path, "not a checkpoint directory (no such directory)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise _fail(path, "not a Hugging Face checkpoint directory (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _fail(cfg_file, f"unreadable JSON ({err})") from None
    if not isinstance(raw, dict):
        raise _fail(cfg_file, "expected a JSON object")
    return raw


def _rope_theta(raw: Mapping[str, Any], where: Path) -> float:
    scaling = raw.get("rope_scaling")
    if scaling not in (None, {}) and (not isinstance(scaling, dict) or
                                      scaling.get("rope_type", scaling.get("type")) != "default"):
        raise _fail(where, f"unsupported option rope_scaling={scaling!r} (only plain RoPE is implemented)")
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise _fail(where, f"rope_parameters: expected an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise _fail(where, f"unsupported option rope_parameters.rope_type={rope_type!r} "
                               "(only plain RoPE is implemented)")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise _fail(where, f"unsupported rope_parameters keys {extra}")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if "rope_theta" in raw:
        return float(raw["rope_theta"])
    raise _fail(where, "missing required field 'rope_theta' (or rope_parameters.rope_theta)")


def config_from_hf(raw: Mapping[str, Any], *, dtype: str | None = None, where: Any = "config.json") -> ModelConfig:
    """A validated `ModelConfig` from a parsed config.json; unsupported options are a ValueError."""
    archs = raw.get("architectures")
    if archs is None:
        model_type = raw.get("model_type")
        if model_type is None:
            raise _fail(where, "missing required field 'architectures'")
        archs = [_FAMILY_TO_ARCH.get(model_type, f"<model_type {model_type!r}>")]
    if not isinstance(archs, list) or len(archs) != 1:
        raise _fail(where, f"architectures: expected one entry, got {archs!r}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise _fail(where, f"unsupported architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    for key in _REQUIRED:
        if raw.get(key) is None:
            raise _fail(where, f"missing required field {key!r}")

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(where, f"unsupported option hidden_act={act!r} (SwiGLU with silu only)")
    if float(raw.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise _fail(where, f"unsupported option attention_dropout={raw['attention_dropout']!r} (must be 0)")
    if raw.get("mlp_bias"):
        raise _fail(where, "unsupported option mlp_bias=true")
    if raw.get("use_sliding_window"):
        raise _fail(where, "unsupported option use_sliding_window=true (full attention only)")
    layer_types = raw.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise _fail(where, f"unsupported option layer_types={sorted(set(layer_types))} (full attention only)")
    if family == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases and none on o_proj
        qk_norm = False
    else:
        if raw.get("attention_bias"):
            # Llama and Qwen3 put the bias on o_proj as well; this model has q/k/v biases only.
            raise _fail(where, f"unsupported option attention_bias=true for {arch}")
        attention_bias = False
        qk_norm = family == "qwen3"

    if dtype is None:
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        dtype = dtype if dtype in DTYPE_NAMES else "float32"
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {list(DTYPE_NAMES)} or None, got {dtype!r}")

    num_heads = int(raw["num_attention_heads"])
    head_dim = raw.get("head_dim")
    if head_dim is not None and int(head_dim) == int(raw["hidden_size"]) // num_heads and (
        int(raw["hidden_size"]) % num_heads == 0
    ):
        head_dim = None
    try:
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            intermediate_size=int(raw["intermediate_size"]),
            head_dim=None if head_dim is None else int(head_dim),
            rope_theta=_rope_theta(raw, where),
            rms_norm_eps=float(raw["rms_norm_eps"]),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qk_norm=qk_norm,
            attention_bias=attention_bias,
            max_seq_len=int(raw.get("max_position_embeddings") or 4096),
            dtype=dtype,
            family=family,
        )
    except (TypeError, ValueError) as err:
        if str(err).startswith(str(where)):
            raise
        raise _fail(where, str(err)) from None


def load_config(path: str | os.PathLike, *, dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (reads config.json only)."""
    path = Path(path)
    return config_from_hf(_read_config_json(path), dtype=dtype, where=path / "config.json")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents for `cfg` (transformers-loadable)."""
    family = cfg.family
    if cfg.logit_scale != 1.0:
        raise ValueError(f"logit_scale={cfg.logit_scale:g} has no field in a {family} config.json (it needs 1)")
    if family == "qwen2" and (not cfg.attention_bias or cfg.qk_norm):
        raise ValueError("family qwen2 needs attention_bias=True and qk_norm=False to be a Qwen2 checkpoint")
    if family == "qwen3" and (cfg.attention_bias or not cfg.qk_norm):
        raise ValueError("family qwen3 needs attention_bias=False and qk_norm=True to be a Qwen3 checkpoint")
    if family == "llama" and (cfg.attention_bias or cfg.qk_norm):
        raise ValueError("family llama needs attention_bias=False and qk_norm=False to be a Llama checkpoint")
    out: dict[str, Any] = {
        "architectures": [_FAMILY_TO_ARCH[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len,
        "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": cfg.param_dtype or cfg.dtype,
        "use_cache": True,
    }
    if family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if family == "llama":
        out["mlp_bias"] = False
    if family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    return out


# ---------------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------------


def hf_name(parts: Sequence[str]) -> tuple[str, bool]:
    """HF tensor name of a parameter path, and whether the array is transposed between the two."""
    parts = list(parts)
    leaf = parts[-1]
    transpose = leaf == "kernel"
    if leaf in ("kernel", "embedding"):
        parts[-1] = "weight"
    prefix = [] if parts[0] == "lm_head" else ["model"]
    return ".".join(prefix + parts), transpose


def _abstract_model(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, state


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """HF tensor name -> (HF shape, transposed) for every parameter of the model built from `cfg`."""
    _, state = _abstract_model(cfg)
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name, transpose = hf_name(path_parts(kp))
        shape = tuple(leaf.shape)
        out[name] = (shape[::-1] if transpose else shape, transpose)
    return out


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    # Tied checkpoints sometimes store the (identical) lm_head; old ones store RoPE's inv_freq buffer.
    return (cfg.tie_embeddings and name == "lm_head.weight") or name.endswith("rotary_emb.inv_freq")


# ---------------------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------------------


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the index or the single file."""
    from safetensors import safe_open

    index = path / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise _fail(index, f"unreadable index ({type(err).__name__}: {err})") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise _fail(index, f"refers to missing shard {f.name}")
        return files
    single = path / _SINGLE
    if single.is_file():
        try:
            with safe_open(single, framework="numpy") as f:
                return {name: single for name in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise _fail(single, f"unreadable safetensors file ({type(err).__name__}: {err})") from None
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (pickle files {pickles} are never loaded)" if pickles else ""
    raise _fail(path, f"no {_SINGLE} or {_INDEX}{hint}")


def _headers(files: Mapping[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype string), reading headers only."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], str]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        try:
            with safe_open(f, framework="numpy") as h:
                present = set(h.keys())
                for name in names:
                    if name not in present:
                        raise _fail(f, f"index maps tensor {name!r} to this file, which lacks it")
                    s = h.get_slice(name)
                    out[name] = (tuple(int(d) for d in s.get_shape()), str(s.get_dtype()))
        except ValueError:
            raise
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise _fail(f, f"unreadable safetensors file ({type(err).__name__}: {err})") from None
    return out


def _validate_tensors(path: Path, cfg: ModelConfig, headers: Mapping[str, tuple[tuple[int, ...], str]]):
    expected = expected_tensors(cfg)
    missing = sorted(set(expected) - set(headers))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise _fail(path, f"missing tensor {', '.join(repr(m) for m in missing[:3])}{more}")
    unexpected = sorted(n for n in set(headers) - set(expected) if not _ignorable(n, cfg))
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise _fail(path, f"unexpected tensor {', '.join(repr(u) for u in unexpected[:3])}{more} "
                          "(not part of this architecture/config)")
    for name, (shape, _) in expected.items():
        got_shape, got_dtype = headers[name]
        if got_shape != shape:
            raise _fail(path, f"tensor {name!r} has shape {list(got_shape)}, expected {list(shape)} from config.json")
        if got_dtype not in _FLOAT_SAFETENSORS_DTYPES:
            allowed = list(_FLOAT_SAFETENSORS_DTYPES)
            raise _fail(path, f"tensor {name!r} has dtype {got_dtype}, expected one of {allowed}")
    return expected


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def check_pretrained(path: str | os.PathLike, *, dtype: str | None = None) -> ModelConfig:
    """Everything `load_pretrained` checks before reading a weight (directory, config.json, every tensor's
    presence, shape and dtype from the safetensors headers); returns the checkpoint's `ModelConfig`.
    Raises the same one-line ValueError; cheap (no tensor data is read)."""
    path = Path(path)
    cfg = load_config(path, dtype=dtype)
    _validate_tensors(path, cfg, _headers(_tensor_files(path)))
    return cfg


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    mesh: Any = None,
    rules: Sequence[Any] | None = None,
) -> Transformer:
    """Load a Hugging Face Qwen2 / Qwen3 / Llama checkpoint directory into a `Transformer`.

    Args:
        path: directory with config.json and model.safetensors (or model.safetensors.index.json + shards).
        dtype: "float32" | "bfloat16" | "float16" for parameters and activations; None -> config.json's
            torch_dtype (float32 when absent or unsupported).
        mesh: optional `jax.sharding.Mesh` (opd.sharding.make_mesh): each parameter is placed with its
            NamedSharding as it is read, so a large model never sits whole on one device.
        rules: partition rules for `mesh` (default opd.sharding.DEFAULT_RULES).
    Raises:
        ValueError (one line naming the problem) for anything that is not a loadable checkpoint; it is
        raised before any weight is read.
    """
    from safetensors import safe_open

    path = Path(path)
    cfg = load_config(path, dtype=dtype)
    files = _tensor_files(path)
    headers = _headers(files)
    expected = _validate_tensors(path, cfg, headers)

    arrays: dict[str, np.ndarray] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for f, names in by_file.items():
        with safe_open(f, framework="numpy") as h:
            for name in names:
                arrays[name] = h.get_tensor(name)
    return model_from_tensors(cfg, arrays, mesh=mesh, rules=rules)


def model_from_tensors(
    cfg: ModelConfig,
    arrays: dict[str, np.ndarray],
    *,
    mesh: Any = None,
    rules: Sequence[Any] | None = None,
) -> Transformer:
    """A `Transformer` for `cfg` from Hugging Face-named arrays in Hugging Face layout (Linear weights
    [out, in]); `mesh`/`rules` as in `load_pretrained`. `arrays` is consumed (emptied) so that each host copy
    can be freed once placed. Missing or misshapen tensors are a one-line ValueError before anything is placed."""
    expected = expected_tensors(cfg)
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise ValueError(f"arrays: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                                     if len(missing) > 1 else ""))
    for name, (shape, _) in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"arrays: tensor {name!r} has shape {list(arrays[name].shape)}, expected {list(shape)}")

    graphdef, abstract_state = _abstract_model(cfg)
    shardings = None
    if mesh is not None:
        from opd import sharding as sh

        shardings = sh.state_shardings(abstract_state, mesh, rules if rules is not None else sh.DEFAULT_RULES)

    np_dtype = _NP_DTYPES[cfg.param_dtype or cfg.dtype]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
    sh_leaves = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
    values = []
    for (kp, _), s in zip(leaves, sh_leaves):
        name, transpose = hf_name(path_parts(kp))
        x = arrays.pop(name)
        x = np.ascontiguousarray((x.T if transpose else x).astype(np_dtype))
        values.append(jax.device_put(x, s) if s is not None else jnp.asarray(x))
    state = jax.tree_util.tree_unflatten(treedef, values)
    return nnx.merge(graphdef, state)


def save_pretrained(model: Transformer, path: str | os.PathLike, *, max_shard_size: int | None = None) -> None:
    """Write `model` as a Hugging Face checkpoint directory (config.json + safetensors, never pickle).

    max_shard_size: bytes per file; None -> one model.safetensors, otherwise model-0000i-of-0000n.safetensors
    plus model.safetensors.index.json (as transformers writes them).
    """
    from safetensors.numpy import save_file

    cfg: ModelConfig = model.cfg
    hf_cfg = config_to_hf(cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        name, transpose = hf_name(path_parts(kp))
        arr = np.asarray(jax.device_get(x))
        tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)

    metadata = {"format": "pt"}
    for stale in [path / _SINGLE, path / _INDEX, *path.glob("model-*-of-*.safetensors")]:
        if stale.exists():
            stale.unlink()
    if max_shard_size is None:
        save_file(tensors, str(path / _SINGLE), metadata=metadata)
    else:
        if max_shard_size < 1:
            raise ValueError(f"max_shard_size: expected a positive number of bytes or None, got {max_shard_size!r}")
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].nbytes
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += nbytes
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(path / fname), metadata=metadata)
            weight_map.update({k: fname for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def _token_content(tok: Any) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


@dataclass
class HFTokenizer:
    """A `tokenizers.Tokenizer` from tokenizer.json with the special tokens of tokenizer_config.json.

    Mirrors the attributes of `opd.tasks.tokenizer.Tokenizer` where they exist: `bos_id`, `eos_id`,
    `pad_id` (the checkpoint's pad token, else EOS: HF vocabularies do not reserve id 0 for padding),
    `think_open_id` / `think_close_id` (None when "<think>"/"</think>" are not single tokens), `vocab_size`,
    `special_ids` (role -> id), `special_tokens` (every added special token: string -> id) and
    `chat_template_ids`: the special tokens that occur in the chat template (e.g. <|im_start|>, <|im_end|>),
    which with `think_*_id` and `eos_id` is what the special-token mask (`opd.losses.mask_first_occurrences`)
    wants: see `mask_ids`.
    """

    tokenizer: Any
    special_tokens: dict[str, int]
    special_ids: dict[str, int]
    chat_template: str | None
    chat_template_ids: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.special_ids.get("eos")

    @property
    def bos_id(self) -> int | None:
        return self.special_ids.get("bos")

    @property
    def pad_id(self) -> int | None:
        return self.special_ids.get("pad", self.special_ids.get("eos"))

    @property
    def think_open_id(self) -> int | None:
        return self.special_ids.get("think_open")

    @property
    def think_close_id(self) -> int | None:
        return self.special_ids.get("think_close")

    @property
    def mask_ids(self) -> list[int]:
        """Ids for the special-token mask: chat-template specials, EOS and the think markers, sorted."""
        ids = set(self.chat_template_ids.values())
        ids.update(i for i in (self.eos_id, self.think_open_id, self.think_close_id) if i is not None)
        return sorted(ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Decode up to (not including) the first EOS."""
        ids = [int(i) for i in ids]
        if self.eos_id is not None and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Any, *, add_generation_prompt: bool = True) -> str:
        """The conversation as text under this tokenizer's chat template (opd.model.chat.render_chat);
        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]."""
        from opd.model.chat import render_chat

        names = {f"{role}_token": self.tokenizer.id_to_token(i) for role, i in self.special_ids.items()
                 if role in ("bos", "eos", "pad", "unk")}
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=names)

    def encode_chat(self, messages: Any, *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `render_chat(messages)`; special tokens in the template map to their single ids."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a checkpoint directory: tokenizer.json via `tokenizers`, special tokens from
    tokenizer_config.json (added_tokens_decoder, bos/eos/pad_token, chat_template or chat_template.jinja)."""
    from tokenizers import Tokenizer

    path = Path(path)
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise _fail(path, "no tokenizer.json (only fast tokenizers are supported)")
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as err:
        raise _fail(tj, f"unreadable tokenizer ({type(err).__name__}: {err})") from None
    tc: dict[str, Any] = {}
    tcf = path / "tokenizer_config.json"
    if tcf.is_file():
        try:
            tc = json.loads(tcf.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise _fail(tcf, f"unreadable JSON ({err})") from None

    special_tokens: dict[str, int] = {}
    for id_str, info in (tc.get("added_tokens_decoder") or {}).items():
        if isinstance(info, dict) and info.get("special", False) and "content" in info:
            special_tokens[info["content"]] = int(id_str)
    for added in tok.get_added_tokens_decoder().items() if hasattr(tok, "get_added_tokens_decoder") else ():
        i, at = added
        if getattr(at, "special", False):
            special_tokens.setdefault(at.content, int(i))

    special_ids: dict[str, int] = {}
    for role in ("bos", "eos", "pad", "unk"):
        content = _token_content(tc.get(f"{role}_token"))
        if content is not None:
            i = tok.token_to_id(content)
            if i is None:
                raise _fail(tcf, f"{role}_token {content!r} is not in tokenizer.json's vocabulary")
            special_ids[role] = i
    for role, content in (("think_open", "<think>"), ("think_close", "</think>"),
                          ("im_start", "<|im_start|>"), ("im_end", "<|im_end|>")):
        i = tok.token_to_id(content)
        if i is not None:
            special_ids[role] = i

    template = tc.get("chat_template")
    jinja = path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = "\n".join(t.get("template", "") for t in template if isinstance(t, dict))
    chat_ids = {s: i for s, i in special_tokens.items() if template and s in template}
    return HFTokenizer(tok, dict(sorted(special_tokens.items(), key=lambda kv: kv[1])), special_ids,
                       template, chat_ids)


def require_same_vocabulary(student: str | os.PathLike, teacher: str | os.PathLike) -> None:
    """Refuse a student/teacher checkpoint pair whose vocabularies differ (no token mapping is declared
    for HF pairs): a teacher config vocab_size below the student's, or different tokenizer.json vocabularies
    when both exist. A teacher head padded past the student's is one vocabulary (Qwen2.5-7B has 152,064 rows,
    Qwen2.5-0.5B 151,936, one tokenizer); it is scored over the student's ids (opd.teacher.lm_head_over)."""
    s_cfg, t_cfg = load_config(student), load_config(teacher)
    if t_cfg.vocab_size < s_cfg.vocab_size:
        raise ValueError(f"teacher vocab_size {t_cfg.vocab_size} < student vocab_size {s_cfg.vocab_size} "
                         f"({teacher} vs {student}) and no token mapping is declared")
    if (Path(student) / "tokenizer.json").is_file() and (Path(teacher) / "tokenizer.json").is_file():
        sv = load_tokenizer(student).tokenizer.get_vocab(with_added_tokens=True)
        tv = load_tokenizer(teacher).tokenizer.get_vocab(with_added_tokens=True)
        if sv != tv:
            diff = sorted(set(sv.items()) ^ set(tv.items()), key=lambda kv: kv[1])[:3]
            raise ValueError(f"teacher and student tokenizers differ (e.g. {diff}) and no token mapping is declared")


def num_parameters(cfg: ModelConfig) -> int:
    """Parameter count of the model `cfg` describes (from shapes only)."""
    return sum(math.prod(s) for s, _ in expected_tensors(cfg).values())
