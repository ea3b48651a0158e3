"""Preallocated key/value cache for decoding.

Layout: per layer, one k and one v buffer of shape [B, K, S, E] (batch, kv heads, slots, head dim), or
[B, S, E] with one kv head (`kv_lead`): heads before slots, the layout attention multiplies in, so a decode
step reads its layer's buffers as they are (no slice of a stacked buffer, no transpose of the whole cache).
A single kv head gets no axis of its own: a [B, 1, S, E] buffer reaches attention through a reshape that drops
the unit axis, and XLA's CPU compiler then writes the step's slot twice and copies every buffer three to four
times per decode step (tests/test_sampling.py reads the compiled loop; timings in results/notes/45_speed.md).
With several kv heads the axis stays, so a mesh that splits heads over `tensor` keeps them split (folding it
into the batch axis instead made GSPMD gather the keys and values).

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


def kv_lead(batch: int, kv_heads: int) -> tuple[int, ...]:
    """The leading axes of a layer's key/value buffers and of attention's matmuls: (B, K), or (B,) for one kv
    head (see the module docstring)."""
    return (batch,) if kv_heads == 1 else (batch, kv_heads)


class KVCache(NamedTuple):
    k_by_layer: tuple[jax.Array, ...]  # one [*kv_lead(B, K), S, E] buffer per layer
    v_by_layer: tuple[jax.Array, ...]
    valid_BxS: jax.Array  # bool: slot holds a real token of that sequence
    index: jax.Array  # int32 scalar: next slot to write (shared by the batch)
    length_B: jax.Array  # int32: real tokens written so far per sequence (= next RoPE position)

    @classmethod
    def create(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of `max_len` slots; `dtype` defaults to the model's activation dtype."""
        if max_len < 1:
            raise ValueError(f"max_len: expected a positive integer, got {max_len!r}")
        dtype = dtype or cfg.activation_dtype
        shape = (*kv_lead(batch_size, cfg.num_kv_heads), max_len, cfg.resolved_head_dim)
        return cls(
            k_by_layer=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            v_by_layer=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            valid_BxS=jnp.zeros((batch_size, max_len), jnp.bool_),
            index=jnp.zeros((), jnp.int32),
            length_B=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k_by_layer[0].shape[-2]

    def grow(self, max_len: int) -> KVCache:
        """The same cache with `max_len` slots; the added slots are empty (invalid, so never attended to)."""
        extra = max_len - self.max_len
        if extra < 0:
            raise ValueError(f"max_len: expected at least the cache's {self.max_len} slots, got {max_len}")
        if extra == 0:
            return self
        pad_slots = ((0, 0),) * (self.k_by_layer[0].ndim - 2) + ((0, extra), (0, 0))
        return self._replace(
            k_by_layer=tuple(jnp.pad(k, pad_slots) for k in self.k_by_layer),
            v_by_layer=tuple(jnp.pad(v, pad_slots) for v in self.v_by_layer),
            valid_BxS=jnp.pad(self.valid_BxS, ((0, 0), (0, extra))),
        )
