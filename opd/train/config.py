"""Typed config tree of the OPD experiment (Hydra structured configs) and its validation.

Schemas are registered in Hydra's ConfigStore as `base_<name>` and every YAML option extends its schema
in its defaults list (style.md E10/E11), so a typo'd key or a wrong type fails at composition. Values that
a type cannot express (loss names, K ≤ V, top-p ∈ (0, 1], matching vocabularies, existing checkpoint
paths) are checked by `validate` before any computation and raise `opd.cli.ConfigError` naming the key.

Model and task groups belong to their modules (conf/model, conf/task); they are kept as plain mappings
here and turned into `opd.model.ModelConfig` / `opd.tasks.make_task(...)` by `model_config` / `build_task`.
A model section with a `path` (conf/model/hf.yaml) is a Hugging Face checkpoint directory: its ModelConfig
comes from the checkpoint (opd.model.hf), and the experiment loads it as is instead of preparing it by SFT (a
teacher with `teacher_sft: true` is SFT'd starting from the checkpoint's weights). `tokenizer: hf` is the HF
student's own tokenizer (opd.model.hf.HFTokenizer), which the jsonl task renders prompts with.
"""

from __future__ import annotations

import dataclasses
import math
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
    box_cox_alpha: float = 1.0  # power_opd: α of the bounded Box–Cox reward (q^α − π^α)/α (→ log ratio as α → 0)
    constant_advantage: float = -1.0  # constant_negative: the fixed advantage of the control (< 0)
    is_clip: float | None = None  # support_v4/v5: cap of the EMA-PG importance weight (None: uncapped)
    mask_special_tokens: bool = False  # zero the loss at the first think-open/think-close/EOS per response
    rollout_top_p: float = 1.0  # the paper couples rollout top-p to the method (LSM 0.9, baseline 1.0)


@dataclass
class RolloutConfig:
    """How the student samples its on-policy batch each step."""

    prompts_per_step: int = 8  # distinct prompts per training step
    group_size: int = 4  # G rollouts per prompt (paper: 8)
    temperature: float = 1.0
    top_p: float | None = None  # None: the loss's rollout_top_p (paper Table A1); a number overrides it
    # Scoring and the update see the batch cut to its longest rollout, rounded up to a multiple of this
    # (0: the task's whole budget). Each distinct width is one more compiled program (opd/train/batch.py).
    pad_multiple: int = 64
    # Response positions of the sampler's first decode window (opd.sampling.decode_windows): the KV cache
    # grows in windows that double until the budget, so a short response does not pay for the whole budget's
    # cache; 0 = one window at the full budget. Each window is one more compiled loop. Applies to the run's
    # rollouts and its held-out evaluations; it changes the cost of a decode step, never what it draws.
    first_window: int = 64


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
    # adamw | lion. Lion (Chen et al. 2023) steps every weight by lr times the sign of its momentum, so the
    # output row of a token the data never asks for keeps moving down however small its gradient has become
    # (results/notes/30_regime.md, "Why R7 holds: a Lion phase"). Lion wants an lr several times below AdamW's.
    optimizer: str = "adamw"
    # Adam's epsilon (optax's default 1e-8, as optimizer.eps); unused by Lion (as an R7 lever:
    # results/notes/30_regime.md).
    eps: float = 1e-8
    train_problems: int = 4096  # size of the demonstration pool (task "train" split)
    eval_problems: int = 128  # held-out problems for the accuracy printed after SFT
    log_every: int = 50
    seed: int = 0


SFT_OPTIMIZERS = ("adamw", "lion")
TEACHER_TOKENIZERS = ("same", "variant")
TOKEN_MAPPINGS = (None, "surface", "role")
STUDENT_TOKENIZERS = ("basic", "spaced", "hf")
HF_VARIANT_EOS = "<|endoftext|>"
"""The end of turn of an HF `variant` teacher (failure mode 3 on real tokens): its assistant turns end with
this token instead of the student's EOS (SmolLM2/Qwen: "<|im_end|>"); the rest of the template is shared."""


