"""Fig 1 / Fig A1–A3 analog (arXiv 2603.25562 §3.1): future-reward coupling on the 1-D two-task toy.

    python paper_figs/fig_toy_coupling.py results/sandbox/toy_coupling [out_dir] [--name PREFIX] [--no-per-seed]

Reads only the job's metrics.jsonl / metrics.json (written by `python -m experiments.toy_coupling`) and
writes, under paper_figs/ (or out_dir):
- fig_toy_coupling.png: (a) gradient-variance proxy vs iteration per γ, left task (odd iterations) and
  right task (even iterations): median over seeds, band = range over seeds; (b) end-of-training
  state-visitation heatmaps (all seeds pooled) for the teachers and for γ ∈ heatmap_gammas, per task.
- fig_toy_coupling_seed<seed>.png: the same for each seed alone (the paper's Fig A1–A3).
- fig_toy_coupling_kl.png: reverse KL to the teacher and distance to target over training, and the
  late-training variance level vs γ.
Smoothing: curves are a centred moving average of log10 values over `SMOOTH` points of the same task's
series (raw values are in the rows). Heatmaps: visitation fraction per time step (each column sums to 1),
shown on a sqrt colour scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paper_figs.common import get, load_jobs, plt, save, setup_style

SMOOTH = 21  # points of one task's series (≈ 42 iterations)
GAMMA_CMAP = "viridis"


def smooth_log(y: np.ndarray, w: int = SMOOTH) -> np.ndarray:
    """Centred moving average of log10(y) along the last axis, edges shrink the window; returns log10."""
    ly = np.log10(np.maximum(y, 1e-30))
    w = w | 1  # odd, so the window is centred
    if w <= 1 or ly.shape[-1] < w:
        return ly
    k = np.ones(w)
    pad = w // 2
    num = np.apply_along_axis(lambda v: np.convolve(np.pad(v, pad, constant_values=0), k, "valid"), -1, ly)
    den = np.convolve(np.pad(np.ones(ly.shape[-1]), pad, constant_values=0), k, "valid")
    return num / den


def load(results_dir: str):
    jobs = load_jobs(results_dir)
    jobs = [j for j in jobs if "heatmaps" in j["metrics"] and j["rows"]]
    if not jobs:
        raise SystemExit(f"no toy_coupling job under {results_dir}")
    if len(jobs) > 1:
        print(f"note: {len(jobs)} jobs under {results_dir}; using the last, {jobs[-1]['dir']}")
    job = jobs[-1]
    rows = job["rows"]
    steps = np.array([r["step"] for r in rows])
    series = {
        k: np.array([r[k] for r in rows], dtype=float)
        for k in ("grad_var", "grad_var_all", "reverse_kl", "final_dist", "sigma")
    }  # [I, S, G]
    series = {k: np.moveaxis(v, 0, -1) for k, v in series.items()}  # [S, G, I]
    return job, steps, series


def gamma_colors(gammas):
    cmap = plt.get_cmap(GAMMA_CMAP)
    return {g: cmap(0.9 * i / max(1, len(gammas) - 1)) for i, g in enumerate(gammas)}


def variance_panel(ax, steps, var_SGI, gammas, task: int, title: str, band: bool):
    mask = (steps % 2 == 1) if task == 0 else (steps % 2 == 0)
    x = steps[mask]
    colors = gamma_colors(gammas)
    for gi, g in enumerate(gammas):
        ls = smooth_log(var_SGI[:, gi][:, mask])  # [S, I_task], log10
        med = np.median(ls, axis=0)
        ax.plot(x, 10**med, color=colors[g], lw=1.4, label=f"γ = {g:g}")
        if band and ls.shape[0] > 1:
            ax.fill_between(x, 10 ** ls.min(0), 10 ** ls.max(0), color=colors[g], alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlim(0, steps.max())
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient variance (output layer)")
    ax.set_title(title)


def heatmap_panel(ax, counts_TX, edges, horizon, start, target, title, vmax=1.0):
    frac = counts_TX / np.maximum(counts_TX.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(
        np.sqrt(frac).T,
        origin="lower",
        aspect="auto",
        cmap="magma",
        vmin=0,
        vmax=np.sqrt(vmax),
        extent=[-0.5, horizon + 0.5, edges[0], edges[-1]],
        interpolation="nearest",
    )
    ax.axhline(target, color="#4fd1c5", ls="--", lw=1.1)
    ax.plot([0], [start], marker="o", ms=4, color="white", mec="black", mew=0.5)
    ax.set_title(title, fontsize=9)
    ax.grid(False)
    return im


def study_figure(job, steps, series, seed_index: int | None, name: str, out_dir):
    m, cfg = job["metrics"], job["config"]
    gammas, seeds = m["gammas"], m["seeds"]
    heat_gammas = [g for g in get(cfg, "heatmap_gammas", [0.0, 0.5, 1.0]) if g in gammas]
    horizon, start, target = get(cfg, "horizon", 20), get(cfg, "start", 2.0), get(cfg, "target", 3.0)
    edges = np.asarray(m["heatmap_edges"])
    heat = np.asarray(m["heatmaps"], dtype=float)  # [S, G, K, T+1, X]
    theat = np.asarray(m["teacher_heatmaps"], dtype=float)  # [S, K, T+1, X]
    var = series["grad_var"]
    sel = slice(None) if seed_index is None else slice(seed_index, seed_index + 1)

    ncol = len(heat_gammas) + 1
    fig = plt.figure(figsize=(2.6 * ncol + 0.8, 8.6), layout="constrained")
    sub_top, sub_bot = fig.subfigures(2, 1, height_ratios=[1.0, 1.25])
    ax_l, ax_r = sub_top.subplots(1, 2, sharey=True)
    tag = "median over seeds, band: range" if seed_index is None else f"seed {seeds[seed_index]}"
    variance_panel(ax_l, steps, var[sel], gammas, 0, "left task (odd iterations)", seed_index is None)
    variance_panel(ax_r, steps, var[sel], gammas, 1, "right task (even iterations)", seed_index is None)
    ax_r.set_ylabel("")
    ax_r.legend(loc="upper right", ncol=1, fontsize=8)
    sub_top.suptitle(
        f"(a) gradient-variance proxy, Var = (1/M) Σ‖g_m − ḡ‖² ({tag}; {SMOOTH}-point moving mean of log10)",
        fontsize=10,
    )

    axes = sub_bot.subplots(2, ncol, sharex=True, sharey=True)
    im = None
    for k, task in enumerate(("left", "right")):
        s0, tgt = (start, -target) if k == 0 else (-start, target)
        im = heatmap_panel(axes[k, 0], theat[sel, k].sum(0), edges, horizon, s0, tgt, f"{task}: teacher")
        for c, g in enumerate(heat_gammas, start=1):
            gi = gammas.index(g)
            im = heatmap_panel(
                axes[k, c], heat[sel, gi, k].sum(0), edges, horizon, s0, tgt, f"{task}: student, γ = {g:g}"
            )
        axes[k, 0].set_ylabel("position")
    for c in range(ncol):
        axes[1, c].set_xlabel("time step")
    cb = sub_bot.colorbar(im, ax=axes, shrink=0.85, pad=0.01)
    cb.set_label("√(visitation fraction per step)")
    pooled = "pooled over seeds" if seed_index is None else f"seed {seeds[seed_index]}"
    sub_bot.suptitle(f"(b) state visitation after training ({pooled}; dashed: target, dot: start)", fontsize=10)
    return save(fig, name, out_dir)


def training_figure(job, steps, series, out_dir, name):
    m = job["metrics"]
    gammas, seeds = m["gammas"], m["seeds"]
    colors = gamma_colors(gammas)
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8), layout="constrained")
    for key, ax, ylab, logy in (
        ("reverse_kl", axes[0], "reverse KL to teacher, Σ_t KL(π‖q)", True),
        ("final_dist", axes[1], "distance to target |s_T − target|", True),
    ):
        for gi, g in enumerate(gammas):
            ls = smooth_log(series[key][:, gi], 2 * SMOOTH + 1)  # both tasks interleaved
            ax.plot(steps, 10 ** np.median(ls, 0), color=colors[g], lw=1.3, label=f"γ = {g:g}")
            ax.fill_between(steps, 10 ** ls.min(0), 10 ** ls.max(0), color=colors[g], alpha=0.15, lw=0)
        ax.set_yscale("log" if logy else "linear")
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylab)
    axes[0].legend(fontsize=8)
    last = np.asarray(m["summary"]["grad_var_last_quarter"])  # [S, G, K]
    markers = ("o", "s", "^", "D", "v")
    for si, s in enumerate(seeds):
        for k, task in enumerate(("left", "right")):
            axes[2].plot(
                gammas,
                last[si, :, k],
                marker=markers[si % 5],
                ls="-" if k == 0 else ":",
                color=f"C{si}",
                lw=1.1,
                ms=4,
                label=f"seed {s}, {task}",
            )
    axes[2].set_yscale("log")
    axes[2].set_xlabel("γ")
    axes[2].set_ylabel("mean gradient variance, last quarter")
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(
        "Training curves (median over seeds, band: range; moving mean of log10 over "
        f"{2 * SMOOTH + 1} iterations) and late-training variance vs γ",
        fontsize=10,
    )
    return save(fig, f"{name}_kl", out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="a toy_coupling job directory (or a directory above one)")
    parser.add_argument("out_dir", nargs="?", default=None, help="where PNGs go (default: paper_figs/)")
    parser.add_argument("--name", default="fig_toy_coupling", help="file-name prefix of the PNGs")
    parser.add_argument("--no-per-seed", action="store_true", help="skip the per-seed figures")
    args = parser.parse_args()
    setup_style()
    job, steps, series = load(args.results_dir)
    study_figure(job, steps, series, None, args.name, args.out_dir)
    for si, s in enumerate([] if args.no_per_seed else job["metrics"]["seeds"]):
        study_figure(job, steps, series, si, f"{args.name}_seed{s}", args.out_dir)
    training_figure(job, steps, series, args.out_dir, args.name)


if __name__ == "__main__":
    main()
