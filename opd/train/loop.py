"""The OPD training loop, one for every run.

A run is a list of routes `{task, teacher, token mapping}`: a single-task run is one route, a multi-task run
alternates routes one per step (paper §6). Every step is the same five stages, each a function:

    sample   route.task.rollout(student, items)         -> Rollouts (one turn or many; π_old recorded), cut
             to the longest row by trim_padding (rollout.pad_multiple)
    score    the route's frozen teacher on the rollouts  -> TeacherPayload (top-K, or via a token mapping)
    mask     build_batch                                -> Batch (response only; optional special-token mask)
    update   OPDStepper.update (objective from the registry, AdamW over the student's parameters)
    row      one metrics row (task-agnostic names, plus the route's name under "task")

The loop never asks which task it holds; everything task-specific lives behind the Task protocol
(opd/tasks/common.py). Each hot stage is timed to `block_until_ready`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd import failure_modes as fm
from opd import objectives
from opd.cli import RunHaltedError, progress_bar
from opd.train import evaluate as ev
from opd.train.batch import build_batch, trim_padding


@dataclass
class Route:
    """One task, its frozen teacher, how the teacher's vocabulary relates to the student's, and its items."""

    name: str
    task: Any  # a Task (opd.tasks.common) in the *student's* tokenizer
    teacher: nnx.Module
    mapping: Any = None  # opd.tasks.TokenMapping; None = same vocabulary
    train_items: list = field(default_factory=list)
    eval_items: list = field(default_factory=list)

    @property
    def mapped(self) -> bool:
        return self.mapping is not None and not self.mapping.is_identity


def rollout_top_p(cfg: Any) -> float:
    """The effective rollout top-p: rollout.top_p when set, else the loss config's `rollout_top_p`.

    The loss config, not the objective's registry entry: a loss preset may pair an objective with another
    rollout top-p than the paper's (conf/loss/lsm_top_p1.yaml, table3's swapped cells), and the tables label
    a job by that value. The registry's pairing is what each objective's own preset sets (tests/test_configs.py).
    """
    top_p = cfg.rollout.top_p
    return float(cfg.loss.rollout_top_p if top_p is None else top_p)


# ---------------------------------------------------------------------------------------------------------
# STAGES
# ---------------------------------------------------------------------------------------------------------


def run_sampler(cfg: Any, sample_fn=None):
    """The sampler every rollout of a run goes through (its OPD batches and its evaluations): `sample_fn`
    (default `opd.sampling.sample`) at the run's `rollout.first_window`."""
    from opd import sampling

    return sampling.with_first_window(int(cfg.rollout.first_window), sample_fn)


def sample_stage(student, route: Route, items: list, key, cfg: Any, sample_fn=None):
    return route.task.rollout(student, items, key, temperature=float(cfg.rollout.temperature),
                              top_p=rollout_top_p(cfg), sample_fn=sample_fn)


@nnx.jit
def _forward_logprobs(model, tokens_BxL, attention_mask_BxL):
    from opd.model import forward_logprobs

    return forward_logprobs(model, tokens_BxL, attention_mask_BxL)


