"""On-policy distillation experiment (Hydra entry point; config conf/opd.yaml, schema opd/train/config.py).

    python -m experiments.opd                                      # one LSM run on the default config
    python -m experiments.opd -m loss=sampled_token,lsm seed=0,1,2  # the paper's comparison, 3 seeds
    python -m experiments.opd experiment=smoke                     # the whole pipeline, tiny
    python -m experiments.opd model@student=hf student.path=DIR model@teacher=hf teacher.path=DIR

Flow: validate the config (one ConfigError line, nothing written, on a bad value) -> prepare or reuse the
SFT teacher and student (opd/train/sft.py, cached by config hash) -> evaluate teacher and initial student
-> OPD (opd/train/loop.py) -> metrics.jsonl rows per step and metrics.json (initial/final/teacher accuracy,
resolved config, git revision) in the Hydra job's output directory.

Hugging Face checkpoints (conf/model/hf.yaml, `<role>.path=DIR`, optional `<role>.dtype`): that model is
loaded as is with opd.model.hf.load_pretrained, with no SFT (as teacher_checkpoint/student_checkpoint do
for orbax checkpoints); either role or both. Validation checks before anything runs that the directory
holds config.json and matching safetensors, that an HF teacher and an HF student share one vocabulary, that
the checkpoint's vocab_size covers the task tokenizer's (the generated tasks speak opd.tasks.Tokenizer
ids, so the checkpoint must have been saved with at least that vocabulary; sampled ids above it decode
to nothing, as HF tokenizers treat padded embedding rows, and such a response scores 0) and that
max_position_embeddings covers prompt + response. A conf/model partner's vocab_size is padded up to the
checkpoint's.
"""

from __future__ import annotations

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


