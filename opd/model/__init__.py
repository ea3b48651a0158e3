"""Flax NNX decoder (Llama / Qwen2 / Qwen3 family), its config and KV cache (docs/interfaces.md)."""

from opd.model.cache import KVCache
from opd.model.config import ModelConfig
from opd.model.transformer import (
    Transformer,
    default_positions,
    forward_logprobs,
    token_logprobs,
)

__all__ = ["KVCache", "ModelConfig", "Transformer", "default_positions", "forward_logprobs", "token_logprobs"]
