"""Preallocated key/value cache for decoding.

Layout: one buffer per k and v of shape [L, B, S, K, E] (layers, batch, slots, kv heads, head dim).
All sequences of a batch write the same slot at each call (`index`, a scalar): a left-padded prompt of
length P fills slots [0, P), then each decode step fills one slot. Which slots hold real tokens is
`valid_BxS` (padding and tokens fed after a sequence has stopped are invalid and never attended to);
`length_B` counts the real tokens of each sequence, which is the RoPE position of its next token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from opd.model.config import ModelConfig


class KVCache(NamedTuple):
    k_LxBxSxKxE: jax.Array
    v_LxBxSxKxE: jax.Array
    valid_BxS: jax.Array  # bool: slot holds a real token of that sequence
    index: jax.Array  # int32 scalar: next slot to write (shared by the batch)
    length_B: jax.Array  # int32: real tokens written so far per sequence (= next RoPE position)

    @classmethod
    def create(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of `max_len` slots; `dtype` defaults to the model's activation dtype."""
        if max_len < 1:
            raise ValueError(f"max_len: expected a positive integer, got {max_len!r}")
        dtype = dtype or cfg.activation_dtype
        shape = (cfg.num_layers, batch_size, max_len, cfg.num_kv_heads, cfg.resolved_head_dim)
        return cls(
            k_LxBxSxKxE=jnp.zeros(shape, dtype),
            v_LxBxSxKxE=jnp.zeros(shape, dtype),
            valid_BxS=jnp.zeros((batch_size, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
            length_B=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k_LxBxSxKxE.shape[2]
