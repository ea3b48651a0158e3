"""Future-reward coupling study (a): SGD on a tabular student with ĝ_γ (issue 3, item 5a).

    python -m experiments.sandbox_sgd                          # 3 seeds × γ ∈ {0, .25, .5, .75, 1}
    python -m experiments.sandbox_sgd lr=1.0 num_iters=200 hydra.run.dir=results/sandbox/sgd_quick      # a quick look
    python paper_figs/fig_sgd_coupling.py results/sandbox/sgd  # the figure

All seeds × γ run as one jitted call: jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None))) over
`make_run(cfg) -> run(rng, gamma)` (synthetic/sgd_study.py, which defines every metric).

Rows (one job for all γ): metrics.jsonl has one row per SGD iteration `step` = 0..num_iters-1 with
kl, variance, bias, grad_norm, exact_grad_norm, instability — each a nested list [seed][gamma] in the
order of `seeds` and `gammas` (repeated in metrics.json `metrics.seeds` / `metrics.gammas`).
metrics.json `metrics.summary` has per-γ means over seeds: final KL, mean variance over the last
quarter, mean and max instability.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from opd.cli import entry_point, output_dir, require
from opd.results import RunRecorder
from synthetic import tabular
from synthetic.sgd_study import SGDStudyConfig, make_run

TRACE_KEYS = ("kl", "variance", "bias", "grad_norm", "exact_grad_norm", "instability")


@dataclass
class SandboxSGDConfig:
    name: str = "sandbox_sgd"
    vocab: int = 3  # V
    horizon: int = 6  # T (V^T sequences are enumerated every iteration for the exact diagnostics)
    teacher_scale: float = 2.0  # teacher logits ~ N(0, scale²), fixed by teacher_seed
    student_scale: float = 0.1  # initial student logits ~ N(0, scale²), drawn per seed
    teacher_seed: int = 0
    lr: float = 2.0  # plain SGD step size on the logit table
    batch_size: int = 16  # Monte Carlo sequences per update
    num_iters: int = 400
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])


ConfigStore.instance().store(name="base_sandbox_sgd", node=SandboxSGDConfig)


def validate(cfg) -> None:
    require(cfg.vocab >= 2, "vocab", "an integer >= 2", cfg.vocab)
    require(cfg.horizon >= 1, "horizon", "an integer >= 1", cfg.horizon)
    require(cfg.vocab**cfg.horizon <= 100_000, "horizon", "V^T <= 100000 (exact diagnostics every iteration)",
            cfg.horizon)
    require(cfg.lr > 0, "lr", "> 0", cfg.lr)
    require(cfg.batch_size >= 1, "batch_size", "an integer >= 1", cfg.batch_size)
    require(cfg.num_iters >= 1, "num_iters", "an integer >= 1", cfg.num_iters)
    require(len(cfg.seeds) >= 1, "seeds", "a non-empty list", list(cfg.seeds))
    require(len(cfg.gammas) >= 1 and all(0.0 <= g <= 1.0 for g in cfg.gammas), "gammas",
            "a non-empty list of floats in [0, 1]", list(cfg.gammas))
    require(cfg.teacher_scale > 0 and cfg.student_scale >= 0, "teacher_scale/student_scale", "> 0 / >= 0",
            (cfg.teacher_scale, cfg.student_scale))
    tabular.validate_sizes(cfg.vocab, cfg.horizon)


def run_study(cfg, out_dir) -> dict:
    validate(cfg)
    recorder = RunRecorder(out_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    study_cfg = SGDStudyConfig(vocab=cfg.vocab, horizon=cfg.horizon, teacher_scale=cfg.teacher_scale,
                               student_scale=cfg.student_scale, teacher_seed=cfg.teacher_seed, lr=cfg.lr,
                               batch_size=cfg.batch_size, num_iters=cfg.num_iters)
    t0 = time.time()
    with jax.enable_x64(True):
        run = make_run(study_cfg)
        study = jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))
        keys = jax.vmap(jax.random.key)(jnp.asarray(list(cfg.seeds)))
        trace, _ = study(keys, jnp.asarray(list(cfg.gammas), jnp.float64))
        trace = jax.tree.map(np.asarray, jax.block_until_ready(trace))  # each [S, G, I]
    wall = time.time() - t0
    for i in range(cfg.num_iters):
        recorder.log(i, **{k: trace[k][:, :, i] for k in TRACE_KEYS})
    tail = max(1, cfg.num_iters // 4)
    summary = {
        "final_kl": trace["kl"][:, :, -1].mean(0),
        "variance_last_quarter": trace["variance"][:, :, -tail:].mean((0, 2)),
        "variance_first": trace["variance"][:, :, 0].mean(0),
        "instability_mean": trace["instability"].mean((0, 2)),
        "instability_max": trace["instability"].max((0, 2)),
        "kl_increase_frac": (trace["instability"] > 0).mean((0, 2)),
    }
    final = {"seeds": list(cfg.seeds), "gammas": [float(g) for g in cfg.gammas], "study_wall_s": round(wall, 2),
             "summary": summary}
    recorder.finish(final)
    return final


@hydra.main(version_base="1.3", config_path="../conf", config_name="sandbox_sgd")
@entry_point
def main(cfg: DictConfig) -> None:
    validate(cfg)
    final = run_study(cfg, output_dir())
    s = final["summary"]
    print(f"sandbox_sgd: {len(cfg.seeds)} seeds x {len(cfg.gammas)} gammas x {cfg.num_iters} iterations in "
          f"{final['study_wall_s']} s -> {output_dir()}")
    for gi, g in enumerate(final["gammas"]):
        print(f"  gamma={g:<5} final KL {s['final_kl'][gi]:.4f}  variance (last quarter) "
              f"{s['variance_last_quarter'][gi]:.4g}  instability mean {s['instability_mean'][gi]:.2e} "
              f"max {s['instability_max'][gi]:.3f}")


if __name__ == "__main__":
    main()
