"""Exact gradient variance of sampled-token OPD, vOPD, PowerOPD, the constant control and every top-K
variant, and where each sits in bias-variance.

    python paper_figs/fig_support_variance.py results/sandbox/support

Top row: Σ_y p(y)‖ĝ(y) − E ĝ‖² (one rollout per estimate) vs K for the K-dependent estimators; the
K-free ones are horizontal lines. Bottom row: relative bias against the token-level full RKL vs variance at
K = 2 (K-free estimators at their only value). Medians over seeds, horizon T of the study. LSM at K = 1
has no point on the log axis: a one-token renormalized support gives a zero gradient (variance 0, bias 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from paper_figs.common import save, setup_style
from paper_figs.fig_support_common import (
    COLORS,
    LABELS,
    SCALAR,
    TOPK_VARIANTS,
    VOPD_TOPK,
    families,
    load_rows,
    medians,
)

SCATTER_K = 2
MARKERS = {**dict.fromkeys(VOPD_TOPK, "s"), **dict.fromkeys(SCALAR, "^")}


def main(root: str) -> None:
    setup_style()
    rows = load_rows(root)
    horizon = max(r["horizon"] for r in rows)
    fams = families(rows)
    fig, axes = plt.subplots(2, len(fams), figsize=(4.2 * len(fams), 8.0), squeeze=False)
    for j, fam in enumerate(fams):
        var = medians(rows, fam, horizon, "variance")
        bias = medians(rows, fam, horizon, "rel_bias_tok")
        ax = axes[0, j]
        for name in TOPK_VARIANTS + VOPD_TOPK:
            ks = [k for k in sorted(var[name]) if var[name][k] > 0]  # LSM at K=1 has no gradient at all
            ax.plot(ks, [var[name][k] for k in ks], MARKERS.get(name, "o") + ("-" if name in TOPK_VARIANTS else "--"),
                    ms=3.5, lw=1.3, color=COLORS[name], label=LABELS[name])
        for name in SCALAR:
            if name != "constant" or var[name][None] > 0:
                ax.axhline(var[name][None], color=COLORS[name], lw=1.6, ls="-.", label=LABELS[name])
        ax.set(yscale="log", xlabel="K", title=fam)
        ax.title.set_fontsize(10)
        ax = axes[1, j]
        for name in TOPK_VARIANTS + VOPD_TOPK + SCALAR:
            k = SCATTER_K if name in TOPK_VARIANTS + VOPD_TOPK else None
            ax.scatter(var[name][k], bias[name][k], color=COLORS[name], marker=MARKERS.get(name, "o"), s=34,
                       zorder=3, edgecolors="k", linewidths=0.3)
        ax.set(xscale="log", xlabel="exact variance", ylim=(-0.05, None))
    axes[0, 0].set_ylabel("exact variance E‖ĝ − E ĝ‖² (log)")
    axes[1, 0].set_ylabel(f"rel. bias vs token-level full RKL (K={SCATTER_K})")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8,
               bbox_to_anchor=(0.5, -0.07))
    v = rows[0]["vocab"]
    fig.suptitle(f"Exact gradient variance of OPD estimators (V={v}, T={horizon}, one rollout per estimate, "
                 "median over seeds)", fontsize=11)
    save(fig, "fig_support_variance")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/sandbox/support")
