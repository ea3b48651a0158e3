"""`python -m experiments.opd` through the real command line: every bad input is one line on stderr, exit
status 2, and no results; a sweep writes what the figure script reads (slow). The smoke run end to end, and
its kill and resume, are in test_long_runs.py (they share one reference run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from processes import experiment_env

ROOT = Path(__file__).resolve().parents[1]


def _cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "experiments.opd", f"hydra.run.dir={run_dir}", *overrides]


# The full bad-input table runs in process (tests/test_bad_input.py); these go through the real command line.
BAD = {
    "unknown_loss": (["loss=nope"], "loss"),
    "unknown_top_level_key": (["+foo=1"], "foo"),
    "mapped_teacher_topk_objective": (["tasks.arithmetic.teacher_tokenizer=variant",
                                       "tasks.arithmetic.token_mapping=surface"], "tasks.arithmetic.token_mapping"),
}


def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path):
    procs = {}
    for name, (overrides, _) in BAD.items():  # in parallel: each is mostly interpreter start-up
        procs[name] = subprocess.Popen(
            _cmd(tmp_path / name, f"checkpoint_root={tmp_path / 'ckpt'}", *overrides), cwd=ROOT, env=experiment_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        key = BAD[name][1]
        lines = [x for x in stderr.splitlines() if x.strip()]
        assert proc.returncode == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), (name, lines)
        run_dir = tmp_path / name
        assert not (run_dir / "metrics.json").exists() and not (run_dir / "metrics.jsonl").exists(), name
        assert not run_dir.exists() or not any(run_dir.iterdir()), (name, list(run_dir.iterdir()))
    assert not (tmp_path / "ckpt").exists()  # nothing trained


@pytest.mark.slow
def test_multirun_compare_sweep_smoke(tmp_path):
    # eval_problems=24: more held-out items than SFT measured (16), so the first job measures the teacher and the
    # initial student and the other jobs read what it stored beside the cached checkpoints
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.opd", "-m", "experiment=smoke", "loss=sampled_token,lsm", "seed=0,1",
         "eval_problems=24", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"checkpoint_root={tmp_path / 'ckpt'}"],
        cwd=ROOT, env=experiment_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").rglob("metrics.json"))
    assert len(jobs) == 4
    logs = [(j.parent / "opd.log").read_text() for j in jobs]
    reused = "the held-out scores an earlier job measured the same way"
    assert sum(log.count(reused) for log in logs) == 2 * 3  # teacher and student, in every job after the first
    before = [[x for x in (j.parent / "eval_items.jsonl").read_text().splitlines() if '"final"' not in x] for j in jobs]
    assert all(b == before[0] for b in before) and len(before[0]) == 2 * 24 * 2  # 2 models x 24 items x (1 + greedy)
    fig = subprocess.run([sys.executable, "paper_figs/fig_opd_curves.py", str(tmp_path / "sweep"), "--out",
                          str(tmp_path / "figs")], cwd=ROOT, env=experiment_env(), capture_output=True, text=True,
                         timeout=300)
    assert fig.returncode == 0, fig.stderr
    assert (tmp_path / "figs" / "opd_curves.png").exists() and (tmp_path / "figs" / "opd_final_accuracy.png").exists()
