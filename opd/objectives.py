"""The objective registry: one table from a loss name to its per-position function, what the teacher must
supply for it, and the rollout top-p the paper pairs it with.

Everything that needs to know about objectives reads this table: the update step (opd/train/opd_step.py),
the config check (opd/train/config.py), the chunked path (the per-position function runs unchanged on a
chunk of positions) and the tests. Each function is a thin adapter from the trainer's per-position
inputs to one function of opd/losses.py; no divergence is re-derived here.

A per-position function is `fn(student_logits_xV, inputs, loss_cfg, teacher_logits_xV) -> values_x`, where
`inputs` is a `PositionInputs` with the same leading axes as the logits (any: [B, L] or a flat chunk [C]),
`loss_cfg` carries the objective's constants (clip_eps, dual_clip, ...) and `teacher_logits_xV` is None
unless the objective declares `teacher="logits"`.

What the teacher supplies, from least to most:
    "sampled"  log q(y_t) of the sampled token only: any teacher, including one with another vocabulary
               reached through a declared token mapping;
    "topk"     the teacher's top-K ids and log-probs, in the student's vocabulary (same vocabulary only);
    "logits"   the teacher's full logits at every position (same vocabulary; computed inside the update,
               chunk by chunk when the update is chunked, because the scoring payload never ships [B, L, V]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array

from opd import losses as L

TEACHER_SUPPLIES = ("sampled", "topk", "logits")


class PositionInputs(NamedTuple):
    """Per-position inputs of an objective (leading axes as the student's logits without V)."""

    tokens: Array  # int: y_t, the token sampled at the position (target-aligned)
    old_logprobs: Array  # log π_old(y_t) recorded by the sampler
    teacher_sampled: Array  # log q(y_t)
    topk_ids: Array  # int [..., K]: the teacher's top-K ids (zeros when the teacher supplies only "sampled")
    topk_logprobs: Array  # [..., K]: the teacher's full-vocabulary log-probs at those ids


PerPosition = Callable[[Array, PositionInputs, Any, Array | None], Array]


@dataclass(frozen=True)
class Objective:
    name: str
    fn: PerPosition
    teacher: str  # one of TEACHER_SUPPLIES
    rollout_top_p: float  # the paper's pairing (Table A1): LSM family 0.9, sampled-token 1.0
    summary: str


def token_logprobs(student_logits_xV: Array, tokens_x: Array) -> Array:
    """log π(y_t) from logits, float32."""
    logp_xV = jax.nn.log_softmax(student_logits_xV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_xV, tokens_x[..., None], axis=-1)[..., 0]


def _sampled_token(logits, x: PositionInputs, cfg, _teacher_logits):
    advantage = L.sampled_token_log_ratio(x.old_logprobs, x.teacher_sampled)
    return L.ppo_clip_loss(token_logprobs(logits, x.tokens), x.old_logprobs, advantage,
                           clip_eps=float(cfg.clip_eps), dual_clip=cfg.dual_clip)


def _lsm(logits, x: PositionInputs, _cfg, _teacher_logits):
    return L.topk_reverse_kl(logits, x.topk_ids, x.topk_logprobs, renormalize=True)


def _lsm_no_renorm(logits, x: PositionInputs, _cfg, _teacher_logits):
    return L.topk_reverse_kl(logits, x.topk_ids, x.topk_logprobs, renormalize=False)


def _topk_tail(logits, x: PositionInputs, _cfg, _teacher_logits):
    return L.topk_reverse_kl_with_tail(logits, x.topk_ids, x.topk_logprobs)


def _topk_fkl(logits, x: PositionInputs, _cfg, _teacher_logits):
    return L.topk_forward_kl(logits, x.topk_ids, x.topk_logprobs)


def _full_rkl(logits, _x: PositionInputs, _cfg, teacher_logits):
    return L.full_reverse_kl(logits, jax.lax.stop_gradient(teacher_logits))


def _policy_gradient(logits, x: PositionInputs, cfg, advantage):
    return L.ppo_clip_loss(token_logprobs(logits, x.tokens), x.old_logprobs, advantage,
                           clip_eps=float(cfg.clip_eps), dual_clip=cfg.dual_clip)


def _vopd(logits, x: PositionInputs, cfg, teacher_logits):
    kl = L.full_reverse_kl(logits, jax.lax.stop_gradient(teacher_logits))
    return _policy_gradient(logits, x, cfg, L.sampled_token_advantage(x.old_logprobs, x.teacher_sampled,
                                                                      kl_baseline=kl))


def _vopd_topk(logits, x: PositionInputs, cfg, _teacher_logits):
    kl = L.topk_reverse_kl(logits, x.topk_ids, x.topk_logprobs, renormalize=False)
    return _policy_gradient(logits, x, cfg, L.sampled_token_advantage(x.old_logprobs, x.teacher_sampled,
                                                                      kl_baseline=kl))


def _power_opd(logits, x: PositionInputs, cfg, _teacher_logits):
    alpha = float(cfg.box_cox_alpha)
    return _policy_gradient(logits, x, cfg, L.sampled_token_advantage(x.old_logprobs, x.teacher_sampled,
                                                                      reward="box_cox", alpha=alpha))


def _constant_negative(logits, x: PositionInputs, cfg, _teacher_logits):
    value = float(cfg.constant_advantage)
    return _policy_gradient(logits, x, cfg, L.constant_advantage(x.old_logprobs, value))


def _stop_grad_topk(logits, x: PositionInputs, _cfg, _teacher_logits):
    return L.stop_gradient_topk_reverse_kl(logits, x.topk_ids, x.topk_logprobs)


def _support_v2(logits, x: PositionInputs, cfg, teacher_logits):
    ids, logq = L.student_topk_support(logits, jax.lax.stop_gradient(teacher_logits), int(cfg.k))
    return L.union_sampled_reverse_kl(logits, ids, logq, x.tokens, x.teacher_sampled)


def _support_v3(logits, x: PositionInputs, _cfg, _teacher_logits):
    return L.union_sampled_reverse_kl(logits, x.topk_ids, x.topk_logprobs, x.tokens, x.teacher_sampled)


def _support_v4(logits, x: PositionInputs, cfg, teacher_logits):
    ids, logq = L.student_topk_support(logits, jax.lax.stop_gradient(teacher_logits), int(cfg.k))
    return L.ema_pg_loss(logits, ids, logq, x.tokens, x.old_logprobs, x.teacher_sampled,
                         is_clip=cfg.is_clip)


def _support_v5(logits, x: PositionInputs, cfg, _teacher_logits):
    return L.ema_pg_loss(logits, x.topk_ids, x.topk_logprobs, x.tokens, x.old_logprobs, x.teacher_sampled,
                         is_clip=cfg.is_clip)


REGISTRY: dict[str, Objective] = {o.name: o for o in (
    Objective("sampled_token", _sampled_token, "sampled", 1.0,
              "advantage log q(y) − log π_old(y) in the PPO clipped surrogate (the paper's baseline)"),
    Objective("lsm", _lsm, "topk", 0.9,
              "teacher top-K local support matching: reverse KL renormalized over the teacher's top-K (Eq. 6-8)"),
    Objective("lsm_no_renorm", _lsm_no_renorm, "topk", 0.9,
              "the top-K partial sum of the reverse KL, full-vocabulary probabilities (Fig. 6a ablation)"),
    Objective("topk_tail", _topk_tail, "topk", 0.9, "reverse KL over K support bins plus one tail bin"),
    Objective("topk_fkl", _topk_fkl, "topk", 0.9, "forward KL truncated to the teacher's top-K, unnormalized"),
    Objective("full_rkl", _full_rkl, "logits", 0.9, "exact full-vocabulary reverse KL (Eq. 4)"),
    Objective("vopd", _vopd, "logits", 1.0,
              "vOPD: sampled-token advantage + full-vocabulary KL(π‖q) as a detached value baseline (2605.07865)"),
    Objective("vopd_topk", _vopd_topk, "topk", 1.0,
              "vOPD with the baseline's KL as a partial sum over the teacher's top-K (2605.07865)"),
    Objective("power_opd", _power_opd, "sampled", 1.0,
              "PowerOPD: bounded Box-Cox reward (q^α − π^α)/α as the sampled-token advantage (2606.17199)"),
    Objective("constant_negative", _constant_negative, "sampled", 1.0,
              "control: a constant negative advantage in place of the teacher's log ratio (2608.31046)"),
    Objective("stop_grad_topk", _stop_grad_topk, "topk", 0.9,
              "top-K partial sum of the reverse KL with the log ratio detached (2605.11182)"),
    Objective("support_v2", _support_v2, "logits", 0.9,
              "V2: reverse KL renormalized over the student's top-K ∪ {y_t} (App. G.3)"),
    Objective("support_v3", _support_v3, "topk", 0.9,
              "V3: reverse KL renormalized over the teacher's top-K ∪ {y_t} (App. G.3)"),
    Objective("support_v4", _support_v4, "logits", 0.9,
              "V4: EMA-PG head (student top-K partial sum) + REINFORCE tail for y_t outside it (App. G.3)"),
    Objective("support_v5", _support_v5, "topk", 0.9,
              "V5: EMA-PG head (teacher top-K partial sum) + REINFORCE tail for y_t outside it (App. G.3)"),
)}

NAMES = tuple(REGISTRY)


def get(name: str) -> Objective:
    """The registered objective `name`; ValueError (one line) naming the choices otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"loss.name: expected one of {', '.join(NAMES)}, got {name!r}")
    return REGISTRY[name]
