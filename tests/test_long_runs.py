"""The smoke experiment end to end (it learns and writes complete results), and long runs that survive: the
same run killed mid-way resumes to exactly its rows and parameters; a non-finite loss halts cleanly (or is
skipped); one failing job does not end a sweep; a sweep with a bad job is refused before any job runs; a
finished run is never overwritten."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from processes import experiment_env

from opd.model import ModelConfig, Transformer
from opd.tasks import make_task
from opd.train import resume
from opd.train.loop import NonFiniteError, Route, run_opd

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = ("time_s", "time/sample_s", "time/score_s", "time/update_s")
# The smoke experiment (4 steps, held-out evaluations at steps 2 and 4), checkpointed every 2 steps.
SMOKE = ["experiment=smoke", "eval_samples=2", "checkpoint_every=2", "log_every=1"]
REQUIRED_ROW_KEYS = {
    "loss", "grad_norm", "entropy", "response_len", "truncated_frac", "logprob_gap", "neg_reward_frac",
    "not_in_topk_frac", "teacher_topk_mass", "student_topk_mass", "time/sample_s", "time/score_s", "time/update_s",
}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.opd", *args]


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE}
            for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_state(run_dir: Path) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(resume.latest(run_dir).absolute() / "state")
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _sft_losses(out: str, label: str) -> list[float]:
    return [float(line.split(" loss ")[1].split()[0]) for line in out.splitlines() if f"[sft {label}] step" in line]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One uninterrupted `python -m experiments.opd experiment=smoke` run: its directory, output, and the
    overrides (SFT cache, compilation cache) later runs of the same configuration share with it."""
    root = tmp_path_factory.mktemp("smoke")
    shared = (f"checkpoint_root={root / 'sft'}", f"compile_cache={root / 'xla'}")
    proc = subprocess.run(_cmd(*SMOKE, *shared, f"hydra.run.dir={root / 'ref'}"), cwd=ROOT, env=experiment_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(dir=root / "ref", root=root, shared=shared, out=proc.stdout + proc.stderr)


def test_smoke_experiment_learns_and_writes_complete_results(smoke_run):
    run_dir, ckpt, out = smoke_run.dir, smoke_run.root / "sft", smoke_run.out
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
    assert any((smoke_run.root / "xla").iterdir())  # `compile_cache` stored the run's programs


def test_killed_run_resumes_to_the_uninterrupted_rows_and_parameters(smoke_run, tmp_path):
    # the processes share the reference run's SFT and compilation caches: they load its models and programs
    shared, env = smoke_run.shared, experiment_env()
    ref, killed = smoke_run.dir, tmp_path / "killed"
    # the same command, killed with SIGKILL after step 3 (the newest checkpoint is step 2's)
    kill_after = 3
    child = subprocess.Popen(_cmd(*SMOKE, *shared, f"hydra.run.dir={killed}"), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and child.poll() is None:
        rows = (killed / "metrics.jsonl").read_text().splitlines() if (killed / "metrics.jsonl").exists() else []
        if len(rows) >= kill_after:
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists() and resume.latest(killed) is not None
    # rerun the same command in the same directory: it continues from the newest checkpoint
    proc = subprocess.run(_cmd(*SMOKE, *shared, f"hydra.run.dir={killed}"), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[resume] continuing after step" in proc.stdout + proc.stderr
    got, want = _rows(killed), _rows(ref)
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # no duplicated or missing steps
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], abs=1e-6, rel=1e-6), (a["step"], k)
            else:
                assert a[k] == b[k], (a["step"], k)
    for a, b in zip(_final_state(killed), _final_state(ref), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # a finished run is never overwritten: the same command again is refused with one line
    again = subprocess.run(_cmd(*SMOKE, *shared, f"hydra.run.dir={killed}"), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    lines = [x for x in again.stderr.splitlines() if x.strip()]
    assert again.returncode == 2 and len(lines) == 1 and "already holds a finished run" in lines[0], lines


def _tiny(vocab, seed):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_seq_len=128)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def _cfg():
    ns = SimpleNamespace
    return ns(loss=ns(name="lsm", k=4, aggregation="sequence_mean", clip_eps=0.2, dual_clip=3.0,
                      mask_special_tokens=False, rollout_top_p=0.9),
              optimizer=ns(name="adamw", lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0,
                           warmup_steps=0, minibatches_per_step=1),
              seed=0, eval_seed=1, steps=3, eval_every=100, eval_samples=1, eval_batch_size=2, log_every=1,
              diagnostics_every=0, diag_bucket_size=8,
              rollout=ns(prompts_per_step=2, group_size=1, temperature=1.0, top_p=None, pad_multiple=8,
                         first_window=64))


def _poisoned_score(bad_step: int):
    """Teacher scoring whose top-K log-probs turn NaN at the `bad_step`-th call (an injected fault)."""
    from opd.teacher import score

    calls = {"n": 0}

    def score_fn(*args, **kwargs):
        calls["n"] += 1
        payload = score(*args, **kwargs)
        if calls["n"] == bad_step:
            payload = payload._replace(topk_logprobs_BxLxK=jnp.full_like(payload.topk_logprobs_BxLxK, jnp.nan))
        return payload

    return score_fn


def _route():
    task = make_task("arithmetic", min_terms=2, max_terms=2)
    return task, Route("arithmetic", task, _tiny(task.tokenizer.vocab_size, 1), train_items=task.items("train", 8, 0),
                       eval_items=task.items("eval", 2, 0))


def test_non_finite_loss_halts_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    from opd.results import RunRecorder

    task, route = _route()
    student = _tiny(task.tokenizer.vocab_size, 0)
    rec = RunRecorder(tmp_path, {})
    with pytest.raises(NonFiniteError) as err:
        run_opd(_cfg(), student, [route], recorder=rec, log=lambda _m: None, run_dir=tmp_path, checkpoint_every=1,
                score_fn=_poisoned_score(2))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("step 2 (arithmetic): non-finite loss")
    assert "step_0000001" in msg  # the last good checkpoint, named
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert resume.latest(tmp_path).name == "step_0000001"  # intact, and its parameters are finite
    assert all(np.all(np.isfinite(x)) for x in _final_state(tmp_path))


def test_skip_mode_logs_the_bad_step_and_leaves_the_parameters_finite(tmp_path):
    task, route = _route()
    student = _tiny(task.tokenizer.vocab_size, 0)
    out = run_opd(_cfg(), student, [route], log=lambda _m: None, on_nonfinite="skip", score_fn=_poisoned_score(2))
    assert [r["skipped_update"] for r in out["rows"]] == [0.0, 1.0, 0.0]
    assert not np.isfinite(out["rows"][1]["loss"]) and np.isfinite(out["rows"][2]["loss"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(nnx.state(student, nnx.Param)))


def test_a_sweep_with_a_bad_job_is_refused_before_any_job_runs(tmp_path):
    proc = subprocess.run(_cmd("-m", "experiment=smoke", "loss.k=4,0,4", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                               f"checkpoint_root={tmp_path / 'sft'}"), cwd=ROOT, env=experiment_env(),
                          capture_output=True, text=True, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: loss.k: expected an integer >= 1, got 0") and "sweep job 1" in lines[0]
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "sft").exists()


def test_one_failing_job_does_not_end_the_sweep_and_the_table_lists_it(smoke_run, tmp_path):
    """Under the joblib launcher (two jobs in parallel, one per core): job 1's teacher checkpoint is not a
    checkpoint, which only loading finds out. Job 0 reuses the smoke run's SFT models and programs."""
    bad = tmp_path / "not_a_checkpoint"
    bad.mkdir()
    sweep = tmp_path / "sweep"
    proc = subprocess.run(_cmd("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SMOKE,
                               "steps=2", f"tasks.arithmetic.teacher_checkpoint=null,{bad}",
                               f"hydra.sweep.dir={sweep}", *smoke_run.shared), cwd=ROOT, env=experiment_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.rglob(".hydra"))
    assert len(jobs) == 2 and (jobs[0] / "metrics.json").exists()
    error = (jobs[1] / "error.txt").read_text()
    assert "Traceback" in error and "# resolved config" in error and str(bad) in error
    assert "error: job 1:" in proc.stderr
    # --out and --rows both in tmp_path: the defaults are the committed results/tables and results/rows
    table = subprocess.run([sys.executable, "paper_figs/tables.py", str(sweep), "--table", "table1",
                            "--min-seeds", "1", "--min-items", "1", "--out", str(tmp_path / "tables"),
                            "--rows", str(tmp_path / "rows")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert f"Failed jobs (no results): `{jobs[1].relative_to(sweep)}`" in table.stdout


@pytest.mark.parametrize(("launcher", "target"), [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launchers_compose(launcher, target):
    from hydra import compose, initialize_config_dir

    import experiments.opd  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.gpus_per_node >= 1
