"""Multi-task OPD (paper §6: batches alternate tasks, one task per step, each task routed to its own teacher).

One student, one optimizer, several routes `{task name: Route(task, teacher, mapping, ...)}`. Step s trains on
task `tasks[(s - 1) % len(tasks)]`: sample a group of rollouts from the student, score them with *that task's*
teacher, build the batch and apply the configured objective through the single-task trainer's own pieces
(`opd.train.opd_step.OPDStepper`, `build_batch`'s masking convention, `opd.teacher.score`,
`opd.sampling.sample`). Metrics are prefixed by task (`<task>/loss`, `<task>/teacher_kl`, `<task>/accuracy`
or `<task>/success`, ...) and failure-mode records (opd.failure_modes) are written to `diagnostics.json`.

Text world: a rollout alternates student turns and environment turns in one context (the whole context is
re-prefilled each turn, left-padded to a fixed width so the sampler compiles once); environment tokens have
response mask 0, so they never enter an objective or a diagnostic; the teacher scores the whole conversation
and only the student's tokens are used.

Teachers with another vocabulary (failure mode 3): a declared `TokenMapping` spells each student token in
the teacher's vocabulary; the teacher scores the mapped conversation and the log-prob of a student token is
the sum of its pieces' log-probs. Only the sampled-token objective is defined then (the teacher's top-K ids
live in its own vocabulary), and no top-K coverage is reported. A teacher whose vocabulary differs from the
student's without a declared mapping, and a task without a teacher, are refused before anything runs
(`check_routes`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import MISSING

from opd import failure_modes as fm
from opd import losses as L
from opd.train.config import LossConfig, OptimizerConfig, RolloutConfig, SFTConfig
from opd.train.opd_step import Batch, OPDStepper, positions_from_mask


@dataclass
class Route:
    """One task, its frozen teacher and how the teacher's vocabulary relates to the student's."""

    task: Any  # ArithmeticTask | TextWorldTask, in the *student's* tokenizer
    teacher: nnx.Module
    mapping: Any = None  # opd.tasks.TokenMapping; None or identity = same vocabulary
    train_items: list = field(default_factory=list)  # Problems (arithmetic) or episode seeds (textworld)
    eval_items: list = field(default_factory=list)

    @property
    def mapped(self) -> bool:
        return self.mapping is not None and not self.mapping.is_identity


def check_routes(tasks: list[str], teacher_tokenizers: dict[str, Any], student_tokenizer, mappings: dict[str, Any],
                 loss_name: str) -> dict[str, Any]:
    """Validate routing before training; returns {task: mapping-or-None}. Raises ValueError (one line) for a
    task without a configured teacher, a teacher vocabulary that differs without a declared mapping, or a
    mapped teacher with an objective that needs the teacher's top-K in the student's vocabulary."""
    from opd.tasks import require_compatible

    if not tasks:
        raise ValueError("tasks: expected at least one task name, got []")
    missing = [t for t in tasks if t not in teacher_tokenizers]
    if missing:
        raise ValueError(f"tasks: no teacher configured for task(s) {missing}; configured teachers: "
                         f"{sorted(teacher_tokenizers)}")
    out = {}
    for t in tasks:
        try:
            mapping = require_compatible(student_tokenizer, teacher_tokenizers[t], mappings.get(t))
        except ValueError as err:
            raise ValueError(f"teachers.{t}: {err}") from None
        if not mapping.is_identity and loss_name != "sampled_token":
            raise ValueError(f"teachers.{t}: a teacher with another vocabulary (declared token mapping) supports "
                             f"only loss=sampled_token (its top-K ids are not student ids), got loss={loss_name}")
        out[t] = None if mapping.is_identity else mapping
    return out


def special_id_map(tokenizer) -> dict[str, int]:
    """The special tokens the paper masks at first occurrence (think markers, EOS), by name."""
    names = {"think_open": "think_open_id", "think_close": "think_close_id", "eos": "eos_id"}
    return {k: int(getattr(tokenizer, a)) for k, a in names.items() if getattr(tokenizer, a, None) is not None}


# ---------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """Host arrays of one task's rollouts, target-aligned, right- or left-padded (positions from the mask)."""

    tokens: np.ndarray  # [B, L] int32
    attention_mask: np.ndarray  # [B, L]
    response_mask: np.ndarray  # [B, L] 1 exactly on student tokens
    response_len: np.ndarray  # [B] student tokens per row
    truncated: np.ndarray  # [B] bool: hit a length limit (arithmetic) / episode failed on a limit (textworld)
    score: np.ndarray  # [B] verifier score / episode success


