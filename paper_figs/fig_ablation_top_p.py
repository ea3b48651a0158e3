"""The ablation_top_p block as one figure: the final score of LSM and of sampled-token OPD against the rollout
top-p, beside their paired difference at each top-p (reads results/tables/ablation_top_p.json, which
paper_figs/tables.py writes; never imports opd).

    python paper_figs/fig_ablation_top_p.py [--table results/tables/ablation_top_p.json] [--out paper_figs]

Writes `ablation_top_p.png`: left, the final held-out sampled score per rollout top-p for each objective
(95% interval as bars; each objective's own paper top-p, LSM 0.9 and sampled-token 1.0, drawn filled, the
others hollow) with the student before OPD as a line; right, LSM − sampled-token OPD at each top-p, paired by
seed and item (95% interval), so the reader sees at which rollout policies the objective's sign holds.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import PALETTE, block_table, fail, interval, plt, save, setup_style

OBJECTIVES = {"lsm": ("LSM", 0.9, PALETTE[0]), "sampled_token": ("sampled-token OPD", 1.0, PALETTE[1])}


def points(table: dict) -> dict[str, list[dict]]:
    """{objective: its rows sorted by rollout top-p, each with its "top_p"} for the two objectives."""
    by_objective: dict[str, list[dict]] = {name: [] for name in OBJECTIVES}
    for r in table["rows"]:
        m = re.fullmatch(r"(lsm|sampled_token) @ top-p ([0-9.]+)", r.get("key") or "")
        if m:
            by_objective[m.group(1)].append({**r, "top_p": float(m.group(2))})
    return {name: sorted(rows, key=lambda r: r["top_p"]) for name, rows in by_objective.items()}


def paired(table: dict, by_objective: dict[str, list[dict]]) -> list[tuple[float, dict]]:
    """[(top-p, the headline entry LSM − sampled-token at that top-p)] where both cells exist."""
    headline = {(h["a"], h["b"]): h for h in table["headline"]}
    st = {r["top_p"]: r["method"] for r in by_objective["sampled_token"]}
    return [(r["top_p"], headline[(r["method"], st[r["top_p"]])]) for r in by_objective["lsm"]
            if (r["method"], st.get(r["top_p"])) in headline]


def main(argv: list[str]) -> int:
    table, path, out = block_table(argv, "ablation_top_p", __doc__)
    by_objective = points(table) if table.get("name") == "ablation_top_p" else {}
    if not by_objective or any(len(rows) < 2 for rows in by_objective.values()):
        fail(f"--table: expected an ablation_top_p table with each objective at two or more top-p, got {path}")
    setup_style()
    fig, (score_ax, diff_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for (name, rows), shift in zip(by_objective.items(), (-0.004, 0.004)):
        label, own, color = OBJECTIVES[name]
        score_ax.plot([r["top_p"] + shift for r in rows], [100 * r["mean"] for r in rows], color=color, alpha=0.5)
        for r in rows:  # the objective's own paper top-p filled, the ablated ones hollow
            interval(score_ax, r["top_p"] + shift, r["mean"], r["ci_low"], r["ci_high"], fmt="o", color=color,
                     mfc=color if r["top_p"] == own else "white",
                     label=f"{label} (filled: its paper top-p {own:g})" if r["top_p"] == own else None)
    student = next((r for r in table["rows"] if r["method"] == "Student before OPD"), None)
    if student:
        score_ax.axhline(100 * student["mean"], color="gray", ls="--", lw=1, label="student before OPD")
    score_ax.legend(loc="best", fontsize=8)
    score_ax.set(xlabel="rollout top-p", ylabel="final held-out score (%)",
                 title="score by rollout top-p (95% interval)")

    diffs = paired(table, by_objective)
    for top_p, h in diffs:
        interval(diff_ax, top_p, h["paired_diff"], h["paired_ci_low"], h["paired_ci_high"], fmt="o",
                 color=PALETTE[3])
    diff_ax.plot([p for p, _ in diffs], [100 * h["paired_diff"] for _, h in diffs], color=PALETTE[3], alpha=0.5)
    diff_ax.axhline(0, color="gray", lw=1)
    diff_ax.set(xlabel="rollout top-p (both objectives)", ylabel="points",
                title="LSM − sampled-token, paired (95% interval)")
    top_ps = sorted({r["top_p"] for rows in by_objective.values() for r in rows})
    for ax in (score_ax, diff_ax):
        ax.set_xticks(top_ps, [f"{p:g}" for p in top_ps])
        ax.invert_xaxis()  # from full sampling (1.0) to the narrowest nucleus, left to right
    fig.suptitle(f"ablation_top_p at revision {table['revision'][:7]}: {table['jobs']} jobs", fontsize=10)
    save(fig, "ablation_top_p", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
