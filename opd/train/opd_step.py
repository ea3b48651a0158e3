"""One OPD training step, split into its hot stages: sample (opd.sampling), score (opd.teacher), update.

The objective is built by `make_loss_fn(...) -> loss_fn(params, rest, batch, teacher_state) -> (loss, aux)`
and the step (`make_update_fn`) only does grad, AdamW update and metrics (style.md E3). The per-position
objective comes from the registry (opd/objectives.py), which calls one function of opd/losses.py each;
nothing here re-derives a divergence.

The loss runs on the student's final hidden states and LM-head weight through `opd.chunked.chunked_map`:
with `chunk_size` the logits exist one chunk of positions at a time ([B, chunk, V], recomputed in the
backward pass), never as [B, L, V] for the whole batch; with None they are one block (the reference). The
registry's per-position function and the student-side diagnostics (entropy, top-K mass, PPO clip activity)
run on each chunk. An objective that needs the teacher's full logits (full_rkl) gets the teacher's hidden
states from a teacher forward *inside* the update, as an extra LM head of the same chunks, because the
scoring payload never ships [B, L, V].

Scale: the jitted update takes its shardings from opd/sharding.py — train state by the parameter rules, the
batch over ("data", "fsdp") — and donates the train state. `mesh=None` is a one-device mesh, the same
program.

The teacher is frozen (style.md E5): it is not in the optimizer, its logits are under stop_gradient, and
its scoring runs in its own jitted function (opd.teacher.score).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from opd import chunked, diagnostics, objectives, sharding
from opd import losses as L
from opd.teacher import lm_head_over
from opd.train.batch import Batch, build_batch, positions_from_mask  # noqa: F401  (re-exported)


def target_aligned_hidden(model: nnx.Module, tokens_BxL, positions_BxL, attention_mask_BxL) -> jax.Array:
    """h_BxLxD[b, t] = the final hidden state whose LM-head logits *generated* tokens[b, t] (position 0:
    zeros, whose logits are zeros; it is masked)."""
    h_BxLxD = model.hidden_states(tokens_BxL, positions_BxT=positions_BxL, attention_mask_BxT=attention_mask_BxL)
    return jnp.concatenate([jnp.zeros_like(h_BxLxD[:, :1]), h_BxLxD[:, :-1]], axis=1)


def target_aligned_logits(model: nnx.Module, tokens_BxL, positions_BxL, attention_mask_BxL) -> jax.Array:
    """logits_BxLxV[b, t] = the distribution that *generated* tokens[b, t] (position 0: zeros, masked).
    The full [B, L, V] block: for tests and small references, not the update."""
    h_BxLxD = target_aligned_hidden(model, tokens_BxL, positions_BxL, attention_mask_BxL)
    return chunked.lm_head_logits(h_BxLxD, model.lm_head_weight())


# ---------------------------------------------------------------------------------------------------------
# LOSS FACTORY
# ---------------------------------------------------------------------------------------------------------


def position_inputs(batch: Batch) -> objectives.PositionInputs:
    """The per-position view of a batch that every registered objective reads."""
    return objectives.PositionInputs(tokens=batch.tokens_BxL, old_logprobs=batch.old_logprobs_BxL,
                                     teacher_sampled=batch.teacher_sampled_BxL, topk_ids=batch.topk_ids_BxLxK,
                                     topk_logprobs=batch.topk_logprobs_BxLxK)


def at_each_position(reducer, *args_x: jax.Array) -> jax.Array:
    """A diagnostics reducer (a masked mean over positions, opd.diagnostics) evaluated at every position
    on its own: per-position values with the arguments' leading axes, to be reduced after chunking."""
    lead = args_x[0].shape[:-1]
    flat = [a.reshape((-1, *a.shape[len(lead):])) for a in args_x]
    return jax.vmap(reducer)(*flat, jnp.ones(flat[0].shape[:1], jnp.float32)).reshape(lead)


def ppo_clip_active(logprobs_x, old_logprobs_x, advantages_x, *, clip_eps: float, dual_clip) -> jax.Array:
    """1.0 where a clip of `losses.ppo_clip_loss` is active (its gradient in log π is exactly 0 though the
    advantage is not), else 0.0: read off the one implementation of the surrogate, not re-derived."""
    grad_x = jax.grad(lambda lp: L.ppo_clip_loss(lp, old_logprobs_x, advantages_x, clip_eps=clip_eps,
                                                 dual_clip=dual_clip).sum())(logprobs_x)
    return ((grad_x == 0) & (advantages_x != 0)).astype(jnp.float32)


