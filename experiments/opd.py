"""On-policy distillation (Hydra entry point; config conf/opd.yaml, schema opd/train/config.py).

    python -m experiments.opd                                      # one LSM run, arithmetic
    python -m experiments.opd -m loss=sampled_token,lsm seed=0,1,2  # the paper's comparison, 3 seeds
    python -m experiments.opd experiment=multitask                 # arithmetic + text world, a teacher each
    python -m experiments.opd experiment=smoke                     # the whole pipeline, tiny
    python -m experiments.opd model@student=hf student.path=DIR \
        model@tasks.arithmetic.teacher=hf tasks.arithmetic.teacher.path=DIR

Flow: validate the config (one ConfigError line, nothing written, on a bad value) -> prepare or reuse each
route's SFT teacher (on its task, in its tokenizer) and the SFT student (on every task), cached by config
hash -> evaluate teachers and the initial student -> OPD over the routes (opd/train/loop.py) -> in the job's
output directory: metrics.jsonl (a row per step), eval_items.jsonl (every held-out outcome, per item and
sample), diagnostics.json (failure-mode records, when diagnostics_every > 0) and metrics.json (initial,
final and teacher scores per task, the resolved config, the git revision).

Hugging Face checkpoints (conf/model/hf.yaml, `<section>.path=DIR`, optional `<section>.dtype`) are loaded
as is with opd.model.hf.load_pretrained, with no SFT; `tasks.<r>.teacher_sft=true` instead SFTs an HF teacher
from its checkpoint's weights (cached like every SFT), and `tokenizer=hf` makes the HF student's own tokenizer
and chat template the run's, for the jsonl task (experiment=smollm2_smoke: SmolLM2-135M-Instruct on CPU).
Validation checks before anything runs that the
directory holds config.json and matching safetensors, that an HF teacher and an HF student share one
vocabulary, that the checkpoint's vocab_size covers the task tokenizer's (the generated tasks speak
opd.tasks.Tokenizer ids; sampled ids above it decode to nothing, as HF tokenizers treat padded embedding
rows) and that max_position_embeddings covers prompt + response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import jax
from omegaconf import DictConfig

from opd.cli import entry_point, output_dir, progress, run_main
from opd.train.config import register_configs, to_container, validate

register_configs()


# Keys that may change between a run and its resumption (they do not change what is computed).
RESUME_VOLATILE = ("resume", "log_every", "checkpoint_every", "keep_checkpoints", "wandb", "compile_cache")


def check_run_dir(cfg: Any, out_dir: Path) -> dict[str, Any]:
    """Where the run writes and whether it resumes, checked before any computation: {'dir', 'resume_step',
    'config'}. A directory holding a finished run, or rows without a checkpoint, is refused (never
    overwritten); a checkpoint written by another configuration is refused naming what differs."""
    from opd.cli import ConfigError
    from opd.train import resume

    run_dir = Path(str(cfg.resume)) if cfg.resume is not None else out_dir
    key = "resume" if cfg.resume is not None else "hydra.run.dir"
    config = {k: v for k, v in to_container(cfg).items() if k not in RESUME_VOLATILE}
    if (run_dir / "metrics.json").exists():
        raise ConfigError(f"{key}: {run_dir} already holds a finished run (metrics.json); choose another directory")
    checkpoint = resume.latest(run_dir)
    if checkpoint is None:
        if cfg.resume is not None:
            raise ConfigError(f"resume: {run_dir} holds no complete checkpoint (checkpoints/step_*/)")
        if (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"{key}: {run_dir} holds rows of a run but no checkpoint to resume from; choose "
                              "another directory")
        return {"dir": run_dir, "resume_step": None, "config": config}
    saved = json.loads((checkpoint / resume.RUN_STATE).read_text())
    differs = resume.config_differences(saved["config"], config)
    if differs:
        raise ConfigError(f"{key}: the checkpoint {checkpoint} was written by another configuration: "
                          + "; ".join(differs[:5]) + (f" (+{len(differs) - 5} more)" if len(differs) > 5 else ""))
    return {"dir": run_dir, "resume_step": int(saved["step"]), "config": config}


def run_experiment(cfg: Any, built: dict[str, Any], out_dir: Path, *, log: Callable[[str], None] = progress,
                   run: dict[str, Any] | None = None) -> dict:
    """Everything after validation (and `check_run_dir`, whose result is `run`). Returns the final metrics
    written to metrics.json."""
    run = check_run_dir(cfg, out_dir) if run is None else run
    out_dir = run["dir"]
    from opd.results import RunRecorder, write_jsonl
    from opd.tasks.common import teacher_cache_section
    from opd.train import evaluate as ev
    from opd.train.checkpoints import read_eval, write_eval
    from opd.train.loop import Route, run_opd, run_sampler
    from opd.train.sft import prepare_base, prepare_then

    t_start = time.time()
    resolved = to_container(cfg)
    eval_key = jax.random.key(int(cfg.eval_seed))
    route_cfgs = built["routes"]
    eval_items = {name: r["task"].items(str(cfg.eval_split), int(cfg.eval_problems), int(cfg.eval_seed))
                  for name, r in route_cfgs.items()}

    def eval_spec(name: str, n: int) -> dict[str, Any]:
        """Everything a held-out evaluation's numbers depend on besides the model."""
        return {"task": resolved["tasks"][name]["task"], "split": str(cfg.eval_split), "items": n,
                "eval_seed": int(cfg.eval_seed),
                "samples": int(cfg.eval_samples), "batch_size": min(int(cfg.eval_batch_size), n)}

    def evaluate(model, name: str, task, n: int, prefix: str) -> tuple[dict[str, float], list]:
        """Held-out scores of `model` on the first `n` eval items of route `name`, measured as eval_spec."""
        return ev.evaluate(model, task, eval_items[name][:n], eval_key, samples=int(cfg.eval_samples),
                           batch_size=eval_spec(name, n)["batch_size"], prefix=prefix, sample_fn=run_sampler(cfg))

    def sft_eval(names_tasks: list[tuple[str, Any]], n_of: Callable[[str], int]):
        """eval_fn and eval_spec for prepare(): the model's held-out scores on each of its tasks, and the
        per-item outcomes by task."""
        def eval_fn(model):
            out, items = {}, {}
            for name, task in names_tasks:
                metrics, items[name] = evaluate(model, name, task, n_of(name), f"{name}/")
                out.update(metrics)
            return out, items
        return eval_fn, {name: eval_spec(name, n_of(name)) for name, _ in names_tasks}

    def held_out(model, meta: dict[str, Any], names_tasks: list[tuple[str, Any]], prefix: str):
        """The model's held-out scores and per-item outcomes per task: those stored with its checkpoint when
        they were measured the same way (same items, key, samples, batch) after SFT or by an earlier job, else
        a fresh evaluation, stored beside the checkpoint for the next job."""
        spec = {name: eval_spec(name, len(eval_items[name])) for name, _ in names_tasks}
        if meta.get("sft_eval") and meta.get("sft_eval_spec") == spec:
            log(f"[eval] {prefix.rstrip('/')}: the held-out scores measured after SFT (same items and key)")
            return {prefix + k: v for k, v in meta["sft_eval"].items()}, meta.get("sft_eval_items", {})
        # only models this run's cache owns; a user's own checkpoint or Hugging Face directory is never written
        path = meta.get("path") if meta.get("path") and Path(meta["path"]).absolute().is_relative_to(
            Path(cfg.checkpoint_root).absolute()) else None
        if path and (stored := read_eval(path, spec)) is not None:
            log(f"[eval] {prefix.rstrip('/')}: the held-out scores an earlier job measured the same way")
            return {prefix + k: v for k, v in stored["scores"].items()}, stored["items"]
        scores, items = {}, {}
        for name, task in names_tasks:
            metrics, items[name] = evaluate(model, name, task, len(eval_items[name]), f"{name}/")
            scores.update(metrics)
        if path:
            write_eval(path, spec, {"scores": scores, "items": items})
        return {prefix + k: v for k, v in scores.items()}, items

    def prepare_model(label, model_cfg, hf_dir, names_tasks, sections, sft_cfg, checkpoint, n_of, hf_sft=False,
                      base=None, then=None):
        if hf_dir is not None and not hf_sft:  # a Hugging Face checkpoint replaces SFT preparation
            return load_hf(label, hf_dir, model_cfg, log=log)
        eval_fn, spec = sft_eval(names_tasks, n_of)
        return prepare_then(label, model_cfg, [t for _, t in names_tasks], sections, sft_cfg, then,
                            root=cfg.checkpoint_root, store=cfg.checkpoint_store, checkpoint=checkpoint,
                            eval_fn=eval_fn, eval_spec=spec, log=log, init_from=hf_dir if base is None else base)

    teachers, teacher_scores, item_rows = {}, {}, []
    for name, r in route_cfgs.items():
        rc = cfg.tasks[name]
        sections = {"model": r["teacher"].to_dict(),
                    "task": teacher_cache_section(r["task"], resolved["tasks"][name]["task"]),
                    "tokenizer": [cfg.tokenizer, rc.teacher_tokenizer], "sft": resolved["tasks"][name]["sft"]}
        base = None if r["base_task"] is None else prepare_base(
            f"teacher/{name}", r["teacher"], r["base_task"], sections, rc.sft, rc.teacher_base_steps,
            root=cfg.checkpoint_root, store=cfg.checkpoint_store, log=log)
        teachers[name], tmeta = prepare_model(
            f"teacher/{name}", r["teacher"], r["hf_teacher"], [(name, r["teacher_task"])], sections, rc.sft,
            rc.teacher_checkpoint, lambda _n, rc=rc: min(int(rc.sft.eval_problems), int(cfg.eval_problems)),
            hf_sft=r["teacher_sft"], base=base, then=rc.sft_then)
        scores, items = held_out(teachers[name], tmeta, [(name, r["teacher_task"])], "teacher/")
        teacher_scores.update(scores)
        item_rows += [{"phase": "teacher", "task": name, **row} for row in items.get(name, [])]
        resolved.setdefault("checkpoints", {})[f"teacher/{name}"] = tmeta.get("path")
    student_tasks = [(name, r["task"]) for name, r in route_cfgs.items()]
    sections = {"model": built["student"].to_dict(), "tokenizer": cfg.tokenizer,
                "tasks": {name: resolved["tasks"][name]["task"] for name in route_cfgs},
                "sft": resolved["sft_student"]}
    student, smeta = prepare_model(
        "student", built["student"], built["hf_student"], student_tasks, sections, cfg.sft_student,
        cfg.student_checkpoint, lambda _n: min(int(cfg.sft_student.eval_problems), int(cfg.eval_problems)))
    resolved.setdefault("checkpoints", {})["student"] = smeta.get("path")
    initial, items = held_out(student, smeta, student_tasks, "initial/")
    item_rows += [{"phase": "initial", "task": name, **row} for name, rows in items.items() for row in rows]
    prep_s = time.time() - t_start
    log("[eval] teachers " + " ".join(f"{k} {v:.3f}" for k, v in teacher_scores.items())
        + " | student before OPD " + " ".join(f"{k} {v:.3f}" for k, v in initial.items()))

    resolved["effective_models"] = {"student": built["student"].to_dict(),
                                    **{f"teacher/{n}": r["teacher"].to_dict() for n, r in route_cfgs.items()}}
    recorder = RunRecorder(out_dir, resolved, resume_step=run["resume_step"])
    routes = [Route(name=name, task=r["task"], teacher=teachers[name], mapping=r["mapping"],
                    train_items=r["task"].items("train", int(cfg.train_problems), int(cfg.train_seed)),
                    eval_items=eval_items[name]) for name, r in route_cfgs.items()]
    t_opd = time.time()
    from opd.sharding import make_mesh

    mesh = make_mesh(int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor))
    result = run_opd(cfg, student, routes, recorder=recorder, log=log, mesh=mesh, chunk_size=built["chunk_size"],
                     diagnostics_path=out_dir / "diagnostics.json" if int(cfg.diagnostics_every) else None,
                     run_dir=out_dir, checkpoint_every=int(cfg.checkpoint_every),
                     keep_checkpoints=int(cfg.keep_checkpoints), run_config=run["config"],
                     on_nonfinite=str(cfg.on_nonfinite))
    opd_s = time.time() - t_opd

    last_step = max(result["evals"])
    final_scores = {"final/" + k[len("eval/"):]: v for k, v in result["evals"][last_step].items()}
    item_rows += [{"phase": "final", "task": name, **row}
                  for name, rows in result["eval_items"][last_step].items() for row in rows]
    write_jsonl(out_dir / "eval_items.jsonl", item_rows)
    rows = result["rows"]
    timing = {k: sum(r[k] for r in rows[1:]) / max(len(rows) - 1, 1)  # step 1 includes compilation
              for k in ("time/sample_s", "time/score_s", "time/update_s")}
    metric = {name: r["task"].metric for name, r in route_cfgs.items()}
    final = {
        **teacher_scores, **initial, **final_scores,
        # the sweep's objective: the macro mean of every task's final sampled score
        "final/score": sum(final_scores[f"final/{n}/{m}"] for n, m in metric.items()) / len(metric),
        "final/loss": rows[-1]["loss"],
        **{f"mean_{k}": v for k, v in timing.items()},
        # the update program's peak memory per device (the largest over routes)
        **({"update_peak_bytes": max(r["update_peak_bytes"] for r in rows)}
           if all("update_peak_bytes" in r for r in rows) else {}),
        "time/prepare_s": prep_s, "time/opd_s": opd_s,
    }
    path = recorder.finish(final)
    for name, m in metric.items():
        log(f"[done] {name}: teacher {final[f'teacher/{name}/{m}']:.3f} | student {final[f'initial/{name}/{m}']:.3f}"
            f" -> {final[f'final/{name}/{m}']:.3f} (sampled), greedy {final[f'initial/{name}/greedy_{m}']:.3f} -> "
            f"{final[f'final/{name}/greedy_{m}']:.3f}")
    log(f"[done] results: {path} and {path.parent / 'metrics.jsonl'} ({time.time() - t_start:.0f}s)")
    return final


