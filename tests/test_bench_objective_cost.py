"""benchmarks/bench_objective_cost.py: bad input is refused in one line before any measurement, and a run
writes one row per objective with ratios to the first (the baselines table's side-by-side cost)."""

from __future__ import annotations

import json

import pytest
from script_modules import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_objective_cost.py")


@pytest.mark.parametrize("argv, key", [
    (["--objectives", "lsm,nope"], "--objectives"),
    (["--objectives", ""], "--objectives"),
    (["--rounds", "0"], "--rounds"),
    (["loss.k=0"], "loss.k"),
    (["nope=1"], "nope"),  # a composition error (Hydra's own report) is one line too
])
def test_bad_input_is_one_line(bench, capsys, argv, key):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}:"), err


def test_an_existing_out_file_is_kept(bench, tmp_path, capsys):
    out = tmp_path / "cost.json"
    out.write_text("kept")
    assert bench.main(["--out", str(out)]) == 2
    assert out.read_text() == "kept"
    assert "--out" in capsys.readouterr().err


def test_rows_are_ratios_to_the_first_objective(bench, tmp_path):
    out = tmp_path / "cost.json"
    # the default (small) configuration: the measurement path, not the regime's cost
    assert bench.main(["--objectives", "sampled_token,full_rkl", "--rounds", "1", "--out", str(out), "seed=0"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["objective"] for r in rows] == ["sampled_token", "full_rkl"]
    assert rows[0]["update_s_ratio"] == 1.0 and rows[0]["peak_mem_ratio"] == 1.0
    for r in rows:
        assert r["update_s"] > 0 and r["peak_mem_bytes"] > 0
        assert r["update_s_ratio"] == pytest.approx(r["update_s"] / rows[0]["update_s"])
    # full reverse KL runs the teacher inside the update: its compiled program holds the teacher's weights too
    assert rows[1]["peak_mem_bytes"] > rows[0]["peak_mem_bytes"]
