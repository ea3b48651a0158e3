"""The paper's three failure modes of sampled-token OPD (arXiv 2603.25562 §4), as small host-side diagnostics.

Each function takes concrete target-aligned arrays (docs/interfaces.md: `x_BxL[b, t]` scores token
`tokens[b, t]`; `mask_BxL` is 1 exactly on the student's tokens, so prompt, padding and environment tokens
never count) and returns plain Python / NumPy values. They run on the host after a training step (loops and
spans have data-dependent sizes), and `failure_mode_record` bundles them into one JSON-able dict small
enough to store next to metrics.json (`diagnostics.json`), from which `paper_figs/fig_failure_modes.py`
draws the paper's Fig 2-5 analogs.

    failure mode 1  imbalanced one-token signal   sampled_prob_pairs (Fig 2 scatter), neg_reward_frac
    failure mode 2  unreliable teacher on prefixes gap_quantiles_by_bucket (Fig 4), ngram_repetition_rate,
                                                   find_repetition_loops / loop_probabilities (Fig 3)
    failure mode 3  special-token mismatch        special_token_logprobs (Fig 5)
    coverage        sampled token outside the teacher top-K, by position bucket (not_in_topk_by_bucket)

Position of a student token = its offset from the first student token of its row (so in a multi-turn
rollout environment tokens in between count: the position is the context length the teacher sees).
Repetition statistics use the row's student tokens only, in order (environment turns are removed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# The longest block a repetition loop is searched for: a whole line, since the paper's Fig 3 loop repeats one
# line and the regime's worked lines are 19-26 tokens.
LOOP_MAX_PERIOD = 32


def _np(x, dtype=None) -> np.ndarray:
    return np.asarray(x, dtype=dtype)


def _check_2d(**arrays) -> tuple[int, int]:
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected [B, L] arrays of one shape, got {shapes}")
    return first


# ---------------------------------------------------------------------------------------------------------
# Failure mode 1: imbalanced one-token signal
# ---------------------------------------------------------------------------------------------------------


def neg_reward_frac(teacher_sampled_BxL, student_sampled_BxL, mask_BxL) -> float:
    """Fraction of student tokens whose sampled-token reward log q(y_t) − log π(y_t) is < 0 (0.0 if none)."""
    _check_2d(teacher=teacher_sampled_BxL, student=student_sampled_BxL, mask=mask_BxL)
    m = _np(mask_BxL) > 0
    if not m.any():
        return 0.0
    gap = _np(teacher_sampled_BxL, np.float64)[m] - _np(student_sampled_BxL, np.float64)[m]
    return float(np.mean(gap < 0))


def sampled_prob_pairs(
    teacher_sampled_BxL, student_sampled_BxL, mask_BxL, *, max_points: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """(teacher prob, student prob) of the sampled token at every student token: the paper's Fig 2 scatter.

    Subsampled uniformly without replacement to at most `max_points` (fixed `seed`), in row-major order.
    Returns {'teacher_prob', 'student_prob' (lists), 'n_total' (tokens before subsampling)}."""
    _check_2d(teacher=teacher_sampled_BxL, student=student_sampled_BxL, mask=mask_BxL)
    if max_points < 1:
        raise ValueError(f"max_points: expected an integer >= 1, got {max_points}")
    m = _np(mask_BxL) > 0
    q = np.exp(_np(teacher_sampled_BxL, np.float64)[m])
    p = np.exp(_np(student_sampled_BxL, np.float64)[m])
    n = int(q.size)
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        q, p = q[keep], p[keep]
    return {"teacher_prob": q.tolist(), "student_prob": p.tolist(), "n_total": n}


# ---------------------------------------------------------------------------------------------------------
# Positions and buckets
# ---------------------------------------------------------------------------------------------------------


def response_positions(mask_BxL) -> np.ndarray:
    """[B, L] int: offset of each student token from its row's first student token; -1 off the mask."""
    m = _np(mask_BxL) > 0
    if m.ndim != 2:
        raise ValueError(f"mask_BxL: expected [B, L], got shape {m.shape}")
    first = np.where(m.any(axis=1), m.argmax(axis=1), 0)
    pos = np.arange(m.shape[1])[None, :] - first[:, None]
    return np.where(m, pos, -1)