def arithmetic_rollouts(student, task, problems, rng, scfg, *, sample_fn=None) -> RolloutBatch:
    from opd import sampling
    from opd.tasks import encode_prompts

    sample_fn = sample_fn or sampling.sample
    tok = task.tokenizer
    prompt_BxP, mask_BxP = encode_prompts(tok, [p.prompt for p in problems], task.max_prompt_len)
    out = sample_fn(student, jnp.asarray(prompt_BxP), jnp.asarray(mask_BxP), rng, scfg, eos_id=tok.eos_id)
    tokens, resp = np.asarray(out.tokens_BxL), np.asarray(out.response_mask_BxL)
    texts = [tok.decode(tokens[b][resp[b] > 0]) for b in range(len(problems))]
    return RolloutBatch(tokens=tokens, attention_mask=np.asarray(out.attention_mask_BxL), response_mask=resp,
                        response_len=np.asarray(out.response_len_B), truncated=np.asarray(out.truncated_B),
                        score=np.asarray([task.score(p, t) for p, t in zip(problems, texts)], np.float32))


def textworld_length(task) -> int:
    """Fixed width of a text-world batch: the token limit plus one more student turn. Every student token
    fits (a turn starts below the token limit); only the tail of the final observation can be cut."""
    return int(task.max_tokens + task.max_action_len)


def textworld_rollouts(student, task, seeds, rng, top_p: float, temperature: float = 1.0, *,
                       sample_fn=None) -> RolloutBatch:
    """Play one episode per seed with the student, all episodes batched turn by turn.

    Each turn re-prefills every unfinished conversation, left-padded to `task.max_tokens` (fixed, so one
    compile), samples at most `max_action_len` tokens stopping at EOT, and steps the environment. The result
    is the conversations right-padded to `textworld_length(task)` with response mask 1 on student tokens."""
    from opd import sampling
    from opd.tasks.textworld import Conversation  # noqa: F401  (documented type of the segments)

    sample_fn = sample_fn or sampling.sample
    tok = task.tokenizer
    scfg = sampling.SamplingConfig(temperature=float(temperature), top_p=float(top_p), top_k=0,
                                   max_new_tokens=int(task.max_action_len))
    width = int(task.max_tokens)
    games = [task.new_conversation(int(s)) for s in seeds]  # (state, conversation)
    states, convs = [g[0] for g in games], [g[1] for g in games]
    turn = 0
    while not all(s.done for s in states):
        ctx = np.zeros((len(seeds), width), np.int32)
        cmask = np.zeros((len(seeds), width), np.int32)
        for b, conv in enumerate(convs):
            ids = conv.tokens()[-width:]
            ctx[b, width - len(ids):] = ids
            cmask[b, width - len(ids):] = 1
        out = sample_fn(student, jnp.asarray(ctx), jnp.asarray(cmask), jax.random.fold_in(rng, turn), scfg,
                        eos_id=tok.eos_id, stop_ids=task.stop_ids)
        gen, gmask = np.asarray(out.tokens_BxL)[:, width:], np.asarray(out.response_mask_BxL)[:, width:]
        for b in range(len(seeds)):
            if states[b].done:
                continue
            ids = [int(t) for t in gen[b][gmask[b] > 0]]
            text, truncated = task.decode_action(ids)
            states[b], obs, _, _ = task.step(states[b], text, action_tokens=len(ids), truncated=truncated)
            convs[b].add(ids, True)
            convs[b].add(task.observation_ids(obs), False)
        turn += 1
    length = textworld_length(task)
    tokens = np.zeros((len(seeds), length), np.int32)
    resp = np.zeros((len(seeds), length), np.int32)
    attn = np.zeros((len(seeds), length), np.int32)
    for b, conv in enumerate(convs):
        ids, m = conv.tokens()[:length], conv.student_mask()[:length]
        tokens[b, :len(ids)], resp[b, :len(m)], attn[b, :len(ids)] = ids, m, 1
    resp[:, 0] = 0
    return RolloutBatch(tokens=tokens, attention_mask=attn, response_mask=resp, response_len=resp.sum(axis=1),
                        truncated=np.asarray([s.end_reason in ("turn_limit", "token_limit") for s in states]),
                        score=np.asarray([task.score(s) for s in states], np.float32))


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------