def position_terms(objective: objectives.Objective, loss_cfg: Any, logits_xV, *rest) -> dict[str, jax.Array]:
    """Per-position objective and student-side diagnostics of one chunk (any leading axes).

    `rest` is the teacher's logits (objectives with teacher="logits" only) then the PositionInputs fields.
    clip_frac is the sampled-token objective's PPO clip activity at the current parameters (advantage
    log q − log π_old, the loss config's ε and dual clip), reported for every objective: 0 at a step's first
    minibatch (π = π_old), and how far the step's earlier minibatches moved π on the sampled tokens after it.
    """
    teacher_logits_xV = rest[0] if objective.teacher == "logits" else None
    x = objectives.PositionInputs(*rest[1:] if objective.teacher == "logits" else rest)
    sg_logits_xV = jax.lax.stop_gradient(logits_xV)
    advantage_x = L.sampled_token_log_ratio(x.old_logprobs, x.teacher_sampled)
    return {
        "loss": objective.fn(logits_xV, x, loss_cfg, teacher_logits_xV),
        "entropy": at_each_position(diagnostics.entropy, sg_logits_xV),
        "student_topk_mass": at_each_position(diagnostics.student_topk_mass, sg_logits_xV, x.topk_ids),
        "clip_frac": ppo_clip_active(objectives.token_logprobs(sg_logits_xV, x.tokens), x.old_logprobs,
                                     advantage_x, clip_eps=float(loss_cfg.clip_eps), dual_clip=loss_cfg.dual_clip),
    }


def head_layout(h_BxLxD: jax.Array, w_DxV: jax.Array, mesh: Mesh | None) -> tuple[jax.Array, jax.Array]:
    """Hidden states split over the batch axes and the LM-head weight gathered over fsdp (vocabulary
    still split over tensor), so each device computes its rows' logits chunk by chunk; left to itself, the
    partitioner may instead split the hidden axis like the fsdp-sharded weight and replicate the logits."""
    if mesh is None:
        return h_BxLxD, w_DxV
    h_spec = sharding.fit_spec(P(sharding.BATCH_AXES), h_BxLxD.shape, mesh)
    w_spec = sharding.fit_spec(P(None, "tensor"), w_DxV.shape, mesh)
    return (jax.lax.with_sharding_constraint(h_BxLxD, NamedSharding(mesh, h_spec)),
            jax.lax.with_sharding_constraint(w_DxV, NamedSharding(mesh, w_spec)))


def make_loss_fn(student_graphdef, loss_cfg: Any, teacher_graphdef=None, *, chunk_size: int | None = None,
                 mesh: Mesh | None = None):
    """loss_fn(params, rest, batch, teacher_state) -> (loss, aux) for the student's nnx.Param `params`.

    aux holds the student-side diagnostics of the same forward pass (entropy, student_topk_mass, clip_frac),
    masked means over the response tokens. `chunk_size`: sequence positions per chunk (None: one block).
    `mesh` (inside the sharded update only): lay the LM-head inputs out as `head_layout` says."""
    objective = objectives.get(loss_cfg.name)
    chunked.check_chunk_size(chunk_size)
    needs_teacher = objective.teacher == "logits"
    terms = functools.partial(position_terms, objective, loss_cfg)

    def loss_fn(params, rest, batch: Batch, teacher_state=None):
        if needs_teacher and (teacher_graphdef is None or teacher_state is None):
            raise ValueError(f"loss.name={objective.name} needs the teacher's full logits "
                             "(pass teacher_graphdef and teacher_state)")
        student = nnx.merge(student_graphdef, params, rest)
        args = (batch.tokens_BxL, batch.positions_BxL, batch.attention_mask_BxL)
        heads = ()
        if needs_teacher:
            teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_state))
            w_t = lm_head_over(teacher, student.cfg.vocab_size)  # a teacher's padded rows are not the student's
            heads = (head_layout(target_aligned_hidden(teacher, *args), w_t, mesh),)
        h_BxLxD, w_DxV = head_layout(target_aligned_hidden(student, *args), student.lm_head_weight(), mesh)
        per = chunked.chunked_map(terms, h_BxLxD, w_DxV, *position_inputs(batch), chunk_size=chunk_size,
                                  extra_heads=heads)
        loss = L.aggregate(per.pop("loss"), batch.loss_mask_BxL, loss_cfg.aggregation)
        return loss, {k: diagnostics.masked_mean(v, batch.response_mask_BxL) for k, v in per.items()}

    return loss_fn