def score_mapped(teacher, mapping, tokens, attn, *, pad_to: int = 64) -> np.ndarray:
    """Teacher log-prob of each student token through a declared mapping: [B, L] in student positions.

    The batch is re-spelled in the teacher's vocabulary (`mapping.map_batch`), scored in one teacher forward
    pass (width rounded up to a multiple of `pad_to` to bound recompiles), and each student token gets the
    sum of its teacher pieces' target-aligned log-probs (position 0, without context, gets 0)."""
    t_tok, t_mask, owner = mapping.map_batch(tokens, attn)
    width = -(-t_tok.shape[1] // pad_to) * pad_to
    t_tok = np.pad(t_tok, ((0, 0), (0, width - t_tok.shape[1])))
    t_mask = np.pad(t_mask, ((0, 0), (0, width - t_mask.shape[1])))
    owner = np.pad(owner, ((0, 0), (0, width - owner.shape[1])), constant_values=-1)
    t_lp = np.asarray(_forward_logprobs(teacher, jnp.asarray(t_tok), jnp.asarray(t_mask)), np.float64)
    out = np.zeros(np.shape(tokens), np.float64)
    rows, cols = np.nonzero(owner >= 0)
    np.add.at(out, (rows, owner[rows, cols]), t_lp[rows, cols])
    return out.astype(np.float32)


def score_stage(route: Route, rollouts, k: int, score_fn=None, *, chunk_size: int | None = None, mesh=None,
                vocab_size: int | None = None):
    """The teacher's payload for the rollouts. A mapped teacher (another vocabulary) supplies only the
    sampled-token log-prob; its top-K fields are zeros (the config check allows only objectives that need
    no more). `vocab_size`: the student's, when the teacher's head is padded past it (opd.teacher.score)."""
    from opd.teacher import TeacherPayload

    if route.mapped:
        sampled = score_mapped(route.teacher, route.mapping, rollouts.tokens, rollouts.attention_mask)
        zeros_ids = np.zeros(sampled.shape + (k,), np.int32)
        return TeacherPayload(topk_ids_BxLxK=zeros_ids, topk_logprobs_BxLxK=zeros_ids.astype(np.float32),
                              sampled_logprobs_BxL=sampled)
    if score_fn is None:
        from opd.teacher import score as score_fn
    return score_fn(route.teacher, jnp.asarray(rollouts.tokens), jnp.asarray(rollouts.attention_mask), k,
                    chunk_size=chunk_size, mesh=mesh, vocab_size=vocab_size)


def step_row(metrics: dict, rollouts, batch, route: Route) -> dict[str, Any]:
    """One metrics row from the update's metrics and the rollouts (names the same for every task)."""
    row = {k: float(v) for k, v in metrics.items()}
    if route.mapped:  # top-K diagnostics are meaningless without a top-K in the student's vocabulary
        for k in ("not_in_topk_frac", "teacher_topk_mass", "student_topk_mass"):
            row.pop(k, None)
    resp = np.asarray(rollouts.response_mask) > 0
    masked_out = resp & (np.asarray(batch.loss_mask_BxL) == 0)
    ratio = np.asarray(batch.teacher_sampled_BxL) - np.asarray(batch.old_logprobs_BxL)
    row.update({
        "task": route.name,
        "train_score": float(np.mean(rollouts.score)),
        "response_len": float(np.mean(rollouts.response_len)),
        "truncated_frac": float(np.mean(rollouts.truncated)),
        # the sampled-token reward the special-token mask removes, per rollout (failure mode 3)
        "masked_reward_sum": float(ratio[masked_out].sum()) / len(rollouts.score),
    })
    return row


# ---------------------------------------------------------------------------------------------------------
# THE LOOP
# ---------------------------------------------------------------------------------------------------------


class NonFiniteError(RunHaltedError):
    """The loss or the gradient became NaN/inf; the message names the step, the quantity and the last good
    checkpoint (which is intact: non-finite states are never checkpointed)."""


ON_NONFINITE = ("halt", "skip")


def run_opd(
    cfg: Any,
    student: nnx.Module,
    routes: list[Route],
    *,
    recorder=None,
    log: Callable[[str], None] = print,
    diagnostics_path: str | Path | None = None,
    mesh=None,
    chunk_size: int | None = None,
    run_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    run_config: dict[str, Any] | None = None,
    on_nonfinite: str = "halt",
    sample_fn=None,
    score_fn=None,
) -> dict[str, Any]:
    """Train `student` in place for cfg.steps steps, route `(step − 1) mod len(routes)` at each step.

    With `run_dir` and `checkpoint_every` > 0 the run state (student, optimizer, every key and cursor) is
    checkpointed every `checkpoint_every` steps (opd/train/resume.py), tagged with `run_config`; when
    `run_dir` already holds a checkpoint the run continues from it. A non-finite loss or gradient norm halts
    the run with NonFiniteError (`on_nonfinite="halt"`) or, with "skip", is logged and the update skipped
    (the optimizer then applies only finite updates).

    Returns {'rows': [...], 'evals': {step: {...}}, 'eval_items': {step: {route: per-item rows}},
    'records': failure-mode records}."""
    from opd.train import resume
    from opd.train.opd_step import OPDStepper

    objective = objectives.get(cfg.loss.name)
    sample_fn = run_sampler(cfg, sample_fn)
    # Only objectives that read the teacher's logits inside the update get its graph and weights there; each
    # route passes its own (teachers may differ in architecture).
    teachers = {r.name: nnx.split(r.teacher) if objective.teacher == "logits" else (None, None) for r in routes}
    stepper = OPDStepper(student, cfg.loss, cfg.optimizer, mesh=mesh, chunk_size=chunk_size,
                         skip_nonfinite=on_nonfinite == "skip")
    k = int(cfg.loss.k)
    rng = jax.random.key(int(cfg.seed))
    pick = np.random.default_rng(int(cfg.seed))
    eval_key = jax.random.key(int(cfg.eval_seed))  # the same eval draws for every run and step
    n_prompts, group = int(cfg.rollout.prompts_per_step), int(cfg.rollout.group_size)
    steps, diag_every = int(cfg.steps), int(cfg.diagnostics_every)
    rows: list[dict[str, Any]] = []
    evals: dict[int, dict[str, float]] = {}
    eval_items: dict[int, dict[str, list]] = {}
    records: list[dict[str, Any]] = []
    counts = {r.name: 0 for r in routes}
    start, last_checkpoint = 1, None
    if run_dir is not None and (checkpoint := resume.latest(run_dir)) is not None:
        state, saved = resume.restore(checkpoint, stepper.state)
        stepper.load_state(state)
        rng, counts, start = resume.key_from_json(saved["rng"]), saved["counts"], saved["step"] + 1
        pick.bit_generator.state = saved["pick"]
        last_checkpoint = checkpoint
        log(f"[resume] continuing after step {saved['step']} from {checkpoint}")

    def do_eval(step: int) -> dict[str, float]:
        out, items = {}, {}
        for r in routes:
            metrics, items[r.name] = ev.evaluate(
                student, r.task, r.eval_items, eval_key, samples=int(cfg.eval_samples),
                batch_size=min(int(cfg.eval_batch_size), len(r.eval_items)), prefix=f"eval/{r.name}/",
                sample_fn=sample_fn)
            out.update(metrics)
        evals[step], eval_items[step] = out, items
        return out

    bar = progress_bar(steps, initial=start - 1, desc=f"opd {cfg.loss.name}")
    for step in range(start, steps + 1):
        route = routes[(step - 1) % len(routes)]
        counts[route.name] += 1
        idx = pick.integers(0, len(route.train_items), n_prompts)
        items = [route.train_items[i] for i in idx for _ in range(group)]
        rng, key = jax.random.split(rng)

        t0 = time.perf_counter()
        rollouts = trim_padding(sample_stage(student, route, items, key, cfg, sample_fn),
                                int(cfg.rollout.pad_multiple))
        t1 = time.perf_counter()
        payload = jax.block_until_ready(score_stage(route, rollouts, k, score_fn, chunk_size=chunk_size, mesh=mesh,
                                                    vocab_size=student.cfg.vocab_size))
        t2 = time.perf_counter()
        batch = build_batch(rollouts, payload, special_ids=list(route.task.special_ids().values()),
                            mask_special_tokens=bool(cfg.loss.mask_special_tokens))
        graphdef, state = teachers[route.name]
        metrics = jax.block_until_ready(stepper.update(batch, state, teacher_graphdef=graphdef))
        t3 = time.perf_counter()

        bad = [k for k in ("loss", "grad_norm") if not np.isfinite(float(metrics[k]))]
        if bad and on_nonfinite == "halt":
            raise NonFiniteError(f"step {step} ({route.name}): non-finite {' and '.join(bad)} "
                                 f"({', '.join(f'{k}={float(metrics[k])}' for k in bad)}); rows up to step {step - 1} "
                                 f"are in metrics.jsonl; last good checkpoint: {last_checkpoint or 'none'}")
        row = step_row(metrics, rollouts, batch, route)
        row["skipped_update"] = float(bool(bad))
        row["rollout_top_p"] = rollout_top_p(cfg)  # what the rollouts used, beside the config that asked for it
        row.update({"task_step": counts[route.name],
                    "time/sample_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2})
        if step % int(cfg.eval_every) == 0 or step == steps:
            row.update(do_eval(step))
        if diag_every and (counts[route.name] == 1 or counts[route.name] % diag_every == 0
                           or step > steps - len(routes)):
            records.append({"step": step, "task_step": counts[route.name], "task": route.name,
                            **failure_mode_record(route, rollouts, batch, int(cfg.diag_bucket_size), seed=step)})
            if diagnostics_path is not None:
                from opd.results import to_jsonable

                Path(diagnostics_path).write_text(json.dumps(to_jsonable({"records": records})))
        rows.append(row)
        if recorder is not None:
            recorder.log(step, **row)
        if run_dir is not None and checkpoint_every and (step % checkpoint_every == 0 or step == steps):
            last_checkpoint = resume.save(
                run_dir, step, stepper.state, {"rng": resume.key_to_json(rng), "pick": pick.bit_generator.state,
                                               "counts": counts, "config": run_config}, keep=keep_checkpoints)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", task=route.name)
        if step % int(cfg.log_every) == 0 or step == steps or any(k_.startswith("eval/") for k_ in row):
            log(progress_line(cfg, step, steps, row, (t1 - t0, t2 - t1, t3 - t2)))
    bar.close()
    return {"rows": rows, "evals": evals, "eval_items": eval_items, "records": records}


def failure_mode_record(route: Route, rollouts, batch, bucket_size: int, *, seed: int) -> dict[str, Any]:
    tok = route.task.tokenizer
    return fm.failure_mode_record(
        rollouts.tokens, rollouts.response_mask, np.asarray(batch.old_logprobs_BxL),
        np.asarray(batch.teacher_sampled_BxL), None if route.mapped else np.asarray(batch.topk_ids_BxLxK),
        special_ids=route.task.special_ids(), bucket_size=bucket_size, id_to_token=tok.id_to_token, seed=seed)


def progress_line(cfg: Any, step: int, steps: int, row: dict[str, Any], times: tuple[float, float, float]) -> str:
    msg = (f"[opd {cfg.loss.name}] step {step}/{steps} {row['task']}: loss {row['loss']:.4f} "
           f"gap {row['logprob_gap']:+.3f} train {row['train_score']:.2f} len {row['response_len']:.0f} "
           f"({times[0]:.2f}/{times[1]:.2f}/{times[2]:.2f}s)")
    evs = [k for k in row if k.startswith("eval/")]
    if evs:
        msg += " | " + " ".join(f"{k[len('eval/'):]} {row[k]:.3f}" for k in evs)
    return msg
