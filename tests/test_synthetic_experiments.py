"""Hydra entry points of the sandbox: configs compose, bad values fail before anything is written, a
small job writes metrics.json / metrics.jsonl rows that agree with the library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from opd.cli import ConfigError
from synthetic import exact

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")


def _compose(name, overrides=()):
    import experiments.sandbox_sgd
    import experiments.sandbox_variance  # noqa: F401

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.mark.parametrize("estimator", ["token", "causal", "discounted", "full_return", "lsm", "full_rkl"])
@pytest.mark.parametrize("mdp", ["random", "worst_token", "worst_full_return", "worst_causal", "worst_off_policy",
                                 "worst_gamma"])
def test_every_group_option_composes_and_validates(estimator, mdp):
    from experiments.sandbox_variance import validate

    cfg = _compose("sandbox_variance", [f"estimator={estimator}", f"mdp={mdp}"])
    if estimator == "lsm" and mdp != "random":
        cfg.estimator.k = 2
    if mdp == "worst_gamma" and estimator in ("full_return", "lsm", "full_rkl"):
        with pytest.raises(ConfigError, match=r"^estimator\.name: expected discounted for the worst_gamma"):
            validate(cfg)
        return
    validate(cfg)


@pytest.mark.parametrize("override,key", [
    ("mdp.vocab=1", "mdp.vocab"), ("mdp.horizon=0", "mdp.horizon"), ("mdp.horizon=13", "mdp.horizon"),
    ("estimator.gamma=1.5", "estimator.gamma"), ("estimator.gamma=-0.1", "estimator.gamma"),
    ("estimator.name=foo", "estimator.name"), ("mdp.kind=bar", "mdp.kind"), ("mdp.num_pairs=0", "mdp.num_pairs"),
    ("mdp.behaviour_top_p=0", "mdp.behaviour_top_p"), ("mdp.behaviour_top_p=1.5", "mdp.behaviour_top_p"),
])
def test_bad_variance_config_is_one_clear_error(override, key):
    from experiments.sandbox_variance import validate

    cfg = _compose("sandbox_variance", [override])
    with pytest.raises(ConfigError, match=f"^{key}"):
        validate(cfg)


def test_construction_vocab_is_checked():
    from experiments.sandbox_variance import validate

    for mdp, vocab, want in (("worst_gamma", 2, 3), ("worst_off_policy", 3, 2)):
        cfg = _compose("sandbox_variance", [f"mdp={mdp}", f"mdp.vocab={vocab}"])
        with pytest.raises(ConfigError, match=rf"^mdp\.vocab: expected {want} for the {mdp} construction"):
            validate(cfg)


@pytest.mark.parametrize("override,key", [("gammas=[0.5,2.0]", "gammas"), ("lr=0", "lr"), ("vocab=1", "vocab"),
                                          ("horizon=20", "horizon"), ("seeds=[]", "seeds")])
def test_bad_sgd_config_is_one_clear_error(override, key):
    from experiments.sandbox_sgd import validate

    cfg = _compose("sandbox_sgd", [override])
    with pytest.raises(ConfigError, match=f"^{key}"):
        validate(cfg)


def test_cli_bad_value_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "job"
    proc = subprocess.run([sys.executable, "-m", "experiments.sandbox_variance", "estimator.gamma=3",
                           f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error: estimator.gamma: expected a float in [0, 1]" in proc.stderr
    assert not (out / "metrics.json").exists()


def test_variance_job_rows_match_library(tmp_path):
    from experiments.sandbox_variance import pairs, run

    cfg = _compose("sandbox_variance", ["mdp.horizon=3", "mdp.num_pairs=3", "estimator.gamma=0.5"])
    final = run(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and final["num_pairs"] == 3
    for row, (s, q, _) in zip(rows, pairs(cfg)):
        m = exact.estimator_moments(s, q, 0.5)
        assert row["variance"] == pytest.approx(float(m.variance), rel=1e-12)
        assert row["variance"] <= row["bound_gamma"]
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["config"]["estimator"]["gamma"] == 0.5
    assert summary["metrics"]["frac_within_bound_gamma"] == 1.0


def test_sgd_job_rows(tmp_path):
    from experiments.sandbox_sgd import run_study

    cfg = _compose("sandbox_sgd", ["horizon=3", "num_iters=5", "seeds=[0,1]", "gammas=[0.0,1.0]"])
    final = run_study(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5))
    kl = np.array([r["kl"] for r in rows])  # [I, S, G]
    assert kl.shape == (5, 2, 2) and np.all(kl > 0)
    # iteration 0 is before any update: the exact KL must not depend on γ
    assert np.allclose(kl[0, :, 0], kl[0, :, 1])
    var = np.array([r["variance"] for r in rows])
    assert np.all(var[:, :, 1] > 0) and len(final["summary"]["final_kl"]) == 2
