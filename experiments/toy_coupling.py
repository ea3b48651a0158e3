"""Future-reward coupling on the paper's toy (arXiv 2603.25562 §3.1, Fig 1, Fig A1–A3).

    python -m experiments.toy_coupling                       # full study → results/sandbox/toy_coupling
    python -m experiments.toy_coupling iterations=200 seeds=[42] hydra.run.dir=results/sandbox/toy_quick  # quick look
    python paper_figs/fig_toy_coupling.py results/sandbox/toy_coupling                    # the figures
    python -m experiments.toy_coupling teacher_sigma_min=1e-4   # drift ablations (docs/theory.md); also
    python -m experiments.toy_coupling mean_max=null            #   student_optimizer=sgd lr=3e-5

All seeds × γ run in one jitted, vmapped device call (synthetic/toy_control.py::make_study).

Outputs (opd.results.RunRecorder):
- metrics.jsonl: one row per distillation iteration `step` = 1..iterations with `task` ("left" on odd,
  "right" on even steps) and, for each of grad_var (paper's proxy, output layer), grad_var_all (all
  parameters), grad_norm, reverse_kl, final_dist, sigma, a nested list indexed [seed][gamma] in the order
  of `seeds` and `gammas` (also in each row's metrics.json `metrics.seeds` / `metrics.gammas`).
- metrics.json `metrics`: `eval` (end-of-training, [seed][gamma][task]: final_dist, success, reverse_kl,
  outside), `heatmaps` ([seed][gamma][task][time 0..T][position bin] integer visitation counts of
  `eval_rollouts` rollouts; bin edges `heatmap_edges`), `teacher_eval` / `teacher_heatmaps` (the same for
  the teachers, [seed][task]...), `teacher_returns` ([seed][task][teacher iteration]), `summary`.
"""

from __future__ import annotations

import time

import hydra
import jax
import jax.numpy as jnp
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from opd.cli import entry_point, output_dir
from opd.results import RunRecorder
from synthetic.toy_control import (
    TASK_NAMES,
    ToyControlConfig,
    init_mlp,
    make_study,
    num_params,
    seed_keys,
    validate,
)

ConfigStore.instance().store(name="base_toy_coupling", node=ToyControlConfig)

TRACE_KEYS = ("grad_var", "grad_var_all", "grad_norm", "reverse_kl", "final_dist", "sigma")


def run_study(cfg: ToyControlConfig, out_dir) -> dict:
    """Run every seed × γ in one device call and record rows + final metrics under out_dir."""
    validate(cfg)
    recorder = RunRecorder(out_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    study, _ = make_study(cfg)
    t0 = time.time()
    out = jax.block_until_ready(study(seed_keys(cfg.seeds), jnp.asarray(cfg.gammas, jnp.float32)))
    wall = time.time() - t0
    out = jax.tree.map(np.asarray, out)

    trace = out["trace"]  # each field [S, G, I]
    for i in range(cfg.iterations):
        step = i + 1
        recorder.log(step, task=TASK_NAMES[1 - step % 2], **{k: getattr(trace, k)[:, :, i] for k in TRACE_KEYS})

    ev, tev = out["eval"], out["teacher_eval"]  # fields [S, G, K, ...] and [S, K, ...]
    tail = max(2, cfg.iterations // 4)  # >= 2 so both tasks appear
    final = {
        "seeds": list(cfg.seeds),
        "gammas": [float(g) for g in cfg.gammas],
        "tasks": list(TASK_NAMES),
        "num_params": num_params(init_mlp(jax.random.PRNGKey(0), cfg.hidden)),
        "study_wall_s": round(wall, 2),
        "eval": {k: getattr(ev, k) for k in ("final_dist_K", "success_K", "reverse_kl_K", "outside_K")},
        "heatmaps": ev.counts_KxT1xX.astype(np.int64),
        "heatmap_edges": np.linspace(-cfg.heatmap_range, cfg.heatmap_range, cfg.heatmap_bins + 1),
        "teacher_eval": {k: getattr(tev, k) for k in ("final_dist_K", "success_K", "reverse_kl_K", "outside_K")},
        "teacher_heatmaps": tev.counts_KxT1xX.astype(np.int64),
        "teacher_returns": out["teacher_returns"],
        # Mean over the last quarter of iterations, [seed][gamma][task]: odd steps = left, even = right.
        "summary": {
            f"{k}_last_quarter": np.stack(
                [
                    getattr(trace, k)[:, :, -tail:][
                        :, :, (1 - (np.arange(cfg.iterations - tail, cfg.iterations) + 1) % 2) == task
                    ].mean(-1)
                    for task in (0, 1)
                ],
                -1,
            )
            for k in ("grad_var", "reverse_kl", "final_dist")
        },
    }
    recorder.finish(final)
    return final


@hydra.main(version_base="1.3", config_path="../conf", config_name="toy_coupling")
@entry_point
def main(cfg: DictConfig) -> None:
    validate(cfg)  # before any computation: one clear line naming the key (opd.cli.entry_point)
    schema: ToyControlConfig = OmegaConf.to_object(cfg)
    final = run_study(schema, output_dir())
    S, G = len(schema.seeds), len(schema.gammas)
    print(
        f"toy_coupling: {S} seeds x {G} gammas x {schema.iterations} iterations in "
        f"{final['study_wall_s']} s (one jitted call) -> {output_dir()}"
    )
    ev = final["eval"]
    for gi, g in enumerate(schema.gammas):
        var = np.median(final["summary"]["grad_var_last_quarter"][:, gi])
        dist = np.median(ev["final_dist_K"][:, gi])
        print(f"  gamma={g:<5} median grad-var (last quarter) {var:10.3g}   median final |s_T - target| {dist:.3f}")


if __name__ == "__main__":
    main()
