"""Large-vocabulary objectives computed in chunks over positions.

With a 151,936-token vocabulary, the student's logits for one batch of 8,192 positions are 5 GB in
float32, and the backward pass of a naive objective keeps at least two such arrays alive. Here the
LM-head projection and the per-position objective run chunk by chunk (`lax.map`), each chunk under
`jax.checkpoint`, so the forward pass keeps only the per-position values and the backward pass recomputes
one chunk's [C, V] logits at a time. Peak temporary memory is O(C·V) instead of O(N·V)
(`benchmarks/bench_chunked_memory.py` measures it).

The per-chunk objective is the function from `opd.losses`, called on the chunk's logits: there is one
implementation of each objective, and chunking changes only where it runs. Inputs may have any leading
axes ([B, T, D] or [N, D]); outputs keep them. When the number of positions is not a multiple of the
chunk size, the last chunk is padded by repeating the last real position (so padded rows are as finite as
real ones) and the padded values are dropped; their gradient contribution is exactly zero.

`chunk_size=None` runs the same objective without chunking (one [N, V] block), the reference the tests
and the benchmark compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from opd import losses

DEFAULT_CHUNK_SIZE = 1024

# Objectives over the teacher's top-K support: f(student_logits_xV, topk_ids_xK, teacher_topk_logprobs_xK).
TOPK_OBJECTIVES: dict[str, Callable[..., Array]] = {
    "topk_reverse_kl": losses.topk_reverse_kl,
    "topk_forward_kl": losses.topk_forward_kl,
    "topk_reverse_kl_with_tail": losses.topk_reverse_kl_with_tail,
}
# Full-vocabulary objectives: f(student_logits_xV, teacher_logits_xV).
FULL_OBJECTIVES: dict[str, Callable[..., Array]] = {
    "full_reverse_kl": losses.full_reverse_kl,
    "generalized_jsd": losses.generalized_jsd,
}


def lm_head_logits(h_xD: Float[ArrayLike, "*N D"], w_DxV: Float[ArrayLike, "D V"]) -> Float[Array, "*N V"]:
    """LM-head projection with float32 accumulation and a float32 result whatever the input dtype."""
    h_xD, w_DxV = jnp.asarray(h_xD), jnp.asarray(w_DxV)
    logits = jnp.einsum("...d,dv->...v", h_xD, w_DxV, preferred_element_type=jnp.float32)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _check_head(name_h: str, h: Array, name_w: str, w: Array) -> None:
    if h.ndim < 1:
        raise ValueError(f"{name_h} must have a hidden axis [..., D], got a scalar")
    if w.ndim != 2:
        raise ValueError(f"{name_w} must be [D, V], got shape {w.shape}")
    if h.shape[-1] != w.shape[0]:
        raise ValueError(f"{name_h} hidden size {h.shape[-1]} must equal {name_w} rows {w.shape[0]}")


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _objective(table: dict[str, Callable[..., Array]], objective: str) -> Callable[..., Array]:
    if objective not in table:
        raise ValueError(f"objective must be one of {tuple(table)}, got {objective!r}")
    return table[objective]


def chunked_map(
    fn: Callable[..., Any],
    h_xD: Float[ArrayLike, "*N D"],
    w_DxV: Float[ArrayLike, "D V"],
    *payload: ArrayLike,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    extra_heads: tuple[tuple[ArrayLike, ArrayLike], ...] = (),
) -> Any:
    """Apply `fn(logits_CxV, *extra_logits_CxV, *payload_chunk)` over chunks of positions.

    Args:
        fn: per-chunk function returning a pytree of per-position arrays (leading axis C).
        h_xD: final hidden states [..., D] (the model's `hidden_states` output).
        w_DxV: LM-head weight [D, V] (the model's `lm_head_weight()`).
        payload: per-position arrays with the same leading axes as `h_xD` (e.g. top-K ids [..., K]).
        extra_heads: further (hidden [..., D'], weight [D', V']) pairs whose logits are computed per chunk
            too and passed after the first (a teacher's, for full-vocabulary objectives).
        chunk_size: positions per chunk; None computes everything at once (the unchunked reference).
    Returns:
        `fn`'s pytree with the leading axes of `h_xD` restored.
    """
    _check_chunk_size(chunk_size)
    h_xD, w_DxV = jnp.asarray(h_xD), jnp.asarray(w_DxV)
    _check_head("h_xD", h_xD, "w_DxV", w_DxV)
    lead = h_xD.shape[:-1]
    heads = [(h_xD, w_DxV)] + [(jnp.asarray(h), jnp.asarray(w)) for h, w in extra_heads]
    for i, (h, w) in enumerate(heads[1:]):
        _check_head(f"extra_heads[{i}] hidden", h, f"extra_heads[{i}] weight", w)
        if h.shape[:-1] != lead:
            raise ValueError(f"extra_heads[{i}] hidden leading axes {h.shape[:-1]} must equal {lead}")
    payload = tuple(jnp.asarray(p) for p in payload)
    for i, p in enumerate(payload):
        if p.shape[: len(lead)] != lead:
            raise ValueError(f"payload[{i}] leading axes {p.shape[: len(lead)]} must equal {lead}")

    n = 1
    for d in lead:
        n *= d
    flat_hs = [h.reshape(n, h.shape[-1]) for h, _ in heads]
    weights = [w for _, w in heads]
    flat_payload = [p.reshape((n, *p.shape[len(lead) :])) for p in payload]

    def per_chunk(hs: list[Array], ws: list[Array], pl: list[Array]) -> Any:
        logits = [lm_head_logits(h, w) for h, w in zip(hs, ws)]
        return fn(*logits, *pl)

    if chunk_size is None or n <= chunk_size:
        # Unchunked reference, or a single chunk (checkpointed: the backward pass recomputes its logits).
        f = per_chunk if chunk_size is None else jax.checkpoint(per_chunk)
        out = f(flat_hs, weights, flat_payload)
        return jax.tree.map(lambda x: x.reshape(lead + x.shape[1:]), out)

    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n

    def to_chunks(x: Array) -> Array:
        if pad:  # repeat the last real position: padded rows are exactly as finite as real ones
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
        return x.reshape((num_chunks, chunk_size, *x.shape[1:]))

    body = jax.checkpoint(lambda xs: per_chunk(xs[0], weights, xs[1]))
    out = jax.lax.map(body, ([to_chunks(h) for h in flat_hs], [to_chunks(p) for p in flat_payload]))
    return jax.tree.map(
        lambda x: x.reshape((num_chunks * chunk_size, *x.shape[2:]))[:n].reshape(lead + x.shape[2:]), out
    )


def chunked_topk_objective(
    h_xD: Float[ArrayLike, "*N D"],
    w_DxV: Float[ArrayLike, "D V"],
    topk_ids_xK: Int[ArrayLike, "*N K"],
    teacher_topk_logprobs_xK: Float[ArrayLike, "*N K"],
    *,
    objective: str = "topk_reverse_kl",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    **objective_kwargs: Any,
) -> Float[Array, "*N"]:
    """Per-position top-K objective (`opd.losses.<objective>`) of the logits h @ W, in chunks.

    `objective` is one of TOPK_OBJECTIVES; `objective_kwargs` go to it (e.g. renormalize=False).
    Equal to `losses.<objective>(h @ W, topk_ids, teacher_topk_logprobs)` up to float rounding.
    """
    f = _objective(TOPK_OBJECTIVES, objective)
    topk_ids_xK = jnp.asarray(topk_ids_xK)
    losses._require_ids_in_range("topk_ids", topk_ids_xK, jnp.shape(w_DxV)[-1])  # eager check if concrete
    return chunked_map(
        lambda logits, ids, lq: f(logits, ids, lq, **objective_kwargs),
        h_xD,
        w_DxV,
        topk_ids_xK,
        teacher_topk_logprobs_xK,
        chunk_size=chunk_size,
    )


def chunked_full_objective(
    h_xD: Float[ArrayLike, "*N D"],
    w_DxV: Float[ArrayLike, "D V"],
    teacher_h_xD: Float[ArrayLike, "*N Dt"],
    teacher_w_DxV: Float[ArrayLike, "Dt V"],
    *,
    objective: str = "full_reverse_kl",
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    **objective_kwargs: Any,
) -> Float[Array, "*N"]:
    """Per-position full-vocabulary objective with both student and teacher logits built per chunk.

    The teacher side is wrapped in `stop_gradient` (the teacher never trains). `objective` is one of
    FULL_OBJECTIVES (`objective_kwargs`, e.g. beta=0.3, go to it).
    """
    f = _objective(FULL_OBJECTIVES, objective)
    if jnp.shape(teacher_w_DxV)[-1] != jnp.shape(w_DxV)[-1]:
        raise ValueError(
            f"teacher vocabulary {jnp.shape(teacher_w_DxV)[-1]} must equal student vocabulary "
            f"{jnp.shape(w_DxV)[-1]}"
        )
    th, tw = jax.lax.stop_gradient(jnp.asarray(teacher_h_xD)), jax.lax.stop_gradient(jnp.asarray(teacher_w_DxV))
    return chunked_map(
        lambda s, t: f(s, t, **objective_kwargs), h_xD, w_DxV, chunk_size=chunk_size, extra_heads=((th, tw),)
    )


def token_logprobs_and_entropy(
    logits_xV: Float[ArrayLike, "*N V"], tokens_x: Int[ArrayLike, "*N"]
) -> tuple[Float[Array, "*N"], Float[Array, "*N"]]:
    """log p(token) and the entropy −Σ p log p of softmax(logits), per position, in float32."""
    logp_xV = jax.nn.log_softmax(losses._f32(logits_xV), axis=-1)
    lp = jnp.take_along_axis(logp_xV, jnp.asarray(tokens_x)[..., None], axis=-1)[..., 0]
    p = jnp.exp(logp_xV)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp_xV, 0.0), 0.0), axis=-1)
    return lp, ent


def chunked_token_logprobs(
    h_xD: Float[ArrayLike, "*N D"],
    w_DxV: Float[ArrayLike, "D V"],
    tokens_x: Int[ArrayLike, "*N"],
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Float[Array, "*N"], Float[Array, "*N"]]:
    """Per-position log p(tokens) and entropy of softmax(h @ W), in chunks (differentiable).

    Feeds the sampled-token objectives (`losses.sampled_token_log_ratio`, `losses.ppo_clip_loss`),
    which act on [N] log-probs and need no chunking themselves. The caller aligns positions: to score
    token t, pass the hidden state at t − 1.
    """
    tokens_x = jnp.asarray(tokens_x)
    if tokens_x.shape != jnp.shape(h_xD)[:-1]:
        raise ValueError(f"tokens_x shape {tokens_x.shape} must equal h_xD leading axes {jnp.shape(h_xD)[:-1]}")
    losses._require_ids_in_range("tokens_x", tokens_x, jnp.shape(w_DxV)[-1])
    return chunked_map(token_logprobs_and_entropy, h_xD, w_DxV, tokens_x, chunk_size=chunk_size)


def chunked_model_logprobs(
    model: Any,
    tokens_BxL: Int[ArrayLike, "B L"],
    attention_mask_BxL: Int[ArrayLike, "B L"],
    *,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> tuple[Float[Array, "B L"], Float[Array, "B L"]]:
    """Target-aligned log p(tokens[t] | tokens[:t]) and the entropy of that next-token distribution, [B, L]
    each, from one pass of `model.hidden_states` and the LM head in chunks (docs/interfaces.md alignment:
    position 0 and masked targets hold 0). Same values as `opd.model.forward_logprobs` without the
    [B, L, V] logits."""
    tokens_BxL, attention_mask_BxL = jnp.asarray(tokens_BxL), jnp.asarray(attention_mask_BxL)
    h_BxLxD = model.hidden_states(tokens_BxL, attention_mask_BxT=attention_mask_BxL)
    lp, ent = chunked_token_logprobs(h_BxLxD[:, :-1], model.lm_head_weight(), tokens_BxL[:, 1:], chunk_size=chunk_size)
    keep = attention_mask_BxL[:, 1:].astype(jnp.bool_)
    lp, ent = jnp.where(keep, lp, 0.0), jnp.where(keep, ent, 0.0)
    return jnp.pad(lp, ((0, 0), (1, 0))), jnp.pad(ent, ((0, 0), (1, 0)))
