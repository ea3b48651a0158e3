"""Large-vocabulary objectives computed in chunks of positions, with the LM head recomputed per chunk.

With a 151,936-token vocabulary, the student's logits for one batch of 8,192 positions are 5 GB in
float32, and the backward pass of a naive objective keeps at least two such arrays alive. `chunked_map`
runs the LM-head projection and any per-position function chunk by chunk (`lax.map`), each chunk under
`jax.checkpoint`, so the forward pass keeps only the per-position outputs and the backward pass recomputes
one chunk's logits at a time: peak temporary memory is O(chunk·V) instead of O(N·V)
(`benchmarks/bench_chunked_memory.py` measures it; tests/test_train.py checks the trainer's update).

Chunks run along the *last* leading axis (the sequence positions of [B, L, D] hidden states); the axes
before it (the batch) stay whole in every chunk. A batch sharded over devices therefore stays sharded: each
device computes [B / devices, chunk, V] logits per chunk and no chunk lives on one device only. Flat
[N, D] inputs are chunked along N.

The per-chunk function is whatever the caller passes (an objective of the registry in opd/objectives.py,
teacher top-K scoring in opd/teacher.py, token log-probs): there is one implementation of each objective,
and chunking changes only where it runs. When the chunked axis is not a multiple of the chunk size, the
last chunk is padded by repeating the last real position (so padded rows are as finite as real ones) and
the padded outputs are dropped; their gradient contribution is exactly zero.

`chunk_size=None` runs the same function without chunking (one block), the reference the tests and the
benchmark compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from opd import losses

DEFAULT_CHUNK_SIZE = 128
"""Sequence positions per chunk when chunking is on by default. Per device, one chunk's logits are
[B / (data·fsdp), 128, V] float32: 0.6 GB at 8 local rows and V = 151,936, against 20 GB for a 4,096-token
sequence unchunked; each chunk's [B·128, D] x [D, V] head matmul is still large enough to keep an
accelerator busy."""

CHUNK_ABOVE_VOCAB = 32_768
"""Default policy of `resolve_chunk_size`: chunk when the vocabulary is larger than this. The float32
logits, their log-softmax and their gradient cost about 12·V bytes per position: ≤ 0.4 MB at V ≤ 32,768
(Llama-2, Mistral and every task vocabulary here, which keep the one-block path and its single fused
kernel), 1.5–3 MB at the 128K–256K vocabularies of Llama-3, Qwen2/3 and Gemma: the order of everything
a 7B model's 32 layers keep per position for the backward pass (about 34·D bytes per layer in 16-bit,
4.5 MB, without rematerialization) and many times it with rematerialization. The cost of chunking is one
extra LM-head matmul in the backward pass (the recompute)."""


def resolve_chunk_size(requested: int | None, vocab_size: int) -> int | None:
    """The chunk size the update and teacher scoring use.

    `requested`: None → the default policy (DEFAULT_CHUNK_SIZE when vocab_size > CHUNK_ABOVE_VOCAB, else
    unchunked); 0 → unchunked; a positive int → that many sequence positions per chunk.
    Returns a positive int or None (unchunked).
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected a positive integer, got {vocab_size!r}")
    if requested is None:
        return DEFAULT_CHUNK_SIZE if vocab_size > CHUNK_ABOVE_VOCAB else None
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
        raise ValueError(f"chunk_size: expected null (auto), 0 (off) or a positive integer, got {requested!r}")
    return requested or None


def lm_head_logits(h_xD: Float[ArrayLike, "*N D"], w_DxV: Float[ArrayLike, "D V"]) -> Float[Array, "*N V"]:
    """LM-head projection as the model computes it (`Transformer.logits`): the weight in the activation
    dtype, float32 accumulation, float32 result, so chunked logits equal the sampler's."""
    h_xD = jnp.asarray(h_xD)
    w_DxV = jnp.asarray(w_DxV).astype(h_xD.dtype)
    logits = jnp.einsum("...d,dv->...v", h_xD, w_DxV, preferred_element_type=jnp.float32)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _check_head(name_h: str, h: Array, name_w: str, w: Array) -> None:
    if h.ndim < 2:
        raise ValueError(f"{name_h} must be [..., N, D] with at least one position axis, got shape {h.shape}")
    if w.ndim != 2:
        raise ValueError(f"{name_w} must be [D, V], got shape {w.shape}")
    if h.shape[-1] != w.shape[0]:
        raise ValueError(f"{name_h} hidden size {h.shape[-1]} must equal {name_w} rows {w.shape[0]}")


def check_chunk_size(chunk_size: int | None) -> None:
    """ValueError (one line) unless `chunk_size` is None or a positive int."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected null or a positive integer, got {chunk_size!r}")


def chunked_map(
    fn: Callable[..., Any],
    h_xD: Float[ArrayLike, "*N D"],
    w_DxV: Float[ArrayLike, "D V"],
    *payload: ArrayLike,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    extra_heads: tuple[tuple[ArrayLike, ArrayLike], ...] = (),
) -> Any:
    """Apply `fn(logits_xV, *extra_logits_xV, *payload_chunk)` over chunks of positions.

    Args:
        fn: per-chunk function returning a pytree of per-position arrays (the chunk's leading axes first).
        h_xD: final hidden states [..., N, D] (the model's `hidden_states` output); chunks run along N.
        w_DxV: LM-head weight [D, V] (the model's `lm_head_weight()`).
        payload: per-position arrays with the same leading axes as `h_xD` (e.g. top-K ids [..., N, K]).
        extra_heads: further (hidden [..., N, D'], weight [D', V']) pairs whose logits are computed per chunk
            too and passed after the first (a teacher's, for full-vocabulary objectives).
        chunk_size: positions of N per chunk; None computes everything at once (the unchunked reference).
    Returns:
        `fn`'s pytree with the leading axes of `h_xD` restored.
    """
    check_chunk_size(chunk_size)
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

    hs, weights = [h for h, _ in heads], [w for _, w in heads]

    def per_chunk(hs: list[Array], pl: list[Array]) -> Any:
        return fn(*[lm_head_logits(h, w) for h, w in zip(hs, weights)], *pl)

    axis, n = len(lead) - 1, lead[-1]  # the chunked (position) axis and its length
    if chunk_size is None or n <= chunk_size:
        # Unchunked reference, or a single chunk (checkpointed: the backward pass recomputes its logits).
        return (per_chunk if chunk_size is None else jax.checkpoint(per_chunk))(hs, list(payload))

    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n

    def to_chunks(x: Array) -> Array:  # [..., N, ...] -> [num_chunks, ..., chunk, ...]
        if pad:  # repeat the last real position: padded rows are exactly as finite as real ones
            x = jnp.pad(x, [(0, pad) if d == axis else (0, 0) for d in range(x.ndim)], mode="edge")
        x = x.reshape((*x.shape[:axis], num_chunks, chunk_size, *x.shape[axis + 1:]))
        return jnp.moveaxis(x, axis, 0)

    def from_chunks(x: Array) -> Array:  # [num_chunks, ..., chunk, ...] -> [..., N, ...]
        x = jnp.moveaxis(x, 0, axis)
        x = x.reshape((*x.shape[:axis], num_chunks * chunk_size, *x.shape[axis + 2:]))
        return jax.lax.slice_in_dim(x, 0, n, axis=axis)

    body = jax.checkpoint(lambda xs: per_chunk(*xs))
    out = jax.lax.map(body, ([to_chunks(h) for h in hs], [to_chunks(p) for p in payload]))
    return jax.tree.map(from_chunks, out)


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
