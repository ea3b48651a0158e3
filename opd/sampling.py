"""Batched generation from the student: temperature, top-k, exact top-p, in one jitted program.

Top-p needs no sort of the vocabulary and no search for the nucleus threshold: tokens are drawn by
rejection from supersets of the nucleus, and a draw's membership is one masked sum (`_select_top_p`); the
kept set is that of `nucleus_threshold_keep` (the threshold form, found by bisection, for callers that
need the whole keep-mask).

`sample` prefills the left-padded prompt into a preallocated KV cache, then draws one token per step for
every sequence until each has emitted EOS (or a stop id) or `max_new_tokens` are drawn; the loop exits as
soon as every sequence is done. A decode step attends to every slot of the cache, so its cost grows with the
cache's length; the loop runs in windows of response positions that double (`decode_windows`: 64, 128, ...,
N) and the cache grows to each window's end between them, so short responses never pay for N's slots. Empty
slots are masked out either way: windows change a step's cost, not what it computes (up to the order of
float additions). Alongside each token it records the student's log-probability under its
*unmodified* distribution (temperature 1, no truncation) — the on-policy log π_θ(y_t | c_t) that the
trainer's recomputation must reproduce (tests/test_sampling.py checks 1e-5).

The model enters the jitted function functionally (`nnx.split`: graph definition static, parameters as an
argument), so repeated calls with the same shapes and config reuse one compiled program.
"""

from __future__ import annotations

import dataclasses
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
    # Response positions of the first decode window; windows double until N, the KV cache growing with them
    # (see `decode_windows`). 0 -> one window, the cache at its full length from the first step.
    first_window: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            raise ValueError(f"top_k: expected an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens: expected a positive integer, got {self.max_new_tokens!r}")
        if not (isinstance(self.first_window, int) and not isinstance(self.first_window, bool)
                and self.first_window >= 0):
            raise ValueError(f"first_window: expected an integer >= 0 (0 = one window), got {self.first_window!r}")


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
    >= top_p (the exact nucleus). The first (most likely) token is always kept.

    Used on the (already sorted) top-k candidates; unsorted rows go through `_select_top_p` (sampling)
    or `nucleus_threshold_keep` (the keep-mask), which need no sort."""
    probs_BxV = jax.nn.softmax(sorted_logits_BxV.astype(jnp.float32), axis=-1)
    # Keep token j while the strictly more likely tokens hold < p (an exclusive cumsum, exact at j = 0).
    mass_before_BxV = jnp.concatenate(
        [jnp.zeros_like(probs_BxV[:, :1]), jnp.cumsum(probs_BxV, axis=-1)[:, :-1]], axis=-1)
    return mass_before_BxV < top_p


# Probabilities lie in [0, 1], so their float32 bit patterns lie in [0, 0x3F800000] (1.0) < 2**30: the
# bisection interval [0, max bits + 1] has width <= 2**30 and 30 halvings shrink it to 1.
_BISECTION_STEPS = 30


def nucleus_threshold_keep(logits_BxV: jax.Array, top_p: float) -> jax.Array:
    """The exact top-p nucleus of softmax(logits) per row, found without sorting: True on {i : π_i >= τ*},
    τ* = max{τ : Σ_{j: π_j >= τ} π_j >= top_p}.

    This is the smallest set of most likely tokens with mass >= top_p (at least one token). If several
    tokens tie exactly at τ*, all of them are kept (a sort would keep an arbitrary subset); with real
    logits such ties have probability zero. `top_p >= 1` keeps every token.

    τ* is found by bisection over the int32 bit patterns of the float32 probabilities (for non-negative
    floats the bit pattern is monotone in the value), `_BISECTION_STEPS` masked sums over V, vectorized
    over rows. The masked sum with a fixed reduction order is monotone in τ even in float32 (rounding is
    monotone and dropping a non-negative term never increases the sum), so the search returns exactly
    the largest feasible threshold for the computed mass; the invariant is lo feasible (or 0 = keep all),
    hi infeasible (hi = max + 1 ulp holds mass 0 < top_p).
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if top_p >= 1.0:
        return jnp.ones(logits_BxV.shape, jnp.bool_)
    probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
    probs_BxV = jnp.where(probs_BxV > 0, probs_BxV, 0.0)  # +0.0 (bits 0) for zeros; no -0.0
    bits_BxV = jax.lax.bitcast_convert_type(probs_BxV, jnp.int32)
    lo_B = jnp.zeros(bits_BxV.shape[:1], jnp.int32)
    hi_B = jnp.max(bits_BxV, axis=-1) + 1

    def halve(_, lo_hi):
        lo_B, hi_B = lo_hi
        mid_B = lo_B + (hi_B - lo_B) // 2
        mass_B = jnp.sum(jnp.where(bits_BxV >= mid_B[:, None], probs_BxV, 0.0), axis=-1)
        ok_B = mass_B >= top_p
        return jnp.where(ok_B, mid_B, lo_B), jnp.where(ok_B, hi_B, mid_B)

    lo_B, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (lo_B, hi_B))
    return bits_BxV >= lo_B[:, None]