def load_hf(role: str, path: str, model_cfg: Any, *, log: Callable[[str], None] = progress) -> tuple[Any, dict]:
    """A Hugging Face checkpoint loaded as is (validated by opd.train.config.validate), and its meta."""
    from opd.model import hf

    model = hf.load_pretrained(path, dtype=model_cfg.dtype)
    log(f"[hf {role}] loaded {path} ({hf.num_parameters(model.cfg) / 1e6:.2f}M parameters, "
        f"vocab {model.cfg.vocab_size}, {model.cfg.dtype}; no SFT)")
    return model, {"path": str(path), "trained": False, "format": "hf"}


_GROUPS = {"loss": "loss", "rollout": "rollout", "optimizer": "optimizer", "experiment": "experiment"}


@hydra.main(version_base="1.3", config_path="../conf", config_name="opd")
@entry_point
def main(cfg: DictConfig) -> float:
    built = validate(cfg)  # ConfigError -> one line on stderr, exit 2, job dir removed
    if cfg.loss.name in cfg.tuned_lr:  # the validation choice (paper_figs/tune.py); the run records it
        cfg.optimizer.lr = float(cfg.tuned_lr[cfg.loss.name])
    run = check_run_dir(cfg, output_dir())
    if cfg.compile_cache is not None:  # before the first compilation
        from opd import compile_cache

        compile_cache.enable(cfg.compile_cache)
    final = run_experiment(cfg, built, output_dir(), run=run)
    return float(final["final/score"])


if __name__ == "__main__":
    run_main(main, _GROUPS, "opd", validate)
