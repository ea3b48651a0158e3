"""Batched generation from the student: temperature, top-k, exact top-p, in one jitted while_loop.

`sample` prefills the left-padded prompt into a preallocated KV cache, then draws one token per step for
every sequence until each has emitted EOS (or a stop id) or `max_new_tokens` are drawn; the loop exits as
soon as every sequence is done. Alongside each token it records the student's log-probability under its
*unmodified* distribution (temperature 1, no truncation) — the on-policy log π_θ(y_t | c_t) that the
trainer's recomputation must reproduce (tests/test_sampling.py checks 1e-5).

The model enters the jitted function functionally (`nnx.split`: graph definition static, parameters as an
argument), so repeated calls with the same shapes and config reuse one compiled program.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd.model.cache import KVCache

PAD_ID = 0


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 -> greedy (argmax); the recorded log-probs stay at temperature 1
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 -> off
    top_k: int = 0  # keep the k most likely tokens; 0 -> off
    max_new_tokens: int = 128  # N: response length budget

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}")


class Rollout(NamedTuple):
    tokens_BxL: jax.Array  # int32: prompt (left-padded, P) + response (N = max_new_tokens); PAD after a stop
    attention_mask_BxL: jax.Array  # int32: 1 on real prompt tokens and generated tokens up to and incl. EOS
    response_mask_BxL: jax.Array  # int32: 1 on generated tokens up to and including EOS
    logprobs_BxL: jax.Array  # float32: student log-prob of each sampled token (unmodified softmax); 0 elsewhere
    response_len_B: jax.Array  # int32: generated tokens, EOS included
    truncated_B: jax.Array  # bool: hit max_new_tokens without EOS / stop id


# --- token selection ----------------------------------------------------------------------------------


def nucleus_keep(sorted_logits_BxV: jax.Array, top_p: float) -> jax.Array:
    """Given logits sorted in descending order, True on the smallest prefix whose probability mass is
    >= top_p (the exact nucleus). The first (most likely) token is always kept."""
    probs_BxV = jax.nn.softmax(sorted_logits_BxV.astype(jnp.float32), axis=-1)
    # Keep token j while the strictly more likely tokens hold < p (an exclusive cumsum, exact at j = 0).
    mass_before_BxV = jnp.concatenate(
        [jnp.zeros_like(probs_BxV[:, :1]), jnp.cumsum(probs_BxV, axis=-1)[:, :-1]], axis=-1)
    return mass_before_BxV < top_p


def select_tokens(logits_BxV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Draw one token per row from softmax(logits / T) truncated to top-k, then to the top-p nucleus."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if cfg.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    x_BxV = logits_BxV / cfg.temperature
    V = x_BxV.shape[-1]
    index_BxC = None  # vocabulary id of each candidate column when candidates are reordered
    if 0 < cfg.top_k < V:
        x_BxV, index_BxC = jax.lax.top_k(x_BxV, cfg.top_k)  # sorted, descending
    elif cfg.top_p < 1.0:
        index_BxC = jnp.argsort(-x_BxV, axis=-1)
        x_BxV = jnp.take_along_axis(x_BxV, index_BxC, axis=-1)
    if cfg.top_p < 1.0:
        x_BxV = jnp.where(nucleus_keep(x_BxV, cfg.top_p), x_BxV, -jnp.inf)
    choice_B = jax.random.categorical(key, x_BxV, axis=-1)
    if index_BxC is not None:
        choice_B = jnp.take_along_axis(index_BxC, choice_B[:, None], axis=-1)[:, 0]
    return choice_B.astype(jnp.int32)


# --- the loop -----------------------------------------------------------------------------------------


class _LoopState(NamedTuple):
    step: jax.Array  # int32 scalar: response position of the next draw
    tokens_BxN: jax.Array  # int32
    logprobs_BxN: jax.Array  # float32
    done_B: jax.Array  # bool: emitted a stop token
    length_B: jax.Array  # int32: tokens generated so far (stop token included)
    logits_BxV: jax.Array  # float32: next-token logits
    cache: KVCache


def _draw(state: _LoopState, rng: jax.Array, cfg: SamplingConfig, stop_S: jax.Array):
    """Draw position `state.step` for every sequence; PAD (log-prob 0) for sequences already done."""
    token_B = select_tokens(state.logits_BxV, jax.random.fold_in(rng, state.step), cfg)
    logp_BxV = jax.nn.log_softmax(state.logits_BxV, axis=-1)  # unmodified: temperature 1, no truncation
    logprob_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
    live_B = ~state.done_B
    token_B = jnp.where(live_B, token_B, PAD_ID)
    logprob_B = jnp.where(live_B, logprob_B, 0.0)
    tokens_BxN = jax.lax.dynamic_update_slice(state.tokens_BxN, token_B[:, None], (jnp.zeros_like(state.step), state.step))
    logprobs_BxN = jax.lax.dynamic_update_slice(state.logprobs_BxN, logprob_B[:, None], (jnp.zeros_like(state.step), state.step))
    done_B = state.done_B | (live_B & jnp.any(token_B[:, None] == stop_S[None, :], axis=-1))
    state = state._replace(tokens_BxN=tokens_BxN, logprobs_BxN=logprobs_BxN, done_B=done_B,
                           length_B=state.length_B + live_B.astype(jnp.int32))
    return state, token_B, live_B


def _sample_impl(graphdef, params, prompt_BxP, prompt_mask_BxP, rng, stop_S, cfg: SamplingConfig) -> Rollout:
    model = nnx.merge(graphdef, params)
    B, P = prompt_BxP.shape
    N = cfg.max_new_tokens
    prompt_BxP = prompt_BxP.astype(jnp.int32)
    prompt_mask_BxP = prompt_mask_BxP.astype(jnp.int32)

    # PREFILL: the whole left-padded prompt in one pass; its last position is real for every sequence.
    cache = KVCache.create(model.cfg, B, P + N)
    logits_BxPxV, cache = model(prompt_BxP, attention_mask_BxT=prompt_mask_BxP, cache=cache)
    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        tokens_BxN=jnp.full((B, N), PAD_ID, jnp.int32),
        logprobs_BxN=jnp.zeros((B, N), jnp.float32),
        done_B=jnp.zeros((B,), jnp.bool_),
        length_B=jnp.zeros((B,), jnp.int32),
        logits_BxV=logits_BxPxV[:, -1].astype(jnp.float32),
        cache=cache,
    )

    # DECODE: draw position `step`, feed it back for the logits of `step + 1`. The last draw happens after
    # the loop, so no forward pass is wasted; the loop stops early once every sequence is done.
    def cond(state: _LoopState) -> jax.Array:
        return (state.step < N - 1) & ~jnp.all(state.done_B)

    def body(state: _LoopState) -> _LoopState:
        state, token_B, live_B = _draw(state, rng, cfg, stop_S)
        logits_Bx1xV, cache = model(token_B[:, None], attention_mask_BxT=live_B[:, None], cache=state.cache)
        return state._replace(step=state.step + 1, logits_BxV=logits_Bx1xV[:, 0].astype(jnp.float32),
                              cache=cache)

    state = jax.lax.while_loop(cond, body, state)
    state, _, _ = _draw(state, rng, cfg, stop_S)  # position N - 1, or PAD everywhere if all are done

    response_mask_BxN = (jnp.arange(N, dtype=jnp.int32)[None, :] < state.length_B[:, None]).astype(jnp.int32)
    return Rollout(
        tokens_BxL=jnp.concatenate([prompt_BxP * prompt_mask_BxP, state.tokens_BxN], axis=1),
        attention_mask_BxL=jnp.concatenate([prompt_mask_BxP, response_mask_BxN], axis=1),
        response_mask_BxL=jnp.concatenate([jnp.zeros_like(prompt_mask_BxP), response_mask_BxN], axis=1),
        logprobs_BxL=jnp.concatenate([jnp.zeros((B, P), jnp.float32), state.logprobs_BxN], axis=1),
        response_len_B=state.length_B,
        truncated_B=~state.done_B,
    )


# Static: the graph definition and the sampling config. Stop ids are an array (only their count is static).
_sample_jit = jax.jit(_sample_impl, static_argnames=("graphdef", "cfg"))


def sample(model: Any, prompt_BxP: Any, prompt_mask_BxP: Any, rng: jax.Array, cfg: SamplingConfig, *,
           eos_id: int, stop_ids: Sequence[int] = ()) -> Rollout:
    """Sample up to `cfg.max_new_tokens` tokens after each left-padded prompt (see module docstring).

    Prompts must be left-padded (the last column real for every row). `rng` is a PRNG key; the draw at
    response position t uses fold_in(rng, t), so a rerun with the same key reproduces the rollout.
    """
    if not isinstance(cfg, SamplingConfig):
        raise TypeError(f"cfg: expected a SamplingConfig, got {type(cfg).__name__}")
    vocab = model.cfg.vocab_size
    stops = sorted({int(eos_id), *(int(s) for s in stop_ids)})
    for s in stops:
        if not 0 <= s < vocab:
            raise ValueError(f"eos_id/stop_ids: expected ids in [0, {vocab}), got {s}")
    # The number of stop ids is part of the compiled shape: pad (with EOS) to a bucket so that changing
    # the stop set rarely recompiles.
    bucket = max(8, 1 << (len(stops) - 1).bit_length())
    stops = stops + [int(eos_id)] * (bucket - len(stops))
    if prompt_BxP.shape != prompt_mask_BxP.shape or len(prompt_BxP.shape) != 2:
        raise ValueError(f"prompt_BxP / prompt_mask_BxP: expected equal [B, P] shapes, got "
                         f"{prompt_BxP.shape} and {prompt_mask_BxP.shape}")
    max_len = prompt_BxP.shape[1] + cfg.max_new_tokens
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"max_new_tokens: prompt length {prompt_BxP.shape[1]} + max_new_tokens "
                         f"{cfg.max_new_tokens} = {max_len} exceeds model.max_seq_len={model.cfg.max_seq_len}")
    if not isinstance(prompt_mask_BxP, jax.core.Tracer) and not np.all(np.asarray(prompt_mask_BxP)[:, -1]):
        raise ValueError("prompt_mask_BxP: prompts must be left-padded with a real last token in every row")
    graphdef, params = nnx.split(model)
    return _sample_jit(graphdef, params, jnp.asarray(prompt_BxP), jnp.asarray(prompt_mask_BxP), rng,
                       jnp.asarray(stops, jnp.int32), cfg=cfg)
