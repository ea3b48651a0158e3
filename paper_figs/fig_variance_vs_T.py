# ruff: noqa: N999  (file name fixed by the project brief; T is the horizon)
"""Exact gradient variance vs horizon T (log-log) with the paper's worst-case bounds (App. B.2).

    python paper_figs/fig_variance_vs_T.py results/sandbox/variance     # rows from paper_figs/sandbox.sh

Reads only metrics.json rows of experiments.sandbox_variance jobs. Left: random tabular pairs (median over
pairs). Right: the worst-case constructions of synthetic/bounds.py, with fitted log-log slopes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from paper_figs.common import PALETTE, get, load_jobs, save, setup_style

GAMMAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def series(jobs, kind, name, gamma=None, key="median_variance"):
    out = {}
    for j in jobs:
        c = j["config"]
        if get(c, "mdp.kind") != kind or get(c, "estimator.name") != name:
            continue
        if gamma is not None and abs(get(c, "estimator.gamma") - gamma) > 1e-9:
            continue
        out[get(c, "mdp.horizon")] = j["metrics"][key]
    t = np.array(sorted(out))
    return t, np.array([out[x] for x in t])


def slope(t, v, t_min=4):
    keep = t >= t_min
    return float(np.polyfit(np.log(t[keep]), np.log(v[keep]), 1)[0])


def main(root: str) -> None:
    setup_style()
    jobs = load_jobs(root)
    fig, (ax_r, ax_w) = plt.subplots(1, 2, figsize=(12, 5.6))

    # RANDOM PAIRS
    for i, g in enumerate(GAMMAS):
        t, v = series(jobs, "random", "discounted", g)
        if len(t):
            tag = " (token)" if g == 0 else " (causal)" if g == 1 else ""
            ax_r.plot(t, v, "o-", color=PALETTE[i], ms=3.5, label=f"$\\hat g_\\gamma$, γ={g:g}{tag}")
    t, v = series(jobs, "random", "full_return")
    if len(t):
        ax_r.plot(t, v, "s-", color=PALETTE[5], ms=3.5, label="full return (Eq. 1)")
    t, v = series(jobs, "random", "full_rkl")
    t, v = t[t >= 2], v[t >= 2]  # T = 1: a deterministic estimator, variance exactly 0
    if len(t):
        ax_r.plot(t, v, "^:", color=PALETTE[6], ms=3.5, label="per-prefix full RKL")
    t, b2 = series(jobs, "random", "discounted", 0.0, "median_bound_token")
    _, b4 = series(jobs, "random", "discounted", 0.0, "median_bound_sequence")
    if len(t):
        ax_r.plot(t, b2, "--", color="0.45", lw=1.2, label=r"$T^2B_r^2B_g^2$ (paper, token)")
        ax_r.plot(t, b4, "-.", color="0.25", lw=1.2, label=r"$T^4B_r^2B_g^2$ (paper, sequence)")
    ax_r.set(xscale="log", yscale="log", xlabel="horizon T", ylabel="exact Var = E‖ĝ − Eĝ‖²  (median of pairs)",
             title="Random tabular pairs (V=3, 16 pairs per T)")
    ax_r.legend(fontsize=7.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))

    # WORST-CASE CONSTRUCTIONS
    t, v = series(jobs, "worst_token", "discounted", 0.0)
    if len(t):
        ax_w.plot(t, v, "o-", color=PALETTE[0], label=f"γ=0, shared rows (slope {slope(t, v):.2f})")
        _, b = series(jobs, "worst_token", "discounted", 0.0, "median_bound_token")
        ax_w.plot(t, b, "--", color=PALETTE[0], lw=1, alpha=0.7, label=r"its $T^2B_r^2B_g^2$ bound (paper)")
    t, v = series(jobs, "worst_full_return", "full_return")
    if len(t):
        ax_w.plot(t, v, "s-", color=PALETTE[1], label=f"full return, tabular (slope {slope(t, v):.2f})")
        _, b4 = series(jobs, "worst_full_return", "full_return", None, "median_bound_sequence")
        _, b3 = series(jobs, "worst_full_return", "full_return", None, "median_bound_tight_full")
        ax_w.plot(t, b4, "-.", color=PALETTE[1], lw=1, alpha=0.7, label=r"its $T^4B_r^2B_g^2$ bound (paper)")
        ax_w.plot(t, b3, ":", color=PALETTE[1], lw=1.2, alpha=0.9, label=r"$T^3B_r^2B_g^2$ (ours: martingale bound)")
    t, v = series(jobs, "worst_full_return", "discounted", 0.0)
    if len(t):
        ax_w.plot(t, v, "d-", color=PALETTE[3], ms=4, label=f"γ=0, tabular (slope {slope(t, v):.2f})")
    ax_w.set(xscale="log", yscale="log", xlabel="horizon T", ylabel="exact variance",
             title="Worst-case constructions (V=2); slopes fitted for T ≥ 4")
    ax_w.legend(fontsize=7.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    for ax in (ax_r, ax_w):
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({int(x) for x in ax.get_lines()[0].get_xdata()}))
    fig.suptitle("Exact single-sequence gradient variance vs horizon (all V^T sequences enumerated, float64)",
                 fontsize=11)
    save(fig, "fig_variance_vs_T")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/sandbox/variance")