def run_experiment(cfg: Any, built: dict[str, Any], out_dir: Path, *, log: Callable[[str], None] = progress) -> dict:
    """Everything after validation. Returns the final metrics written to metrics.json."""
    from opd.results import RunRecorder
    from opd.train import evaluate as ev
    from opd.train.loop import TaskSpec, run_opd
    from opd.train.sft import prepare

    t_start = time.time()
    task = built["task"]
    resolved = to_container(cfg)
    max_new = int(cfg.rollout.max_new_tokens or task.max_response_len)
    eval_problems = task.problems("eval", int(cfg.eval_problems), int(cfg.eval_seed))
    eval_key = jax.random.key(int(cfg.eval_seed))

    def eval_spec(n: int) -> dict[str, Any]:
        """Everything a held-out evaluation's numbers depend on besides the model."""
        return {"task": resolved["task"], "problems": n, "eval_seed": int(cfg.eval_seed),
                "max_new_tokens": max_new, "batch_size": min(int(cfg.eval_batch_size), n)}

    def evaluate(model, n: int, prefix: str = "") -> dict[str, float]:
        """Held-out accuracy on the first `n` eval problems, measured as `eval_spec(n)` describes."""
        return ev.evaluate(model, task, eval_problems[:n], eval_key, max_new_tokens=max_new,
                           batch_size=eval_spec(n)["batch_size"], prefix=prefix)

    def held_out(model, meta: dict[str, Any], prefix: str) -> dict[str, float]:
        """The model's held-out accuracy: the numbers stored with its checkpoint when they were measured
        the same way (same problems, key, budget, batch), else a fresh evaluation."""
        if meta.get("sft_eval") and meta.get("sft_eval_spec") == eval_spec(len(eval_problems)):
            log(f"[eval] {prefix.rstrip('/')}: the held-out accuracy measured after SFT (same problems and key)")
            return {prefix + k: v for k, v in meta["sft_eval"].items()}
        return evaluate(model, len(eval_problems), prefix)

    def model(role: str, checkpoint: str | None):
        hf_dir = built.get("hf_paths", {}).get(role)
        if hf_dir is not None:  # a Hugging Face checkpoint replaces SFT preparation
            return load_hf(role, hf_dir, built[role], log=log)
        n_sft = int(cfg[f"sft_{role}"].eval_problems)
        return prepare(
            role, built[role], built[role].to_dict(), task, resolved["task"], cfg[f"sft_{role}"],
            resolved[f"sft_{role}"], root=cfg.checkpoint_root, checkpoint=checkpoint,
            eval_fn=lambda m: evaluate(m, n_sft), eval_spec=eval_spec(n_sft), log=log)

    teacher, tmeta = model("teacher", cfg.teacher_checkpoint)
    student, smeta = model("student", cfg.student_checkpoint)
    prep_s = time.time() - t_start

    teacher_acc = held_out(teacher, tmeta, "teacher/")
    initial_acc = held_out(student, smeta, "initial/")
    log("[eval] teacher acc {:.3f} greedy {:.3f} | student before OPD acc {:.3f} greedy {:.3f}".format(
        teacher_acc["teacher/accuracy"], teacher_acc["teacher/greedy_accuracy"],
        initial_acc["initial/accuracy"], initial_acc["initial/greedy_accuracy"]))

    resolved["checkpoints"] = {"teacher": tmeta.get("path"), "student": smeta.get("path")}
    resolved["effective_models"] = {"teacher": built["teacher"].to_dict(), "student": built["student"].to_dict()}
    recorder = RunRecorder(out_dir, resolved)
    spec = TaskSpec(task=task, teacher=teacher,
                    train_problems=task.problems("train", int(cfg.train_problems), int(cfg.train_seed)),
                    eval_problems=eval_problems, max_new_tokens=max_new)
    t_opd = time.time()
    result = run_opd(cfg, student, spec, recorder=recorder, log=log)
    opd_s = time.time() - t_opd

    last = result["evals"][max(result["evals"])]
    rows = result["rows"]
    timing = {k: sum(r[k] for r in rows[1:]) / max(len(rows) - 1, 1)  # step 1 includes compilation
              for k in ("time/sample_s", "time/score_s", "time/update_s")}
    final = {
        **teacher_acc, **initial_acc,
        "final/accuracy": last["eval/accuracy"], "final/greedy_accuracy": last["eval/greedy_accuracy"],
        "final/loss": rows[-1]["loss"],
        **{f"mean_{k}": v for k, v in timing.items()},
        "time/prepare_s": prep_s, "time/opd_s": opd_s,
    }
    path = recorder.finish(final)
    log("[done] teacher {:.3f} | student {:.3f} -> {:.3f} (sampled pass@1), greedy {:.3f} -> {:.3f}".format(
        final["teacher/accuracy"], final["initial/accuracy"], final["final/accuracy"],
        final["initial/greedy_accuracy"], final["final/greedy_accuracy"]))
    log(f"[done] results: {path} and {path.parent / 'metrics.jsonl'} ({time.time() - t_start:.0f}s)")
    return final


def load_hf(role: str, path: str, model_cfg: Any, *, log: Callable[[str], None] = progress) -> tuple[Any, dict]:
    """A Hugging Face checkpoint loaded as is (validated by opd.train.config.validate), and its meta."""
    from opd.model import hf

    model = hf.load_pretrained(path, dtype=model_cfg.dtype)
    log(f"[hf {role}] loaded {path} ({hf.num_parameters(model.cfg) / 1e6:.2f}M parameters, "
        f"vocab {model.cfg.vocab_size}, {model.cfg.dtype}; no SFT)")
    return model, {"path": str(path), "trained": False, "format": "hf"}


_GROUPS = {"loss": "loss", "task": "task", "rollout": "rollout", "optimizer": "optimizer",
           "experiment": "experiment", "model@student": "model", "model@teacher": "model"}


@hydra.main(version_base="1.3", config_path="../conf", config_name="opd")
@entry_point
def main(cfg: DictConfig) -> float:
    built = validate(cfg)  # ConfigError -> one line on stderr, exit 2, job dir removed
    final = run_experiment(cfg, built, output_dir())
    return float(final["final/accuracy"])


if __name__ == "__main__":
    run_main(main, _GROUPS, "opd")
