"""The constructions that make each variance bound's order visible (synthetic/bounds.py, docs/theory.md).

    python paper_figs/fig_theory_constructions.py results/sandbox/variance    # rows from paper_figs/sandbox.sh

Reads only metrics.json of experiments.sandbox_variance jobs and writes fig_theory_constructions.png:
(a) exact variance vs T with fitted log-log slopes (T ≥ 6): token level with shared rows (T²), causal γ = 1
    and full return on-policy (T³), the same under the student's top-p 0.55 behaviour (T⁴);
(b) variance / the on-policy martingale bound B_r²B_g²T²·min(T, 1/(1−γ²)): on-policy curves stay below 1,
    the top-p ones cross it (the bound needs tokens drawn from π); dotted: variance / the paper's bound;
(c) `worst_gamma` at T = 8 (V = 3): variance and the martingale bound against 1/(1−γ²) (γ = 1: T).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from paper_figs.common import PALETTE, get, load_jobs, save, setup_style
from paper_figs.fig_variance_vs_T import series, slope

CURVES = [  # (mdp kind, estimator name, gamma filter, paper bound key, label)
    ("worst_token", "discounted", 0.0, "median_bound_token", "γ=0, shared rows, on-policy"),
    ("worst_causal", "discounted", 1.0, "median_bound_sequence", "γ=1, on-policy"),
    ("worst_causal", "full_return", None, "median_bound_sequence", "full return, on-policy"),
    ("worst_off_policy", "discounted", 1.0, "median_bound_sequence", "γ=1, top-p 0.55"),
    ("worst_off_policy", "full_return", None, "median_bound_sequence", "full return, top-p 0.55"),
]


def main(root: str) -> None:
    setup_style()
    jobs = load_jobs(root)
    fig, (ax_v, ax_r, ax_g) = plt.subplots(1, 3, figsize=(17, 5.2), layout="constrained")
    for i, (kind, name, gamma, paper_key, label) in enumerate(CURVES):
        t, v = series(jobs, kind, name, gamma)
        if not len(t):
            continue
        color = PALETTE[i]
        marker = "o" if "top-p" not in label else "s"
        ax_v.plot(t, v, marker + "-", color=color, ms=4, label=f"{label} (slope {slope(t, v, 6):.2f})")
        _, mart = series(jobs, kind, name, gamma, "median_bound_martingale")
        _, paper = series(jobs, kind, name, gamma, paper_key)
        ax_r.plot(t, v / mart, marker + "-", color=color, ms=4, label=label)
        ax_r.plot(t, v / paper, ":", color=color, lw=1)
    ax_v.set(xscale="log", yscale="log", xlabel="horizon T", ylabel="exact variance",
             title="(a) worst cases: T², T³ on-policy, T⁴ off-policy")
    ax_v.legend(fontsize=8)
    ax_r.axhline(1.0, color="grey", ls="--", lw=1)
    ax_r.set(xscale="log", yscale="log", xlabel="horizon T", ylabel="variance / bound",
             title="(b) solid: / on-policy martingale bound; dotted: / paper's bound")
    ax_r.legend(fontsize=8)

    rows = []
    for j in jobs:
        c = j["config"]
        if get(c, "mdp.kind") == "worst_gamma" and get(c, "estimator.name") == "discounted":
            rows.append((get(c, "estimator.gamma"), get(c, "mdp.horizon"), j["metrics"]))
    if rows:
        rows.sort(key=lambda r: r[0])
        horizon = rows[0][1]
        eff = np.array([horizon if g >= 1 else min(horizon, 1 / (1 - g * g)) for g, _, _ in rows])
        var = np.array([m["median_variance"] for _, _, m in rows])
        bound = np.array([m["median_bound_martingale"] for _, _, m in rows])
        ax_g.plot(eff, var, "o-", color=PALETTE[0], label="exact variance")
        ax_g.plot(eff, bound, "--", color="0.4", label=r"$B_r^2B_g^2T^2\min(T, 1/(1-\gamma^2))$")
        for (g, _, _), x, v, b in zip(rows, eff, var, bound, strict=True):
            ax_g.annotate(f"γ={g:g}\n{v / b:.2f}", (x, v), textcoords="offset points", xytext=(4, -22), fontsize=7)
        keep = eff <= 1 / (1 - 0.875**2) + 1e-9
        ax_g.set_title(f"(c) worst_gamma, T={horizon}, V=3: slope in 1/(1−γ²) "
                       f"{slope(eff[keep], var[keep], 0):.2f} (γ ≤ 7/8); labels: variance/bound", fontsize=9)
        ax_g.set(xscale="log", yscale="log", xlabel="min(T, 1/(1−γ²))", ylabel="exact variance")
        ax_g.legend(fontsize=8)
    fig.suptitle("Each bound's order attained by a construction (exact, float64, all V^T sequences)", fontsize=11)
    save(fig, "fig_theory_constructions")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/sandbox/variance")
