"""OPD with Hugging Face checkpoints (`model@student=hf student.path=DIR model@tasks.arithmetic.teacher=hf
tasks.arithmetic.teacher.path=DIR`):
tiny checkpoints written with opd.model.hf.save_pretrained run the experiment end to end, loaded as is (no
SFT); each bad checkpoint input is one ConfigError naming the key, before anything is computed or written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir

from opd.cli import ConfigError
from opd.model import ModelConfig, Transformer, hf
from opd.tasks import make_task
from opd.train.config import register_configs, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()

SMOKE_TASK = dict(min_terms=3, max_terms=4)  # conf/experiment/smoke.yaml's task
TOK_VOCAB = make_task("arithmetic").tokenizer.vocab_size
_task = make_task("arithmetic", **SMOKE_TASK)
SEQ = _task.max_prompt_len + _task.max_response_len  # prompt + response of the smoke task


def _save(path: Path, *, seed: int, vocab_size: int = TOK_VOCAB, max_seq_len: int = SEQ, hidden: int = 32) -> Path:
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=2 * hidden, max_seq_len=max_seq_len, tie_embeddings=True, family="llama")
    hf.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(seed)), path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"student": _save(root / "student", seed=1), "teacher": _save(root / "teacher", seed=2)}


def _hf_overrides(student: Path | str, teacher: Path | str) -> list[str]:
    return ["model@student=hf", f"student.path={student}", "model@tasks.arithmetic.teacher=hf",
            f"tasks.arithmetic.teacher.path={teacher}"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="opd", overrides=["experiment=smoke", *overrides])


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_opd_runs_end_to_end_on_hf_checkpoints(ckpts, tmp_path, monkeypatch):
    import experiments.opd as exp
    from opd.train import loop

    cfg = _compose([*_hf_overrides(ckpts["student"], ckpts["teacher"]), f"checkpoint_root={tmp_path / 'ckpt'}",
                    "steps=2", "eval_every=1", "eval_problems=4", "eval_batch_size=4", "train_problems=16"])
    built = validate(cfg)
    assert built["hf_student"] == str(ckpts["student"])
    assert built["routes"]["arithmetic"]["hf_teacher"] == str(ckpts["teacher"])
    assert built["student"] == hf.load_config(ckpts["student"])

    seen = {}
    run_opd = loop.run_opd

    def spy(cfg, student, routes, **kw):  # the models OPD gets, as loaded and after training (in place)
        seen["student_before"], seen["teacher_before"] = _params(student), _params(routes[0].teacher)
        seen["student"], seen["teacher"] = student, routes[0].teacher
        return run_opd(cfg, student, routes, **kw)

    monkeypatch.setattr(loop, "run_opd", spy)
    lines: list[str] = []
    out = tmp_path / "run"
    final = exp.run_experiment(cfg, built, out, log=lines.append)

    assert any(x.startswith("[hf teacher/arithmetic] loaded") for x in lines)
    assert any(x.startswith("[hf student] loaded") for x in lines)
    assert not any(x.startswith("[sft") for x in lines), lines  # loaded as is: no SFT
    assert not (tmp_path / "ckpt").exists()
    payload = json.loads((out / "metrics.json").read_text())
    m = payload["metrics"]
    for key in ("initial/arithmetic/accuracy", "final/arithmetic/accuracy", "teacher/arithmetic/accuracy"):
        assert 0.0 <= m[key] <= 1.0 and m[key] == final[key], key
    assert payload["config"]["checkpoints"] == {"teacher/arithmetic": str(ckpts["teacher"]),
                                                "student": str(ckpts["student"])}

    # The student was trained, the teacher untouched; both started from the checkpoints' weights.
    for role in ("student", "teacher"):
        on_disk = _params(hf.load_pretrained(ckpts[role]))
        assert all(np.array_equal(a, b) for a, b in zip(on_disk, seen[f"{role}_before"], strict=True)), role
    after_s, after_t = _params(seen["student"]), _params(seen["teacher"])
    assert any(not np.array_equal(a, b) for a, b in zip(seen["student_before"], after_s, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(seen["teacher_before"], after_t, strict=True))


@pytest.fixture(scope="module")
def bad(ckpts, tmp_path_factory):
    """name -> (overrides, key the error names, text the message contains)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "no_config").mkdir()
    small = _save(root / "small_vocab", seed=3, vocab_size=TOK_VOCAB - 1)
    other = _save(root / "other_vocab", seed=4, vocab_size=TOK_VOCAB + 8)
    short = _save(root / "short", seed=5, max_seq_len=SEQ - 1)
    s, t = ckpts["student"], ckpts["teacher"]
    return {
        "missing_dir": (_hf_overrides(root / "nope", t), "student.path", "config.json"),
        "no_config_json": (_hf_overrides(s, root / "no_config"), "tasks.arithmetic.teacher.path", "config.json"),
        # a teacher with fewer rows than the student (one padded past the student's is accepted, see below)
        "vocab_mismatch": (_hf_overrides(other, t), "tasks.arithmetic.teacher.path", "vocab_size"),
        "vocab_below_task_tokenizer": (_hf_overrides(small, small), "student.path", "opd.tasks.Tokenizer"),
        "short_positions": (_hf_overrides(s, short), "tasks.arithmetic.teacher.path", "max_position_embeddings"),
    }


