"""The bad-input table: malformed configurations and inputs across every entry point. Each is refused before
any computation with exit status 2 and exactly one `error: <key>: ...` line (a ValueError naming the argument
for library calls), and nothing is written.

Entry points run in process (the command-line checks happen before JAX does any work, so a subprocess per case
would be mostly interpreter start-up): `run_main` exactly as `python -m experiments.<name>` calls it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

OPD_CASES = {  # overrides -> the key the one error line must name
    "unknown_loss_option": (["loss=nope"], "loss"),
    "unknown_objective": (["loss.name=nope"], "loss.name"),
    "k_zero": (["loss.k=0"], "loss.k"),
    "k_above_vocab": (["loss.k=100000"], "loss.k"),
    "top_p_above_one": (["rollout.top_p=1.5"], "rollout.top_p"),
    "loss_top_p_zero": (["loss.rollout_top_p=0"], "loss.rollout_top_p"),
    "temperature_zero": (["rollout.temperature=0"], "rollout.temperature"),
    "pad_multiple_negative": (["rollout.pad_multiple=-8"], "rollout.pad_multiple"),
    "first_window_negative": (["rollout.first_window=-1"], "rollout.first_window"),
    "lr_inf": (["optimizer.lr=inf"], "optimizer.lr"),
    "lr_nan": (["optimizer.lr=nan"], "optimizer.lr"),
    "lr_negative": (["optimizer.lr=-1"], "optimizer.lr"),
    "minibatches_drop_rows": (["optimizer.minibatches_per_step=3"], "optimizer.minibatches_per_step"),
    "dual_clip_below_one": (["loss.dual_clip=0.5"], "loss.dual_clip"),
    "eval_problems_zero": (["eval_problems=0"], "eval_problems"),
    "steps_zero": (["steps=0"], "steps"),
    "steps_not_a_number": (["steps=many"], "steps"),
    "unknown_top_level_key": (["+foo=1"], "foo"),
    "unknown_loss_key": (["loss.nope=1"], "loss.nope"),
    "unknown_model_key": (["+student.foo=1"], "student"),
    "unknown_task": (["tasks.arithmetic.task.name=nope"], "tasks.arithmetic.task.name"),
    "unknown_task_option": (["task@tasks.arithmetic.task=nope"], "task@tasks.arithmetic.task"),
    "jsonl_task_without_hf_tokenizer": (["task@tasks.arithmetic.task=jsonl"], "tokenizer"),
    "unknown_model_option": (["model@student=nope"], "model@student"),
    "unknown_experiment": (["experiment=nope"], "experiment"),
    # (a teacher vocab_size above the student's is a padded head, accepted; below it is raised to the tokenizer's)
    "teacher_vocab_not_positive": (["tasks.arithmetic.teacher.vocab_size=0"], "tasks.arithmetic.teacher"),
    "missing_teacher_checkpoint": (["tasks.arithmetic.teacher_checkpoint=/nonexistent/ckpt"],
                                   "tasks.arithmetic.teacher_checkpoint"),
    "missing_student_checkpoint": (["student_checkpoint=/nonexistent/ckpt"], "student_checkpoint"),
    "variant_teacher_without_mapping": (["tasks.arithmetic.teacher_tokenizer=variant", "loss=sampled_token"],
                                        "tasks.arithmetic.token_mapping"),
    "mapped_teacher_topk_objective": (["tasks.arithmetic.teacher_tokenizer=variant",
                                       "tasks.arithmetic.token_mapping=surface"], "tasks.arithmetic.token_mapping"),
    "unknown_teacher_tokenizer": (["tasks.arithmetic.teacher_tokenizer=nope"], "tasks.arithmetic.teacher_tokenizer"),
    "unknown_student_tokenizer": (["tokenizer=nope"], "tokenizer"),
    "mesh_not_device_count": (["mesh.data=2"], "mesh"),
    "tuning_reads_the_test_split": (["tuning=true"], "eval_split"),
    "unknown_split": (["eval_split=test"], "eval_split"),
    "negative_chunk": (["chunk_size=-1"], "chunk_size"),
    "unknown_nonfinite_policy": (["on_nonfinite=ignore"], "on_nonfinite"),
    "resume_missing_dir": (["resume=/nonexistent/run"], "resume"),
    "keep_no_checkpoints": (["keep_checkpoints=0"], "keep_checkpoints"),
    "compile_cache_empty_path": (["compile_cache=''"], "compile_cache"),
    "tuned_lr_unknown_objective": (["+tuned_lr.nope=0.001"], "tuned_lr"),
    "tuned_lr_not_positive": (["+tuned_lr.lsm=0"], "tuned_lr.lsm"),
    "tuned_lr_in_a_tuning_run": (["tuning=true", "eval_split=validation", "+tuned_lr.lsm=0.001"], "tuned_lr"),
    "tuned_lr_without_the_runs_objective": (["loss=lsm", "+tuned_lr.sampled_token=0.001"], "tuned_lr"),
    "student_sft_lr_zero": (["sft_student.lr=0"], "sft_student.lr"),
    "teacher_sft_eps_zero": (["tasks.arithmetic.sft.eps=0"], "tasks.arithmetic.sft.eps"),
    "sft_then_without_steps": (["experiment=regime", "~tasks.arithmetic.sft_then.steps"], "tasks.arithmetic.sft_then"),
    "sft_then_unknown_field": (["experiment=regime", "+tasks.arithmetic.sft_then.nope=1"], "tasks.arithmetic.sft_then"),
    "sft_then_lr_zero": (["experiment=regime", "tasks.arithmetic.sft_then.lr=0"], "tasks.arithmetic.sft_then.lr"),
    "sft_then_unknown_optimizer": (["experiment=regime", "tasks.arithmetic.sft_then.optimizer=sgd"],
                                   "tasks.arithmetic.sft_then.optimizer"),
    "teacher_sft_optimizer_unknown": (["tasks.arithmetic.sft.optimizer=sgd"], "tasks.arithmetic.sft.optimizer"),
    "student_sft_optimizer_unknown": (["sft_student.optimizer=sgd"], "sft_student.optimizer"),
    "capacity_steps_negative": (["capacity_sft_steps=-1"], "capacity_sft_steps"),
    "lsm_over_one_token": (["loss=lsm", "loss.k=1"], "loss.k"),
    "sweep_with_a_bad_job": (["-m", "loss.k=4,0"], "loss.k"),
    "multitask_bad_top_p": (["experiment=multitask", "rollout.top_p=1.5"], "rollout.top_p"),
}


def _one_line(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


@pytest.mark.parametrize("case", sorted(OPD_CASES))
def test_experiment_opd_refuses(case, tmp_path, monkeypatch, capsys):
    import experiments.opd as exp
    from opd.cli import run_main

    overrides, key = OPD_CASES[case]
    run_dir = tmp_path / "run"
    argv = [*overrides, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"checkpoint_root={tmp_path / 'ckpt'}"]
    monkeypatch.setattr(sys, "argv", ["experiments/opd.py", *argv])
    monkeypatch.setattr(exp, "main", lambda: pytest.fail("Hydra ran a job for a refused configuration"))
    with pytest.raises(SystemExit) as exit_:
        run_main(exp.main, exp._GROUPS, "opd", exp.validate)
    lines = _one_line(capsys)
    assert exit_.value.code == 2 and len(lines) == 1, (case, lines)
    assert lines[0].startswith(f"error: {key}:"), (case, lines)
    assert not any(tmp_path.iterdir()), (case, list(tmp_path.iterdir()))  # nothing written, nothing trained


def _composed(overrides):
    from hydra import compose, initialize_config_dir

    import experiments.opd  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="opd", overrides=overrides)


def test_a_finished_run_is_never_overwritten(tmp_path):
    from experiments.opd import check_run_dir
    from opd.cli import ConfigError

    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^hydra\.run\.dir: .* already holds a finished run"):
        check_run_dir(_composed([]), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_rows_without_a_checkpoint_are_not_restarted_over(tmp_path):
    from experiments.opd import check_run_dir
    from opd.cli import ConfigError

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="holds rows of a run but no checkpoint"):
        check_run_dir(_composed([]), tmp_path)


def test_resume_from_a_checkpoint_of_another_configuration_says_what_differs(tmp_path):
    from experiments.opd import RESUME_VOLATILE, check_run_dir
    from opd.cli import ConfigError
    from opd.train import resume
    from opd.train.config import to_container

    ckpt = resume.checkpoints_dir(tmp_path) / "step_0000010"
    (ckpt / "state").mkdir(parents=True)
    config = {k: v for k, v in to_container(_composed([])).items() if k not in RESUME_VOLATILE}
    (ckpt / resume.RUN_STATE).write_text(json.dumps({"step": 10, "config": config}))
    assert check_run_dir(_composed([]), tmp_path)["resume_step"] == 10  # the same configuration resumes
    with pytest.raises(ConfigError) as err:
        check_run_dir(_composed(["loss=sampled_token", f"resume={tmp_path}"]), tmp_path)
    assert str(err.value).startswith("resume: the checkpoint") and "loss.name ('lsm' vs 'sampled_token')" in str(
        err.value)


# ---------------------------------------------------------------------------------------------------------
# Table, figure, import and sandbox commands
# ---------------------------------------------------------------------------------------------------------


def _exit_2_one_line(fn, capsys, key: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        code = fn()
        raise SystemExit(code)
    lines = _one_line(capsys)
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}"), lines


def test_table_command_on_a_missing_sweep(tmp_path, capsys):
    from paper_figs import tables

    out = tmp_path / "tables"
    _exit_2_one_line(lambda: tables.main([str(tmp_path / "nope"), "--table", "table1", "--out", str(out)]), capsys,
                     "sweep_dir:")
    assert not out.exists()


def test_table_command_on_a_sweep_below_the_protocol(tmp_path, capsys):
    from paper_figs import tables

    job = tmp_path / "sweep" / "0" / ".hydra"
    job.mkdir(parents=True)
    (job.parent / "metrics.json").write_text(json.dumps({"config": {"seed": 0, "loss": {"name": "lsm"},
                                                                     "tasks": {"arithmetic": {}}}, "metrics": {}}))
    (job.parent / "eval_items.jsonl").write_text(json.dumps({"phase": "final", "task": "arithmetic", "item": 0,
                                                             "sample": 0, "correct": 1.0}) + "\n")
    out = tmp_path / "tables"
    _exit_2_one_line(lambda: tables.main([str(tmp_path / "sweep"), "--table", "table1", "--out", str(out)]), capsys,
                     "sweep_dir: method 'lsm' on task 'arithmetic' has 1 seeds x 1 items")
    assert not out.exists()


@pytest.mark.parametrize("script", ["fig_opd_curves", "fig_failure_modes"])
def test_figure_commands_on_an_empty_directory(script, tmp_path, capsys):
    import importlib

    module = importlib.import_module(f"paper_figs.{script}")
    argv = [str(tmp_path)] if script == "fig_opd_curves" else [str(tmp_path), str(tmp_path / "figs")]
    _exit_2_one_line(lambda: module.main(argv), capsys, "")
    assert not (tmp_path / "figs").exists() and not any(tmp_path.glob("*.png"))


def test_gguf_import_of_a_file_that_is_not_gguf(tmp_path, capsys):
    from opd.model import convert

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    out = tmp_path / "out"
    _exit_2_one_line(lambda: convert.main(["--gguf", str(bad), "--out", str(out)]), capsys, "")
    assert not out.exists()


@pytest.mark.parametrize(("module", "overrides", "key"), [
    ("sandbox_variance", ["estimator.gamma=1.5"], "estimator.gamma"),
    ("sandbox_variance", ["mdp.vocab=1"], "mdp.vocab"),
    ("toy_coupling", ["horizon=0"], "horizon"),
])
def test_sandbox_commands_refuse(module, overrides, key, tmp_path, monkeypatch, capsys):
    import importlib

    exp = importlib.import_module(f"experiments.{module}")
    monkeypatch.setattr(sys, "argv", [f"experiments/{module}.py", f"--config-path={ROOT / 'conf'}", *overrides,
                                      f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as exit_:
        exp.main()
    lines = _one_line(capsys)
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {key}:"), lines
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ---------------------------------------------------------------------------------------------------------
# Library calls: a ValueError naming the argument
# ---------------------------------------------------------------------------------------------------------


def _library_cases():
    from opd import losses, sampling
    from opd.model import hf
    from opd.tasks import make_task
    from synthetic import exact

    nan = np.array([[0.0, np.nan, 1.0]])
    ids = np.array([[0, 1]])
    logq = np.log(np.array([[0.5, 0.5]]))
    logits = np.zeros((4, 2))  # V = 2, T = 2: (2^2 - 1) / (2 - 1) = 3 prefixes; 4 rows is the wrong shape
    return {
        "nan_student_logits": (lambda: losses.topk_reverse_kl(nan, ids, logq), "student_logits"),
        "nan_full_kl": (lambda: losses.full_reverse_kl(nan, np.zeros((1, 3))), "student_logits"),
        "topk_id_out_of_range": (lambda: losses.topk_reverse_kl(np.zeros((1, 3)), np.array([[0, 7]]), logq),
                                 "topk_ids"),
        "unknown_aggregation": (lambda: losses.aggregate(np.zeros((1, 2)), np.ones((1, 2)), "max"), "mode"),
        "top_p_above_one": (lambda: sampling.SamplingConfig(top_p=1.5), "top_p"),
        "unknown_task": (lambda: make_task("nope"), "task"),
        "bad_task_kwarg": (lambda: make_task("arithmetic", digits=0), "digits"),
        "missing_checkpoint": (lambda: hf.load_pretrained("/nonexistent/ckpt"), ""),
        "moments_wrong_shape": (lambda: exact.estimator_moments(logits, logits, 0.0), ""),
    }


@pytest.mark.parametrize("case", ["nan_student_logits", "nan_full_kl", "topk_id_out_of_range", "unknown_aggregation",
                                  "top_p_above_one", "unknown_task", "bad_task_kwarg", "missing_checkpoint",
                                  "moments_wrong_shape"])
def test_library_calls_raise_one_line_naming_the_argument(case):
    fn, name = _library_cases()[case]
    with pytest.raises(ValueError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg and name in msg, (case, msg)
