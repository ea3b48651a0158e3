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


def brute_force_estimates(student: np.ndarray, teacher: np.ndarray, gamma: float | None, behaviour=None):
    """Plain-loop reference over every sequence y: (π(y), β(y) or None, dense ĝ_γ(y) [R, V]) per sequence,
    as arrays; γ = None is the full return. Independent of synthetic.exact's vectorized engine."""
    import itertools

    vocab = student.shape[1]
    horizon = tabular.horizon_from_rows(student.shape[0], vocab)
    logp, logq = log_softmax(student), log_softmax(teacher)
    p_pi, p_beta, ests = [], [], []
    for seq in itertools.product(range(vocab), repeat=horizon):
        rows = [tabular.prefix_row(seq[:t], vocab) for t in range(horizon)]
        r = np.array([logp[rows[t], seq[t]] - logq[rows[t], seq[t]] for t in range(horizon)])
        if gamma is None:
            c = np.full(horizon, r.sum())
        else:
            c = np.array([sum(gamma ** (s - t) * r[s] for s in range(t, horizon)) for t in range(horizon)])
        g = np.zeros_like(student)
        for t in range(horizon):
            g[rows[t]] += c[t] * (np.eye(vocab)[seq[t]] - np.exp(logp[rows[t]]))
        p_pi.append(np.exp(sum(logp[rows[t], seq[t]] for t in range(horizon))))
        if behaviour is not None:
            p_beta.append(np.prod([behaviour[rows[t], seq[t]] for t in range(horizon)]))
        ests.append(g)
    return np.array(p_pi), (np.array(p_beta) if behaviour is not None else None), np.array(ests)
