"""Multi-task on-policy distillation (Hydra entry point; config conf/multitask.yaml, schema
opd/train/multitask.py MultitaskConfig).

    python -m experiments.multitask                                   # sampled-token OPD, arithmetic + textworld
    python -m experiments.multitask -m loss=sampled_token,lsm loss.mask_special_tokens=false,true seed=0,1,2
    python -m experiments.multitask tasks=[arithmetic] teachers.arithmetic.tokenizer=variant \
        teachers.arithmetic.token_mapping=surface                     # failure mode 3: a mismatched teacher

Flow: validate (one ConfigError line, nothing written; a task without a teacher or a teacher vocabulary
without a declared mapping is refused here) -> SFT or load one teacher per task (own tokenizer, own size)
and the student on all tasks -> evaluate teachers and the initial student -> alternate tasks, one per step
(opd/train/multitask.py) -> metrics.jsonl rows, diagnostics.json (failure-mode records) and metrics.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import jax
from omegaconf import DictConfig

from opd.cli import entry_point, output_dir, progress, run_main
from opd.train.multitask import register_multitask_configs, validate_multitask

register_multitask_configs()


def run_experiment(cfg, built, out_dir: Path, *, log=progress) -> dict:
    from opd.results import RunRecorder
    from opd.train.config import to_container
    from opd.train.multitask import build_routes, run_multitask, teacher_scores

    t0 = time.time()
    student, routes, paths = build_routes(cfg, built, log=log)
    eval_key = jax.random.key(int(cfg.eval_seed))
    teacher = teacher_scores(routes, built, eval_key)
    log("[eval] " + " ".join(f"{k} {v:.3f}" for k, v in teacher.items()))
    resolved = to_container(cfg)
    resolved["checkpoints"] = paths
    recorder = RunRecorder(out_dir, resolved)
    result = run_multitask(cfg, student, routes, recorder=recorder, diagnostics_path=out_dir / "diagnostics.json",
                           log=log)
    first, last = result["evals"][0], result["evals"][max(result["evals"])]
    final = {**teacher, **{f"initial/{k}": v for k, v in first.items()}, **{f"final/{k}": v for k, v in last.items()},
             "time/total_s": time.time() - t0}
    path = recorder.finish(final)
    log("[done] " + " ".join(f"{k} {v:.3f}" for k, v in final.items()))
    log(f"[done] results: {path}")
    return final


@hydra.main(version_base="1.3", config_path="../conf", config_name="multitask")
@entry_point
def main(cfg: DictConfig) -> float:
    built = validate_multitask(cfg)
    final = run_experiment(cfg, built, output_dir())
    return float(sum(v for k, v in final.items() if k.startswith("final/")))


_GROUPS = {"loss": "loss", "rollout": "rollout", "optimizer": "optimizer", "experiment": "experiment",
           "model@student": "model"}

if __name__ == "__main__":
    run_main(main, _GROUPS, "multitask")
