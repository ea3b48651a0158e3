"""Teacher and student preparation: supervised training on the task's solver demonstrations, cached.

Loss: token-level cross-entropy on the demonstration tokens only (response + EOS; the prompt and padding
are context), AdamW with linear warmup and cosine decay, global-norm clipping. One jitted step over the
nnx.split state of (model, optimizer).

`prepare(...)` is what experiments call: it returns a model loaded from the checkpoint cache when the key
(model config + task config + SFT config, and the starting checkpoint's fingerprint when SFT starts from a
Hugging Face checkpoint's weights instead of a random init) is there, and otherwise trains, evaluates and
saves it. The
student is made *deliberately weaker* by its config (smaller model, fewer SFT steps) so that OPD has room
to improve it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opd.cli import progress_bar
from opd.train import checkpoints, resume
from opd.train.batch import positions_from_mask
from opd.train.config import SFTConfig
from opd.train.store import archive, unpack

FINGERPRINT_PROBLEMS = 32  # demonstrations hashed into the cache key
SAVE_EVERY_S = 600.0  # how often a long SFT leaves a checkpoint to resume from (not part of its cache key)


def sft_loss(model, tokens_BxL, attention_mask_BxL, target_mask_BxL):
    """Mean next-token cross-entropy over target tokens."""
    positions = positions_from_mask(attention_mask_BxL)
    logits = model(tokens_BxL, positions_BxT=positions, attention_mask_BxT=attention_mask_BxL)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
    m = target_mask_BxL[:, 1:].astype(jnp.float32)
    return (nll * m).sum() / jnp.maximum(m.sum(), 1.0)


def make_sft_step(graphdef):
    @jax.jit
    def step(state, tokens, attn, target):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(sft_loss)(model, tokens, attn, target)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    return step


def _schedule(cfg) -> optax.Schedule:
    warmup = min(int(cfg.warmup_steps), max(int(cfg.steps) - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 1), max(int(cfg.steps), 2), cfg.lr * 0.05)


def sft_optimizer(model: nnx.Module, cfg) -> nnx.Optimizer:
    """`cfg.optimizer` (AdamW or Lion, decoupled weight decay) on the warmup-cosine schedule after global-norm
    clipping (every SFT loop's optimizer)."""
    if cfg.optimizer == "lion":
        update = optax.lion(_schedule(cfg), weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        update = optax.adamw(_schedule(cfg), eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"optimizer: expected one of adamw, lion, got {cfg.optimizer!r}")
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), update)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def _demonstrations(tasks: list, n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per task, (tokens, attention_mask, target_mask) of `n` train-split demonstrations."""
    return [t.demonstrations(t.items("train", n, seed)) for t in tasks]


def train_sft(model: nnx.Module, tasks: list, cfg, *, label: str = "sft",
              log: Callable[[str], None] = print, resume_dir: str | Path | None = None,
              save_every_s: float = SAVE_EVERY_S) -> tuple[list[float], float]:
    """Train `model` in place on `cfg.train_problems` demonstrations of each task for `cfg.steps` steps
    (step i draws a batch of task (i − 1) mod len(tasks)); returns (the logged losses, seconds trained, earlier
    sessions' included).

    resume_dir: where the SFT leaves a run-state checkpoint (parameters, optimizer state, the batch sampler's
    state) every `save_every_s` seconds, and where it continues from the newest one: a long SFT survives the
    end of the session that started it, and the resumed model equals the uninterrupted one bit for bit."""
    data = _demonstrations(tasks, int(cfg.train_problems), int(cfg.seed))
    optimizer = sft_optimizer(model, cfg)
    graphdef, state = nnx.split((model, optimizer))
    step = make_sft_step(graphdef)
    rng = np.random.default_rng(int(cfg.seed))
    losses: list[float] = []
    start, before_s = 1, 0.0
    found = resume.latest(resume_dir) if resume_dir is not None else None
    if found is not None:
        state, run_state = resume.restore(found, state)
        rng.bit_generator.state = run_state["sampler"]
        losses, start, before_s = run_state["losses"], run_state["step"] + 1, run_state["elapsed_s"]
        log(f"[sft {label}] resuming after step {run_state['step']}/{cfg.steps} ({before_s:.0f}s trained) from {found}")
    t0 = last_save = time.time()
    bar = progress_bar(int(cfg.steps), desc=f"sft {label}", initial=start - 1)
    for i in range(start, int(cfg.steps) + 1):
        bar.update(1)
        tokens, attn, target = data[(i - 1) % len(data)]
        idx = rng.integers(0, len(tokens), int(cfg.batch_size))
        state, loss = step(state, jnp.asarray(tokens[idx]), jnp.asarray(attn[idx]), jnp.asarray(target[idx]))
        if i % int(cfg.log_every) == 0 or i == int(cfg.steps):
            losses.append(float(loss))
            log(f"[sft {label}] step {i}/{cfg.steps} ({tasks[(i - 1) % len(tasks)].name}) loss {float(loss):.4f} "
                f"({time.time() - t0:.0f}s)")
        if resume_dir is not None and i < int(cfg.steps) and time.time() - last_save >= save_every_s:
            try:
                resume.save(resume_dir, i, state, {"sampler": rng.bit_generator.state, "losses": losses,
                                                   "elapsed_s": before_s + time.time() - t0}, keep=1)
            except OSError as e:  # parallel jobs training the same key share resume_dir; a lost save costs little
                log(f"[sft {label}] no checkpoint at step {i}: {e}")
            last_save = time.time()
    bar.close()
    nnx.update((model, optimizer), state)
    return losses, before_s + time.time() - t0


def new_model(model_cfg, seed: int) -> nnx.Module:
    from opd.model import Transformer

    return Transformer(model_cfg, rngs=nnx.Rngs(seed))


FINGERPRINT_SAMPLE_BYTES = 1 << 20


def init_fingerprint(path: str | Path) -> str:
    """What a Hugging Face checkpoint directory holds, for the cache key of an SFT that starts from it:
    config.json, and of every weight file its name, size, header (tensor names, shapes, dtypes) and a
    1 MiB sample from its middle; cheaper than hashing the weights, and any re-save changes it."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + size.to_bytes(8, "little") + fh.read(min(n, size)))
            fh.seek(max(size // 2 - FINGERPRINT_SAMPLE_BYTES // 2, 0))
            h.update(fh.read(FINGERPRINT_SAMPLE_BYTES))
    return h.hexdigest()


def sft_cache_key(sections: dict[str, Any], tasks: list, seed: int, init_from: str | Path | None = None) -> str:
    """The cache key of an SFT: its config sections, a sample of the demonstrations (so changed task code
    retrains) and, when it starts from a checkpoint, that checkpoint's fingerprint."""
    sample = _demonstrations(tasks, FINGERPRINT_PROBLEMS, seed)
    keyed = {**sections, "data": checkpoints.data_fingerprint(*(a for s in sample for a in s))}
    # Fields added after models were stored are left out at their defaults, so those models keep their keys.
    defaults = {"eps": SFTConfig.eps, "optimizer": SFTConfig.optimizer}
    if "sft" in keyed:
        keyed["sft"] = {k: v for k, v in keyed["sft"].items() if not (k in defaults and v == defaults[k])}
    if init_from is not None:  # an SFT'd checkpoint of this cache is named by its key, a Hugging Face one by its files
        is_ours = checkpoints.is_complete(init_from)
        keyed["init_from"] = checkpoints.read_meta(init_from)["key"] if is_ours else init_fingerprint(init_from)
    return checkpoints.cache_key(keyed)


def prepare(
    label: str,
    model_cfg,
    tasks: list,
    sections: dict[str, Any],
    sft_cfg,
    *,
    root: str | Path,
    checkpoint: str | Path | None = None,
    eval_fn: Callable[[nnx.Module], tuple[dict[str, float], dict[str, list]]] | None = None,
    eval_spec: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    init_from: str | Path | None = None,
    store: str | Path | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """A prepared model and its meta ({'key', 'path', 'trained', 'sft_eval', ...}), SFT'd on the
    demonstrations of `tasks` (one task or several, steps alternating).

    checkpoint: an explicit directory to load instead of the cache. Otherwise the cache key is the hash of
    `sections` (everything the model depends on: model, tasks, SFT settings) and of a sample of the
    demonstrations (so changed task code retrains); a complete cached checkpoint is loaded, else the model is
    trained, evaluated with `eval_fn` -> (scores, per-item outcomes), both stored in meta.json with `eval_spec`,
    what they depend on, so a caller measuring the same way can reuse them, and saved atomically.

    init_from: a checkpoint directory whose weights start the SFT instead of a random init: a Hugging Face one
    (loaded at `model_cfg.dtype`; `model_cfg` must be its config) or one this cache holds (prepare_base).

    store: a committed checkpoint store (opd/train/store.py); a model it holds under the same key is unpacked
    into the cache instead of being trained."""
    model = new_model(model_cfg, int(sft_cfg.seed))  # the structure a saved checkpoint is restored into
    if checkpoint is not None:
        checkpoints.load_model(model, checkpoint)
        meta = checkpoints.read_meta(checkpoint) if (Path(checkpoint) / checkpoints.META).exists() else {}
        log(f"[sft {label}] loaded {checkpoint}")
        return model, {**meta, "path": str(checkpoint), "trained": False}
    key = sft_cache_key(sections, tasks, int(sft_cfg.seed), init_from)
    path = Path(root) / key
    if not checkpoints.is_complete(path) and store is not None and unpack(key, store, root) is not None:
        log(f"[sft {label}] unpacked {archive(store, key)} (trained on an earlier machine) into {path}")
    if checkpoints.is_complete(path):
        checkpoints.load_model(model, path)
        meta = checkpoints.read_meta(path)
        log(f"[sft {label}] reusing cached checkpoint {path}")
        return model, {**meta, "path": str(path), "trained": False}
    if init_from is not None:
        if checkpoints.is_complete(init_from):
            checkpoints.load_model(model, init_from)  # an SFT'd model of this cache (same architecture)
        else:
            from opd.model import hf

            model = hf.load_pretrained(init_from, dtype=model_cfg.dtype)
            if model.cfg != model_cfg:
                raise ValueError(f"init_from: {init_from} holds another model than model_cfg "
                                 f"({model.cfg} vs {model_cfg})")
        log(f"[sft {label}] starting from the weights of {init_from}")
    partial = Path(root) / f".partial-{key}"  # run-state checkpoints of this key's SFT while it trains
    losses, train_s = train_sft(model, tasks, sft_cfg, label=label, log=log, resume_dir=partial)
    sft_eval, sft_items = eval_fn(model) if eval_fn is not None else ({}, {})
    if sft_eval:
        log(f"[sft {label}] held-out " + " ".join(f"{k} {v:.3f}" for k, v in sft_eval.items()))
    meta = {"key": key, "label": label, **sections, "init_from": None if init_from is None else str(init_from),
            "final_loss": losses[-1] if losses else None, "sft_eval": sft_eval, "sft_eval_spec": eval_spec,
            "sft_eval_items": sft_items,
            "train_time_s": round(train_s, 1), "provenance": _provenance()}
    checkpoints.save_model(model, path, meta)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"[sft {label}] saved {path}")
    return model, {**meta, "path": str(path), "trained": True}


def _provenance() -> dict[str, Any]:
    """Where the model was trained (revision, packages, devices): a retrain under the same cache key on another
    machine or software stack is not bit-identical, and can be a different model (results/notes/35_retraining.md)."""
    from opd.results import provenance

    return {k: v for k, v in provenance({}).items() if k != "config"}


def prepare_then(label: str, model_cfg, tasks: list, sections: dict[str, Any], sft_cfg, then: dict | None,
                 **kw: Any) -> tuple[nnx.Module, dict[str, Any]]:
    """`prepare(...)`, then, when `then` is set (a route's sft_then), a second SFT phase from its weights with
    `then`'s fields replacing the recipe's, cached under its own key (which names the first phase's); returns the
    last phase's model and meta. A given `checkpoint` replaces both phases."""
    from omegaconf import OmegaConf

    model, meta = prepare(label, model_cfg, tasks, sections, sft_cfg, **kw)
    if then is None or kw.get("checkpoint") is not None:
        return model, meta
    then_sft = OmegaConf.merge(sft_cfg, then)
    then_sections = {**sections, "sft": OmegaConf.to_container(then_sft, resolve=True), "role": "then"}
    return prepare(f"{label} then", model_cfg, tasks, then_sections, then_sft, **{**kw, "init_from": meta["path"]})


def prepare_base(label: str, model_cfg, base_task, sections: dict[str, Any], sft_cfg, steps: int, *,
                 root: str | Path, store: str | Path | None = None, log: Callable[[str], None] = print) -> str:
    """The checkpoint path of a teacher's base (a route's teacher_base_steps): the teacher's architecture SFT'd
    `steps` steps by the teacher's recipe on `base_task` (its demonstrations in the student's conventions),
    cached under its own key; the teacher's SFT then starts from it (prepare(..., init_from=path)). The teacher's
    key names the base's, so the base is prepared first: a store that is to spare a fresh machine both SFTs
    holds both models."""
    from omegaconf import OmegaConf

    base_sft = OmegaConf.merge(sft_cfg, {"steps": int(steps)})
    base_sections = {**sections, "sft": OmegaConf.to_container(base_sft, resolve=True), "role": "teacher_base"}
    _, meta = prepare(f"{label} base", model_cfg, [base_task], base_sections, base_sft, root=root, store=store,
                      log=log)
    return meta["path"]
