"""opd.failure_modes on constructed inputs whose answers are worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from opd import failure_modes as fm
from opd import losses as L

LN = math.log


def _batch():
    """Two rows, L = 8. Row 0: prompt at cols 0-1, response cols 2-7. Row 1: prompt 0-2, student 3-4,
    environment 5-6 (mask 0), student 7."""
    tokens = np.array([[1, 9, 5, 6, 5, 6, 5, 2],
                       [1, 9, 9, 7, 7, 8, 8, 7]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 1, 1, 0, 0, 1]], np.float32)
    student = np.log(np.array([[1, 1, .5, .5, .5, .5, .5, .9],
                               [1, 1, 1, .8, .4, 1, 1, .2]]))
    teacher = np.log(np.array([[1, 1, .25, .5, 1.0, .25, .9, .1],
                               [1, 1, 1, .4, .8, .01, .01, .4]]))
    return tokens, mask, student, teacher


def test_neg_reward_frac_counts_only_masked_strictly_negative():
    _, mask, s, t = _batch()
    # masked gaps (q/p): row0 .5,1,2,.5,1.8,.111 -> negatives at .5,.5,.111 = 3; row1 .5,2,2 -> 1. 4 of 9.
    assert fm.neg_reward_frac(t, s, mask) == pytest.approx(4 / 9)
    assert fm.neg_reward_frac(t, s, np.zeros_like(mask)) == 0.0


def test_scatter_pairs_are_the_masked_probabilities_and_subsample():
    _, mask, s, t = _batch()
    out = fm.sampled_prob_pairs(t, s, mask)
    assert out["n_total"] == 9
    np.testing.assert_allclose(out["student_prob"], [.5, .5, .5, .5, .5, .9, .8, .4, .2])
    np.testing.assert_allclose(out["teacher_prob"], [.25, .5, 1., .25, .9, .1, .4, .8, .4])
    sub = fm.sampled_prob_pairs(t, s, mask, max_points=4, seed=3)
    assert sub["n_total"] == 9 and len(sub["teacher_prob"]) == 4
    pairs = set(zip(np.round(out["teacher_prob"], 6), np.round(out["student_prob"], 6)))
    assert set(zip(np.round(sub["teacher_prob"], 6), np.round(sub["student_prob"], 6))) <= pairs


def test_response_positions_count_environment_tokens():
    _, mask, _, _ = _batch()
    pos = fm.response_positions(mask)
    np.testing.assert_array_equal(pos[0], [-1, -1, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(pos[1], [-1, -1, -1, 0, 1, -1, -1, 4])


def test_gap_quantiles_by_bucket():
    _, mask, s, t = _batch()
    out = fm.gap_quantiles_by_bucket(t, s, mask, bucket_size=2, quantiles=(0.0, 0.5, 1.0))
    # bucket 0 = positions 0,1: row0 gaps ln.5, ln1; row1 ln.5, ln2
    # bucket 1 = positions 2,3: row0 ln2, ln.5 ; bucket 2 = positions 4,5: row0 ln1.8, ln(1/9); row1 ln2
    assert out["bucket_start"] == [0, 2, 4]
    assert out["count"] == [4, 2, 3]
    np.testing.assert_allclose(out["quantiles"][0], [LN(.5), LN(.5) / 2, LN(2)], atol=1e-12)
    np.testing.assert_allclose(out["quantiles"][2], [LN(1 / 9), LN(1.8), LN(2)], atol=1e-12)
    assert out["mean"][1] == pytest.approx(0.0, abs=1e-12)
    assert out["min"][2] == pytest.approx(LN(1 / 9)) and out["max"][2] == pytest.approx(LN(2))


def test_gap_buckets_empty_bucket_is_none():
    mask = np.array([[1, 0, 0, 0, 0, 1]], np.float32)
    z = np.zeros((1, 6))
    out = fm.gap_quantiles_by_bucket(z, z, mask, bucket_size=2)
    assert out["count"] == [1, 0, 1]
    assert out["mean"][1] is None and out["quantiles"][1][0] is None
    json.dumps(out)


def test_not_in_topk_by_bucket():
    tokens, mask, _, _ = _batch()
    topk = np.zeros((2, 8, 2), np.int32)
    topk[0, :, 0] = 5          # row 0: 5 is always in the top-K, 6 and 2 never
    topk[1, :, 0] = 7          # row 1: 7 always in, 8 never (8 only occurs off the mask)
    out = fm.not_in_topk_by_bucket(tokens, topk, mask, bucket_size=2)
    # row0 positions 0..5 tokens 5,6,5,6,5,2 -> miss 0,1,0,1,0,1; row1 positions 0,1,4 tokens 7,7,7 -> 0
    assert out["count"] == [4, 2, 3]
    np.testing.assert_allclose(out["frac"], [1 / 4, 1 / 2, 1 / 3])
    assert out["overall"] == pytest.approx(3 / 9)


@pytest.mark.parametrize("seq,n,rate", [
    ([1, 2, 1, 2, 1], 2, 0.5),          # 12 21 12 21
    ([1, 2, 3, 4], 2, 0.0),
    ([4, 4, 4, 4], 1, 0.75),
    ([4, 4, 4, 4], 3, 0.5),             # 444 444
    ([1, 2], 3, 0.0),                   # too short
])
def test_ngram_repetition_rate(seq, n, rate):
    assert fm.ngram_repetition_rate(seq, n) == pytest.approx(rate)


def test_repetition_rates_drop_environment_tokens():
    tokens, mask, _, _ = _batch()
    # row 1 student tokens: 7, 7, 7 (the 8s are environment) -> unigram rep 2/3
    assert fm.ngram_repetition_rates(tokens, mask, 1)[1] == pytest.approx(2 / 3)


def test_find_repetition_loops_by_hand():
    assert fm.find_repetition_loops([9, 1, 2, 1, 2, 1, 2, 7]) == [(1, 2, 6)]
    assert fm.find_repetition_loops([9, 1, 2, 1, 2, 7]) == []                       # only 2 copies
    assert fm.find_repetition_loops([9, 1, 2, 1, 2, 7], min_repeats=2) == [(1, 2, 4)]
    # a period-1 run is reported once, not again as period 2 or 3
    assert fm.find_repetition_loops([3, 3, 3, 3, 3, 3, 3]) == [(0, 1, 7)]
    # partial last copy is part of the loop: 123 123 123 1
    assert fm.find_repetition_loops([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 8]) == [(0, 3, 10)]
    # two loops in one sequence, different periods
    assert fm.find_repetition_loops([5, 5, 5, 0, 1, 2, 1, 2, 1, 2]) == [(0, 1, 3), (4, 2, 6)]
    assert fm.find_repetition_loops([1, 2, 3, 4, 5, 6]) == []
    assert fm.find_repetition_loops([1, 2, 1, 2, 1, 2], max_period=1) == []


def test_loop_probabilities_report_teacher_and_student_on_loop_tokens():
    tokens, mask, s, t = _batch()
    assert fm.loop_probabilities(tokens, mask, s, t, min_repeats=3)["n_loops"] == 1  # 5 6 5 6 5 is 2.5 copies
    out = fm.loop_probabilities(tokens, mask, s, t, min_repeats=2)
    # row 0 student tokens 5 6 5 6 5 2 -> loop period 2 of length 5 at cols 2..6
    # row 1 student tokens 7 7 7 (cols 3, 4, 7) -> period-1 loop across the environment turn
    assert out["n_loops"] == 2
    first, second = out["loops"]
    assert (first["row"], first["start"], first["period"], first["length"]) == (0, 2, 2, 5)
    assert first["tokens"] == [5, 6, 5, 6, 5]
    np.testing.assert_allclose(first["teacher_prob"], [.25, .5, 1., .25, .9])
    np.testing.assert_allclose(first["student_prob"], [.5] * 5)
    assert (second["row"], second["start"], second["length"]) == (1, 3, 3)
    np.testing.assert_allclose(second["teacher_prob"], [.4, .8, .4])
    assert out["loop_token_frac"] == pytest.approx(8 / 9)
    assert out["teacher_prob_mean"] == pytest.approx((.25 + .5 + 1 + .25 + .9 + .4 + .8 + .4) / 8)
    assert out["student_prob_mean"] == pytest.approx((.5 * 5 + .8 + .4 + .2) / 8)


def test_no_loops_gives_none_means():
    tokens = np.array([[1, 2, 3, 4]])
    out = fm.loop_probabilities(tokens, np.ones((1, 4)), np.zeros((1, 4)), np.zeros((1, 4)))
    assert out["n_loops"] == 0 and out["teacher_prob_mean"] is None and out["loop_token_frac"] == 0.0


def test_special_token_logprobs_first_occurrence_only_and_same_positions_as_mask():
    tokens, mask, s, t = _batch()
    # special id 5: first student occurrence in row 0 at col 2 (row 1 has none);
    # id 7: row 1 col 3 (col 7 is a later occurrence); id 9 occurs only in prompts -> never
    out = fm.special_token_logprobs(tokens, mask, s, t, {"five": 5, "seven": 7, "nine": 9})
    np.testing.assert_allclose(out["five"]["student_logprob"], [LN(.5)])
    np.testing.assert_allclose(out["five"]["teacher_logprob"], [LN(.25)])
    np.testing.assert_allclose(out["seven"]["teacher_logprob"], [LN(.4)])
    assert out["nine"]["teacher_mean"] is None and out["nine"]["student_logprob"] == []
    # the positions reported are exactly those mask_first_occurrences removes from the response mask
    response_tokens = np.where(mask > 0, tokens, -1)
    masked = np.asarray(L.mask_first_occurrences(response_tokens, [5, 7, 9], mask))
    removed = np.argwhere((mask > 0) & (masked == 0)).tolist()
    assert removed == [[0, 2], [1, 3]]


def test_record_is_json_and_consistent():
    tokens, mask, s, t = _batch()
    topk = np.repeat(tokens[..., None], 4, axis=-1)  # sampled token always in the top-K
    rec = fm.failure_mode_record(tokens, mask, s, t, topk, special_ids={"eos": 2}, bucket_size=4, ngram_n=2,
                                 loop_min_repeats=2,
                                 id_to_token=lambda i: f"<{i}>")
    rec2 = json.loads(json.dumps(rec))
    assert rec2["n_tokens"] == 9
    assert rec2["neg_reward_frac"] == pytest.approx(4 / 9)
    assert rec2["coverage"]["overall"] == 0.0
    assert rec2["special_tokens"]["eos"]["teacher_logprob"] == pytest.approx([LN(.1)])
    assert rec2["loops"]["loops"][0]["text"] == ["<5>", "<6>", "<5>", "<6>", "<5>"]
    assert len(rec2["repetition_rate"]) == 2
    gap = (t - s)[mask > 0]
    assert rec2["logprob_gap"] == pytest.approx(gap.mean())
    assert "coverage" not in fm.failure_mode_record(tokens, mask, s, t)


def test_record_subsamples_large_batches():
    rng = np.random.default_rng(0)
    B, Lx = 16, 300
    tokens = rng.integers(3, 50, (B, Lx))
    lp = np.log(rng.uniform(0.01, 1, (B, Lx)))
    rec = fm.failure_mode_record(tokens, np.ones((B, Lx)), lp, lp * 0.5, max_points=2000)
    assert rec["scatter"]["n_total"] == B * Lx and len(rec["scatter"]["teacher_prob"]) == 2000
    assert len(json.dumps(rec)) < 400_000


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        fm.neg_reward_frac(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="bucket_size"):
        fm.gap_quantiles_by_bucket(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), bucket_size=0)
    with pytest.raises(ValueError, match="min_repeats"):
        fm.find_repetition_loops([1, 1], min_repeats=1)