def _buckets(mask_BxL, bucket_size: int) -> tuple[np.ndarray, int]:
    if int(bucket_size) < 1:
        raise ValueError(f"bucket_size: expected an integer >= 1, got {bucket_size}")
    pos = response_positions(mask_BxL)
    bucket = np.where(pos >= 0, pos // int(bucket_size), -1)
    n_buckets = int(bucket.max()) + 1 if (bucket >= 0).any() else 0
    return bucket, n_buckets


def gap_quantiles_by_bucket(
    teacher_sampled_BxL,
    student_sampled_BxL,
    mask_BxL,
    *,
    bucket_size: int,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> dict[str, Any]:
    """Distribution of the gap log q(y_t) − log π(y_t) per position bucket (the paper's Fig 4).

    Bucket j holds positions [j·bucket_size, (j+1)·bucket_size). Empty buckets (between non-empty ones)
    have count 0 and NaN statistics -> stored as None. Returns {'bucket_size', 'bucket_start', 'count',
    'quantile_levels', 'quantiles' ([n_buckets][len(quantiles)]), 'mean', 'min', 'max'}."""
    _check_2d(teacher=teacher_sampled_BxL, student=student_sampled_BxL, mask=mask_BxL)
    qs = [float(q) for q in quantiles]
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles: expected values in [0, 1], got {qs}")
    bucket, n_buckets = _buckets(mask_BxL, bucket_size)
    gap = _np(teacher_sampled_BxL, np.float64) - _np(student_sampled_BxL, np.float64)
    out: dict[str, Any] = {"bucket_size": int(bucket_size), "bucket_start": [], "count": [],
                           "quantile_levels": qs, "quantiles": [], "mean": [], "min": [], "max": []}
    for j in range(n_buckets):
        g = gap[bucket == j]
        out["bucket_start"].append(j * int(bucket_size))
        out["count"].append(int(g.size))
        if g.size:
            out["quantiles"].append(np.quantile(g, qs).tolist())
            out["mean"].append(float(g.mean()))
            out["min"].append(float(g.min()))
            out["max"].append(float(g.max()))
        else:
            out["quantiles"].append([None] * len(qs))
            out["mean"].append(None)
            out["min"].append(None)
            out["max"].append(None)
    return out


def not_in_topk_by_bucket(tokens_BxL, topk_ids_BxLxK, mask_BxL, *, bucket_size: int) -> dict[str, Any]:
    """Coverage: per position bucket, the fraction of sampled tokens y_t not among the teacher's top-K ids.

    Returns {'bucket_size', 'bucket_start', 'count', 'frac' (None for an empty bucket), 'overall'}."""
    tokens, topk = _np(tokens_BxL), _np(topk_ids_BxLxK)
    _check_2d(tokens=tokens, mask=mask_BxL)
    if topk.ndim != 3 or topk.shape[:2] != tokens.shape:
        raise ValueError(f"topk_ids_BxLxK: expected shape {tokens.shape} + (K,), got {topk.shape}")
    miss = ~np.any(topk == tokens[..., None], axis=-1)
    bucket, n_buckets = _buckets(mask_BxL, bucket_size)
    m = _np(mask_BxL) > 0
    out: dict[str, Any] = {"bucket_size": int(bucket_size), "bucket_start": [], "count": [], "frac": [],
                           "overall": float(miss[m].mean()) if m.any() else 0.0}
    for j in range(n_buckets):
        sel = bucket == j
        c = int(sel.sum())
        out["bucket_start"].append(j * int(bucket_size))
        out["count"].append(c)
        out["frac"].append(float(miss[sel].mean()) if c else None)
    return out


# ---------------------------------------------------------------------------------------------------------
# Failure mode 2: repetition
# ---------------------------------------------------------------------------------------------------------


def ngram_repetition_rate(tokens: Sequence[int], n: int) -> float:
    """rep-n of one sequence: 1 − (#distinct n-grams / #n-grams); 0.0 when it has fewer than n tokens.

    E.g. n=2 on [1,2,1,2,1]: bigrams 12,21,12,21 -> 2 distinct of 4 -> 0.5."""
    if int(n) < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n}")
    t = [int(x) for x in np.asarray(tokens).reshape(-1)]
    grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def _student_rows(tokens_BxL, mask_BxL) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row: (student tokens in order, their column indices)."""
    tokens, m = _np(tokens_BxL), _np(mask_BxL) > 0
    _check_2d(tokens=tokens, mask=m)
    return [(tokens[b][m[b]], np.nonzero(m[b])[0]) for b in range(tokens.shape[0])]


def ngram_repetition_rates(tokens_BxL, mask_BxL, n: int) -> list[float]:
    """`ngram_repetition_rate` of each row's student tokens (environment and prompt tokens removed)."""
    return [ngram_repetition_rate(t, n) for t, _ in _student_rows(tokens_BxL, mask_BxL)]


def find_repetition_loops(
    tokens: Sequence[int], *, min_repeats: int = 3, max_period: int = LOOP_MAX_PERIOD, min_period: int = 1
) -> list[tuple[int, int, int]]:
    """Spans where a block of `period` tokens repeats at least `min_repeats` times back to back.

    Returns maximal loops as (start, period, length) with tokens[start:start+length] periodic with that
    period and length >= min_repeats · period (the last copy may be partial). Periods are tried smallest
    first; a span already covered by a smaller-period loop is not reported again (a loop of period 1
    is not also a loop of period 2). E.g. [9,1,2,1,2,1,2,7] with min_repeats=3 -> [(1, 2, 6)].
    """
    if int(min_repeats) < 2:
        raise ValueError(f"min_repeats: expected an integer >= 2, got {min_repeats}")
    if not 1 <= int(min_period) <= int(max_period):
        raise ValueError(
            f"min_period/max_period: expected 1 <= min_period <= max_period, got {min_period}, {max_period}"
        )
    t = np.asarray(tokens).reshape(-1)
    n = t.size
    covered = np.zeros(n, bool)
    loops: list[tuple[int, int, int]] = []
    for p in range(int(min_period), int(max_period) + 1):
        if n < 2 * p:
            break
        eq = t[p:] == t[:-p]  # eq[i] <=> t[i + p] == t[i]
        i = 0
        while i < eq.size:
            if not eq[i]:
                i += 1
                continue
            j = i
            while j < eq.size and eq[j]:
                j += 1
            start, length = i, (j - i) + p  # t[i : j + p] is periodic with period p
            if length >= int(min_repeats) * p and not covered[start:start + length].all():
                loops.append((int(start), p, int(length)))
                covered[start:start + length] = True
            i = j
    loops.sort()
    return loops


def loop_probabilities(
    tokens_BxL,
    mask_BxL,
    student_sampled_BxL,
    teacher_sampled_BxL,
    *,
    min_repeats: int = 3,
    max_period: int = LOOP_MAX_PERIOD,
    max_loops: int = 20,
) -> dict[str, Any]:
    """Repetition loops in the student's tokens of each row, with the teacher's and student's probability of
    every loop token (the paper's Fig 3: the teacher keeps rewarding the loop).

    Loops are searched in each row's student tokens (environment turns removed). Returns
    {'loops': [{'row', 'start' (column of the first loop token), 'period', 'length', 'tokens',
    'teacher_prob', 'student_prob'}] (the `max_loops` longest, longest first), 'n_loops',
    'loop_token_frac' (student tokens inside any loop / all student tokens), 'teacher_prob_mean',
    'student_prob_mean' (over the distinct loop tokens; None when there is no loop)}."""
    s_lp, t_lp = _np(student_sampled_BxL, np.float64), _np(teacher_sampled_BxL, np.float64)
    _check_2d(tokens=tokens_BxL, mask=mask_BxL, student=s_lp, teacher=t_lp)
    found, n_tok, n_loop_tok, q_all, p_all = [], 0, 0, [], []
    for b, (toks, cols) in enumerate(_student_rows(tokens_BxL, mask_BxL)):
        n_tok += toks.size
        in_loop = np.zeros(toks.size, bool)
        for start, period, length in find_repetition_loops(toks, min_repeats=min_repeats, max_period=max_period):
            c = cols[start:start + length]
            q, p = np.exp(t_lp[b, c]), np.exp(s_lp[b, c])
            in_loop[start:start + length] = True
            found.append({"row": b, "start": int(c[0]), "period": period, "length": length,
                          "tokens": toks[start:start + length].astype(int).tolist(),
                          "teacher_prob": q.tolist(), "student_prob": p.tolist()})
        n_loop_tok += int(in_loop.sum())
        q_all.append(np.exp(t_lp[b, cols[in_loop]]))
        p_all.append(np.exp(s_lp[b, cols[in_loop]]))
    found.sort(key=lambda d: (-d["length"], d["row"], d["start"]))
    return {
        "loops": found[:max_loops],
        "n_loops": len(found),
        "loop_token_frac": n_loop_tok / n_tok if n_tok else 0.0,
        "teacher_prob_mean": float(np.concatenate(q_all).mean()) if n_loop_tok else None,
        "student_prob_mean": float(np.concatenate(p_all).mean()) if n_loop_tok else None,
    }


# ---------------------------------------------------------------------------------------------------------
# Failure mode 3: special tokens
# ---------------------------------------------------------------------------------------------------------


def special_token_logprobs(
    tokens_BxL, mask_BxL, student_sampled_BxL, teacher_sampled_BxL, special_ids: Mapping[str, int]
) -> dict[str, dict[str, Any]]:
    """Student vs teacher log-prob of each special token at its first occurrence in each row's student tokens
    (the paper's Fig 5: the positions `mask_first_occurrences` masks).

    Returns {name: {'id', 'student_logprob', 'teacher_logprob' (one entry per row where it occurs),
    'student_mean', 'teacher_mean' (None if it never occurs)}}."""
    tokens, m = _np(tokens_BxL), _np(mask_BxL) > 0
    s_lp, t_lp = _np(student_sampled_BxL, np.float64), _np(teacher_sampled_BxL, np.float64)
    _check_2d(tokens=tokens, mask=m, student=s_lp, teacher=t_lp)
    out: dict[str, dict[str, Any]] = {}
    for name, sid in special_ids.items():
        hit = (tokens == int(sid)) & m
        rows = np.nonzero(hit.any(axis=1))[0]
        cols = hit.argmax(axis=1)[rows]
        s, t = s_lp[rows, cols], t_lp[rows, cols]
        out[str(name)] = {
            "id": int(sid),
            "student_logprob": s.tolist(),
            "teacher_logprob": t.tolist(),
            "student_mean": float(s.mean()) if s.size else None,
            "teacher_mean": float(t.mean()) if t.size else None,
        }
    return out


# ---------------------------------------------------------------------------------------------------------
# Bundle
# ---------------------------------------------------------------------------------------------------------


def failure_mode_record(
    tokens_BxL,
    response_mask_BxL,
    student_sampled_BxL,
    teacher_sampled_BxL,
    topk_ids_BxLxK=None,
    *,
    special_ids: Mapping[str, int] | None = None,
    bucket_size: int = 16,
    ngram_n: int = 3,
    loop_min_repeats: int = 3,
    loop_max_period: int = LOOP_MAX_PERIOD,
    max_loops: int = 20,
    max_points: int = 2000,
    seed: int = 0,
    id_to_token=None,
) -> dict[str, Any]:
    """All failure-mode diagnostics of one batch as a JSON-able dict (lists, floats, ints, None).

    topk_ids_BxLxK=None (a teacher scored through a token mapping has no top-K in the student's
    vocabulary) leaves out coverage. Keys: n_tokens, neg_reward_frac, logprob_gap, scatter, gap_by_bucket,
    ngram_n, repetition_rate (per row), repetition_rate_mean, loops, special_tokens, coverage.
    `id_to_token` (e.g. `tokenizer.id_to_token`) adds each loop's token strings as 'text', so figure
    scripts can label tokens without importing the tokenizer."""
    m = _np(response_mask_BxL) > 0
    q, p = _np(teacher_sampled_BxL, np.float64), _np(student_sampled_BxL, np.float64)
    _check_2d(tokens=tokens_BxL, mask=m, student=p, teacher=q)
    rep = ngram_repetition_rates(tokens_BxL, m, ngram_n)
    rec: dict[str, Any] = {
        "n_tokens": int(m.sum()),
        "neg_reward_frac": neg_reward_frac(q, p, m),
        "logprob_gap": float((q[m] - p[m]).mean()) if m.any() else 0.0,
        "scatter": sampled_prob_pairs(q, p, m, max_points=max_points, seed=seed),
        "gap_by_bucket": gap_quantiles_by_bucket(q, p, m, bucket_size=bucket_size),
        "ngram_n": int(ngram_n),
        "repetition_rate": rep,
        "repetition_rate_mean": float(np.mean(rep)) if rep else 0.0,
        "loops": loop_probabilities(tokens_BxL, m, p, q, min_repeats=loop_min_repeats,
                                    max_period=loop_max_period, max_loops=max_loops),
        "special_tokens": special_token_logprobs(tokens_BxL, m, p, q, special_ids or {}),
    }
    if id_to_token is not None:
        for loop in rec["loops"]["loops"]:
            loop["text"] = [str(id_to_token(i)) for i in loop["tokens"]]
    if topk_ids_BxLxK is not None:
        rec["coverage"] = not_in_topk_by_bucket(tokens_BxL, topk_ids_BxLxK, m, bucket_size=bucket_size)
    return rec