@nnx.jit
def _forward_logprobs(model, tokens_BxL, attention_mask_BxL):
    from opd.model import forward_logprobs

    return forward_logprobs(model, tokens_BxL, attention_mask_BxL)


def _student_logprobs(student, tokens, attn) -> np.ndarray:
    """π(y_t | c_t) under the student's unmodified softmax: the on-policy π_old of this step, recomputed in
    one forward pass over the finished rollout (for the text world the sampler saw it turn by turn)."""
    return np.asarray(_forward_logprobs(student, jnp.asarray(tokens), jnp.asarray(attn)))


def score_mapped(teacher, mapping, tokens, attn, *, pad_to: int = 64) -> np.ndarray:
    """Teacher log-prob of each student token through a declared mapping: [B, L] in student positions.

    The batch is re-spelled in the teacher's vocabulary (`mapping.map_batch`), scored in one teacher forward
    pass (width rounded up to a multiple of `pad_to` to bound recompiles), and each student token gets the
    sum of its teacher pieces' target-aligned log-probs. Positions whose first piece sits at teacher
    position 0 (no context) get 0, like every target-aligned array."""
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


def make_batch(rb: RolloutBatch, student_lp, teacher_lp, topk_ids, topk_lp, *, special_ids, mask_special: bool
               ) -> Batch:
    """The trainer's Batch for one task's rollouts (same masking convention as opd_step.build_batch)."""
    response = jnp.asarray(rb.response_mask, jnp.float32)
    loss_mask = response
    if mask_special and special_ids:
        response_tokens = jnp.where(response > 0, jnp.asarray(rb.tokens), -1)
        loss_mask = L.mask_first_occurrences(response_tokens, list(special_ids), response)
    attn = jnp.asarray(rb.attention_mask)
    return Batch(tokens_BxL=jnp.asarray(rb.tokens, jnp.int32), attention_mask_BxL=attn,
                 positions_BxL=positions_from_mask(attn), response_mask_BxL=response, loss_mask_BxL=loss_mask,
                 old_logprobs_BxL=jnp.asarray(student_lp, jnp.float32),
                 teacher_sampled_BxL=jnp.asarray(teacher_lp, jnp.float32),
                 topk_ids_BxLxK=jnp.asarray(topk_ids, jnp.int32), topk_logprobs_BxLxK=jnp.asarray(topk_lp, jnp.float32))


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def evaluate_route(student, route: Route, rng, *, top_p: float = 0.9, batch_size: int = 64) -> float:
    """Held-out pass@1 (arithmetic) or success rate (textworld), sampled with top-p 0.9, T = 1 (paper §6)."""
    from opd import sampling

    task, items, scores = route.task, route.eval_items, []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pad = chunk + [chunk[-1]] * (batch_size - len(chunk)) if len(items) > batch_size else chunk
        key = jax.random.fold_in(rng, start)
        if task.name == "textworld":
            rb = textworld_rollouts(student, task, pad, key, top_p)
        else:
            scfg = sampling.SamplingConfig(temperature=1.0, top_p=top_p, top_k=0,
                                           max_new_tokens=int(task.max_response_len))
            rb = arithmetic_rollouts(student, task, pad, key, scfg)
        scores.extend(rb.score[:len(chunk)].tolist())
    return float(np.mean(scores))


