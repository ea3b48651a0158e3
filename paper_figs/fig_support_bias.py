"""Exact bias of every top-K support variant against the full reverse KL, as a function of K = 1 … V.

    python paper_figs/fig_support_bias.py results/sandbox/support

Top row: ‖E ĝ − ∇_tok‖ / ‖∇_tok‖, ∇_tok the gradient of the full-vocabulary per-prefix reverse KL (the
support truncation alone). Bottom row: against the sequence-level KL gradient (truncation plus the future
coupling every per-position objective drops; dotted: the full-vocabulary RKL's own floor). Medians over
seeds, horizon T of the study. Tick labels: K, the teacher's top-K mass q(top-K) and the student's mass on the
teacher's top-K π(top-K) (prefix-weighted, median over seeds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from paper_figs.common import save, setup_style
from paper_figs.fig_support_common import COLORS, LABELS, TOPK_VARIANTS, families, load_rows, medians


def main(root: str) -> None:
    setup_style()
    rows = load_rows(root)
    horizon = max(r["horizon"] for r in rows)
    fams = families(rows)
    fig, axes = plt.subplots(2, len(fams), figsize=(4.2 * len(fams), 7.4), squeeze=False)
    for j, fam in enumerate(fams):
        mass = medians(rows, fam, horizon, "teacher_topk_mass")["lsm"]
        student_mass = medians(rows, fam, horizon, "student_mass_on_teacher_topk")["lsm"]
        for i, field in enumerate(("rel_bias_tok", "rel_bias_seq")):
            ax = axes[i, j]
            med = medians(rows, fam, horizon, field)
            for name in TOPK_VARIANTS:
                ks = sorted(med[name])
                ax.plot(ks, [med[name][k] for k in ks], "o-", ms=3, lw=1.4, color=COLORS[name],
                        label=LABELS[name])
            if field == "rel_bias_seq":
                ax.axhline(med["full_rkl"][None], color="k", ls=":", lw=1, label="full-vocabulary RKL")
            ks = sorted(mass)
            ax.set_xticks(ks, [f"{k}\n{mass[k]:.2f}\n{student_mass[k]:.2f}" for k in ks], fontsize=7)
            ax.set_ylim(bottom=0)
            if i == 0:
                ax.set_title(fam, fontsize=10)
        axes[0, j].set_ylabel("rel. bias vs token-level full RKL" if j == 0 else "")
        axes[1, j].set_ylabel("rel. bias vs sequence-level KL" if j == 0 else "")
        axes[1, j].set_xlabel("K / q(top-K) / π(top-K)", fontsize=8)
    fig.legend(*axes[1, 0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8,
               bbox_to_anchor=(0.5, -0.06))
    v = rows[0]["vocab"]
    fig.suptitle(f"Exact gradient bias of top-K objectives vs K (V={v}, T={horizon}, enumeration, "
                 "median over seeds)", fontsize=11)
    save(fig, "fig_support_bias")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/sandbox/support")
