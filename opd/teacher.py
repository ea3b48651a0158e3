"""Frozen-teacher scoring: one forward pass over prompt + rollout -> top-K ids and log-probs per token.

The teacher is frozen on purpose (style.md E5): its parameters enter a jitted function under
`stop_gradient`, it is never handed to an optimizer, and only the [B, L, K] payload leaves the function —
never the [B, L, V] distribution. With `chunk_size` the LM head and the log-softmax over the vocabulary run
`chunk_size` sequence positions at a time through `opd.chunked.chunked_map` (the helper the update uses),
so even the on-device temporary is [B, chunk, V].

`mesh` places the batch with its batch axis over ("data", "fsdp") and the teacher's parameters by the
rules of opd/sharding.py, as the update does; None is a one-device mesh (the same code path). Placing the
teacher once beforehand (`sharding.shard_module(teacher, mesh)`) makes the per-call placement free.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from opd import chunked, sharding


class TeacherPayload(NamedTuple):
    topk_ids_BxLxK: jax.Array  # int32: the teacher's K most likely next tokens (target-aligned)
    topk_logprobs_BxLxK: jax.Array  # float32: full-vocabulary teacher log-probs at those ids (descending)
    sampled_logprobs_BxL: jax.Array  # float32: teacher log q(y_t | c_t) of the token at t; 0 where masked


def lm_head_over(model: Any, vocab_size: int) -> jax.Array:
    """The model's LM-head weight [D, vocab_size] over its first `vocab_size` ids. A teacher whose head is
    padded past the student's vocabulary (Qwen2.5-7B has 152,064 rows, Qwen2.5-0.5B 151,936, one tokenizer)
    is scored over the ids the student can emit: its log-softmax renormalizes over them."""
    w_DxV = model.lm_head_weight()
    return w_DxV if vocab_size == w_DxV.shape[-1] else w_DxV[:, :vocab_size]


def _score_impl(graphdef, params, tokens_BxL, attention_mask_BxL, k: int, chunk_size: int | None,
                vocab_size: int):
    params = jax.lax.stop_gradient(params)  # frozen: no gradient ever flows into the teacher
    teacher = nnx.merge(graphdef, params)
    h_BxTxD = teacher.hidden_states(tokens_BxL, attention_mask_BxT=attention_mask_BxL)[:, :-1]
    target_BxT = tokens_BxL[:, 1:]  # position t of h predicts token t + 1

    def score_chunk(logits_BxCxV, target_BxC):
        logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
        topk_lp_BxCxK, topk_ids_BxCxK = jax.lax.top_k(logp_BxCxV, k)
        sampled_BxC = jnp.take_along_axis(logp_BxCxV, target_BxC[..., None], axis=-1)[..., 0]
        return topk_ids_BxCxK.astype(jnp.int32), topk_lp_BxCxK, sampled_BxC

    ids_BxTxK, lp_BxTxK, sampled_BxT = chunked.chunked_map(
        score_chunk, h_BxTxD, lm_head_over(teacher, vocab_size), target_BxT, chunk_size=chunk_size)
    sampled_BxT = jnp.where(attention_mask_BxL[:, 1:].astype(jnp.bool_), sampled_BxT, 0.0)
    # Target alignment: position 0 has no context -> ids 0, log-probs 0.
    return TeacherPayload(
        topk_ids_BxLxK=jnp.pad(ids_BxTxK, ((0, 0), (1, 0), (0, 0))),
        topk_logprobs_BxLxK=jnp.pad(lp_BxTxK, ((0, 0), (1, 0), (0, 0))),
        sampled_logprobs_BxL=jnp.pad(sampled_BxT, ((0, 0), (1, 0))),
    )


# Computation follows the placed inputs (parameters by the sharding rules, batch over the batch axes).
_score_jit = jax.jit(_score_impl, static_argnames=("graphdef", "k", "chunk_size", "vocab_size"))


def score(teacher: Any, tokens_BxL: Any, attention_mask_BxL: Any, k: int, *,
          chunk_size: int | None = None, mesh: Mesh | None = None, vocab_size: int | None = None) -> TeacherPayload:
    """Teacher top-`k` ids and log-probs, and the log-prob of each token in `tokens_BxL`, target-aligned
    (`payload[b, t]` scores `tokens[b, t]` given `tokens[b, :t]`; position 0 is all zeros).

    `chunk_size` (optional, an addition to the contract): sequence positions per vocabulary chunk; None = all.
    `mesh`: where to run (see the module docstring); B must be divisible by its data·fsdp size.
    `vocab_size`: score over the teacher's first `vocab_size` ids, the student's vocabulary (`lm_head_over`);
    None = all of the teacher's.
    """
    own = teacher.cfg.vocab_size
    V = own if vocab_size is None else vocab_size
    if not isinstance(V, int) or isinstance(V, bool) or not 1 <= V <= own:
        raise ValueError(f"vocab_size: expected an integer in [1, the teacher's vocab_size={own}], got {V!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= V:
        raise ValueError(f"k: expected an integer in [1, vocab_size={V}], got {k!r}")
    chunked.check_chunk_size(chunk_size)
    if tokens_BxL.shape != attention_mask_BxL.shape or len(tokens_BxL.shape) != 2:
        raise ValueError(f"tokens_BxL / attention_mask_BxL: expected equal [B, L] shapes, got "
                         f"{tokens_BxL.shape} and {attention_mask_BxL.shape}")
    mesh = sharding.make_mesh(1, 1, 1) if mesh is None else mesh
    sharding.check_batch_divisible(tokens_BxL.shape[0], mesh, "tokens_BxL batch")
    graphdef, params = nnx.split(teacher)
    params = sharding.shard_state(params, mesh)
    tokens_BxL, attention_mask_BxL = sharding.shard_batch(
        (jnp.asarray(tokens_BxL, jnp.int32), jnp.asarray(attention_mask_BxL)), mesh)
    return _score_jit(graphdef, params, tokens_BxL, attention_mask_BxL, k, chunk_size, V)
