"""Shared helpers for figure scripts. Figures read results rows only; nothing here imports `opd`.

A "job" is a directory holding metrics.json (final metrics + resolved config) and metrics.jsonl (rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FIG_DIR = Path(__file__).resolve().parent
ROOT = FIG_DIR.parent

# ten distinct colours: a block with up to ten methods (baselines has eight) never repeats one
PALETTE = ["#0b4f6c", "#d1495b", "#edae49", "#66a182", "#8d6a9f", "#2e4057", "#f4845f", "#00a6a6", "#9c6644",
           "#b5179e"]


def setup_style() -> None:
    plt.rcParams.update({
        "figure.dpi": 120, "savefig.dpi": 150, "savefig.bbox": "tight",
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
        "axes.prop_cycle": matplotlib.cycler(color=PALETTE), "font.size": 10, "legend.frameon": False,
    })


def fail(message: str) -> None:
    """A figure or table command's bad input: one `error: ...` line on stderr, exit status 2, nothing written."""
    import sys

    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_jobs(root: str | Path) -> list[dict[str, Any]]:
    """Every finished job under `root`: {'dir', 'config', 'metrics', 'rows'}, sorted by directory; `root` may
    also be a packed rows file (results/rows/<table>.jsonl.gz, paper_figs/rows.py)."""
    if Path(root).is_file():
        from paper_figs.rows import read

        return read(Path(root))
    jobs = []
    for summary in sorted(Path(root).rglob("metrics.json")):
        payload = json.loads(summary.read_text())
        jobs.append({"dir": summary.parent, "config": payload.get("config", {}),
                     "metrics": payload.get("metrics", {}), "rows": read_rows(summary.parent)})
    if not jobs:
        fail(f"sweep_dir: no finished jobs (metrics.json) under {root}")
    return jobs


def read_rows(job_dir: str | Path) -> list[dict[str, Any]]:
    """The job's metrics.jsonl rows ([] when the file is absent)."""
    path = Path(job_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def get(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """config['a']['b'] for 'a.b', or `default` when any key is missing."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def mapped_teacher(config: dict[str, Any]) -> bool:
    """True when any route's teacher uses another tokenizer (reached through a token mapping)."""
    routes = get(config, "tasks", {}) or {}
    return any((r or {}).get("teacher_tokenizer", "same") != "same" for r in routes.values())


def save(fig: plt.Figure, name: str, out_dir: str | Path | None = None) -> Path:
    """Write `<name>.png` under paper_figs/ (or `out_dir`) and close the figure."""
    out = Path(out_dir) if out_dir else FIG_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def block_table(argv: list[str], name: str, doc: str) -> tuple[dict[str, Any], Path, Path | None]:
    """A block figure's command line: --table (default results/tables/<name>.json, which paper_figs/tables.py
    writes) and --out. Returns (the table, its path, the output folder); a missing file is refused with one line.
    The figure itself checks that the table is the block's and holds what it draws."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--table", type=Path, default=ROOT / "results" / "tables" / f"{name}.json")
    ap.add_argument("--out", type=Path, default=None, help=f"directory of {name}.png (default paper_figs/)")
    args = ap.parse_args(argv)
    if not args.table.is_file():
        fail(f"--table: expected the {name} table (python paper_figs/tables.py ... --table {name}), got {args.table}")
    return json.loads(args.table.read_text()), args.table, args.out


def interval(ax: plt.Axes, x: float, mean: float, low: float, high: float, **kw: Any) -> None:
    """One point with its 95% interval as bars, in percent (the tables hold fractions)."""
    ax.errorbar([x], [100 * mean], yerr=[[100 * (mean - low)], [100 * (high - mean)]], capsize=3, **kw)
