"""`python -m experiments.opd` end to end: the smoke experiment runs the whole pipeline and writes complete
results; every bad input is one line on stderr, exit status 2, and no results."""

from __future__ import annotations

import json
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


def test_smoke_experiment_writes_complete_results(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    proc = subprocess.run(_cmd(run_dir, "experiment=smoke", f"checkpoint_root={ckpt}"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "[sft teacher] step" in out and "[sft student] step" in out and "[opd lsm] step 4/4 loss" in out
    assert "results:" in out
    payload = json.loads((run_dir / "metrics.json").read_text())
    m = payload["metrics"]
    for key in ("initial/accuracy", "final/accuracy", "teacher/accuracy", "initial/greedy_accuracy",
                "final/greedy_accuracy", "teacher/greedy_accuracy"):
        assert 0.0 <= m[key] <= 1.0, key
    assert payload["config"]["loss"]["name"] == "lsm" and payload["git_revision"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert REQUIRED_ROW_KEYS <= set(row), REQUIRED_ROW_KEYS - set(row)
    assert "eval/accuracy" in rows[1] and "eval/accuracy" in rows[3]
    assert rows[-1]["eval/accuracy"] == m["final/accuracy"]
    cached = [p for p in ckpt.iterdir() if not p.name.startswith(".")]
    assert len(cached) == 2  # teacher + student cached
    # the SFT evaluation was measured exactly as the run's (same problems, key, budget, batch): stored with
    # its spec and reused as teacher/ and initial/ accuracy instead of being measured again
    metas = {json.loads((p / "meta.json").read_text())["label"]: json.loads((p / "meta.json").read_text())
             for p in cached}
    for label, prefix in (("teacher", "teacher/"), ("student", "initial/")):
        assert metas[label]["sft_eval_spec"]["problems"] == payload["config"]["eval_problems"]
        assert metas[label]["sft_eval"]["accuracy"] == m[prefix + "accuracy"]
        assert f"[eval] {prefix.rstrip('/')}: the held-out accuracy measured after SFT" in out


BAD = {
    "unknown_loss": (["loss=nope"], "loss"),
    "unknown_loss_name": (["loss.name=nope"], "loss.name"),
    "unknown_task": (["task.name=nope"], "task.name"),
    "k_above_vocab": (["loss.k=100000"], "loss.k"),
    "top_p_above_one": (["rollout.top_p=1.5"], "rollout.top_p"),
    "top_p_zero": (["loss.rollout_top_p=0"], "loss.rollout_top_p"),
    "vocab_mismatch": (["teacher.vocab_size=500"], "teacher.vocab_size"),
    "missing_checkpoint": (["teacher_checkpoint=/nonexistent/ckpt"], "teacher_checkpoint"),
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
