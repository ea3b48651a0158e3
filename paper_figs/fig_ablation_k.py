"""The ablation_k block as one figure: LSM's final score against its support size K, beside the coverage that
K buys (reads results/tables/ablation_k.json, which paper_figs/tables.py writes; never imports opd).

    python paper_figs/fig_ablation_k.py [--table results/tables/ablation_k.json] [--out paper_figs]

Writes `ablation_k.png`: left, the final held-out sampled score per K (95% interval as bars) with the full
vocabulary (full reverse KL) as the last point, the student before OPD and (when the table holds it)
sampled-token OPD as lines; right, the teacher's top-K mass on the student's rollouts and the fraction of
sampled tokens outside the teacher's top-K per K (the full vocabulary holds all of the mass by definition,
drawn hollow).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import PALETTE, block_table, fail, interval, plt, save, setup_style


def points(table: dict) -> tuple[list[dict], dict | None, dict | None]:
    """(LSM rows sorted by K, each with its "k"; the full reverse KL row; the student-before-OPD row)."""
    by_k, full, student = [], None, None
    for r in table["rows"]:
        m = re.fullmatch(r"lsm K=(\d+)", r.get("key") or "")
        if m:
            by_k.append({**r, "k": int(m.group(1))})
        elif r.get("key") == "full_rkl":
            full = r
        elif r["method"] == "Student before OPD":
            student = r
    return sorted(by_k, key=lambda r: r["k"]), full, student


def main(argv: list[str]) -> int:
    table, path, out = block_table(argv, "ablation_k", __doc__)
    by_k, full, student = points(table)
    if table.get("name") != "ablation_k" or len(by_k) < 2:
        fail(f"--table: expected an ablation_k table with LSM at two or more K, got {path}")
    setup_style()
    fig, (score_ax, cover_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    ks = [r["k"] for r in by_k]
    full_x = 2 * ks[-1]  # one step past the largest K on the log axis
    ticks, labels = ks + ([full_x] if full else []), [str(k) for k in ks] + (["full V"] if full else [])

    for r, x in [(r, r["k"]) for r in by_k] + ([(full, full_x)] if full else []):
        color = PALETTE[1] if r is full else PALETTE[0]
        interval(score_ax, x, r["mean"], r["ci_low"], r["ci_high"], fmt="o", color=color,
                 label="full reverse KL" if r is full else None)
    score_ax.plot(ks, [100 * r["mean"] for r in by_k], color=PALETTE[0], alpha=0.5)
    if student:
        score_ax.axhline(100 * student["mean"], color="gray", ls="--", lw=1, label="student before OPD")
    baseline = next((r for r in table["rows"] if r.get("key") == "sampled_token"), None)
    if baseline:  # the comparison the block's validation-chosen K is paired with
        score_ax.axhline(100 * baseline["mean"], color=PALETTE[2], ls=":", lw=1.5, label="sampled-token OPD")
    score_ax.legend(loc="upper left")
    score_ax.set(xscale="log", xlabel="support size K", ylabel="final held-out score (%)",
                 title="LSM score by K (95% interval)")

    for key, name, color in (("teacher_topk_mass", "teacher top-K mass", PALETTE[3]),
                             ("not_in_topk_frac", "sampled tokens outside top-K", PALETTE[2])):
        cover_ax.plot(ks, [100 * r[key] if r.get(key) is not None else float("nan") for r in by_k], "o-",
                      color=color, label=name)
        if full:
            cover_ax.plot([full_x], [100.0 if key == "teacher_topk_mass" else 0.0], "o", mfc="none", color=color)
    cover_ax.set(xscale="log", xlabel="support size K", ylabel="% (mean over steps and seeds)",
                 title="coverage on the student's rollouts", ylim=(-3, 103))
    cover_ax.legend(loc="center right")
    for ax in (score_ax, cover_ax):
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
    fig.suptitle(f"ablation_k at revision {table['revision'][:7]}: {table['jobs']} jobs", fontsize=10)
    save(fig, "ablation_k", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
