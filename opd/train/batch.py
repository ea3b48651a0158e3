"""The one batch builder: a finished rollout (any task, any number of turns) and the teacher's scores ->
the `Batch` the update reads, with the response, loss and position arrays every objective shares.

The loss mask is the response mask (student tokens only: prompt, padding and environment turns are 0) minus,
when asked, the first occurrence per sequence of each special id (the paper's special-token mask).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from opd import losses as L


class Batch(NamedTuple):
    """Everything the update needs from one sample + score round, all device arrays, target-aligned."""

    tokens_BxL: jax.Array
    attention_mask_BxL: jax.Array
    positions_BxL: jax.Array
    response_mask_BxL: jax.Array  # every generated token (diagnostics)
    loss_mask_BxL: jax.Array  # response mask, minus masked special tokens (objective)
    old_logprobs_BxL: jax.Array  # π_old(y_t) recorded by the sampler (unmodified softmax)
    teacher_sampled_BxL: jax.Array  # log q(y_t)
    topk_ids_BxLxK: jax.Array
    topk_logprobs_BxLxK: jax.Array


def positions_from_mask(attention_mask_BxL: jax.Array) -> jax.Array:
    """RoPE positions: cumsum(mask) − 1 clipped at 0, so left padding never shifts them."""
    return jnp.maximum(jnp.cumsum(attention_mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def build_batch(rollout, payload, *, special_ids=(), mask_special_tokens: bool = False) -> Batch:
    """Masks and positions from a Rollout and a TeacherPayload (docs/interfaces.md)."""
    response_mask = rollout.response_mask_BxL.astype(jnp.float32)
    loss_mask = response_mask
    if mask_special_tokens and len(special_ids):
        # First occurrence *in the response*: prompt and padding positions become -1 (never an id).
        response_tokens = jnp.where(response_mask > 0, rollout.tokens_BxL, -1)
        loss_mask = L.mask_first_occurrences(response_tokens, list(special_ids), response_mask)
    return Batch(
        tokens_BxL=rollout.tokens_BxL,
        attention_mask_BxL=rollout.attention_mask_BxL,
        positions_BxL=positions_from_mask(rollout.attention_mask_BxL),
        response_mask_BxL=response_mask,
        loss_mask_BxL=loss_mask,
        old_logprobs_BxL=rollout.logprobs_BxL.astype(jnp.float32),
        teacher_sampled_BxL=payload.sampled_logprobs_BxL.astype(jnp.float32),
        topk_ids_BxLxK=payload.topk_ids_BxLxK,
        topk_logprobs_BxLxK=payload.topk_logprobs_BxLxK.astype(jnp.float32),
    )
