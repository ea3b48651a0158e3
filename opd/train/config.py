"""Typed config tree of the OPD experiment (Hydra structured configs) and its validation.

Schemas are registered in Hydra's ConfigStore as `base_<name>` and every YAML option extends its schema
in its defaults list (style.md E10/E11), so a typo'd key or a wrong type fails at composition. Values that
a type cannot express (loss names, K ≤ V, top-p ∈ (0, 1], matching vocabularies, existing checkpoint
paths) are checked by `validate` before any computation and raise `opd.cli.ConfigError` naming the key.

Model and task groups belong to their modules (conf/model, conf/task); they are kept as plain mappings
here and turned into `opd.model.ModelConfig` / `opd.tasks.make_task(...)` by `model_config` / `build_task`.
A model section with a `path` (conf/model/hf.yaml) is a Hugging Face checkpoint directory: its ModelConfig
comes from the checkpoint (opd.model.hf), and the experiment loads it as is instead of preparing it by SFT.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from opd import objectives
from opd.cli import ConfigError, require, require_choice
from opd.losses import AGGREGATION_MODES

LOSSES = objectives.NAMES
"""Objectives the OPD step knows: the registry's names (opd/objectives.py)."""


@dataclass
class LossConfig:
    """One OPD objective and its constants."""

    name: str = MISSING  # one of LOSSES
    # Teacher top-K support size (also the K of every loss's diagnostics). Measured (benchmarks/
    # bench_opd_step.py --mass-only, default SFT teacher, V=117): top-K mass on teacher rollouts K=1 0.9992,
    # K=2 0.9998, K=4 0.9999; on SFT-student top-p 0.9 rollouts K=1 0.9980, K=2 0.9996, K=4 0.9999. The
    # paper's K=32/152K holds 97-99%, which K=1 already does here, but K=1 makes renormalized LSM identically
    # 0; K=4 (3.4% of V) is the default, K=2 the smallest non-degenerate choice.
    k: int = 4
    # token_mean (paper Eq. 8) | sequence_mean: the default, because it is what produced the paper's numbers
    # (verl token-mean per micro-batch of one sequence, then averaged; paper.md §5 "Code reality").
    aggregation: str = "sequence_mean"
    clip_eps: float = 0.2  # sampled_token: PPO clip ε (verl default)
    dual_clip: float | None = 3.0  # sampled_token: dual clip c for negative advantages (None: off)
    mask_special_tokens: bool = False  # zero the loss at the first think-open/think-close/EOS per response
    rollout_top_p: float = 1.0  # the paper couples rollout top-p to the method (LSM 0.9, baseline 1.0)


@dataclass
class RolloutConfig:
    """How the student samples its on-policy batch each step."""

    prompts_per_step: int = 8  # distinct prompts per training step
    group_size: int = 4  # G rollouts per prompt (paper: 8)
    temperature: float = 1.0
    top_p: float | None = None  # None: the loss's rollout_top_p (paper Table A1); a number overrides it
    max_new_tokens: int | None = None  # None: the task's max_response_len


@dataclass
class OptimizerConfig:
    """AdamW with global-norm clipping over the student's nnx.Param only (paper.md §6, verl defaults)."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 (paper: 0)
    minibatches_per_step: int = 1  # optimizer steps per training step (paper: 2 = batch 128 / mini 64)


@dataclass
class SFTConfig:
    """Supervised preparation of a teacher or a student on the task's solver demonstrations."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    train_problems: int = 4096  # size of the demonstration pool (task "train" split)
    eval_problems: int = 128  # held-out problems for the accuracy printed after SFT
    log_every: int = 50
    seed: int = 0


@dataclass
class OPDConfig:
    """The whole experiment: `python -m experiments.opd` composes conf/opd.yaml onto this schema."""

    student: Any = MISSING  # conf/model/* mapping -> opd.model.ModelConfig
    teacher: Any = MISSING
    task: Any = MISSING  # conf/task/* mapping: `name` + make_task kwargs
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sft_teacher: SFTConfig = field(default_factory=SFTConfig)
    sft_student: SFTConfig = field(default_factory=SFTConfig)
    steps: int = 60  # OPD training steps
    eval_every: int = 10  # evaluate held-out pass@1 every this many steps (and at the first and last)
    eval_problems: int = 128  # held-out problems (task "eval" split, fixed seed shared by every run)
    eval_seed: int = 1234
    eval_batch_size: int = 32  # = rollout batch by default, so LSM's rollouts and sampled eval share one program
    train_seed: int = 7  # seed of the OPD prompt pool (task "train" split)
    train_problems: int = 4096  # OPD prompt pool size
    seed: int = 0  # rollout sampling and everything random in the OPD run
    log_every: int = 1  # print one progress line every this many steps
    checkpoint_root: str = ".cache/opd/checkpoints"  # SFT checkpoint cache
    teacher_checkpoint: str | None = None  # an existing checkpoint dir replaces teacher SFT
    student_checkpoint: str | None = None  # an existing checkpoint dir replaces student SFT
    name: str = "opd"  # a label for figures and logs


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_opd", node=OPDConfig)
    cs.store(group="loss", name="base_loss", node=LossConfig)
    cs.store(group="rollout", name="base_rollout", node=RolloutConfig)
    cs.store(group="optimizer", name="base_optimizer", node=OptimizerConfig)


