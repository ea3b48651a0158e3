"""Shared test inputs for the exact-engine tests: random tabular student/teacher pairs and a float64
log-softmax reference."""

from __future__ import annotations

import numpy as np

from synthetic import tabular


def random_pair(seed: int, vocab: int, horizon: int, scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """(student, teacher) logit tables of one row per prefix, N(0, scale²) entries."""
    rng = np.random.default_rng(seed)
    rows = tabular.num_prefixes(vocab, horizon)
    return scale * rng.normal(size=(rows, vocab)), scale * rng.normal(size=(rows, vocab))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
