"""`python -m experiments.opd` end to end: the smoke experiment runs the whole pipeline and writes complete
results; every bad input is one line on stderr, exit status 2, and no results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_ROW_KEYS = {
    "loss", "grad_norm", "entropy", "response_len", "truncated_frac", "logprob_gap", "neg_reward_frac",
    "not_in_topk_frac", "teacher_topk_mass", "student_topk_mass", "time/sample_s", "time/score_s", "time/update_s",
}


def _env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "experiments.opd", f"hydra.run.dir={run_dir}", *overrides]


def _sft_losses(out: str, label: str) -> list[float]:
    return [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if f"[sft {label}] step" in line]


def test_smoke_experiment_learns_and_writes_complete_results(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    proc = subprocess.run(_cmd(run_dir, "experiment=smoke", f"checkpoint_root={ckpt}", "eval_samples=2"), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "[opd lsm] step 4/4 arithmetic: loss" in out and "results:" in out
    # learning: the teacher's SFT cross-entropy falls over its 30 steps
    teacher_losses = _sft_losses(out, "teacher/arithmetic")
    assert len(teacher_losses) == 3 and teacher_losses[-1] < 0.8 * teacher_losses[0], teacher_losses
    payload = json.loads((run_dir / "metrics.json").read_text())
    m = payload["metrics"]
    for phase in ("teacher", "initial", "final"):
        for key in ("accuracy", "greedy_accuracy"):
            assert f"{phase}/arithmetic/{key}" in m, (phase, key)
    assert m["final/score"] == m["final/arithmetic/accuracy"]
    assert payload["config"]["loss"]["name"] == "lsm" and payload["git_revision"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and {r["task"] for r in rows} == {"arithmetic"}
    for row in rows:
        assert REQUIRED_ROW_KEYS <= set(row), REQUIRED_ROW_KEYS - set(row)
        assert all(math.isfinite(row[k]) for k in REQUIRED_ROW_KEYS), row
    assert "eval/arithmetic/accuracy" in rows[1] and "eval/arithmetic/accuracy" not in rows[2]
    assert rows[-1]["eval/arithmetic/accuracy"] == m["final/arithmetic/accuracy"]
    # every held-out outcome, per item and sample: 16 items x (2 sampled + 1 greedy) for each phase
    items = [json.loads(x) for x in (run_dir / "eval_items.jsonl").read_text().splitlines()]
    final = [r for r in items if r["phase"] == "final"]
    assert len(final) == 16 * 3 and {r["sample"] for r in final} == {-1, 0, 1}
    sampled = [r["correct"] for r in final if r["sample"] >= 0]
    assert sum(sampled) / len(sampled) == m["final/arithmetic/accuracy"]
    cached = [p for p in ckpt.iterdir() if not p.name.startswith(".")]
    assert len(cached) == 2  # teacher + student cached
    # the SFT evaluation was measured exactly as the run's (same items, key, samples, batch): stored with its
    # spec and reused as the teacher/ and initial/ scores instead of being measured again
    metas = {json.loads((p / "meta.json").read_text())["label"]: json.loads((p / "meta.json").read_text())
             for p in cached}
    for label, prefix in (("teacher/arithmetic", "teacher/"), ("student", "initial/")):
        assert metas[label]["sft_eval_spec"]["arithmetic"]["items"] == payload["config"]["eval_problems"]
        assert metas[label]["sft_eval"]["arithmetic/accuracy"] == m[prefix + "arithmetic/accuracy"]
        assert f"[eval] {prefix.rstrip('/')}: the held-out scores measured after SFT" in out


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
            _cmd(tmp_path / name, f"checkpoint_root={tmp_path / 'ckpt'}", *overrides), cwd=ROOT, env=_env(),
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
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.opd", "-m", "experiment=smoke", "loss=sampled_token,lsm", "seed=0,1",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", f"checkpoint_root={tmp_path / 'ckpt'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").rglob("metrics.json"))
    assert len(jobs) == 4
    fig = subprocess.run([sys.executable, "paper_figs/fig_opd_curves.py", str(tmp_path / "sweep"), "--out",
                          str(tmp_path / "figs")], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert fig.returncode == 0, fig.stderr
    assert (tmp_path / "figs" / "opd_curves.png").exists() and (tmp_path / "figs" / "opd_final_accuracy.png").exists()