def metric_name(task) -> str:
    return "success" if task.name == "textworld" else "accuracy"


def run_multitask(cfg: Any, student: nnx.Module, routes: dict[str, Route], *, recorder=None,
                  diagnostics_path=None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `student` in place for cfg.steps steps alternating `cfg.tasks`; returns rows, evals, diagnostics.

    cfg needs: tasks, steps, seed, eval_every, log_every, diagnostics_every, diag_bucket_size, loss (name, k,
    mask_special_tokens, rollout_top_p, ...), rollout (prompts_per_step, group_size, temperature, top_p),
    optimizer (the trainer's OptimizerConfig)."""
    from opd import sampling
    from opd import teacher as teacher_mod
    from opd.results import to_jsonable

    tasks = list(cfg.tasks)
    stepper = OPDStepper(student, cfg.loss, cfg.optimizer)
    k = int(cfg.loss.k)
    top_p = float(cfg.loss.rollout_top_p if cfg.rollout.top_p is None else cfg.rollout.top_p)
    n_prompts, group = int(cfg.rollout.prompts_per_step), int(cfg.rollout.group_size)
    rng = jax.random.key(int(cfg.seed))
    pick = np.random.default_rng(int(cfg.seed))
    eval_key = jax.random.key(int(cfg.eval_seed))
    rows, evals, records = [], {}, []
    steps, diag_every = int(cfg.steps), int(cfg.diagnostics_every)
    counts = {t: 0 for t in tasks}

    def do_eval(step):
        out = {f"{t}/{metric_name(r.task)}": evaluate_route(student, r, eval_key) for t, r in routes.items()}
        evals[step] = out
        return out

    evals[0] = do_eval(0)
    log("[multitask] step 0 " + " ".join(f"{k_} {v:.3f}" for k_, v in evals[0].items()))
    for step in range(1, steps + 1):
        name = tasks[(step - 1) % len(tasks)]
        route = routes[name]
        task, tok = route.task, route.task.tokenizer
        counts[name] += 1
        idx = pick.integers(0, len(route.train_items), n_prompts)
        items = [route.train_items[i] for i in idx for _ in range(group)]
        rng, key = jax.random.split(rng)
        t0 = time.perf_counter()
        if task.name == "textworld":
            rb = textworld_rollouts(student, task, items, key, top_p, float(cfg.rollout.temperature))
        else:
            scfg = sampling.SamplingConfig(temperature=float(cfg.rollout.temperature), top_p=top_p, top_k=0,
                                           max_new_tokens=int(task.max_response_len))
            rb = arithmetic_rollouts(student, task, items, key, scfg)
        student_lp = _student_logprobs(student, rb.tokens, rb.attention_mask) * (rb.attention_mask > 0)
        t1 = time.perf_counter()
        if route.mapped:
            teacher_lp = score_mapped(route.teacher, route.mapping, rb.tokens, rb.attention_mask)
            topk_ids = np.zeros(rb.tokens.shape + (k,), np.int32)
            topk_lp = np.zeros(rb.tokens.shape + (k,), np.float32)
        else:
            payload = teacher_mod.score(route.teacher, jnp.asarray(rb.tokens), jnp.asarray(rb.attention_mask), k)
            teacher_lp = np.asarray(payload.sampled_logprobs_BxL)
            topk_ids, topk_lp = np.asarray(payload.topk_ids_BxLxK), np.asarray(payload.topk_logprobs_BxLxK)
        t2 = time.perf_counter()
        sids = special_id_map(tok)
        batch = make_batch(rb, student_lp, teacher_lp, topk_ids, topk_lp, special_ids=list(sids.values()),
                           mask_special=bool(cfg.loss.mask_special_tokens))
        metrics = jax.block_until_ready(stepper.update(batch))
        t3 = time.perf_counter()

        row = {f"{name}/{k_}": float(v) for k_, v in metrics.items()}
        if route.mapped:  # top-K diagnostics are meaningless without a top-K in the student's vocabulary
            for k_ in ("not_in_topk_frac", "teacher_topk_mass", "student_topk_mass"):
                row.pop(f"{name}/{k_}", None)
        m = rb.response_mask > 0
        gap = float((teacher_lp[m] - student_lp[m]).mean()) if m.any() else 0.0
        masked_out = (rb.response_mask > 0) & (np.asarray(batch.loss_mask_BxL) == 0)
        row.update({
            "task": name, f"{name}/task_step": counts[name],
            f"{name}/teacher_kl": -gap,  # token-mean sampled-token estimate of KL(π ‖ q)
            f"{name}/train_{metric_name(task)}": float(rb.score.mean()),
            f"{name}/response_len": float(rb.response_len.mean()),
            f"{name}/truncated_frac": float(rb.truncated.mean()),
            # the sampled-token reward mass the special-token mask removes (failure mode 3)
            f"{name}/masked_reward_sum": float((teacher_lp - student_lp)[masked_out].sum()) / len(items),
            f"{name}/time/sample_s": t1 - t0, f"{name}/time/score_s": t2 - t1, f"{name}/time/update_s": t3 - t2,
        })
        if step % int(cfg.eval_every) == 0 or step == steps:
            row.update(do_eval(step))
        if diag_every and (counts[name] == 1 or counts[name] % diag_every == 0 or step > steps - len(tasks)):
            rec = fm.failure_mode_record(rb.tokens, rb.response_mask, student_lp, teacher_lp,
                                         None if route.mapped else topk_ids, special_ids=sids,
                                         bucket_size=int(cfg.diag_bucket_size), id_to_token=tok.id_to_token,
                                         seed=step)
            records.append({"step": step, "task_step": counts[name], "task": name, **rec})
            if diagnostics_path is not None:
                import json

                diagnostics_path.write_text(json.dumps(to_jsonable({"records": records})))
        rows.append(row)
        if recorder is not None:
            recorder.log(step, **row)
        if step % int(cfg.log_every) == 0 or step == steps:
            msg = (f"[multitask {cfg.loss.name}] step {step}/{steps} {name}: loss {row[f'{name}/loss']:.4f} "
                   f"kl {row[f'{name}/teacher_kl']:+.3f} train {metric_name(task)} "
                   f"{row[f'{name}/train_{metric_name(task)}']:.2f} len {row[f'{name}/response_len']:.0f} "
                   f"({t1 - t0:.1f}/{t2 - t1:.1f}/{t3 - t2:.1f}s)")
            evs = [k_ for k_ in row if k_.endswith(("/accuracy", "/success"))]
            if evs:
                msg += " | " + " ".join(f"{k_} {row[k_]:.3f}" for k_ in evs)
            log(msg)
    return {"rows": rows, "evals": evals, "records": records}


# ---------------------------------------------------------------------------------------------------------
# Config schema, validation and preparation (used by experiments/multitask.py, conf/multitask.yaml)
# ---------------------------------------------------------------------------------------------------------

TEACHER_TOKENIZERS = ("default", "variant")
TOKEN_MAPPINGS = (None, "surface", "role")


@dataclass
class TeacherConfig:
    """One task's teacher: its model, its tokenizer conventions and how its vocabulary maps to the student's."""

    model: Any = MISSING  # conf/model/* mapping
    tokenizer: str = "default"  # default | variant (think markers as pieces, EOS "<|endoftext|>": failure mode 3)
    token_mapping: str | None = None  # null | surface | role (opd.tasks.TokenMapping.from_tokenizers specials=)
    checkpoint: str | None = None  # an existing checkpoint directory replaces the teacher's SFT
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(steps=800, seed=0))


@dataclass
class MultitaskConfig:
    """`python -m experiments.multitask` composes conf/multitask.yaml onto this schema."""

    student: Any = MISSING
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "textworld"])  # one task per step, in turn
    task_args: dict[str, Any] = field(default_factory=dict)  # task name -> make_task kwargs
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)  # task name -> its teacher
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sft_student: SFTConfig = field(default_factory=lambda: SFTConfig(steps=200, seed=1))
    steps: int = 40  # training steps in all (each task gets steps / len(tasks))
    eval_every: int = 10
    eval_problems: int = 64  # per task
    eval_seed: int = 1234
    train_seed: int = 7
    train_problems: int = 1024  # per task: problems / episode seeds of the train split
    seed: int = 0
    log_every: int = 1
    diagnostics_every: int = 5  # failure-mode records every N steps of a task (and its first and last); 0: off
    diag_bucket_size: int = 16
    checkpoint_root: str = ".cache/opd/checkpoints"
    student_checkpoint: str | None = None  # an existing checkpoint directory replaces the student's SFT
    name: str = "multitask"


