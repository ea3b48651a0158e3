"""Which suppressor hides the paper's drift at γ = 1? The toy's ablations side by side (docs/theory.md).

    python paper_figs/fig_toy_ablation.py results/sandbox/toy_coupling results/sandbox/toy_ablation [out_dir]

Reads the baseline job and every job under the ablation directory (one per ablation: teacher_sigma,
unbounded_mean, sgd; written by `python -m experiments.toy_coupling <override>`, see paper_figs/sandbox.sh)
and writes fig_toy_ablation.png:
(a) variance gap vs iteration: the paper's variance proxy at γ = 1 over γ = 0, per seed (thin) and the
    median over seeds (thick), both tasks, moving mean of log10 over `SMOOTH` iterations;
(b) end-of-training distance to target |s_T − target| per γ (each seed × task a dot, median a line);
    dashed: the success radius 1;
(c) success rate P(|s_T − target| < 1) per γ, mean over seeds and tasks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import PALETTE, get, load_jobs, plt, save, setup_style

SMOOTH = 41
ABLATIONS = {  # directory name -> label
    "baseline": "baseline (σ floor 0.1 for all, µ = 2 tanh, Adam 1e-3)",
    "teacher_sigma": "teachers' σ floor 1e-4",
    "unbounded_mean": "unbounded action mean",
    "sgd": "plain SGD, lr 3e-5",
}


def smooth_log(y: np.ndarray, w: int = SMOOTH) -> np.ndarray:
    ly = np.log10(np.maximum(y, 1e-30))
    k = np.ones(w) / w
    return np.apply_along_axis(lambda v: np.convolve(np.pad(v, w // 2, mode="edge"), k, "valid"), -1, ly)


def load(baseline_dir: str, ablation_dir: str) -> dict[str, dict]:
    jobs = {"baseline": load_jobs(baseline_dir)[-1]}
    for job in load_jobs(ablation_dir):
        jobs[Path(job["dir"]).name] = job
    missing = [k for k in ABLATIONS if k not in jobs]
    if missing:
        print(f"note: no job for {missing}; plotting the rest")
    return {k: jobs[k] for k in ABLATIONS if k in jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline_dir")
    parser.add_argument("ablation_dir")
    parser.add_argument("out_dir", nargs="?", default=None)
    args = parser.parse_args()
    setup_style()
    jobs = load(args.baseline_dir, args.ablation_dir)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained", width_ratios=[1.4, 1, 0.8])
    for c, (key, job) in enumerate(jobs.items()):
        color = PALETTE[c % len(PALETTE)]
        gammas = job["metrics"]["gammas"]
        var_ISG = np.array([r["grad_var"] for r in job["rows"]], dtype=float)
        steps = np.array([r["step"] for r in job["rows"]])
        gap_SI = smooth_log(var_ISG[:, :, gammas.index(1.0)].T) - smooth_log(var_ISG[:, :, gammas.index(0.0)].T)
        for g in gap_SI:
            axes[0].plot(steps, 10**g, color=color, lw=0.6, alpha=0.45)
        axes[0].plot(steps, 10 ** np.median(gap_SI, 0), color=color, lw=1.8, label=ABLATIONS[key])
        dist_SGK = np.asarray(job["metrics"]["eval"]["final_dist_K"], dtype=float)
        x = np.arange(len(gammas)) + (c - 1.5) * 0.12
        for si in range(dist_SGK.shape[0]):
            for k in range(dist_SGK.shape[2]):
                axes[1].scatter(x, dist_SGK[si, :, k], color=color, s=10, alpha=0.6, lw=0)
        axes[1].plot(x, np.median(dist_SGK, axis=(0, 2)), color=color, lw=1.4)
        success_G = np.asarray(job["metrics"]["eval"]["success_K"], dtype=float).mean(axis=(0, 2))
        axes[2].plot(gammas, success_G, marker="o", color=color, lw=1.4, ms=4)
        ticks = gammas
    axes[0].axhline(10, color="grey", ls=":", lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("variance(γ = 1) / variance(γ = 0)")
    axes[0].set_title("(a) variance gap (thin: seeds, thick: median)", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")
    axes[1].axhline(1.0, color="grey", ls="--", lw=1)
    axes[1].set_yscale("log")
    axes[1].set_xticks(np.arange(len(ticks)), [f"{g:g}" for g in ticks])
    axes[1].set_xlabel("γ")
    axes[1].set_ylabel("|s_T − target| after training")
    axes[1].set_title("(b) distance to target (dots: seed × task)", fontsize=10)
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_xlabel("γ")
    axes[2].set_ylabel("success rate")
    axes[2].set_title("(c) P(|s_T − target| < 1), mean over seeds, tasks", fontsize=10)
    seeds = get(next(iter(jobs.values()))["config"], "seeds", [])
    fig.suptitle(f"Toy drift ablations (seeds {seeds}; one config value each)", fontsize=11)
    save(fig, "fig_toy_ablation", args.out_dir)


if __name__ == "__main__":
    main()
