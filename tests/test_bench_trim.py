"""benchmarks/bench_trim.py: bad input is refused in one line before any measurement, and a run times the
batch at the budget's width beside the one cut to its longest rollout, with the same first loss."""

from __future__ import annotations

import re

import pytest
from script_modules import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_trim.py")


@pytest.mark.parametrize("argv, key", [
    (["--rounds", "0"], "--rounds and --response-len"),
    (["--response-len", "10"], "--rounds and --response-len"),
    (["--response-len", "5000", "seed=0"], "--response-len"),
    (["rollout.pad_multiple=0"], "rollout.pad_multiple"),
    (["experiment=multitask"], "overrides"),
])
def test_bad_input_is_one_line(bench, capsys, argv, key):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}:"), err


def test_the_cut_batch_is_narrower_and_gives_the_same_first_loss(bench, capsys):
    # the default (small) configuration: prompt 34 + budget 115; rows ended at 5-45 tokens fit in 128 columns
    assert bench.main(["--rounds", "1", "--response-len", "25", "seed=0"]) == 0
    out = capsys.readouterr().out
    widths = [int(w) for w in re.findall(r"width +(\d+):", out)]
    assert len(widths) == 2 and widths[1] < widths[0] and widths[1] % 64 == 0
    first, second = (float(x) for x in re.search(r"first-step loss (\S+) vs (\S+)", out).groups())
    assert first != 0 and first == pytest.approx(second, rel=1e-5)