@dataclass
class RouteConfig:
    """One task of the run and its teacher (a route). A single-task run has one; multi-task alternates them."""

    task: Any = MISSING  # conf/task/* mapping: `name` + the task's kwargs
    teacher: Any = MISSING  # conf/model/* mapping, or a Hugging Face checkpoint section (conf/model/hf.yaml)
    # same: the student's tokenizer | variant: other special-token conventions (think markers written as
    # ordinary pieces, "<|endoftext|>" as EOS), the paper's failure mode 3; needs a token_mapping.
    teacher_tokenizer: str = "same"
    token_mapping: str | None = None  # null | surface | role (opd.tasks.TokenMapping.from_tokenizers specials=)
    teacher_checkpoint: str | None = None  # an existing checkpoint directory replaces the teacher's SFT
    # With a Hugging Face teacher section (model=hf): true SFTs it on this route's demonstrations starting
    # from the checkpoint's weights (cached by config hash and the checkpoint's fingerprint), the way the
    # paper's teacher is an SFT of its student's base; false loads it as is.
    teacher_sft: bool = False
    # The paper's teacher is an SFT of its student's base, a model that ended its turns with the student's EOS.
    # > 0: the teacher's architecture is first SFT'd this many steps (the teacher's recipe otherwise) on its
    # demonstrations written in the student's special-token conventions (the task's `base_view`), and its SFT
    # starts from those weights; 0: from a random init.
    teacher_base_steps: int = 0
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(seed=0))  # the teacher's SFT on this task
    # A second phase of the teacher's SFT, started from the first's weights: fields of `sft` it sets otherwise
    # (steps at least), e.g. another optimizer; null: none. The first phase is cached under its own key. Set it
    # in a YAML and override its fields: Hydra cannot merge a command-line dict into a null node.
    sft_then: dict[str, Any] | None = None


