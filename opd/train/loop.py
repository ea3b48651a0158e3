"""The OPD training loop: per step, sample G rollouts per prompt from the student, score them with the
frozen teacher, update the student with the configured objective, log one metrics row.

Each hot stage is its own jitted function (sampler, teacher scoring, update) and is timed separately
(`time/sample_s`, `time/score_s`, `time/update_s`, each measured to `block_until_ready`).

Per-task teacher routing: `run_opd` takes `teachers: {task_name: teacher}`-style routing through
`TaskSpec`; a single-task run has one spec. A multi-task loop alternates specs per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx

from opd.train import evaluate as ev
from opd.train.opd_step import OPDStepper, build_batch


@dataclass
class TaskSpec:
    """One task, its frozen teacher, its prompt pool and held-out problems."""

    task: Any
    teacher: nnx.Module
    train_problems: list
    eval_problems: list
    max_new_tokens: int


def special_ids(tokenizer) -> list[int]:
    """The tokens masked at first occurrence (paper: '<', 'think', '<|im_end|>'): think markers and EOS."""
    ids = [getattr(tokenizer, n, None) for n in ("think_open_id", "think_close_id", "eos_id")]
    return [int(i) for i in ids if i is not None]


def _block(x):
    return jax.block_until_ready(x)


def run_opd(
    cfg: Any,
    student: nnx.Module,
    spec: TaskSpec,
    *,
    recorder=None,
    log: Callable[[str], None] = print,
    sample_fn=None,
    score_fn=None,
) -> dict[str, Any]:
    """Train `student` in place for cfg.steps; returns {'rows': [...], 'evals': {step: {...}}}."""
    from opd import sampling

    sample_fn = sample_fn or sampling.sample
    if score_fn is None:
        from opd.teacher import score as score_fn
    task, teacher = spec.task, spec.teacher
    tok = task.tokenizer
    top_p = float(cfg.loss.rollout_top_p if cfg.rollout.top_p is None else cfg.rollout.top_p)
    scfg = sampling.SamplingConfig(temperature=float(cfg.rollout.temperature), top_p=top_p, top_k=0,
                                   max_new_tokens=int(spec.max_new_tokens))
    k = int(cfg.loss.k)
    needs_teacher_logits = cfg.loss.name == "full_rkl"
    teacher_graphdef, teacher_state = (nnx.split(teacher) if needs_teacher_logits else (None, None))
    stepper = OPDStepper(student, cfg.loss, cfg.optimizer, teacher_graphdef=teacher_graphdef)
    sids = special_ids(tok)

    rng = jax.random.key(int(cfg.seed))
    prompt_rng = np.random.default_rng(int(cfg.seed))
    eval_rng = jax.random.key(int(cfg.eval_seed))  # same eval samples key for every run and step
    n_prompts, group = int(cfg.rollout.prompts_per_step), int(cfg.rollout.group_size)
    steps = int(cfg.steps)
    rows: list[dict[str, Any]] = []
    evals: dict[int, dict[str, float]] = {}

    def do_eval(step: int) -> dict[str, float]:
        out = ev.evaluate(student, task, spec.eval_problems, eval_rng, max_new_tokens=spec.max_new_tokens,
                          batch_size=min(int(cfg.get("eval_batch_size", 32)), len(spec.eval_problems)))
        evals[step] = out
        return out

    for step in range(1, steps + 1):
        idx = prompt_rng.integers(0, len(spec.train_problems), n_prompts)
        prompts = [spec.train_problems[i].prompt for i in idx for _ in range(group)]
        prompt_BxP, mask_BxP = ev.encode_prompts(task, prompts)
        rng, key = jax.random.split(rng)

        t0 = time.perf_counter()
        rollout = _block(sample_fn(student, prompt_BxP, mask_BxP, key, scfg, eos_id=tok.eos_id))
        t1 = time.perf_counter()
        payload = _block(score_fn(teacher, rollout.tokens_BxL, rollout.attention_mask_BxL, k))
        t2 = time.perf_counter()
        batch = build_batch(rollout, payload, special_ids=sids, mask_special_tokens=bool(cfg.loss.mask_special_tokens))
        metrics = _block(stepper.update(batch, teacher_state))
        t3 = time.perf_counter()

        row = {k_: float(v) for k_, v in metrics.items()}
        row.update({
            "response_len": float(np.mean(np.asarray(rollout.response_len_B))),
            "truncated_frac": float(np.mean(np.asarray(rollout.truncated_B))),
            "time/sample_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2,
        })
        if step % int(cfg.eval_every) == 0 or step == steps:
            row.update(do_eval(step))
        rows.append(row)
        if recorder is not None:
            recorder.log(step, **row)
        if step % int(cfg.log_every) == 0 or step == steps or "eval/accuracy" in row:
            msg = (f"[opd {cfg.loss.name}] step {step}/{steps} loss {row['loss']:.4f} "
                   f"gap {row['logprob_gap']:+.3f} len {row['response_len']:.0f} "
                   f"out-of-topK {row['not_in_topk_frac']:.3f} "
                   f"({t1 - t0:.2f}/{t2 - t1:.2f}/{t3 - t2:.2f}s)")
            if "eval/accuracy" in row:
                msg += f" acc {row['eval/accuracy']:.3f} greedy {row['eval/greedy_accuracy']:.3f}"
            log(msg)
    return {"rows": rows, "evals": evals}
