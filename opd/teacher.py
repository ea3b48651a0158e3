"""Frozen-teacher scoring: one forward pass over prompt + rollout -> top-K ids and log-probs per token.

The teacher is frozen on purpose (style.md E5): its parameters enter a jitted function under
`stop_gradient`, it is never handed to an optimizer, and only the [B, L, K] payload leaves the function —
never the [B, L, V] distribution. With `chunk_size` the log-softmax over the vocabulary is computed for
`chunk_size` positions at a time (lax.map), so even the on-device temporary is [B, chunk, V].
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class TeacherPayload(NamedTuple):
    topk_ids_BxLxK: jax.Array  # int32: the teacher's K most likely next tokens (target-aligned)
    topk_logprobs_BxLxK: jax.Array  # float32: full-vocabulary teacher log-probs at those ids (descending)
    sampled_logprobs_BxL: jax.Array  # float32: teacher log q(y_t | c_t) of the token at t; 0 where masked


def _score_impl(graphdef, params, tokens_BxL, attention_mask_BxL, k: int, chunk_size: int | None):
    params = jax.lax.stop_gradient(params)  # frozen: no gradient ever flows into the teacher
    teacher = nnx.merge(graphdef, params)
    B, L = tokens_BxL.shape
    h_BxTxD = teacher.hidden_states(tokens_BxL, attention_mask_BxT=attention_mask_BxL)[:, :-1]
    target_BxT = tokens_BxL[:, 1:]  # position t of h predicts token t + 1
    T = L - 1

    def score_chunk(h_BxCxD, target_BxC):
        logp_BxCxV = jax.nn.log_softmax(teacher.logits(h_BxCxD), axis=-1)
        topk_lp_BxCxK, topk_ids_BxCxK = jax.lax.top_k(logp_BxCxV, k)
        sampled_BxC = jnp.take_along_axis(logp_BxCxV, target_BxC[..., None], axis=-1)[..., 0]
        return topk_ids_BxCxK.astype(jnp.int32), topk_lp_BxCxK, sampled_BxC

    if chunk_size is None or chunk_size >= T:
        ids_BxTxK, lp_BxTxK, sampled_BxT = score_chunk(h_BxTxD, target_BxT)
    else:
        n = -(-T // chunk_size)
        pad = n * chunk_size - T
        h_NxBxCxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk_size, -1).swapaxes(0, 1)
        tgt_NxBxC = jnp.pad(target_BxT, ((0, 0), (0, pad))).reshape(B, n, chunk_size).swapaxes(0, 1)
        ids, lp, sampled = jax.lax.map(lambda a: score_chunk(*a), (h_NxBxCxD, tgt_NxBxC))
        ids_BxTxK = ids.swapaxes(0, 1).reshape(B, n * chunk_size, k)[:, :T]
        lp_BxTxK = lp.swapaxes(0, 1).reshape(B, n * chunk_size, k)[:, :T]
        sampled_BxT = sampled.swapaxes(0, 1).reshape(B, n * chunk_size)[:, :T]

    sampled_BxT = jnp.where(attention_mask_BxL[:, 1:].astype(jnp.bool_), sampled_BxT, 0.0)
    # Target alignment: position 0 has no context -> ids 0, log-probs 0.
    return TeacherPayload(
        topk_ids_BxLxK=jnp.pad(ids_BxTxK, ((0, 0), (1, 0), (0, 0))),
        topk_logprobs_BxLxK=jnp.pad(lp_BxTxK, ((0, 0), (1, 0), (0, 0))),
        sampled_logprobs_BxL=jnp.pad(sampled_BxT, ((0, 0), (1, 0))),
    )


_score_jit = jax.jit(_score_impl, static_argnames=("graphdef", "k", "chunk_size"))


def score(teacher: Any, tokens_BxL: Any, attention_mask_BxL: Any, k: int, *,
          chunk_size: int | None = None) -> TeacherPayload:
    """Teacher top-`k` ids and log-probs, and the log-prob of each token in `tokens_BxL`, target-aligned
    (`payload[b, t]` scores `tokens[b, t]` given `tokens[b, :t]`; position 0 is all zeros).

    `chunk_size` (optional, an addition to the contract): positions per vocabulary chunk; None = all.
    """
    V = teacher.cfg.vocab_size
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= V:
        raise ValueError(f"k: expected an integer in [1, vocab_size={V}], got {k!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected null or a positive integer, got {chunk_size!r}")
    if tokens_BxL.shape != attention_mask_BxL.shape or len(tokens_BxL.shape) != 2:
        raise ValueError(f"tokens_BxL / attention_mask_BxL: expected equal [B, L] shapes, got "
                         f"{tokens_BxL.shape} and {attention_mask_BxL.shape}")
    graphdef, params = nnx.split(teacher)
    return _score_jit(graphdef, params, jnp.asarray(tokens_BxL, jnp.int32), jnp.asarray(attention_mask_BxL),
                      k, chunk_size)
