"""The one batch builder: a finished rollout (any task, any number of turns) and the teacher's scores ->
the `Batch` the update reads, with the response, loss and position arrays every objective shares.

The loss mask is the response mask (student tokens only: prompt, padding and environment turns are 0) minus,
when asked, the first occurrence per sequence of each special id (the paper's special-token mask).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def _rollout_arrays(rollouts) -> tuple:
    """(tokens, attention_mask, response_mask, logprobs) of a task's `Rollouts` or of the sampler's `Rollout`."""
    if hasattr(rollouts, "tokens_BxL"):
        return rollouts.tokens_BxL, rollouts.attention_mask_BxL, rollouts.response_mask_BxL, rollouts.logprobs_BxL
    return rollouts.tokens, rollouts.attention_mask, rollouts.response_mask, rollouts.logprobs


def trim_padding(rollouts, multiple: int):
    """`rollouts` without the trailing columns that are padding in every row, the width rounded up to a
    multiple of `multiple` (0: unchanged) and never beyond the original.

    A task pads every rollout to its whole budget, but a batch's longest response is often far shorter (the
    regime: ~200 of a 626-token budget); scoring and the update cost what the width costs. The dropped
    columns hold no token any row attends to or is scored on (their attention, response and loss masks are
    0, and a causal model never lets them change an earlier position), so every objective's value is the
    same up to float addition order. Rounding bounds the number of distinct widths, each one more compiled
    program."""
    if not multiple:
        return rollouts
    width = np.shape(rollouts.attention_mask)[1]
    used = np.flatnonzero(np.asarray(rollouts.attention_mask).any(axis=0))
    last = int(used[-1]) + 1 if used.size else 1
    keep = min(width, -(-last // multiple) * multiple)
    if keep == width:
        return rollouts
    return dataclasses.replace(rollouts, **{name: np.asarray(getattr(rollouts, name))[:, :keep] for name in
                                            ("tokens", "attention_mask", "response_mask", "logprobs")})


def build_batch(rollouts, payload, *, special_ids=(), mask_special_tokens: bool = False) -> Batch:
    """The update's Batch from finished rollouts (`opd.tasks.Rollouts`, or a single-turn `opd.sampling.Rollout`)
    and the teacher's `TeacherPayload` (docs/interfaces.md)."""
    tokens, attention_mask, response, logprobs = (jnp.asarray(x) for x in _rollout_arrays(rollouts))
    response_mask = response.astype(jnp.float32)
    loss_mask = response_mask
    if mask_special_tokens and len(special_ids):
        # First occurrence *in the response*: prompt, environment and padding positions become -1 (never an id).
        response_tokens = jnp.where(response_mask > 0, tokens, -1)
        loss_mask = L.mask_first_occurrences(response_tokens, list(special_ids), response_mask)
    return Batch(
        tokens_BxL=tokens.astype(jnp.int32),
        attention_mask_BxL=attention_mask,
        positions_BxL=positions_from_mask(attention_mask),
        response_mask_BxL=response_mask,
        loss_mask_BxL=loss_mask,
        old_logprobs_BxL=logprobs.astype(jnp.float32) * response_mask,
        teacher_sampled_BxL=jnp.asarray(payload.sampled_logprobs_BxL, jnp.float32),
        topk_ids_BxLxK=jnp.asarray(payload.topk_ids_BxLxK, jnp.int32),
        topk_logprobs_BxLxK=jnp.asarray(payload.topk_logprobs_BxLxK, jnp.float32),
    )