def register_multitask_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from opd.train.config import register_configs

    register_configs()
    ConfigStore.instance().store(name="base_multitask", node=MultitaskConfig)


def make_tokenizer(kind: str):
    from opd.tasks import Tokenizer

    # Spaced words: the student shares one vocabulary across tasks and the text world needs them (see
    # Tokenizer.spaced); arithmetic encodes the same either way.
    if kind == "default":
        return Tokenizer.spaced()
    return Tokenizer.variant(think_as_pieces=True, eos_token="<|endoftext|>", spaced=True, name="teacher-variant")


def validate_multitask(cfg: Any) -> dict[str, Any]:
    """Check everything a type cannot, before any computation; ConfigError naming the key otherwise.

    Returns {'student': ModelConfig, 'tasks': {name: student-side task}, 'teacher_tasks': {name: teacher-side
    task}, 'teachers': {name: ModelConfig}, 'mappings': {name: TokenMapping | None}}."""
    from opd.cli import ConfigError, require, require_choice
    from opd.tasks import TokenMapping, make_task
    from opd.train.config import LOSSES, model_config, to_container

    require_choice("loss.name", cfg.loss.name, LOSSES)
    require(len(cfg.tasks) >= 1, "tasks", "at least one task name", list(cfg.tasks))
    for key in ("steps", "eval_every", "eval_problems", "train_problems", "rollout.prompts_per_step",
                "rollout.group_size", "diag_bucket_size"):
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        require(isinstance(node, int) and node >= 1, key, "an integer >= 1", node)
    require(isinstance(cfg.diagnostics_every, int) and cfg.diagnostics_every >= 0, "diagnostics_every",
            "an integer >= 0", cfg.diagnostics_every)
    student_tok = make_tokenizer("default")
    teacher_toks, declared = {}, {}
    for name, tcfg in cfg.teachers.items():
        require_choice(f"teachers.{name}.tokenizer", tcfg.tokenizer, TEACHER_TOKENIZERS)
        require_choice(f"teachers.{name}.token_mapping", tcfg.token_mapping, TOKEN_MAPPINGS)
        teacher_toks[name] = make_tokenizer(tcfg.tokenizer)
        if tcfg.token_mapping is not None:
            declared[name] = TokenMapping.from_tokenizers(student_tok, teacher_toks[name],
                                                          specials=tcfg.token_mapping)
    try:
        mappings = check_routes(list(cfg.tasks), teacher_toks, student_tok, declared, cfg.loss.name)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tasks, teacher_tasks, teachers = {}, {}, {}
    args = to_container(cfg.task_args) if cfg.task_args is not None else {}
    student = model_config(cfg.student, "student").replace(
        vocab_size=max(model_config(cfg.student, "student").vocab_size, student_tok.vocab_size))
    for name in cfg.tasks:
        kwargs = dict(args.get(name, {}) or {})
        try:
            tasks[name] = make_task(name, tokenizer=student_tok, **kwargs)
            teacher_tasks[name] = make_task(name, tokenizer=teacher_toks[name], **kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"task_args.{name}: {err}") from None
        mc = model_config(cfg.teachers[name].model, f"teachers.{name}.model")
        teachers[name] = mc.replace(vocab_size=max(mc.vocab_size, teacher_toks[name].vocab_size))
        ckpt = cfg.teachers[name].checkpoint
        if ckpt is not None:
            require(Path(str(ckpt)).is_dir(), f"teachers.{name}.checkpoint", "an existing directory or null", ckpt)
        seq = sequence_length(tasks[name]) + (16 if mappings[name] is not None else 0)  # mapped: longer
        for key, m in (("student", student), (f"teachers.{name}.model", teachers[name])):
            require(m.max_seq_len >= seq, f"{key}.max_seq_len", f"at least {seq} for task {name}", m.max_seq_len)
    if cfg.student_checkpoint is not None:
        require(Path(str(cfg.student_checkpoint)).is_dir(), "student_checkpoint", "an existing directory or null",
                cfg.student_checkpoint)
    require(cfg.loss.k <= min(student.vocab_size, *(t.vocab_size for t in teachers.values())), "loss.k",
            "at most the smallest vocabulary size", cfg.loss.k)
    return {"student": student, "tasks": tasks, "teacher_tasks": teacher_tasks, "teachers": teachers,
            "mappings": mappings}


