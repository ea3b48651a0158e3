"""Shared reading and styling for the fig_support_* figures (rows of synthetic/support_study.py).

Reads only results/sandbox/support/rows.jsonl; imports neither `opd` nor `synthetic`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from paper_figs.common import fail

TOPK_VARIANTS = ["lsm", "lsm_no_renorm", "stop_grad_topk", "topk_tail", "v2", "v3", "v4", "v5"]
VOPD_TOPK = ["vopd_topk_teacher", "vopd_topk_student"]
SCALAR = ["full_rkl", "sampled_token", "vopd_full", "box_cox", "constant"]

LABELS = {
    "lsm": "V1 LSM (teacher top-K, renorm)",
    "lsm_no_renorm": "teacher top-K, no renorm",
    "stop_grad_topk": "stop-gradient top-K",
    "topk_tail": "top-K + tail bin",
    "v2": "V2 student top-K ∪ {y}",
    "v3": "V3 teacher top-K ∪ {y}",
    "v4": "V4 EMA-PG, student top-K",
    "v5": "V5 EMA-PG, teacher top-K",
    "vopd_topk_teacher": "vOPD, teacher top-K baseline",
    "vopd_topk_student": "vOPD, student top-K baseline",
    "full_rkl": "full-vocabulary RKL",
    "sampled_token": "sampled-token",
    "vopd_full": "vOPD, full baseline",
    "box_cox": "PowerOPD (Box-Cox, α=1)",
    "constant": "constant advantage −1",
}
_CMAP = plt.get_cmap("tab20")
COLORS = {name: _CMAP(i) for i, name in enumerate(TOPK_VARIANTS + VOPD_TOPK + SCALAR)}


def load_rows(root: str | Path) -> list[dict[str, Any]]:
    path = Path(root) / "rows.jsonl"
    if not path.exists():
        fail(f"rows_dir: no rows at {path}: run `python -m synthetic.support_study --out {root}` first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def family_key(row: dict[str, Any]) -> str:
    m = row.get("top1_mass")
    return "random teacher" if row["family"] == "random" else f"multimodal, top-1 mass {m[0]:.1f}–{m[1]:.1f}"


def families(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(family_key(r) for r in rows))


def medians(rows, family: str, horizon: int, field: str) -> dict[str, dict[Any, float]]:
    """{estimator: {k: median over seeds of `field`}} for one family and horizon."""
    acc: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if family_key(r) == family and r["horizon"] == horizon and field in r:
            acc[r["estimator"]][r["k"]].append(r[field])
    return {e: {k: float(np.median(v)) for k, v in ks.items()} for e, ks in acc.items()}