# ---------------------------------------------------------------------------------------------------------
# Conversions
# ---------------------------------------------------------------------------------------------------------


def to_container(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


HF_KEYS = ("path", "dtype")
"""Keys of a Hugging Face checkpoint model section (conf/model/hf.yaml)."""


def hf_path(section: Any) -> str | None:
    """The checkpoint directory of a model section that names one (conf/model/hf.yaml), else None."""
    raw = to_container(section)
    return None if "path" not in raw else str(raw["path"])


def _hf_model_config(raw: dict[str, Any], key: str):
    """The `ModelConfig` of a Hugging Face checkpoint section, after checking the directory, config.json
    and every tensor header (no weight is read); any problem is a ConfigError naming `<key>.path`."""
    from opd.model import hf

    unknown = sorted(set(raw) - set(HF_KEYS))
    require(not unknown, key, "only " + ", ".join(HF_KEYS) + " in a Hugging Face checkpoint section", unknown)
    path = raw["path"]
    require(isinstance(path, str) and path not in ("", "???"), f"{key}.path",
            "a Hugging Face checkpoint directory (required with model=hf)", path)
    require(Path(path).is_dir() and (Path(path) / "config.json").is_file(), f"{key}.path",
            "an existing Hugging Face checkpoint directory with config.json", path)
    dtype = raw.get("dtype")
    require_choice(f"{key}.dtype", dtype, (None, *hf.DTYPE_NAMES))
    try:
        return hf.check_pretrained(path, dtype=dtype)
    except ValueError as err:
        raise ConfigError(f"{key}.path: {err}") from None


def model_config(section: Any, key: str):
    """An `opd.model.ModelConfig` from a conf/model mapping (a `path` one: from the Hugging Face checkpoint
    it names); unknown keys are a ConfigError."""
    from opd.model import ModelConfig

    raw = {k: v for k, v in to_container(section).items() if not k.startswith("_")}
    raw.pop("name", None)
    if "path" in raw:
        return _hf_model_config(raw, key)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    require(not unknown, key, "ModelConfig fields " + ", ".join(sorted(known)), unknown)
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {err}") from None


def task_kwargs(section: Any) -> tuple[str, dict[str, Any]]:
    raw = {k: v for k, v in to_container(section).items() if not k.startswith("_")}
    name = raw.pop("name", None)
    return name, raw


def build_task(section: Any, key: str = "task"):
    """`opd.tasks.make_task(name, **kwargs)`; an unknown name or bad kwarg is a ConfigError."""
    from opd.tasks import make_task

    name, kwargs = task_kwargs(section)
    require(isinstance(name, str), f"{key}.name", "a task name", name)
    try:
        return make_task(name, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}.name: {err}") from None


def rollout_top_p(cfg: Any) -> float:
    """The effective rollout top-p: rollout.top_p when set, else the loss's paper default."""
    top_p = cfg.rollout.top_p
    return float(cfg.loss.rollout_top_p if top_p is None else top_p)


# ---------------------------------------------------------------------------------------------------------
# Validation (before any computation)
# ---------------------------------------------------------------------------------------------------------


def _positive(value: Any, key: str) -> None:
    require(isinstance(value, (int, float)) and value > 0, key, "a number > 0", value)


def validate(cfg: Any) -> dict[str, Any]:
    """Check every value a type cannot; return the built pieces {'task', 'student', 'teacher', 'hf_paths'}
    (hf_paths: role -> Hugging Face checkpoint directory, or None for a model prepared by SFT).

    Raises ConfigError('<key>: expected <allowed>, got <value>') on the first bad value."""
    require_choice("loss.name", cfg.loss.name, LOSSES)
    require_choice("loss.aggregation", cfg.loss.aggregation, AGGREGATION_MODES)
    for key in ("loss.rollout_top_p", "rollout.top_p"):
        value = cfg.loss.rollout_top_p if key == "loss.rollout_top_p" else cfg.rollout.top_p
        if value is None:
            continue
        require(isinstance(value, (int, float)) and 0.0 < value <= 1.0, key, "a number in (0, 1]", value)
    _positive(cfg.loss.k, "loss.k")
    _positive(cfg.loss.clip_eps, "loss.clip_eps")
    if cfg.loss.dual_clip is not None:
        require(cfg.loss.dual_clip > 1.0, "loss.dual_clip", "a number > 1 or null", cfg.loss.dual_clip)
    _positive(cfg.rollout.temperature, "rollout.temperature")
    for key in ("rollout.prompts_per_step", "rollout.group_size", "optimizer.minibatches_per_step",
                "steps", "eval_every", "eval_problems", "eval_batch_size", "train_problems"):
        node: Any = cfg
        for part in key.split("."):
            node = node[part]
        require(isinstance(node, int) and node >= 1, key, "an integer >= 1", node)
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    require(batch % cfg.optimizer.minibatches_per_step == 0, "optimizer.minibatches_per_step",
            f"a divisor of the batch prompts_per_step * group_size = {batch}", cfg.optimizer.minibatches_per_step)
    require_choice("optimizer.name", cfg.optimizer.name, ["adamw"])
    _positive(cfg.optimizer.lr, "optimizer.lr")
    _positive(cfg.optimizer.grad_clip, "optimizer.grad_clip")
    for sec in ("sft_teacher", "sft_student"):
        _positive(cfg[sec].steps, f"{sec}.steps")
        _positive(cfg[sec].batch_size, f"{sec}.batch_size")
        _positive(cfg[sec].lr, f"{sec}.lr")

    hf_paths = {role: hf_path(cfg[role]) for role in ("student", "teacher")}
    for role in ("teacher", "student"):
        key = f"{role}_checkpoint"
        path = cfg[key]
        if path is None:
            continue
        require(hf_paths[role] is None, key,
                f"null when {role} is a Hugging Face checkpoint ({role}.path is loaded as is)", str(path))
        require(Path(str(path)).is_dir(), key, "an existing checkpoint directory (or null)", str(path))

    task = build_task(cfg.task)
    tok_vocab = task.tokenizer.vocab_size
    student = model_config(cfg.student, "student")
    teacher = model_config(cfg.teacher, "teacher")
    models = {"student": student, "teacher": teacher}
    # The generated tasks speak opd.tasks.Tokenizer ids, so a Hugging Face checkpoint must cover them.
    for role, mc in models.items():
        if hf_paths[role] is not None and mc.vocab_size < tok_vocab:
            raise ConfigError(
                f"{role}.path: checkpoint {hf_paths[role]} has vocab_size {mc.vocab_size}, smaller than the task "
                f"tokenizer's {tok_vocab} (task {task_kwargs(cfg.task)[0]!r} uses opd.tasks.Tokenizer ids; an HF "
                f"checkpoint used with it must have been saved with vocab_size >= {tok_vocab})")
    if hf_paths["student"] is not None and hf_paths["teacher"] is not None:
        from opd.model import hf

        try:
            hf.require_same_vocabulary(hf_paths["student"], hf_paths["teacher"])
        except ValueError as err:
            raise ConfigError(f"teacher.path: {err}") from None
    # conf/model vocab sizes are placeholders padded up to the task tokenizer's vocabulary (and to a Hugging
    # Face partner's); a model asking for more keeps its size, so teacher and student must still agree.
    floor = max([tok_vocab] + [mc.vocab_size for r, mc in models.items() if hf_paths[r] is not None])
    for role, mc in models.items():
        if hf_paths[role] is None:
            models[role] = mc.replace(vocab_size=max(mc.vocab_size, floor))
    student, teacher = models["student"], models["teacher"]
    # Which side to name: the conf/model one (a Hugging Face checkpoint's size is fixed).
    role, other = ("student", "teacher") if hf_paths["teacher"] is not None else ("teacher", "student")
    require(teacher.vocab_size == student.vocab_size, f"{role}.vocab_size",
            f"the {other}'s vocabulary size {models[other].vocab_size} (one tokenizer; sizes below the "
            f"tokenizer's {tok_vocab} are padded up to it)", models[role].vocab_size)
    require(cfg.loss.k <= student.vocab_size, "loss.k", f"an integer in [1, vocab_size={student.vocab_size}]",
            cfg.loss.k)
    max_new = cfg.rollout.max_new_tokens
    if max_new is not None:
        require(isinstance(max_new, int) and max_new >= 1, "rollout.max_new_tokens", "an integer >= 1 or null",
                max_new)
    seq = task.max_prompt_len + (max_new or task.max_response_len)
    for role, mc in models.items():
        if hf_paths[role] is not None:
            if mc.max_seq_len < seq:
                raise ConfigError(f"{role}.path: checkpoint {hf_paths[role]} has max_position_embeddings "
                                  f"{mc.max_seq_len}, shorter than prompt + response length {seq}")
        else:
            require(mc.max_seq_len >= seq, f"{role}.max_seq_len",
                    f"at least prompt + response length {seq}", mc.max_seq_len)
    return {"task": task, "student": student, "teacher": teacher, "hf_paths": hf_paths}