def select_tokens(logits_BxV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Draw one token per row from softmax(logits / T) truncated to top-k, then to the top-p nucleus."""
    first_key, rounds_key = jax.random.split(key)
    u_BxR = jax.random.uniform(first_key, (logits_BxV.shape[0], _FIRST_PROPOSALS), jnp.float32)
    return _select_with_uniforms(logits_BxV, u_BxR, lambda round_: jax.random.fold_in(rounds_key, round_), cfg)


def _select_with_uniforms(logits_BxV: jax.Array, u_BxR: jax.Array, round_key, cfg: SamplingConfig) -> jax.Array:
    """`select_tokens` given its first uniforms [B, _FIRST_PROPOSALS] (the sampler draws those for every step
    at once, so a decode step runs no random-number generator) and `round_key(round)`, the key of a rare extra
    top-p round, made only when a row needs one. Every draw is an inverse CDF of one uniform."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if cfg.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    x_BxV = logits_BxV / cfg.temperature
    V = x_BxV.shape[-1]
    if 0 < cfg.top_k < V:
        x_BxK, index_BxK = jax.lax.top_k(x_BxV, cfg.top_k)  # sorted, descending
        if cfg.top_p < 1.0:
            x_BxK = jnp.where(nucleus_keep(x_BxK, cfg.top_p), x_BxK, -jnp.inf)
        no_floor_B = jnp.full(x_BxK.shape[:1], -1.0, jnp.float32)
        choice_Bx1 = _draw_candidates(jax.nn.softmax(x_BxK, axis=-1), no_floor_B, u_BxR[:, :1])
        return jnp.take_along_axis(index_BxK, choice_Bx1, axis=-1)[:, 0].astype(jnp.int32)
    if cfg.top_p < 1.0:
        return _select_top_p(x_BxV, u_BxR, round_key, cfg.top_p)
    no_floor_B = jnp.full(x_BxV.shape[:1], -1.0, jnp.float32)
    return _draw_candidates(jax.nn.softmax(x_BxV, axis=-1), no_floor_B, u_BxR[:, :1])[:, 0]


def _draw_candidates(probs_BxV: jax.Array, floor_B: jax.Array, u_BxR: jax.Array) -> jax.Array:
    """R independent draws per row from probs restricted to {i : π_i > floor} (inverse CDF of the uniforms)."""
    w_BxV = jnp.where(probs_BxV > floor_B[:, None], probs_BxV, 0.0)
    cum_BxV = jnp.cumsum(w_BxV, axis=-1)
    r_BxR = u_BxR * cum_BxV[:, -1:]
    # The first candidate whose inclusive cumulative mass exceeds r (never a zero-weight token) ...
    hit_BxRxV = (cum_BxV[:, None, :] > r_BxR[:, :, None]) & (w_BxV > 0.0)[:, None, :]
    # ... or, if r rounded up to the total, the most likely candidate.
    return jnp.where(jnp.any(hit_BxRxV, axis=-1), jnp.argmax(hit_BxRxV, axis=-1),
                     jnp.argmax(w_BxV, axis=-1)[:, None]).astype(jnp.int32)


def _in_nucleus(probs_BxV: jax.Array, choice_BxR: jax.Array, top_p: float) -> tuple[jax.Array, jax.Array]:
    """Whether each `choice` lies in its row's nucleus {i : π_i >= τ*} (`nucleus_threshold_keep`): exactly when
    the tokens strictly more likely than it hold mass < top_p. Also returns the choices' probabilities."""
    p_BxR = jnp.take_along_axis(probs_BxV, choice_BxR, axis=-1)
    above_BxR = jnp.sum(jnp.where(probs_BxV[:, None, :] > p_BxR[:, :, None], probs_BxV[:, None, :], 0.0), axis=-1)
    return above_BxR < top_p, p_BxR


# Proposals drawn at once per row: each lands in the nucleus with probability >= top_p, so all of them miss
# (and the row goes on to the sequential rounds) with probability <= (1 - top_p)^4.
_FIRST_PROPOSALS = 4


def _select_top_p(x_BxV: jax.Array, u_BxR: jax.Array, round_key, top_p: float) -> jax.Array:
    """One draw per row from the renormalized nucleus of softmax(x), with no sort, no top-k and no threshold
    search: rejection sampling from supersets of the nucleus.

    First, `_FIRST_PROPOSALS` independent draws per row from softmax(x) (inverse CDF of the uniforms u_BxR,
    one cumulative sum);
    the first that lies in the nucleus (`_in_nucleus`, one masked sum) is the row's token: rejection
    sampling, so it is distributed as softmax(x) renormalized over the nucleus. Rows where all miss (rare)
    go on in rounds: a rejected token c and every token at most as likely lie outside the nucleus (an upper
    set of π), so the row's floor rises to π_c and the next draw is from {i : π_i > floor}, a set that still
    contains the nucleus; the first accepted draw has the same distribution. The most likely token is always
    in the nucleus, so the rounds end."""
    B, _ = x_BxV.shape
    probs_BxV = jax.nn.softmax(x_BxV, axis=-1)
    cand_BxR = _draw_candidates(probs_BxV, jnp.full((B,), -1.0, jnp.float32), u_BxR)
    ok_BxR, p_BxR = _in_nucleus(probs_BxV, cand_BxR, top_p)
    choice_B = jnp.take_along_axis(cand_BxR, jnp.argmax(ok_BxR, axis=-1)[:, None], axis=-1)[:, 0]
    done_B = jnp.any(ok_BxR, axis=-1)
    floor_B = jnp.where(done_B, -1.0, jnp.max(p_BxR, axis=-1))

    def cond(state):
        return ~jnp.all(state[2])

    def body(state):
        round_, choice_B, done_B, floor_B = state
        u_Bx1 = jax.random.uniform(round_key(round_), (B, 1), jnp.float32)
        cand_Bx1 = _draw_candidates(probs_BxV, floor_B, u_Bx1)
        ok_Bx1, p_Bx1 = _in_nucleus(probs_BxV, cand_Bx1, top_p)
        ok_B = ok_Bx1[:, 0] & ~done_B
        return (round_ + 1, jnp.where(ok_B, cand_Bx1[:, 0], choice_B), done_B | ok_B,
                jnp.where(done_B | ok_B, floor_B, p_Bx1[:, 0]))

    state = (jnp.zeros((), jnp.int32), choice_B, done_B, floor_B)
    return jax.lax.while_loop(cond, body, state)[1]


# --- the loop -----------------------------------------------------------------------------------------


def decode_windows(max_new_tokens: int, first_window: int) -> list[int]:
    """End (exclusive, in response positions) of each decode window: first_window, doubling, then N."""
    ends, end = [], first_window
    while 0 < end < max_new_tokens:
        ends.append(end)
        end *= 2
    return ends + [max_new_tokens]


class _LoopState(NamedTuple):
    step: jax.Array  # int32 scalar: response position of the next draw
    tokens_BxN: jax.Array  # int32
    logprobs_BxN: jax.Array  # float32
    done_B: jax.Array  # bool: emitted a stop token
    length_B: jax.Array  # int32: tokens generated so far (stop token included)
    logits_BxV: jax.Array  # float32: next-token logits
    cache: KVCache


def _draw(state: _LoopState, u_NxBxR: jax.Array, rounds_key: jax.Array, cfg: SamplingConfig,
          stop_S: jax.Array):
    """Draw position `state.step` for every sequence; PAD (log-prob 0) for sequences already done."""
    u_BxR = jax.lax.dynamic_index_in_dim(u_NxBxR, state.step, axis=0, keepdims=False)
    # The round is folded in first, so XLA cannot hoist the step's key out of the rare rounds' loop.
    token_B = _select_with_uniforms(
        state.logits_BxV, u_BxR,
        lambda round_: jax.random.fold_in(jax.random.fold_in(rounds_key, round_), state.step), cfg)
    logp_BxV = jax.nn.log_softmax(state.logits_BxV, axis=-1)  # unmodified: temperature 1, no truncation
    logprob_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
    live_B = ~state.done_B
    token_B = jnp.where(live_B, token_B, PAD_ID)
    logprob_B = jnp.where(live_B, logprob_B, 0.0)
    at = (jnp.zeros_like(state.step), state.step)  # column `step` of every row
    tokens_BxN = jax.lax.dynamic_update_slice(state.tokens_BxN, token_B[:, None], at)
    logprobs_BxN = jax.lax.dynamic_update_slice(state.logprobs_BxN, logprob_B[:, None], at)
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

    # Every step's uniforms in one draw, so the decode loop runs no random-number generator (a rare extra
    # top-p round folds the step into `rounds_key`).
    first_key, rounds_key = jax.random.split(rng)
    u_NxBxR = jax.random.uniform(first_key, (N, B, _FIRST_PROPOSALS), jnp.float32)

    # PREFILL: the whole left-padded prompt in one pass; its last position is real for every sequence.
    windows = decode_windows(N, cfg.first_window)
    cache = KVCache.create(model.cfg, B, P + windows[0])
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

    # DECODE: draw position `step`, feed it back for the logits of `step + 1` (cache slot P + step, inside
    # the window that ends at `end`). The last draw happens after the loops, so no forward pass is wasted;
    # every loop stops early once every sequence is done.
    def body(state: _LoopState) -> _LoopState:
        state, token_B, live_B = _draw(state, u_NxBxR, rounds_key, cfg, stop_S)
        logits_Bx1xV, cache = model(token_B[:, None], attention_mask_BxT=live_B[:, None], cache=state.cache)
        return state._replace(step=state.step + 1, logits_BxV=logits_Bx1xV[:, 0].astype(jnp.float32),
                              cache=cache)

    def cond_before(last: int):
        return lambda state: (state.step < last) & ~jnp.all(state.done_B)

    for end in windows:
        state = jax.lax.while_loop(cond_before(min(end, N - 1)), body,
                                   state._replace(cache=state.cache.grow(P + end)))
    state, _, _ = _draw(state, u_NxBxR, rounds_key, cfg, stop_S)  # position N - 1, or PAD if all are done

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
    response position t uses row t of uniforms drawn once from it, so a rerun with the same key reproduces
    the rollout.
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


def with_first_window(first_window: int, sample_fn: Any = None) -> Any:
    """`sample_fn` (default `sample`) with every SamplingConfig it is given set to `first_window`: how a run's
    `rollout.first_window` reaches the samplers its tasks call, whatever task builds the SamplingConfig. The
    windows change what a decode step costs, never what it draws."""
    inner = sample if sample_fn is None else sample_fn

    def windowed(model, prompt_BxP, prompt_mask_BxP, rng, cfg: SamplingConfig, **kw):
        return inner(model, prompt_BxP, prompt_mask_BxP, rng, dataclasses.replace(cfg, first_window=first_window),
                     **kw)

    return windowed
