"""Coupling study (a): SGD with ĝ_γ on a tabular student — exact variance, exact KL and instability.

    python paper_figs/fig_sgd_coupling.py results/sandbox/sgd

Reads only the rows of experiments.sandbox_sgd (one job, fields nested [seed][gamma]).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from paper_figs.common import PALETTE, get, load_jobs, save, setup_style


def main(root: str) -> None:
    setup_style()
    job = load_jobs(root)[-1]
    rows, cfg = job["rows"], job["config"]
    gammas = job["metrics"]["gammas"]
    steps = np.array([r["step"] for r in rows])
    arr = {k: np.array([r[k] for r in rows], dtype=float) for k in ("kl", "variance", "instability")}  # [I, S, G]
    fig, axes = plt.subplots(1, 3, figsize=(14.5, 4.2))
    for gi, g in enumerate(gammas):
        col = PALETTE[gi % len(PALETTE)]
        for ax, key in ((axes[0], "variance"), (axes[1], "kl")):
            mid = np.exp(np.log(arr[key][:, :, gi]).mean(1))  # geometric mean over seeds
            lo, hi = arr[key][:, :, gi].min(1), arr[key][:, :, gi].max(1)
            ax.plot(steps, mid, color=col, lw=1.3, label=f"γ={g:g}")
            ax.fill_between(steps, lo, hi, color=col, alpha=0.12, lw=0)
    ins = arr["instability"]
    width = 0.38
    x = np.arange(len(gammas))
    axes[2].bar(x - width / 2, ins.mean((0, 1)), width, color=PALETTE[0], label="mean relative KL increase / step")
    ax2 = axes[2].twinx()
    ax2.bar(x + width / 2, (ins > 0).mean((0, 1)), width, color=PALETTE[1], label="fraction of steps raising KL")
    ax2.grid(False)
    axes[2].set_xticks(x, [f"{g:g}" for g in gammas])
    axes[2].set(xlabel="γ", ylabel="mean max(0, ΔKL)/KL", title="Instability (all seeds, all iterations)")
    ax2.set_ylabel("fraction of steps with ΔKL > 0")
    h1, l1 = axes[2].get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    axes[2].legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    axes[0].set(yscale="log", xlabel="SGD iteration", ylabel=r"exact Var of one-sequence $\hat g_\gamma$",
                title="Gradient variance (geo-mean of seeds, band min–max)")
    axes[1].set(yscale="log", xlabel="SGD iteration", ylabel="exact KL(π_θ ‖ q) over sequences",
                title="Reverse KL to the teacher")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.suptitle(
        f"SGD with $\\hat g_\\gamma$ on a tabular student (V={get(cfg, 'vocab')}, T={get(cfg, 'horizon')}, "
        f"batch {get(cfg, 'batch_size')}, lr {get(cfg, 'lr')}, {len(job['metrics']['seeds'])} seeds): "
        "exact diagnostics every iteration", fontsize=11)
    save(fig, "fig_sgd_coupling")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/sandbox/sgd")
