"""Exact bias and variance of ĝ_γ vs γ (random tabular pairs, V=3): the bias-variance trade-off of Eq. 3.

    python paper_figs/fig_bias_vs_gamma.py results/sandbox/variance

Reads only metrics.json rows of experiments.sandbox_variance jobs (mdp.kind=random).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from paper_figs.common import PALETTE, get, load_jobs, save, setup_style

HORIZONS = [2, 3, 5, 7]


def main(root: str) -> None:
    setup_style()
    jobs = [j for j in load_jobs(root) if get(j["config"], "mdp.kind") == "random"]
    by_t = defaultdict(dict)
    lsm = {}
    for j in jobs:
        c, m = j["config"], j["metrics"]
        if get(c, "estimator.name") == "discounted":
            by_t[get(c, "mdp.horizon")][get(c, "estimator.gamma")] = m
        elif get(c, "estimator.name") == "lsm":
            lsm[get(c, "mdp.horizon")] = m
    fig, (ax_b, ax_v, ax_t) = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, t in enumerate(h for h in HORIZONS if h in by_t):
        g = np.array(sorted(by_t[t]))
        rel = np.array([by_t[t][x]["median_rel_bias"] for x in g])
        var = np.array([by_t[t][x]["median_variance"] for x in g])
        ax_b.plot(g, rel, "o-", color=PALETTE[i], ms=3.5, label=f"T={t}")
        if t in lsm:
            ax_b.axhline(lsm[t]["median_rel_bias"], color=PALETTE[i], ls=":", lw=1)
        ax_v.plot(g, var, "o-", color=PALETTE[i], ms=3.5, label=f"T={t}")
        ax_t.plot(var, rel, "o-", color=PALETTE[i], ms=3.5, label=f"T={t}")
        ax_t.annotate("γ=0", (var[0], rel[0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax_t.annotate("γ=1", (var[-1], rel[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax_b.set(xlabel="γ", ylabel="‖E ĝ_γ − ∇KL‖ / ‖∇KL‖  (median of 16 pairs)",
             title="Relative bias vs γ (dotted: per-prefix LSM, k=2)")
    ax_v.set(xlabel="γ", ylabel="exact variance E‖ĝ_γ − E ĝ_γ‖²", yscale="log", title="Variance vs γ")
    ax_t.set(xlabel="exact variance", ylabel="relative bias", xscale="log",
             title="Trade-off (each curve: γ from 0 to 1)")
    for ax in (ax_b, ax_v, ax_t):
        ax.legend(fontsize=8)
    fig.suptitle("Discounted OPD estimator ĝ_γ (Eq. 3) on random tabular pairs, V=3: exact enumeration",
                 fontsize=11)
    save(fig, "fig_bias_vs_gamma")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/sandbox/variance")