@dataclass
class MeshConfig:
    """Device mesh axes (opd/sharding.py); their product must equal the number of devices."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1


@dataclass
class OPDConfig:
    """The whole run: `python -m experiments.opd` composes conf/opd.yaml onto this schema."""

    student: Any = MISSING  # conf/model/* mapping -> opd.model.ModelConfig
    # the student's vocabulary: basic | spaced (word pieces with their leading space) | hf (the HF student
    # checkpoint's own tokenizer and chat template; for task=jsonl)
    tokenizer: str = "basic"
    tasks: dict[str, RouteConfig] = field(default_factory=dict)  # route name -> route
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sft_student: SFTConfig = field(default_factory=lambda: SFTConfig(seed=1))  # on every task's demonstrations
    # The regime report's capacity check (R2: the student's architecture SFT'd on the teacher's demonstrations
    # with the teacher's recipe): its SFT steps, when it needs more than the teacher's; null: the teacher's;
    # 0: skipped (capacity_accuracy null, R2 not measured), e.g. for a report of the other measurements first.
    capacity_sft_steps: int | None = None
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # Sequence positions per chunk of the update's objective and of teacher scoring (opd/chunked.py): null
    # chunks large vocabularies only (opd.chunked.resolve_chunk_size), 0 never, a positive integer always.
    chunk_size: int | None = None
    steps: int = 60  # OPD training steps (multi-task: one route per step, in turn)
    eval_every: int = 10  # evaluate held-out pass@1 every this many steps (and at the last)
    eval_problems: int = 128  # held-out items per task (fixed seed shared by every run)
    # validation: tuning runs, where every choice is made | eval: the test split, read once per reported run
    eval_split: str = "eval"
    tuning: bool = False  # a run that makes a choice (lr, steps, K): refused on the test split
    # The validation choice of the learning rate per objective (conf/tuned/<name>.yaml, written by
    # paper_figs/tune.py): for the objectives it names it replaces optimizer.lr; {} sets optimizer.lr by hand.
    tuned_lr: dict[str, float] = field(default_factory=dict)
    eval_samples: int = 1  # sampled pass@1 = mean over this many samples per item
    eval_seed: int = 1234
    eval_batch_size: int = 32
    train_seed: int = 7  # seed of the OPD prompt pool (task "train" split)
    train_problems: int = 4096  # OPD prompt pool size per task
    seed: int = 0  # rollout sampling and everything random in the OPD run
    log_every: int = 1  # print one progress line every this many steps
    diagnostics_every: int = 0  # failure-mode records every N steps of a task (and its first and last); 0: off
    diag_bucket_size: int = 16
    checkpoint_root: str = ".cache/opd/checkpoints"  # SFT checkpoint cache
    # committed SFT'd models (opd/train/store.py), unpacked into the cache instead of training; null: off
    checkpoint_store: str | None = "results/models"
    # A persistent XLA compilation cache directory (opd/compile_cache.py): later runs and sweep jobs with the
    # same programs load them instead of compiling. null: off.
    compile_cache: str | None = None
    student_checkpoint: str | None = None  # an existing checkpoint dir replaces student SFT
    name: str = "opd"  # a label for figures and logs
    # Long runs (opd/train/resume.py): the run state is checkpointed in <run dir>/checkpoints every N steps
    # (0: never) and the newest `keep_checkpoints` kept; rerunning in the same directory, or resume=<run dir>,
    # continues from the newest one.
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: str | None = None
    on_nonfinite: str = "halt"  # halt: stop at a NaN/inf loss or gradient | skip: log it and skip the update
    wandb: bool = False  # also log rows to Weights & Biases (needs `pip install wandb`; TensorBoard always)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_opd", node=OPDConfig)
    cs.store(group="loss", name="base_loss", node=LossConfig)
    cs.store(group="rollout", name="base_rollout", node=RolloutConfig)
    cs.store(group="optimizer", name="base_optimizer", node=OptimizerConfig)
    if not OmegaConf.has_resolver("opd_gguf"):
        OmegaConf.register_new_resolver("opd_gguf", gguf_checkpoint)


def gguf_checkpoint(source: str, cache_root: str = ".cache/opd/models") -> str:
    """`${opd_gguf:smollm2-135m}` in a config: the Hugging Face directory of a GGUF model (a path, or the
    name of a packaged one), converted under `cache_root` on first use (opd.model.gguf.converted_checkpoint)."""
    from opd.model import gguf

    try:
        return str(gguf.converted_checkpoint(source, cache_root))
    except ValueError as err:
        raise ConfigError(f"opd_gguf: {err}") from None


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


def build_task(section: Any, key: str = "task", **extra):
    """`opd.tasks.make_task(name, **kwargs, **extra)`; an unknown name or bad kwarg is a ConfigError."""
    from opd.tasks import make_task

    name, kwargs = task_kwargs(section)
    require(isinstance(name, str), f"{key}.name", "a task name", name)
    try:
        return make_task(name, **kwargs, **extra)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{key}.name: {err}") from None


# ---------------------------------------------------------------------------------------------------------
# Validation (before any computation)
# ---------------------------------------------------------------------------------------------------------


def _positive(value: Any, key: str) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
            key, "a finite number > 0", value)


def _sft_recipe(sft: Any, key: str) -> None:
    for field_ in ("steps", "batch_size", "lr", "eps"):
        _positive(sft[field_], f"{key}.{field_}")
    require_choice(f"{key}.optimizer", sft.optimizer, SFT_OPTIMIZERS)


def _count(cfg: Any, key: str, minimum: int = 1) -> None:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    require(isinstance(node, int) and not isinstance(node, bool) and node >= minimum, key,
            f"an integer >= {minimum}", node)


def make_tokenizer(student: str, teacher: str = "same", *, hf_dir: str | None = None,
                   key: str = "teacher_tokenizer"):
    """The student's tokenizer (`basic` | `spaced` | `hf`: the checkpoint `hf_dir`'s), or a teacher's
    (`same` | `variant`) built on it."""
    from opd.tasks import Tokenizer

    if student == "hf":
        return _hf_tokenizer(hf_dir, teacher, key)
    spaced = student == "spaced"
    if teacher == "same":
        return Tokenizer.spaced() if spaced else Tokenizer()
    return Tokenizer.variant(think_as_pieces=True, eos_token="<|endoftext|>", spaced=spaced, name="teacher-variant")


def _hf_tokenizer(hf_dir: str | None, teacher: str, key: str):
    """A checkpoint's tokenizer (opd.model.hf.HFTokenizer); the `variant` teacher's ends its turns with
    HF_VARIANT_EOS instead (same vocabulary and ids, another EOS)."""
    import dataclasses as dc

    from opd.model import hf

    require(hf_dir is not None, "tokenizer", "basic | spaced, or hf with a Hugging Face student "
            "(model@student=hf student.path=DIR)", "hf")
    try:
        tok = hf.load_tokenizer(hf_dir)
    except ValueError as err:
        raise ConfigError(f"tokenizer: hf: {err}") from None
    require(tok.eos_id is not None and tok.chat_template is not None, "tokenizer",
            "hf with a student checkpoint whose tokenizer has an EOS token and a chat template", hf_dir)
    if teacher == "same":
        return tok
    eos = tok.tokenizer.token_to_id(HF_VARIANT_EOS)
    require(eos is not None and eos != tok.eos_id, key,
            f"same, or variant with a student vocabulary holding {HF_VARIANT_EOS!r} apart from its EOS", teacher)
    return dc.replace(tok, special_ids={**tok.special_ids, "eos": int(eos)})


def hf_token_mapping(student: Any, teacher: Any, specials: str):
    """The declared mapping between an HF student tokenizer and its `variant` teacher (one vocabulary, another
    EOS): `surface` spells every student token by its own string, so the student's EOS stays the teacher's
    end-of-turn-less token (identity; the teacher scores it as it would "<|im_end|>" in its text), `role` maps
    the student's EOS to the teacher's EOS. Different vocabularies are refused (no cross-vocabulary HF map)."""
    from opd.tasks import TokenMapping

    sv = student.tokenizer.get_vocab(with_added_tokens=True)
    if sv != teacher.tokenizer.get_vocab(with_added_tokens=True):
        raise ValueError("teacher and student HF tokenizers have different vocabularies; only one vocabulary "
                         "with different special-token roles can be mapped")
    table = [(i,) for i in range(student.vocab_size)]
    if specials == "role":
        table[student.eos_id] = (teacher.eos_id,)
    return TokenMapping(tuple(table), student.vocab_size, teacher.vocab_size)


def _check_scalars(cfg: Any) -> None:
    known = {f.name for f in dataclasses.fields(OPDConfig)}
    unknown = sorted(k for k in cfg.keys() if k not in known and k != "hydra")
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a key of this configuration (the schema is opd/train/config.py "
                          "OPDConfig; '+key=' additions are refused)")
    require_choice("loss.name", cfg.loss.name, LOSSES)
    require_choice("loss.aggregation", cfg.loss.aggregation, AGGREGATION_MODES)
    for key, value in (("loss.rollout_top_p", cfg.loss.rollout_top_p), ("rollout.top_p", cfg.rollout.top_p)):
        if value is not None:
            require(isinstance(value, (int, float)) and 0.0 < value <= 1.0, key, "a number in (0, 1]", value)
    _count(cfg, "loss.k")
    # Renormalized over one token both distributions are 1: LSM's loss and gradient are identically 0 (a K = 1
    # run ends where it began; results/notes/33_regime_ablations.md).
    require(cfg.loss.name != "lsm" or cfg.loss.k >= 2, "loss.k",
            "an integer >= 2 for loss=lsm (renormalized over K = 1 token its loss and gradient are 0)", cfg.loss.k)
    _positive(cfg.loss.clip_eps, "loss.clip_eps")
    _positive(cfg.loss.box_cox_alpha, "loss.box_cox_alpha")
    require(isinstance(cfg.loss.constant_advantage, (int, float)) and cfg.loss.constant_advantage < 0,
            "loss.constant_advantage", "a number < 0", cfg.loss.constant_advantage)
    if cfg.loss.is_clip is not None:
        _positive(cfg.loss.is_clip, "loss.is_clip")
    if cfg.loss.dual_clip is not None:
        require(cfg.loss.dual_clip > 1.0, "loss.dual_clip", "a number > 1 or null", cfg.loss.dual_clip)
    _positive(cfg.rollout.temperature, "rollout.temperature")
    for key in ("rollout.prompts_per_step", "rollout.group_size", "optimizer.minibatches_per_step", "steps",
                "eval_every", "eval_problems", "eval_samples", "eval_batch_size", "train_problems", "log_every",
                "diag_bucket_size", "mesh.data", "mesh.fsdp", "mesh.tensor"):
        _count(cfg, key)
    _count(cfg, "diagnostics_every", 0)
    _count(cfg, "rollout.pad_multiple", 0)
    _count(cfg, "rollout.first_window", 0)
    require_choice("optimizer.name", cfg.optimizer.name, ["adamw"])
    _positive(cfg.optimizer.lr, "optimizer.lr")
    _positive(cfg.optimizer.grad_clip, "optimizer.grad_clip")
    require_choice("tokenizer", cfg.tokenizer, STUDENT_TOKENIZERS)
    require_choice("on_nonfinite", cfg.on_nonfinite, ("halt", "skip"))
    for objective, lr in cfg.tuned_lr.items():
        require_choice("tuned_lr", objective, LOSSES)
        _positive(lr, f"tuned_lr.{objective}")
    require(not (cfg.tuning and cfg.loss.name in cfg.tuned_lr), "tuned_lr",
            f"no entry for loss.name={cfg.loss.name} in a tuning run (tuning=true sweeps optimizer.lr itself)",
            dict(cfg.tuned_lr))
    # a table run with validation choices (+tuned=<name>) must not run an objective nobody tuned at the default lr
    require(cfg.tuning or not cfg.tuned_lr or cfg.loss.name in cfg.tuned_lr, "tuned_lr",
            f"an entry for loss.name={cfg.loss.name} (tune it first: paper_figs/tune.py), or no tuned_lr at all",
            dict(cfg.tuned_lr))
    if cfg.compile_cache is not None:
        path = Path(str(cfg.compile_cache)).expanduser()
        require(str(cfg.compile_cache) != "" and not (path.exists() and not path.is_dir()), "compile_cache",
                "null or a directory path (created if missing)", cfg.compile_cache)
    require_choice("eval_split", cfg.eval_split, ("validation", "eval"))
    require(not (cfg.tuning and cfg.eval_split == "eval"), "eval_split",
            "validation in a tuning run (tuning=true): choices are made on validation, the test split (eval) is "
            "read once per reported run", cfg.eval_split)
    if cfg.wandb:
        import importlib.util

        require(importlib.util.find_spec("wandb") is not None, "wandb",
                "false, or true with the wandb package installed (pip install wandb)", cfg.wandb)
    _count(cfg, "checkpoint_every", 0)
    _count(cfg, "keep_checkpoints")
    if cfg.resume is not None:
        require(Path(str(cfg.resume)).is_dir(), "resume", "an existing run directory (or null)", cfg.resume)
    chunk = cfg.chunk_size
    require(chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0),
            "chunk_size", "null (auto), 0 (off) or a positive integer", chunk)


def _check_batch(cfg: Any) -> None:
    """The batch must split evenly into optimizer minibatches, and each minibatch over the data-parallel
    devices (mesh.data x mesh.fsdp); the mesh must use every device."""
    import jax

    devices = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    require(devices == jax.device_count(), "mesh", f"axes data x fsdp x tensor = {jax.device_count()} "
            f"(the number of devices)", f"{cfg.mesh.data} x {cfg.mesh.fsdp} x {cfg.mesh.tensor} = {devices}")
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    minibatches = cfg.optimizer.minibatches_per_step
    require(batch % minibatches == 0, "optimizer.minibatches_per_step",
            f"a divisor of the batch prompts_per_step * group_size = {batch}", minibatches)
    shards = cfg.mesh.data * cfg.mesh.fsdp
    require((batch // minibatches) % shards == 0, "rollout.prompts_per_step",
            f"a batch whose minibatches ({batch} / {minibatches}) divide over mesh.data x mesh.fsdp = {shards}",
            cfg.rollout.prompts_per_step)


def _checkpoint_dir(path: Any, key: str) -> None:
    if path is not None:
        require(Path(str(path)).is_dir(), key, "an existing checkpoint directory (or null)", str(path))


def validate(cfg: Any) -> dict[str, Any]:
    """Check every value a type cannot, for every route; return the built pieces:
    {'student': ModelConfig, 'tokenizer', 'hf_student': dir | None,
     'routes': {name: {'task', 'teacher_task', 'teacher': ModelConfig, 'mapping', 'hf_teacher'}}}.

    Raises ConfigError('<key>: expected <allowed>, got <value>') on the first bad value."""
    from opd.tasks import TASKS, TokenMapping, require_compatible

    _check_scalars(cfg)
    require(len(cfg.tasks) >= 1, "tasks", "at least one route {name: {task, teacher, ...}}", dict(cfg.tasks))
    _check_batch(cfg)
    objective = objectives.get(cfg.loss.name)
    hf_student = hf_path(cfg.student)
    if cfg.tokenizer == "hf":
        require(hf_student is not None, "tokenizer", "basic | spaced, or hf with a Hugging Face student "
                "(model@student=hf student.path=DIR)", cfg.tokenizer)
        model_config(cfg.student, "student")  # the directory is checked before its tokenizer is read
    student_tok = make_tokenizer(cfg.tokenizer, hf_dir=hf_student)
    if hf_student is not None:
        require(cfg.student_checkpoint is None, "student_checkpoint",
                "null when the student is a Hugging Face checkpoint (student.path is loaded as is)",
                cfg.student_checkpoint)
    _checkpoint_dir(cfg.student_checkpoint, "student_checkpoint")
    _sft_recipe(cfg.sft_student, "sft_student")
    if cfg.capacity_sft_steps is not None:
        _count(cfg, "capacity_sft_steps", minimum=0)
    student = model_config(cfg.student, "student")
    routes: dict[str, dict[str, Any]] = {}
    for name, rc in cfg.tasks.items():
        key = f"tasks.{name}"
        require_choice(f"{key}.teacher_tokenizer", rc.teacher_tokenizer, TEACHER_TOKENIZERS)
        require_choice(f"{key}.token_mapping", rc.token_mapping, TOKEN_MAPPINGS)
        for part, allowed in (("task", "a task section (conf/task/*)"), ("teacher", "a teacher model section "
                                                                             "(conf/model/*)")):
            require(not OmegaConf.is_missing(rc, part) and rc[part] is not None, f"{key}.{part}", allowed, None)
        _sft_recipe(rc.sft, f"{key}.sft")
        if rc.sft_then is not None:
            fields = {f.name for f in dataclasses.fields(SFTConfig)}
            require("steps" in rc.sft_then and set(rc.sft_then) <= fields, f"{key}.sft_then",
                    f"null or fields of an SFT recipe, steps among them ({', '.join(sorted(fields))})",
                    sorted(rc.sft_then))
            _sft_recipe(OmegaConf.merge(rc.sft, rc.sft_then), f"{key}.sft_then")
        teacher_tok = make_tokenizer(cfg.tokenizer, rc.teacher_tokenizer, hf_dir=hf_student,
                                     key=f"{key}.teacher_tokenizer")
        if cfg.tokenizer == "hf":
            require(rc.teacher_tokenizer == "same" or rc.token_mapping is not None, f"{key}.token_mapping",
                    f"surface | role: the variant teacher ends its turns with {HF_VARIANT_EOS!r}, not the "
                    "student's EOS", rc.token_mapping)
        try:
            if cfg.tokenizer == "hf":
                mapping = (TokenMapping.identity(student_tok.vocab_size) if rc.token_mapping is None else
                           hf_token_mapping(student_tok, teacher_tok, rc.token_mapping))
            else:
                declared = (None if rc.token_mapping is None else
                            TokenMapping.from_tokenizers(student_tok, teacher_tok, specials=rc.token_mapping))
                mapping = require_compatible(student_tok, teacher_tok, declared)
        except ValueError as err:
            raise ConfigError(f"{key}.token_mapping: {err}") from None
        mapping = None if mapping.is_identity else mapping
        if mapping is not None and objective.teacher != "sampled":
            raise ConfigError(f"{key}.token_mapping: a teacher with another vocabulary supplies only sampled-token "
                              f"log-probs, but loss.name={objective.name} needs its {objective.teacher} (use an "
                              f"objective whose teacher supplies 'sampled', e.g. sampled_token)")
        task_name = task_kwargs(rc.task)[0]
        entry = TASKS.get(task_name) if isinstance(task_name, str) else None  # unknown: build_task says so
        extra: dict[str, Any] = {}
        if entry is not None and entry.tokenizer is not None:
            require(cfg.tokenizer == entry.tokenizer, "tokenizer", f"{entry.tokenizer} for a {task_name} task",
                    cfg.tokenizer)
        if entry is not None and entry.takes_context_len:
            extra["context_len"] = student.max_seq_len
        task = build_task(rc.task, f"{key}.task", tokenizer=student_tok, **extra)
        teacher_task = task if rc.teacher_tokenizer == "same" else build_task(rc.task, f"{key}.task",
                                                                              tokenizer=teacher_tok, **extra)
        if hasattr(teacher_task, "teacher_view"):  # a task whose teacher writes another style/conventions
            teacher_task = teacher_task.teacher_view()
        hf_teacher = hf_path(rc.teacher)
        require(not rc.teacher_sft or hf_teacher is not None, f"{key}.teacher_sft",
                f"false unless {key}.teacher is a Hugging Face checkpoint (model@{key}.teacher=hf)", rc.teacher_sft)
        if hf_teacher is not None:
            require(rc.teacher_checkpoint is None, f"{key}.teacher_checkpoint",
                    f"null when the teacher is a Hugging Face checkpoint ({key}.teacher.path is loaded as is)",
                    rc.teacher_checkpoint)
        _checkpoint_dir(rc.teacher_checkpoint, f"{key}.teacher_checkpoint")
        _count(cfg, f"{key}.teacher_base_steps", minimum=0)
        base_task = None
        if rc.teacher_base_steps > 0:
            require(hf_teacher is None and rc.teacher_checkpoint is None, f"{key}.teacher_base_steps",
                    "0 unless the teacher is SFT'd here from a random init (not a Hugging Face or existing "
                    "checkpoint)", rc.teacher_base_steps)
            require(hasattr(task, "base_view"), f"{key}.teacher_base_steps",
                    f"0 for a {task_name} task (it has no demonstrations in the student's conventions for the "
                    "teacher: base_view)", rc.teacher_base_steps)
            base_task = task.base_view()
        teacher = model_config(rc.teacher, f"{key}.teacher")
        routes[name] = {"task": task, "teacher_task": teacher_task, "teacher": teacher, "mapping": mapping,
                        "hf_teacher": hf_teacher, "teacher_sft": bool(rc.teacher_sft),
                        "teacher_vocab": teacher_tok.vocab_size, "base_task": base_task}
    student = _check_models(cfg, student, hf_student, student_tok.vocab_size, routes)
    return {"student": student, "tokenizer": student_tok, "hf_student": hf_student, "routes": routes,
            "chunk_size": _chunk_size(cfg.chunk_size, student.vocab_size)}


def _chunk_size(requested: Any, vocab_size: int) -> int | None:
    from opd import chunked

    return chunked.resolve_chunk_size(requested, vocab_size)


def _check_models(cfg: Any, student, hf_student: str | None, tok_vocab: int, routes: dict[str, dict]) -> Any:
    """Vocabulary sizes, K and sequence lengths of the student and every teacher; returns the student's config
    with its vocabulary padded up to the tokenizer's (conf/model sizes are placeholders; a Hugging Face
    checkpoint's are fixed)."""
    hf_sizes = [student.vocab_size] if hf_student is not None else []
    hf_sizes += [r["teacher"].vocab_size for r in routes.values() if r["hf_teacher"] is not None and not r["mapping"]]
    floor = max([tok_vocab, *hf_sizes])
    if hf_student is not None:
        require(student.vocab_size >= tok_vocab, "student.path",
                f"a checkpoint with vocab_size >= the tokenizer's {tok_vocab} (the generated tasks speak "
                "opd.tasks.Tokenizer ids)", student.vocab_size)
    else:
        student = student.replace(vocab_size=max(student.vocab_size, floor))
    require(cfg.loss.k <= student.vocab_size, "loss.k", f"an integer in [1, vocab_size={student.vocab_size}]",
            cfg.loss.k)
    for name, r in routes.items():
        key = f"tasks.{name}.teacher"
        mc = r["teacher"]
        own_floor = r["teacher_vocab"] if r["mapping"] is not None else floor
        if r["hf_teacher"] is not None:
            require(mc.vocab_size >= own_floor, f"{key}.path",
                    f"a checkpoint with vocab_size >= {own_floor} (the tokenizer's)", mc.vocab_size)
        else:
            mc = mc.replace(vocab_size=max(mc.vocab_size, own_floor))
        if r["hf_teacher"] is not None and hf_student is not None and r["mapping"] is None:
            from opd.model import hf

            try:
                hf.require_same_vocabulary(hf_student, r["hf_teacher"])
            except ValueError as err:
                raise ConfigError(f"{key}.path: {err}") from None
        # one tokenizer; a teacher's head may be padded past the student's (Qwen2.5-7B: 152,064 rows, 0.5B:
        # 151,936), and is scored over the student's ids (opd.teacher.lm_head_over)
        if r["mapping"] is None and mc.vocab_size < student.vocab_size:
            raise ConfigError(f"{key}.{'path' if r['hf_teacher'] else 'vocab_size'}: expected at least the "
                              f"student's vocabulary size {student.vocab_size} (one tokenizer), got vocab_size "
                              f"{mc.vocab_size}")
        seq = r["task"].sequence_length() + (16 if r["mapping"] is not None else 0)  # mapped spellings are longer
        for role, model, hf_dir in (("student", student, hf_student), (key, mc, r["hf_teacher"])):
            if hf_dir is not None:
                require(model.max_seq_len >= seq, f"{role}.path",
                        f"a checkpoint whose max_position_embeddings covers prompt + response {seq} (task {name})",
                        model.max_seq_len)
            else:
                require(model.max_seq_len >= seq, f"{role}.max_seq_len",
                        f"at least prompt + response length {seq} (task {name})", model.max_seq_len)
        r["teacher"] = mc
    return student
