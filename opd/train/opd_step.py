"""One OPD training step, split into its hot stages: sample (opd.sampling), score (opd.teacher), update.

The objective is built by `make_loss_fn(...) -> loss_fn(params, rest, batch, teacher_state) -> (loss, aux)`
and the step (`make_update_fn`) only does grad, AdamW update and metrics (style.md E3). The per-position
objective comes from the registry (opd/objectives.py), which calls one function of opd/losses.py each;
nothing here re-derives a divergence. An objective that needs the teacher's full logits (full_rkl) gets them
from a teacher forward *inside* the update, because the scoring payload never ships [B, L, V].

The teacher is frozen (style.md E5): it is not in the optimizer, its logits are under stop_gradient, and
its scoring runs in its own jitted function (opd.teacher.score).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from opd import diagnostics, objectives
from opd import losses as L
from opd.train.batch import Batch, build_batch, positions_from_mask  # noqa: F401  (re-exported)


def target_aligned_logits(model: nnx.Module, tokens_BxL, positions_BxL, attention_mask_BxL) -> jax.Array:
    """logits_BxLxV[b, t] = the distribution that *generated* tokens[b, t] (position 0: zeros, masked)."""
    logits_BxLxV = model(tokens_BxL, positions_BxT=positions_BxL, attention_mask_BxT=attention_mask_BxL)
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    return jnp.concatenate([jnp.zeros_like(logits_BxLxV[:, :1]), logits_BxLxV[:, :-1]], axis=1)


# ---------------------------------------------------------------------------------------------------------
# LOSS FACTORY
# ---------------------------------------------------------------------------------------------------------


def position_inputs(batch: Batch) -> objectives.PositionInputs:
    """The per-position view of a batch that every registered objective reads."""
    return objectives.PositionInputs(tokens=batch.tokens_BxL, old_logprobs=batch.old_logprobs_BxL,
                                     teacher_sampled=batch.teacher_sampled_BxL, topk_ids=batch.topk_ids_BxLxK,
                                     topk_logprobs=batch.topk_logprobs_BxLxK)


def per_position_loss(loss_cfg: Any, logits_BxLxV, batch: Batch, teacher_logits_BxLxV=None) -> jax.Array:
    """The configured objective at every position [B, L] (unmasked; the caller aggregates)."""
    objective = objectives.get(loss_cfg.name)
    if objective.teacher == "logits" and teacher_logits_BxLxV is None:
        raise ValueError(f"loss.name={objective.name} needs the teacher's full logits (pass teacher_state)")
    return objective.fn(logits_BxLxV, position_inputs(batch), loss_cfg, teacher_logits_BxLxV)


def make_loss_fn(student_graphdef, loss_cfg: Any, teacher_graphdef=None):
    """loss_fn(params, rest, batch, teacher_state) -> (loss, aux) for the student's nnx.Param `params`.

    aux holds the student-side diagnostics computed from the same forward pass (entropy, top-K mass)."""
    needs_teacher = objectives.get(loss_cfg.name).teacher == "logits"

    def loss_fn(params, rest, batch: Batch, teacher_state=None):
        student = nnx.merge(student_graphdef, params, rest)
        logits_BxLxV = target_aligned_logits(student, batch.tokens_BxL, batch.positions_BxL,
                                             batch.attention_mask_BxL)
        teacher_logits = None
        if needs_teacher:
            teacher = nnx.merge(teacher_graphdef, teacher_state)
            teacher_logits = jax.lax.stop_gradient(target_aligned_logits(
                teacher, batch.tokens_BxL, batch.positions_BxL, batch.attention_mask_BxL))
        per_BxL = per_position_loss(loss_cfg, logits_BxLxV, batch, teacher_logits)
        loss = L.aggregate(per_BxL, batch.loss_mask_BxL, loss_cfg.aggregation)
        sg_logits = jax.lax.stop_gradient(logits_BxLxV)
        aux = {
            "entropy": diagnostics.entropy(sg_logits, batch.response_mask_BxL),
            "student_topk_mass": diagnostics.student_topk_mass(sg_logits, batch.topk_ids_BxLxK,
                                                               batch.response_mask_BxL),
        }
        return loss, aux

    return loss_fn


# ---------------------------------------------------------------------------------------------------------
# UPDATE STEP
# ---------------------------------------------------------------------------------------------------------


def make_optimizer(student: nnx.Module, opt_cfg: Any) -> nnx.Optimizer:
    """AdamW (decoupled weight decay, optional linear warmup) after global-norm clipping, over the
    student's nnx.Param only."""
    # Optional linear warmup from 0 (paper: none): a fresh Adam state makes the first updates ~lr * sign(grad).
    # Measured on the default CPU student, warmup did not stop lr 3e-4 from degrading it (conf/optimizer).
    warmup = int(getattr(opt_cfg, "warmup_steps", 0) or 0)
    lr = optax.linear_schedule(0.0, opt_cfg.lr, warmup) if warmup > 0 else opt_cfg.lr
    tx = optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip),
        optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay),
    )
    return nnx.Optimizer(student, tx, wrt=nnx.Param)


def _slice_batch(batch: Batch, i: int, n: int) -> Batch:
    size = batch.tokens_BxL.shape[0] // n
    return jax.tree.map(lambda x: x[i * size:(i + 1) * size], batch)


def make_update_fn(graphdef, student_graphdef, loss_fn, minibatches: int = 1):
    """Jitted update(state, batch, teacher_state) -> (state, metrics).

    `state`/`graphdef` come from nnx.split((student, optimizer)). The batch is cut into `minibatches`
    equal slices along B, one optimizer step each (paper: 2); metrics average over them."""

    @jax.jit
    def update(state, batch: Batch, teacher_state=None):
        student, optimizer = nnx.merge(graphdef, state)
        sums: dict[str, jax.Array] = {}
        for i in range(minibatches):
            mb = _slice_batch(batch, i, minibatches)
            _, params, rest = nnx.split(student, nnx.Param, ...)
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, mb, teacher_state)
            optimizer.update(student, grads)
            row = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
            sums = row if not sums else jax.tree.map(jnp.add, sums, row)
        metrics = {k: v / minibatches for k, v in sums.items()}
        metrics.update(diagnostics.rollout_diagnostics(
            batch.tokens_BxL, batch.response_mask_BxL, batch.old_logprobs_BxL, batch.teacher_sampled_BxL,
            batch.topk_ids_BxLxK, batch.topk_logprobs_BxLxK))
        return nnx.state((student, optimizer)), metrics

    return update


class OPDStepper:
    """Holds the student, its optimizer and the three jitted stages; `step(prompts, rng)` runs one step.

    The teacher is routed per call (`teacher=`), so a multi-task loop can pass each task's own teacher."""

    def __init__(self, student: nnx.Module, loss_cfg: Any, opt_cfg: Any, *, teacher_graphdef=None):
        self.student = student
        self.loss_cfg = loss_cfg
        self.optimizer = make_optimizer(student, opt_cfg)
        self.graphdef, self.state = nnx.split((student, self.optimizer))
        student_graphdef = nnx.split(student, nnx.Param, ...)[0]
        self.loss_fn = make_loss_fn(student_graphdef, loss_cfg, teacher_graphdef)
        self.update_fn = make_update_fn(self.graphdef, student_graphdef, self.loss_fn,
                                        int(opt_cfg.minibatches_per_step))

    def update(self, batch: Batch, teacher_state=None) -> dict[str, jax.Array]:
        self.state, metrics = self.update_fn(self.state, batch, teacher_state)
        nnx.update((self.student, self.optimizer), self.state)  # the sampler reads the module
        return metrics