def test_bad_hf_inputs_are_config_errors_naming_the_key(bad):
    for name, (overrides, key, text) in bad.items():
        with pytest.raises(ConfigError) as err:
            validate(_compose(overrides))
        msg = str(err.value)
        assert msg.startswith(f"{key}:") and text in msg and "\n" not in msg, (name, msg)


def test_an_hf_teacher_padded_past_the_student_is_one_vocabulary(ckpts, tmp_path):
    """As Qwen2.5-7B (152,064 rows) teaching Qwen2.5-0.5B (151,936): the same tokenizer, more rows."""
    padded = _save(tmp_path / "padded", seed=4, vocab_size=TOK_VOCAB + 8)
    built = validate(_compose(_hf_overrides(ckpts["student"], padded)))
    assert built["routes"]["arithmetic"]["teacher"].vocab_size == TOK_VOCAB + 8
    assert built["student"].vocab_size == TOK_VOCAB


def test_bad_hf_inputs_on_the_command_line_write_nothing(bad, tmp_path, monkeypatch, capsys):
    """Through the Hydra entry point (in process: a subprocess per case is mostly JAX start-up): exit 2,
    one `error: <key>: ...` line, the job directory removed, nothing trained."""
    import experiments.opd as exp
    from opd import cli

    discarded: list[set[str]] = []
    discard = cli._discard_empty_job_dir

    def spy(path):  # what Hydra had written to the job dir when the ConfigError came
        discarded.append({p.name for p in path.iterdir()} if path.is_dir() else set())
        discard(path)

    monkeypatch.setattr(cli, "_discard_empty_job_dir", spy)
    for name, (overrides, key, _) in bad.items():
        argv = [f"hydra.run.dir={tmp_path / name}", f"checkpoint_root={tmp_path / 'ckpt'}", "experiment=smoke",
                "hydra/job_logging=none", "hydra/hydra_logging=none", *overrides]  # no handlers on capsys' stream
        cli.check_group_choices(argv, exp._GROUPS, "opd")
        monkeypatch.setattr(sys, "argv", ["experiments/opd.py", f"--config-path={CONF}", *argv])
        with pytest.raises(SystemExit) as exit_:
            exp.main()
        lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert exit_.value.code == 2, (name, lines)
        assert len(lines) == 1 and lines[0].startswith(f"error: {key}:"), (name, lines)
        run_dir = tmp_path / name
        assert not run_dir.exists() or not any(run_dir.iterdir()), (name, list(run_dir.iterdir()))
        assert ".hydra" in discarded[-1], (name, discarded)  # Hydra had made it; the entry point removed it
    assert not (tmp_path / "ckpt").exists()