# ---------------------------------------------------------------------------------------------------------
# UPDATE STEP
# ---------------------------------------------------------------------------------------------------------


def make_optimizer(student: nnx.Module, opt_cfg: Any, *, skip_nonfinite: bool = False) -> nnx.Optimizer:
    """AdamW (decoupled weight decay, optional linear warmup) after global-norm clipping, over the
    student's nnx.Param only. `skip_nonfinite`: an update whose gradient holds NaN/inf is not applied."""
    # Optional linear warmup from 0 (paper: none): a fresh Adam state makes the first updates ~lr * sign(grad).
    warmup = int(getattr(opt_cfg, "warmup_steps", 0) or 0)
    lr = optax.linear_schedule(0.0, opt_cfg.lr, warmup) if warmup > 0 else opt_cfg.lr
    tx = optax.chain(
        optax.clip_by_global_norm(opt_cfg.grad_clip),
        optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay),
    )
    if skip_nonfinite:  # parameters and moments stay untouched; the loop logs the step as skipped
        tx = optax.apply_if_finite(tx, max_consecutive_errors=10**9)
    return nnx.Optimizer(student, tx, wrt=nnx.Param)


def _split_minibatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B / n, ...]: minibatch i is rows i·B/n .. (i + 1)·B/n − 1."""
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n, *x.shape[1:])), batch)


def make_update_fn(graphdef, loss_fn, minibatches: int, mesh: Mesh, state_shardings, teacher_shardings=None):
    """Jitted update(state, batch, teacher_state) -> (state, metrics), train state donated.

    `state`/`graphdef` come from nnx.split((student, optimizer)); `state_shardings` place it
    (sharding.state_shardings), the batch is split over the mesh's batch axes. The batch is cut into
    `minibatches` equal slices along B, one optimizer step each (paper: 2), as a scan (one compiled body
    whatever the count); every slice is split over the batch axes, so each device works on every minibatch.
    π_old is the batch's recorded `old_logprobs_BxL` throughout, so from the second minibatch on the PPO
    ratio is not 1. Metrics average over the minibatches."""
    slices_sharding = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

    def update(state, batch: Batch, teacher_state=None):
        def one_minibatch(state, mb: Batch):
            student, optimizer = nnx.merge(graphdef, state)
            _, params, rest = nnx.split(student, nnx.Param, ...)
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, mb, teacher_state)
            optimizer.update(student, grads)
            return nnx.state((student, optimizer)), {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

        slices = jax.lax.with_sharding_constraint(_split_minibatches(batch, minibatches), slices_sharding)
        state, rows = jax.lax.scan(one_minibatch, state, slices)
        metrics = {k: jnp.mean(v) for k, v in rows.items()}
        metrics.update(diagnostics.rollout_diagnostics(
            batch.tokens_BxL, batch.response_mask_BxL, batch.old_logprobs_BxL, batch.teacher_sampled_BxL,
            batch.topk_ids_BxLxK, batch.topk_logprobs_BxLxK))
        return state, metrics

    return jax.jit(update, in_shardings=(state_shardings, sharding.batch_sharding(mesh), teacher_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def update_peak_bytes(fn, state, batch: Batch, teacher_state) -> int | None:
    """Peak memory of one update, per device, from XLA's buffer assignment of the compiled program: arguments
    + outputs + temporaries - buffers aliased by donation. Measured on every backend (a CPU has no allocator
    statistics); after the update has run once, lowering the same arguments is a cache hit, not a compile."""
    stats = fn.lower(state, batch, teacher_state).compile().memory_analysis()
    if stats is None:  # a backend without the analysis
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


class OPDStepper:
    """Holds the student, its optimizer (their state placed on `mesh`) and the jitted update.

    `update(batch, teacher_state)` runs one training step and leaves the updated parameters in `student`
    (the sampler reads the module). `chunk_size` (sequence positions per chunk, None: unchunked; see
    opd.chunked.resolve_chunk_size for the default policy) chunks the objective. The teacher is routed
    per call: `teacher_state` (and, for a route whose teacher has another architecture, `teacher_graphdef`)
    is passed to `update`; only objectives with teacher="logits" read it."""

    def __init__(self, student: nnx.Module, loss_cfg: Any, opt_cfg: Any, *, mesh: Mesh | None = None,
                 chunk_size: int | None = None, teacher_graphdef=None, skip_nonfinite: bool = False):
        self.objective = objectives.get(loss_cfg.name)
        chunked.check_chunk_size(chunk_size)
        minibatches = opt_cfg.minibatches_per_step
        if not isinstance(minibatches, int) or isinstance(minibatches, bool) or minibatches < 1:
            raise ValueError(f"optimizer.minibatches_per_step: expected a positive integer, got {minibatches!r}")
        self.student, self.loss_cfg, self.chunk_size, self.minibatches = student, loss_cfg, chunk_size, minibatches
        self.mesh = sharding.make_mesh(1, 1, 1) if mesh is None else mesh
        self.optimizer = make_optimizer(student, opt_cfg, skip_nonfinite=skip_nonfinite)
        self.graphdef, state = nnx.split((student, self.optimizer))
        self.state_shardings = sharding.state_shardings(state, self.mesh)
        self.state = jax.device_put(state, self.state_shardings)
        nnx.update((student, self.optimizer), self.state)
        self.student_graphdef = nnx.split(student, nnx.Param, ...)[0]
        self.teacher_graphdef = teacher_graphdef
        self.loss_fn = make_loss_fn(self.student_graphdef, loss_cfg, teacher_graphdef, chunk_size=chunk_size)
        self._update_fns: dict[Any, Any] = {}
        self._teachers: dict[int, tuple[Any, Any]] = {}
        self._peak_bytes: dict[Any, int | None] = {}

    def _update_fn(self, teacher_graphdef, teacher_state):
        leaves = jax.tree.leaves(teacher_state)
        key = (teacher_graphdef, jax.tree.structure(teacher_state), tuple(jnp.shape(x) for x in leaves))
        if key not in self._update_fns:
            loss_fn = make_loss_fn(self.student_graphdef, self.loss_cfg, teacher_graphdef, chunk_size=self.chunk_size,
                                   mesh=self.mesh)
            t_sh = None if teacher_state is None else sharding.state_shardings(teacher_state, self.mesh)
            self._update_fns[key] = (make_update_fn(self.graphdef, loss_fn, self.minibatches, self.mesh,
                                                    self.state_shardings, t_sh), t_sh)
        return self._update_fns[key]

    def load_state(self, state) -> None:
        """Replace the train state (student + optimizer), e.g. from a checkpoint, placed on the mesh."""
        self.state = jax.device_put(state, self.state_shardings)
        nnx.update((self.student, self.optimizer), self.state)

    def _placed_teacher(self, teacher_state, shardings):
        """The teacher state on the mesh, placed once per state object (a route passes the same one each
        step; placing it again would copy a large teacher every step)."""
        cached = self._teachers.get(id(teacher_state))
        if cached is None or cached[0] is not teacher_state:
            cached = self._teachers[id(teacher_state)] = (teacher_state, jax.device_put(teacher_state, shardings))
        return cached[1]

    def update(self, batch: Batch, teacher_state=None, *, teacher_graphdef=None) -> dict[str, jax.Array]:
        """One training step on `batch`; returns the metrics (device scalars, replicated) and the update's
        peak memory per device (`update_peak_bytes`, an int; see update_peak_bytes)."""
        sharding.check_batch_divisible(batch.tokens_BxL.shape[0], self.mesh, "batch (rollouts per step)",
                                       self.minibatches)
        teacher_graphdef = self.teacher_graphdef if teacher_graphdef is None else teacher_graphdef
        if self.objective.teacher != "logits":
            teacher_graphdef, teacher_state = None, None  # not read: neither placed nor traced
        elif teacher_graphdef is None or teacher_state is None:
            raise ValueError(f"loss.name={self.objective.name} needs the teacher's full logits "
                             "(pass teacher_graphdef and teacher_state)")
        fn, t_sh = self._update_fn(teacher_graphdef, teacher_state)
        batch = jax.device_put(batch, sharding.batch_sharding(self.mesh))
        if teacher_state is not None:
            teacher_state = self._placed_teacher(teacher_state, t_sh)
        self.state, metrics = fn(self.state, batch, teacher_state)
        nnx.update((self.student, self.optimizer), self.state)  # the sampler reads the module
        shapes = (id(fn), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)))
        if shapes not in self._peak_bytes:
            self._peak_bytes[shapes] = update_peak_bytes(fn, self.state, batch, teacher_state)
        peak = self._peak_bytes[shapes]
        return metrics if peak is None else {**metrics, "update_peak_bytes": peak}