def sequence_length(task) -> int:
    if task.name == "textworld":
        return textworld_length(task)
    return int(task.max_prompt_len + task.max_response_len)


def sft_batches(task, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, attention_mask, target_mask) of the task's expert demonstrations (SFT data)."""
    if task.name == "textworld":
        seeds = task.episodes("train", n, seed)
        tokens, loss, attn = task.encode_demonstrations(seeds, textworld_length(task))
        return tokens, attn, loss
    from opd.train.sft import demonstration_batch

    return demonstration_batch(task, task.problems("train", n, seed))


def prepare_model(label: str, model_cfg, task_list: list, sections: dict[str, Any], sft_cfg, *, root,
                  checkpoint=None, log: Callable[[str], None] = print) -> tuple[nnx.Module, dict[str, Any]]:
    """SFT a model on the demonstrations of `task_list` (steps alternate tasks), cached by config hash
    (the single-task trainer's checkpoint cache and SFT step); or load `checkpoint`."""
    from opd.train import checkpoints
    from opd.train.sft import FINGERPRINT_PROBLEMS, make_sft_step, new_model, sft_optimizer

    model = new_model(model_cfg, int(sft_cfg.seed))
    if checkpoint is not None:
        checkpoints.load_model(model, checkpoint)
        log(f"[sft {label}] loaded {checkpoint}")
        return model, {"path": str(checkpoint), "trained": False}
    seed = int(sft_cfg.seed)
    samples = [sft_batches(t, FINGERPRINT_PROBLEMS, seed) for t in task_list]
    fingerprint = checkpoints.data_fingerprint(*(a for sample in samples for a in sample))
    key = checkpoints.cache_key({"multitask_sft": sections, "data": fingerprint})
    path = Path(root) / key
    if checkpoints.is_complete(path):
        checkpoints.load_model(model, path)
        log(f"[sft {label}] reusing cached checkpoint {path}")
        return model, {**checkpoints.read_meta(path), "path": str(path), "trained": False}
    data = [sft_batches(t, int(sft_cfg.train_problems), seed) for t in task_list]
    steps = int(sft_cfg.steps)
    optimizer = sft_optimizer(model, sft_cfg)
    graphdef, state = nnx.split((model, optimizer))
    step_fn = make_sft_step(graphdef)
    rng = np.random.default_rng(int(sft_cfg.seed))
    t0, loss = time.time(), None
    for i in range(1, steps + 1):
        tokens, attn, target = data[(i - 1) % len(data)]
        idx = rng.integers(0, len(tokens), int(sft_cfg.batch_size))
        state, loss = step_fn(state, jnp.asarray(tokens[idx]), jnp.asarray(attn[idx]), jnp.asarray(target[idx]))
        if i % int(sft_cfg.log_every) == 0 or i == steps:
            log(f"[sft {label}] step {i}/{steps} ({task_list[(i - 1) % len(data)].name}) loss {float(loss):.4f} "
                f"({time.time() - t0:.0f}s)")
    nnx.update((model, optimizer), state)
    meta = {"key": key, "label": label, "sections": sections, "final_loss": float(loss),
            "train_time_s": round(time.time() - t0, 1)}
    checkpoints.save_model(model, path, meta)
    log(f"[sft {label}] saved {path}")
    return model, {**meta, "path": str(path), "trained": True}


