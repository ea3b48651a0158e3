"""Interval estimates for the tables (NumPy only; never imports `opd`).

Outcomes arrive as a [seeds, items] matrix of per-item scores (the mean over that item's sampled draws), so
both sources of noise are in every interval: which training seeds ran, and which held-out items were drawn.
The bootstrap resamples seeds and items independently (a two-way bootstrap), with a fixed generator so a
table regenerates byte for byte.
"""

from __future__ import annotations

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def _check(scores_SxN: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(scores_SxN, np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected a non-empty [seeds, items] matrix, got shape {x.shape}")
    return x


def two_way_bootstrap(scores_SxN: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Means of `n_boot` resamples of the matrix, seeds and items drawn with replacement independently."""
    x = _check(scores_SxN, "scores_SxN")
    rng = np.random.default_rng(seed)
    s, n = x.shape
    out = np.empty(n_boot)
    for b in range(n_boot):
        rows = rng.integers(0, s, s)
        cols = rng.integers(0, n, n)
        out[b] = x[np.ix_(rows, cols)].mean()
    return out


def mean_ci(scores_SxN: np.ndarray, *, level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the grand mean and its percentile interval under the two-way bootstrap."""
    x = _check(scores_SxN, "scores_SxN")
    boots = two_way_bootstrap(x, seed=seed)
    tail = (1.0 - level) / 2
    return float(x.mean()), float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))


def paired_diff(a_SxN: np.ndarray, b_SxN: np.ndarray, *, level: float = LEVEL, seed: int = 0) -> dict[str, float]:
    """A − B paired by seed and item (same seeds, same items): the mean difference, its two-way bootstrap
    interval, and the relative gain (mean A − mean B) / mean B as the paper computes its +19.8%."""
    a, b = _check(a_SxN, "a_SxN"), _check(b_SxN, "b_SxN")
    if a.shape != b.shape:
        raise ValueError(f"paired_diff: the two methods must share seeds and items, got shapes {a.shape} and "
                         f"{b.shape}")
    mean, low, high = mean_ci(a - b, level=level, seed=seed)
    base = b.mean()
    return {"paired_diff": mean, "paired_ci_low": low, "paired_ci_high": high,
            "relative_gain": float((a.mean() - base) / base) if base > 0 else None}
