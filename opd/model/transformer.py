"""Decoder-only Transformer of the Llama / Qwen2 / Qwen3 family in Flax NNX.

RMSNorm (float32), rotary embeddings in Hugging Face's rotate-half convention, SwiGLU MLP, grouped-query
attention, optional q/k bias (Qwen2), q/k RMSNorm (Qwen3), tied embeddings. Submodule and parameter names
follow Hugging Face (`embed_tokens`, `layers[i].self_attn.q_proj`, ..., `norm`, `lm_head`) and Linear
kernels are stored [in, out], so a checkpoint maps by renaming plus a transpose. Shape letters: config.py.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from opd.model.cache import KVCache, kv_lead
from opd.model.config import ModelConfig

_MASKED = -1e30  # finite: a fully masked row (a padding query) stays finite instead of NaN


class RMSNorm(nnx.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)); the statistics in float32, as Hugging Face."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...].astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return weight * x32.astype(self.dtype)


def rope_cos_sin(positions_BxT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, E] in float32 for Hugging Face's rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb_BxTxE = jnp.concatenate([freqs_BxTxE2, freqs_BxTxE2], axis=-1)
    return jnp.cos(emb_BxTxE), jnp.sin(emb_BxTxE)


def apply_rope(x_BxTxNxE: jax.Array, cos_BxTxE: jax.Array, sin_BxTxE: jax.Array) -> jax.Array:
    dtype = x_BxTxNxE.dtype
    cos = cos_BxTxE[:, :, None, :].astype(dtype)
    sin = sin_BxTxE[:, :, None, :].astype(dtype)
    x1, x2 = jnp.split(x_BxTxNxE, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxTxNxE * cos + rotated * sin


def _linear(cfg: ModelConfig, rngs: nnx.Rngs, d_in: int, d_out: int, *, bias: bool) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype,
        kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, E
        self.q_proj = _linear(cfg, rngs, D, H * E, bias=cfg.attention_bias)
        self.k_proj = _linear(cfg, rngs, D, K * E, bias=cfg.attention_bias)
        self.v_proj = _linear(cfg, rngs, D, K * E, bias=cfg.attention_bias)
        self.o_proj = _linear(cfg, rngs, H * E, D, bias=False)
        self.use_qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            norm = partial(RMSNorm, E, eps=cfg.rms_norm_eps, dtype=cfg.activation_dtype,
                           param_dtype=cfg.weight_dtype)
            self.q_norm = norm()
            self.k_norm = norm()

    def __call__(self, x_BxTxD, cos_BxTxE, sin_BxTxE, mask_BxTxS, kv=None, index=None):
        """kv: None (keys are this call's tokens) or this layer's (k, v) cache buffers ([B, K, S, E], or
        [B, S, E] for one kv head) to write at slots [index, index + T) and attend over. Returns (out_BxTxD, kv)."""
        B, T, _ = x_BxTxD.shape
        H, K, E = self.num_heads, self.num_kv_heads, self.head_dim
        G = H // K
        q_BxTxHxE = self.q_proj(x_BxTxD).reshape(B, T, H, E)
        k_BxTxKxE = self.k_proj(x_BxTxD).reshape(B, T, K, E)
        v_BxTxKxE = self.v_proj(x_BxTxD).reshape(B, T, K, E)
        if self.use_qk_norm:
            q_BxTxHxE = self.q_norm(q_BxTxHxE)
            k_BxTxKxE = self.k_norm(k_BxTxKxE)
        q_BxTxHxE = apply_rope(q_BxTxHxE, cos_BxTxE, sin_BxTxE)
        k_BxTxKxE = apply_rope(k_BxTxKxE, cos_BxTxE, sin_BxTxE)

        # Heads-major: kv head k and its G query heads (h = k * G + g) are batch axes of both matmuls (`lead`:
        # (B, K), or (B,) for one kv head, the cache's layout, opd/model/cache.py), with the G x T queries of a
        # kv head as the rows, so XLA multiplies without transposing the keys.
        lead = kv_lead(B, K)
        q_LxGTxE = q_BxTxHxE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4).reshape(*lead, G * T, E)
        k_LxTxE = k_BxTxKxE.transpose(0, 2, 1, 3).reshape(*lead, T, E)
        v_LxTxE = v_BxTxKxE.transpose(0, 2, 1, 3).reshape(*lead, T, E)
        if kv is None:
            keys_LxSxE, values_LxSxE = k_LxTxE, v_LxTxE
        else:
            k_buf, v_buf = kv
            zero = jnp.zeros_like(index)  # all start indices share one dtype (also under x64)
            start = (zero,) * len(lead) + (index, zero)
            k_buf = jax.lax.dynamic_update_slice(k_buf, k_LxTxE.astype(k_buf.dtype), start)
            v_buf = jax.lax.dynamic_update_slice(v_buf, v_LxTxE.astype(v_buf.dtype), start)
            kv = (k_buf, v_buf)
            keys_LxSxE = k_buf.astype(q_BxTxHxE.dtype)
            values_LxSxE = v_buf.astype(q_BxTxHxE.dtype)

        scores_LxGTxS = jnp.einsum("...qe,...se->...qs", q_LxGTxE, keys_LxSxE,
                                   preferred_element_type=jnp.float32) * (E ** -0.5)
        S = scores_LxGTxS.shape[-1]
        scores_BxKxGxTxS = scores_LxGTxS.reshape(B, K, G, T, S)
        scores_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], scores_BxKxGxTxS, _MASKED)
        probs_LxGTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(values_LxSxE.dtype).reshape(
            *lead, G * T, S)
        out_LxGTxE = jnp.einsum("...qs,...se->...qe", probs_LxGTxS, values_LxSxE)
        out_BxTxHE = out_LxGTxE.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, H * E)
        return self.o_proj(out_BxTxHE), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, rngs, D, F, bias=False)
        self.up_proj = _linear(cfg, rngs, D, F, bias=False)
        self.down_proj = _linear(cfg, rngs, F, D, bias=False)

    def __call__(self, x_BxTxD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.activation_dtype,
                       param_dtype=cfg.weight_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BxTxD, cos_BxTxE, sin_BxTxE, mask_BxTxS, kv=None, index=None):
        attn_BxTxD, kv = self.self_attn(self.input_layernorm(x_BxTxD), cos_BxTxE, sin_BxTxE, mask_BxTxS,
                                        kv=kv, index=index)
        h_BxTxD = x_BxTxD + attn_BxTxD
        return h_BxTxD + self.mlp(self.post_attention_layernorm(h_BxTxD)), kv


def default_positions(attention_mask_BxT: jax.Array, offset_B: jax.Array | None = None) -> jax.Array:
    """RoPE positions cumsum(mask) - 1 (+ tokens already cached), clipped at 0: padding never shifts them."""
    pos_BxT = jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=1) - 1
    if offset_B is not None:
        pos_BxT = pos_BxT + offset_B[:, None]
    return jnp.maximum(pos_BxT, 0)


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens)` -> float32 logits [B, T, V] (full causal pass);
    `model(tokens, attention_mask_BxT=m, cache=c)` -> (logits, updated cache) for prefill / decode."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype,
            embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs,
        )
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.activation_dtype,
                            param_dtype=cfg.weight_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg, rngs, cfg.hidden_size, cfg.vocab_size, bias=False)

    # --- public API (docs/interfaces.md) ----------------------------------------------------------------
    def __call__(self, tokens_BxT, *, positions_BxT=None, attention_mask_BxT=None, cache: KVCache | None = None,
                 inputs_embeds_BxTxD=None):
        """`inputs_embeds_BxTxD` (optional, as Hugging Face) replaces the embedding lookup of `tokens_BxT`."""
        h_BxTxD, new_cache = self._decode(tokens_BxT, positions_BxT, attention_mask_BxT, cache,
                                          inputs_embeds_BxTxD)
        logits_BxTxV = self.logits(h_BxTxD)
        return logits_BxTxV if cache is None else (logits_BxTxV, new_cache)

    def hidden_states(self, tokens_BxT, *, positions_BxT=None, attention_mask_BxT=None):
        """Final-norm output [B, T, D], before the LM head (for chunked large-vocabulary objectives)."""
        return self._decode(tokens_BxT, positions_BxT, attention_mask_BxT, None)[0]

    def lm_head_weight(self) -> jax.Array:
        """W [D, V] with logits = h @ W (tied: the embedding matrix transposed), `logit_scale` folded in, so that
        every path to the logits (full, chunked, sharded) applies it."""
        w_DxV = self.embed_tokens.embedding[...].T if self.cfg.tie_embeddings else self.lm_head.kernel[...]
        return w_DxV if self.cfg.logit_scale == 1.0 else w_DxV * self.cfg.logit_scale

    def logits(self, h_BxTxD: jax.Array) -> jax.Array:
        """LM head in the activation dtype with float32 accumulation; float32 logits."""
        w_DxV = self.lm_head_weight().astype(h_BxTxD.dtype)
        return jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV, preferred_element_type=jnp.float32)

    # --- internals --------------------------------------------------------------------------------------
    def _decode(self, tokens_BxT, positions_BxT, attention_mask_BxT, cache, inputs_embeds_BxTxD=None):
        B, T = tokens_BxT.shape
        if attention_mask_BxT is None:
            mask_BxT = jnp.ones((B, T), jnp.bool_)
        else:
            mask_BxT = attention_mask_BxT.astype(jnp.bool_)
        if positions_BxT is None:
            positions_BxT = default_positions(mask_BxT, None if cache is None else cache.length_B)
        cos_BxTxE, sin_BxTxE = rope_cos_sin(positions_BxT, self.cfg.resolved_head_dim, self.cfg.rope_theta)
        if inputs_embeds_BxTxD is None:
            x_BxTxD = self.embed_tokens(tokens_BxT)
        else:
            x_BxTxD = inputs_embeds_BxTxD.astype(self.cfg.activation_dtype)

        if cache is None:
            causal_TxT = jnp.tril(jnp.ones((T, T), jnp.bool_))
            mask_BxTxS = causal_TxT[None] & mask_BxT[:, None, :]
            index = None
        else:
            index = cache.index
            valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, mask_BxT, (jnp.zeros_like(index), index))
            slot_S = jnp.arange(cache.max_len, dtype=jnp.int32)
            query_slot_T = index + jnp.arange(T, dtype=jnp.int32)
            causal_TxS = slot_S[None, :] <= query_slot_T[:, None]
            mask_BxTxS = valid_BxS[:, None, :] & causal_TxS[None]

        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k_by_layer[i], cache.v_by_layer[i])
            x_BxTxD, kv = layer(x_BxTxD, cos_BxTxE, sin_BxTxE, mask_BxTxS, kv=kv, index=index)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        h_BxTxD = self.norm(x_BxTxD)

        if cache is None:
            return h_BxTxD, None
        new_cache = KVCache(
            k_by_layer=tuple(new_k), v_by_layer=tuple(new_v), valid_BxS=valid_BxS, index=index + T,
            length_B=cache.length_B + mask_BxT.sum(axis=1, dtype=jnp.int32),
        )
        return h_BxTxD, new_cache


def token_logprobs(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
    """Target-aligned log p(tokens[t] | tokens[:t]) from logits of a pass over `tokens`; 0 at position 0
    and wherever the target token is masked out. Float32."""
    logits_BxLxV = logits_BxLxV[:, :-1].astype(jnp.float32)
    target_BxL = tokens_BxL[:, 1:]
    picked_BxL = jnp.take_along_axis(logits_BxLxV, target_BxL[..., None], axis=-1)[..., 0]
    lp_BxL = picked_BxL - jax.nn.logsumexp(logits_BxLxV, axis=-1)
    lp_BxL = jnp.where(attention_mask_BxL[:, 1:].astype(jnp.bool_), lp_BxL, 0.0)
    return jnp.pad(lp_BxL, ((0, 0), (1, 0)))


def forward_logprobs(model: Transformer, tokens_BxL: jax.Array, attention_mask_BxL: jax.Array) -> jax.Array:
    """Target-aligned student log-probs [B, L] (float32) of `tokens` under one full causal pass."""
    logits_BxLxV = model(tokens_BxL, attention_mask_BxT=attention_mask_BxL)
    return token_logprobs(logits_BxLxV, tokens_BxL, attention_mask_BxL)
