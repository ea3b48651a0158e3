"""Wall time of synthetic.exact.estimator_moments at the enumeration limit (V^T <= 10^6), float64, CPU.

    .venv/bin/python benchmarks/bench_exact_moments.py

Prints, per (V, T): first call (compile + run) and the best of 3 warm calls, for γ = 0.5 and the full
return, plus the per-sequence throughput. Target from issue 3: all V^T <= 10^6 sequences in under 10 s.
"""

from __future__ import annotations

import time

import numpy as np

from synthetic import exact, tabular

CASES = [(10, 6), (2, 19), (3, 12), (1000, 2)]


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{'V':>5} {'T':>3} {'V^T':>9} {'rows':>8} {'gamma':>6} {'first call s':>13} {'warm s':>8} {'Mseq/s':>7}")
    for vocab, horizon in CASES:
        rows = tabular.num_prefixes(vocab, horizon)
        student, teacher = rng.normal(size=(rows, vocab)), rng.normal(size=(rows, vocab))
        for gamma in (0.5, None):
            t0 = time.perf_counter()
            exact.estimator_moments(student, teacher, gamma)
            first = time.perf_counter() - t0
            warm = []
            for _ in range(3):
                t0 = time.perf_counter()
                exact.estimator_moments(student, teacher, gamma)
                warm.append(time.perf_counter() - t0)
            n = vocab**horizon
            print(f"{vocab:>5} {horizon:>3} {n:>9} {rows:>8} {gamma!s:>6} {first:>13.2f} {min(warm):>8.2f} "
                  f"{n / min(warm) / 1e6:>7.2f}")


if __name__ == "__main__":
    main()
