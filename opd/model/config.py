"""Model configuration: one frozen dataclass describing a Qwen2 / Qwen3 / Llama-family decoder.

Shape letters used across `opd.model` (style.md E1):
  B batch, T query length, S key length (cache slots), L layers, D hidden size, H query heads,
  K key/value heads, G = H // K query heads per kv head, E head dim, F intermediate size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FAMILIES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of the decoder (the fields are the contract of docs/interfaces.md)."""

    vocab_size: int  # V
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H, query heads
    num_kv_heads: int  # K, key/value heads (grouped-query attention); must divide num_heads
    intermediate_size: int  # F, SwiGLU width
    head_dim: int | None = None  # E; None -> hidden_size // num_heads (Qwen3 uses E != D / H)
    rope_theta: float = 10000.0  # rotary base (Qwen2.5: 1e6)
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False  # lm_head shares the embedding matrix (no `lm_head` submodule)
    qk_norm: bool = False  # Qwen3: RMSNorm over the head dim on q and k, before RoPE
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections (never on o_proj)
    max_seq_len: int = 512  # longest prompt + response the model is used with
    dtype: str = "float32"  # activation dtype name
    family: str = "llama"  # "llama" | "qwen2" | "qwen3" (informational; options above decide the math)
    # Additions beyond the contract (defaults keep the contract's meaning):
    param_dtype: str | None = None  # parameter dtype name; None -> same as `dtype`
    initializer_range: float = 0.02  # std of the normal init of every matrix (as Hugging Face)
    # Multiplies the LM head's logits (Cohere's `logit_scale`); 1 leaves them. Measured as an R7 lever in
    # results/notes/30_regime.md.
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        def bad(key: str, expected: str, got: Any) -> ValueError:
            return ValueError(f"model.{key}: expected {expected}, got {got!r}")

        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "intermediate_size", "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(key, "a positive integer", value)
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise bad("head_dim", f"an explicit value (hidden_size={self.hidden_size} is not divisible "
                      f"by num_heads={self.num_heads})", self.head_dim)
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 2
                                          or self.head_dim % 2):
            raise bad("head_dim", "null or a positive even integer (RoPE rotates pairs)", self.head_dim)
        if self.rope_theta <= 0:
            raise bad("rope_theta", "a positive number", self.rope_theta)
        if self.rms_norm_eps <= 0:
            raise bad("rms_norm_eps", "a positive number", self.rms_norm_eps)
        if self.dtype not in _DTYPES:
            raise bad("dtype", f"one of {sorted(_DTYPES)}", self.dtype)
        if self.param_dtype is not None and self.param_dtype not in _DTYPES:
            raise bad("param_dtype", f"null or one of {sorted(_DTYPES)}", self.param_dtype)
        if self.family not in _FAMILIES:
            raise bad("family", f"one of {list(_FAMILIES)}", self.family)
        if self.initializer_range <= 0:
            raise bad("initializer_range", "a positive number", self.initializer_range)
        if not isinstance(self.logit_scale, int | float) or isinstance(self.logit_scale, bool) \
                or not self.logit_scale > 0:
            raise bad("logit_scale", "a positive number", self.logit_scale)

    # --- derived values -------------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        """E: `head_dim`, or hidden_size // num_heads when it is None."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def activation_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        return _DTYPES[self.param_dtype or self.dtype]

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """Build from a mapping (e.g. a Hydra/OmegaConf node); unknown keys are a clear error."""
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"model: unknown keys {unknown}; allowed: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The fields, less `logit_scale` at its neutral 1: SFT cache keys hash this dict, and a model trained
        before the field existed must keep its key."""
        d = dataclasses.asdict(self)
        if d["logit_scale"] == 1.0:
            del d["logit_scale"]
        return d