def build_routes(cfg: Any, built: dict[str, Any], *, log: Callable[[str], None] = print):
    """(student, routes, meta): SFT (or load) each task's teacher on its own task and tokenizer, and the
    student on all tasks; draw train and eval items."""
    from opd.train.config import to_container

    resolved = to_container(cfg)
    routes, meta = {}, {}
    for name in cfg.tasks:
        ttask = built["teacher_tasks"][name]
        sections = {"model": built["teachers"][name].to_dict(), "task": name,
                    "task_args": resolved["task_args"].get(name),
                    "tokenizer": cfg.teachers[name].tokenizer, "sft": resolved["teachers"][name]["sft"]}
        teacher, tmeta = prepare_model(f"teacher/{name}", built["teachers"][name], [ttask], sections,
                                       cfg.teachers[name].sft, root=cfg.checkpoint_root,
                                       checkpoint=cfg.teachers[name].checkpoint, log=log)
        meta[f"teacher/{name}"] = tmeta.get("path")
        task = built["tasks"][name]
        if task.name == "textworld":
            train = task.episodes("train", int(cfg.train_problems), int(cfg.train_seed))
            evals = task.episodes("eval", int(cfg.eval_problems), int(cfg.eval_seed))
        else:
            train = task.problems("train", int(cfg.train_problems), int(cfg.train_seed))
            evals = task.problems("eval", int(cfg.eval_problems), int(cfg.eval_seed))
        routes[name] = Route(task=task, teacher=teacher, mapping=built["mappings"][name], train_items=train,
                             eval_items=evals)
    sections = {"model": built["student"].to_dict(), "tasks": list(cfg.tasks), "task_args": resolved["task_args"],
                "sft": resolved["sft_student"]}
    student, smeta = prepare_model("student", built["student"], [built["tasks"][n] for n in cfg.tasks], sections,
                                   cfg.sft_student, root=cfg.checkpoint_root, checkpoint=cfg.student_checkpoint,
                                   log=log)
    meta["student"] = smeta.get("path")
    return student, routes, meta


def teacher_scores(routes: dict[str, Route], built: dict[str, Any], eval_key) -> dict[str, float]:
    """Each teacher's held-out score on its own task, in its own tokenizer."""
    out = {}
    for name, r in routes.items():
        tr = Route(task=built["teacher_tasks"][name], teacher=r.teacher, eval_items=r.eval_items)
        out[f"teacher/{name}/{metric_name(r.task)}"] = evaluate_route(r.teacher, tr, eval_key)
    return out
