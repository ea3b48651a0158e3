"""Tables from sweep rows: intervals, paired differences, the protocol's refusals, and RESULTS.md generated
byte-identically from the committed rows."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paper_figs import reproduce, results_md, stats, tables
from paper_figs import rows as packed_rows
from paper_figs.common import load_jobs

ROOT = Path(__file__).resolve().parents[1]


def test_two_way_interval_holds_the_mean_and_narrows_with_more_items():
    rng = np.random.default_rng(0)
    small = (rng.random((5, 50)) < 0.6).astype(float)
    large = (rng.random((5, 2000)) < 0.6).astype(float)
    for x in (small, large):
        mean, low, high = stats.mean_ci(x)
        assert low < mean < high

    def width(x):
        _, low, high = stats.mean_ci(x)
        return high - low

    assert width(large) < 0.5 * width(small)
    # seed-to-seed spread widens the interval beyond the items' binomial noise
    assert width(large + np.linspace(-0.2, 0.2, 5)[:, None]) > 2 * width(large)


def test_paired_difference_is_exact_for_a_constant_shift_and_refuses_unpaired_shapes():
    rng = np.random.default_rng(1)
    b = rng.random((5, 100))
    out = stats.paired_diff(b + 0.1, b)
    assert out["paired_diff"] == pytest.approx(0.1) and out["paired_ci_low"] == pytest.approx(0.1)
    assert out["relative_gain"] == pytest.approx(0.1 / b.mean())
    with pytest.raises(ValueError, match="share seeds and items"):
        stats.paired_diff(b[:4], b)


def _job(root: Path, name: str, *, loss: str, seed: int, p: float, items: int = 20, revision: str = "abc",
         mask: bool = False, top_p: float | None = None, k: int | None = None):
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    default_top_p = 0.9 if loss == "lsm" else 1.0  # the objectives' own rollout top-p (conf/loss/)
    config = {"seed": seed, "loss": {"name": loss, "mask_special_tokens": mask,
                                     "rollout_top_p": default_top_p if top_p is None else top_p,
                                     **({} if k is None else {"k": k})},
              "rollout": {"top_p": None}, "tasks": {"arithmetic": {}}}
    metrics = {"time/prepare_s": 1.0, "time/opd_s": 2.0}
    (job / "metrics.json").write_text(json.dumps({"config": config, "metrics": metrics, "git_revision": revision}))
    rng = np.random.default_rng(seed * 7 + len(loss))
    rows = [{"phase": ph, "task": "arithmetic", "item": i, "sample": s, "correct": float(rng.random() < q)}
            for ph, q in (("teacher", 0.95), ("initial", 0.3), ("final", p)) for i in range(items) for s in (0, 1)]
    (job / "eval_items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (job / "metrics.jsonl").write_text("".join(json.dumps({"step": t, "task": "arithmetic", "loss": 1.0 / t,
                                                           "entropy": 0.5 + 0.01 * seed}) + "\n" for t in (1, 2)))


def _sweep(root: Path, seeds=(0, 1, 2, 3, 4), **kw) -> Path:
    for s in seeds:
        _job(root, f"lsm_{s}", loss="lsm", seed=s, p=0.7, **kw)
        _job(root, f"st_{s}", loss="sampled_token", seed=s, p=0.5, **kw)
    return root


def _table_cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "paper_figs/tables.py", *argv, "--min-items", "20", "--out",
                           str(tmp_path / "tables"), "--rows", str(tmp_path / "rows")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_table_rows_headline_and_failed_jobs(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    (sweep / "crashed" / ".hydra").mkdir(parents=True)  # a job that never wrote results
    t = tables.build("table1", sweep, min_seeds=5, min_items=20, command="test")
    methods = {r["method"] for r in t["rows"]}
    assert {"Teacher", "Student before OPD", "LSM (teacher top-K)", "Sampled-token OPD"} == methods
    lsm = next(r for r in t["rows"] if r["key"] == "lsm")
    assert (lsm["seeds"], lsm["items"], lsm["samples"]) == (5, 20, 2) and lsm["ci_low"] < lsm["mean"] < lsm["ci_high"]
    (h,) = t["headline"]
    assert 0.05 < h["paired_diff"] < 0.35 and h["paired_ci_low"] > 0  # 0.7 vs 0.5 over 200 pairs x 2 samples
    assert t["failed_jobs"] == ["crashed"]
    assert 3.0 <= t["wall_s"] < 60  # the jobs were written within a second of each other, each took 3 s
    assert "relative gain" in tables.markdown(t)


def test_wall_time_is_split_by_source_sweep(tmp_path):
    # two sweeps whose directories share a name (e.g. <date>/<time> on two days) stay two spans
    first, second = _sweep(tmp_path / "a" / "sweep", seeds=(0, 1, 2)), _sweep(tmp_path / "b" / "sweep", seeds=(3, 4))
    t = tables.build("table1", [first, second], min_seeds=5, min_items=20, command="test")
    assert sorted(t["wall_s_by_sweep"]) == ["a/sweep", "b/sweep"]
    assert t["wall_s"] == pytest.approx(sum(t["wall_s_by_sweep"].values()))
    assert "min of sweep wall time: a/sweep " in tables.markdown(t)


@pytest.mark.parametrize(("change", "message"), [
    ({"seeds": (0, 1, 2)}, "has 3 seeds x 20 items; the protocol asks for >= 5 seeds"),
    ({"items": 10}, "has 5 seeds x 10 items"),
])
def test_too_small_a_sweep_is_refused(tmp_path, change, message):
    sweep = _sweep(tmp_path / "s", **change)
    with pytest.raises(tables.TableError, match=message):
        tables.build("table1", sweep, min_seeds=5, min_items=20, command="test")


def test_tuning_runs_on_the_validation_split_are_not_a_reported_table(tmp_path):
    sweep = _sweep(tmp_path / "s")
    payload = json.loads((sweep / "lsm_0" / "metrics.json").read_text())
    payload["config"]["eval_split"] = "validation"
    (sweep / "lsm_0" / "metrics.json").write_text(json.dumps(payload))
    with pytest.raises(tables.TableError, match="evaluated on the validation split"):
        tables.build("table1", sweep, min_seeds=5, min_items=20, command="test")


def test_mixed_revisions_are_refused_on_the_command_line_and_nothing_is_written(tmp_path):
    sweep = _sweep(tmp_path / "s")
    _job(sweep, "late", loss="lsm", seed=9, p=0.7, revision="def")
    out = tmp_path / "tables"
    proc = subprocess.run([sys.executable, "paper_figs/tables.py", str(sweep), "--table", "table1", "--min-items",
                           "20", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: sweep_dir: rows from 2 code")
    assert not out.exists()


def test_a_job_whose_rollouts_ran_at_another_top_p_than_its_config_names_is_refused(tmp_path):
    sweep = _sweep(tmp_path / "s")
    bad = sweep / "lsm_3" / "metrics.jsonl"  # asks for 0.9 (lsm); its rollouts record 1.0
    bad.write_text("".join(json.dumps({"step": t, "task": "arithmetic", "loss": 1.0, "rollout_top_p": 1.0}) + "\n"
                           for t in (1, 2)))
    with pytest.raises(tables.TableError, match=r"asks for rollout top-p 0\.9 but its rollouts ran at 1 "):
        tables.build("table1", sweep, min_seeds=5, min_items=20, command="test")
    bad.write_text(json.dumps({"step": 1, "task": "arithmetic", "loss": 1.0, "rollout_top_p": 0.9}) + "\n")
    assert tables.build("table1", sweep, min_seeds=5, min_items=20, command="test")["rows"]


def test_results_md_regenerates_byte_identically_from_the_committed_rows():
    assert (ROOT / "RESULTS.md").read_text() == results_md.render(ROOT)


def test_a_k_sweep_keeps_each_k_apart_with_its_coverage(tmp_path):
    """Each K is its own method, ordered by value and paired with K = 4; full reverse KL (whose config carries
    the diagnostics' K) is one method without a K or a coverage; each K's coverage is the mean of its rows."""
    sweep = tmp_path / "s"
    cells = [(f"lsm{k}", "lsm", k, 0.3 + 0.01 * k, False) for k in (2, 4, 16)] + [
        ("full_rkl", "full_rkl", 4, 0.5, False), ("masked", "lsm", 4, 0.9, True)]  # masked: table1's, left out
    ks = {}
    for s in range(5):
        for cell, loss, k, p, mask in cells:
            ks[f"{cell}_{s}"] = k
            _job(sweep, f"{cell}_{s}", loss=loss, seed=s, p=p, mask=mask, k=k)
    for name, k in ks.items():  # coverage rows that depend on K and the step
        steps = [{"step": t, "task": "arithmetic", "teacher_topk_mass": 1 - 1 / (k + t),
                  "not_in_topk_frac": 1 / (k + t)} for t in (1, 2)]
        (sweep / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    t = tables.build("ablation_k", sweep, min_seeds=5, min_items=20, command="test")
    methods = [r for r in t["rows"] if r["key"]]
    assert [r["key"] for r in methods] == ["full_rkl", "lsm K=2", "lsm K=4", "lsm K=16"]
    by_key = {r["key"]: r for r in methods}
    assert by_key["lsm K=16"]["not_in_topk_frac"] == pytest.approx((1 / 17 + 1 / 18) / 2)
    assert by_key["lsm K=2"]["teacher_topk_mass"] == pytest.approx(1 - (1 / 3 + 1 / 4) / 2)
    assert by_key["full_rkl"]["teacher_topk_mass"] is None and by_key["full_rkl"]["not_in_topk_frac"] is None
    assert [(h["a"], h["b"]) for h in t["headline"]] == [("LSM (teacher top-K) K=2", "LSM (teacher top-K) K=4"),
                                                         ("LSM (teacher top-K) K=16", "LSM (teacher top-K) K=4"),
                                                         ("Full reverse KL", "LSM (teacher top-K) K=4")]
    md = tables.markdown(t)
    assert "| sampled outside top-K |" in md and f"{100 * (1 / 17 + 1 / 18) / 2:.1f}% |" in md
    assert "sampled outside" not in tables.markdown(tables.build("table1", _sweep(tmp_path / "t1"), min_seeds=5,
                                                                 min_items=20, command="test"))
    # the block's figure reads the table: score and coverage per K, the full vocabulary last
    from paper_figs import fig_ablation_k

    (tmp_path / "ablation_k.json").write_text(json.dumps(t))
    by_k, full, student = fig_ablation_k.points(t)
    assert [r["k"] for r in by_k] == [2, 4, 16] and full["key"] == "full_rkl" and student is not None
    assert fig_ablation_k.main(["--table", str(tmp_path / "ablation_k.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ablation_k.png").stat().st_size > 0


def test_ablation_k_pairs_the_validation_chosen_k_with_sampled_token_opd_only(tmp_path, monkeypatch):
    """Every K is an ablation against K = 4; only the K on record as chosen on validation is also compared with
    sampled-token OPD (the protocol's claim), and without a record no K is."""
    sweep = tmp_path / "s"
    for s in range(5):
        for k, p in ((4, 0.5), (16, 0.7)):
            _job(sweep, f"lsm{k}_{s}", loss="lsm", seed=s, p=p, k=k)
        _job(sweep, f"st_{s}", loss="sampled_token", seed=s, p=0.55)
    record = tmp_path / "lsm_k.json"
    monkeypatch.setitem(tables.VALIDATION_CHOICE, "ablation_k", ("lsm", "K", "loss.k", record))
    pairs = lambda t: {(h["a"], h["b"]): h for h in t["headline"]}  # noqa: E731
    claim = ("LSM (teacher top-K) K=16", "Sampled-token OPD")
    unrecorded = tables.build("ablation_k", sweep, min_seeds=5, min_items=20, command="test")
    assert claim not in pairs(unrecorded) and len(pairs(unrecorded)) == 1  # K=16 - K=4 only
    record.write_text(json.dumps({"choices": {"lsm": 16}, "over": "loss.k"}))
    t = tables.build("ablation_k", sweep, min_seeds=5, min_items=20, command="test")
    assert {r["key"] for r in t["rows"] if r["key"]} == {"lsm K=4", "lsm K=16", "sampled_token"}
    h = pairs(t)[claim]
    assert h["paired_diff"] > 0.1 and h["chosen_on"] == str(record)  # 0.7 vs 0.55
    assert "chosen on validation" in tables.markdown(t)
    assert "chosen_on" not in pairs(t)[("LSM (teacher top-K) K=16", "LSM (teacher top-K) K=4")]
    for wrong in ({"choices": {"lsm": 3e-6}, "over": "optimizer.lr"}, {"choices": {"full_rkl": 16}, "over": "loss.k"}):
        record.write_text(json.dumps(wrong))  # a record of another choice is refused, not read as no choice
        with pytest.raises(tables.TableError, match=r"needs lsm's choice of loss\.k"):
            tables.build("ablation_k", sweep, min_seeds=5, min_items=20, command="test")


def _registered(tmp_path: Path, monkeypatch, *, seeds=(5, 6, 7, 8, 9), k=32, p_lsm=0.7) -> Path:
    """A preregistration record for confirm_k and a sweep of the jobs it names (LSM at K = k)."""
    sweep = tmp_path / "confirm"
    for s in seeds:
        _job(sweep, f"lsm_{s}", loss="lsm", seed=s, p=p_lsm, k=k)
        _job(sweep, f"st_{s}", loss="sampled_token", seed=s, p=0.5)
    record = tmp_path / "confirm_k.json"
    record.write_text(json.dumps({"registered_on": "2026-12-05", "a": "lsm", "b": "sampled_token",
                                  "prediction": "A − B above 0", "revision": "abc", "seeds": [5, 6, 7, 8, 9],
                                  "config": {"lsm": {"loss.k": 32, "loss.mask_special_tokens": False},
                                             "sampled_token": {"loss.mask_special_tokens": False}}}))
    monkeypatch.setitem(tables.PREREGISTERED, "confirm_k", record)
    return sweep


@pytest.mark.parametrize(("p_lsm", "holds"), [(0.7, True), (0.5, False)])
def test_confirm_k_judges_its_preregistered_prediction(tmp_path, monkeypatch, p_lsm, holds):
    sweep = _registered(tmp_path, monkeypatch, p_lsm=p_lsm)
    t = tables.build("confirm_k", sweep, min_seeds=5, min_items=20, command="test")
    (h,) = t["headline"]
    assert (h["a"], h["b"]) == (tables.NAMES["lsm"], tables.NAMES["sampled_token"])
    assert h["prediction_holds"] is holds and h["preregistered"] == str(tmp_path / "confirm_k.json")
    assert ("**held**" if holds else "**did not hold**") in tables.markdown(t)


@pytest.mark.parametrize(("change", "named"), [
    ({"seeds": (5, 6, 7, 8)}, "registered seeds"),           # a seed left out
    ({"seeds": (4, 5, 6, 7, 8, 9)}, "registered seeds"),     # a seed whose test score was already read
    ({"k": 16}, "loss.k=16"),                                # another support size than registered
])
def test_confirm_k_refuses_jobs_its_record_did_not_register(tmp_path, monkeypatch, change, named):
    sweep = _registered(tmp_path, monkeypatch, **change)
    with pytest.raises(tables.TableError, match=named):
        tables.build("confirm_k", sweep, min_seeds=4, min_items=20, command="test")


def test_confirm_k_refuses_another_objective_or_revision(tmp_path, monkeypatch):
    sweep = _registered(tmp_path, monkeypatch)
    _job(tmp_path / "other", "x", loss="full_rkl", seed=5, p=0.5)
    with pytest.raises(tables.TableError, match="registered only lsm, sampled_token"):
        tables.build("confirm_k", [sweep, tmp_path / "other"], min_seeds=5, min_items=20, command="test")
    shutil.rmtree(sweep)
    sweep = _registered(tmp_path, monkeypatch)
    for job in sweep.iterdir():
        payload = json.loads((job / "metrics.json").read_text())
        (job / "metrics.json").write_text(json.dumps({**payload, "git_revision": "def"}))
    with pytest.raises(tables.TableError, match="registered abc"):
        tables.build("confirm_k", sweep, min_seeds=5, min_items=20, command="test")


def test_the_committed_preregistration_names_the_validation_choice():
    """The record committed before the confirmation ran registers the K and the revision the choice was made at."""
    record = json.loads(tables.PREREGISTERED["confirm_k"].read_text())
    choice = json.loads(tables.VALIDATION_CHOICE["ablation_k"][3].read_text())
    assert record["config"]["lsm"]["loss.k"] == choice["choices"]["lsm"] and record["revision"] == choice["revision"]
    assert not set(record["seeds"]) & {0, 1, 2, 3, 4}  # the seeds whose test scores the choice came after


@pytest.mark.parametrize("figure", ["fig_ablation_k", "fig_ablation_top_p"])
def test_an_ablation_figure_refuses_a_missing_or_other_table(tmp_path, capsys, figure):
    module = importlib.import_module(f"paper_figs.{figure}")
    (tmp_path / "t.json").write_text(json.dumps({"name": "table1", "rows": []}))
    for path in (tmp_path / "none.json", tmp_path / "t.json"):
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--table", str(path), "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert len(err) == 1 and err[0].startswith("error: --table:")
    assert not list(tmp_path.glob("*.png"))


# -- the validation choice (paper_figs/tune.py) -----------------------------------------------------------


def _tuning_sweep(root: Path, best: dict[str, float], lrs=(1e-4, 3e-4, 1e-3), split="validation") -> Path:
    """Two seeds per (objective, lr); the `best` lr of each objective scores 0.7 on validation, others 0.3."""
    for loss, chosen in best.items():
        for lr in lrs:
            for seed in (0, 1):
                name = f"{loss}_{lr:g}_{seed}"
                _job(root, name, loss=loss, seed=seed, p=0.7 if lr == chosen else 0.3, items=50)
                payload = json.loads((root / name / "metrics.json").read_text())
                payload["config"].update(eval_split=split, tuning=True, optimizer={"lr": lr})
                (root / name / "metrics.json").write_text(json.dumps(payload))
    return root


def test_tune_chooses_each_objectives_best_validation_lr_and_the_table_preset_reads_it(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from opd.train.config import register_configs, validate
    from paper_figs import tune

    best = {"lsm": 1e-3, "sampled_token": 3e-4}
    sweep = _tuning_sweep(tmp_path / "sweep", best)
    conf, res = tmp_path / "conf", tmp_path / "res"
    assert tune.main([str(sweep), "--name", "regime", "--conf-out", str(conf), "--out", str(res)]) == 0
    record = json.loads((res / "regime.json").read_text())
    assert record["choices"] == best and record["split"] == "validation"
    rows = {r["lr"]: r for r in record["objectives"]["lsm"]}
    assert sorted(rows) == [1e-4, 3e-4, 1e-3] and rows[1e-3]["mean"] > rows[1e-4]["mean"] + 0.2
    assert rows[1e-3]["per_task"]["arithmetic"]["ci_low"] < rows[1e-3]["mean"]
    # the generated file is a valid `tuned_lr` for the table presets
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="opd", overrides=["experiment=table1"])
    with open_dict(cfg):  # what `+tuned=regime` does on the command line (conf/tuned/<name>.yaml, _global_)
        cfg = OmegaConf.merge(cfg, OmegaConf.load(conf / "regime.yaml"))
    validate(cfg)
    assert dict(cfg.tuned_lr) == best and cfg.optimizer.minibatches_per_step == 2 and cfg.eval_split == "eval"


def test_a_job_passed_twice_is_refused_not_merged(tmp_path):
    from paper_figs import tune

    sweep = _sweep(tmp_path / "sweep")
    with pytest.raises(tables.TableError, match="ran the same cell with seed 0; pass each job once"):
        tables.build("table1", [sweep, sweep], min_seeds=5, min_items=20, command="test")
    tuning = _tuning_sweep(tmp_path / "tuning", {"lsm": 1e-3})
    assert tune.main([str(tuning), str(tuning), "--name", "b", "--conf-out", str(tmp_path / "conf"),
                      "--out", str(tmp_path / "res")]) == 2
    assert not (tmp_path / "conf").exists()


def test_tune_joins_objectives_tuned_in_separate_sweeps_through_the_packed_rows(tmp_path):
    from paper_figs import tune

    first = _tuning_sweep(tmp_path / "first", {"lsm": 1e-3})
    second = _tuning_sweep(tmp_path / "second", {"vopd": 1e-4})
    res = tmp_path / "res"
    args = ["--name", "b", "--conf-out", str(tmp_path / "conf"), "--out", str(res)]
    assert tune.main([str(first), *args]) == 0
    assert json.loads((res / "b.json").read_text())["choices"] == {"lsm": 1e-3}
    # the first sweep is gone; its packed rows join the second sweep
    shutil.rmtree(first)
    assert tune.main([str(res / "b.jsonl.gz"), str(second), *args]) == 0
    assert json.loads((res / "b.json").read_text())["choices"] == {"lsm": 1e-3, "vopd": 1e-4}
    assert "vopd: 0.0001" in (tmp_path / "conf" / "b.yaml").read_text()


def _k_sweep(root: Path, best_k: int, ks=(4, 16, 32), lrs=(3e-6,)) -> Path:
    """LSM at each K (and each lr), two seeds; the `best_k` scores 0.7 on validation, the others 0.3."""
    for k in ks:
        for lr in lrs:
            for seed in (0, 1):
                name = f"lsm_k{k}_{lr:g}_{seed}"
                _job(root, name, loss="lsm", seed=seed, p=0.7 if k == best_k else 0.3, items=50, k=k)
                payload = json.loads((root / name / "metrics.json").read_text())
                payload["config"].update(eval_split="validation", tuning=True, optimizer={"lr": lr})
                (root / name / "metrics.json").write_text(json.dumps(payload))
    return root


def test_tune_over_k_chooses_the_support_size_at_a_fixed_rate_and_writes_no_preset(tmp_path):
    from paper_figs import tune

    conf, res = tmp_path / "conf", tmp_path / "res"
    args = ["--name", "lsm_k", "--over", "loss.k", "--conf-out", str(conf), "--out", str(res)]
    assert tune.main([str(_k_sweep(tmp_path / "k", best_k=16)), *args]) == 0
    record = json.loads((res / "lsm_k.json").read_text())
    assert record["choices"] == {"lsm": 16} and record["over"] == "loss.k"
    assert [r["k"] for r in record["objectives"]["lsm"]] == [4, 16, 32]
    assert not conf.exists()  # the configuration has no tuned_k: a cell names its K and cites the record
    # K chosen across two learning rates is not a choice of K
    mixed = _k_sweep(tmp_path / "mixed", best_k=4, lrs=(3e-6, 1e-5))
    with pytest.raises(tables.TableError, match=r"several optimizer\.lr"):
        tune.choose(tables.load([mixed])[0], [], min_values=3, command="test", over="loss.k")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "eval"}, "evaluated on the test split"),
    ({"lrs": (1e-4, 1e-3)}, "ran 2 learning rates"),
])
def test_tune_refuses_a_choice_the_protocol_does_not_allow_and_writes_nothing(tmp_path, kwargs, message):
    sweep = _tuning_sweep(tmp_path / "sweep", {"lsm": 1e-3}, **kwargs)
    proc = subprocess.run([sys.executable, "paper_figs/tune.py", str(sweep), "--name", "x", "--conf-out",
                           str(tmp_path / "conf"), "--out", str(tmp_path / "res")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "conf").exists() and not (tmp_path / "res").exists()


def test_rows_carry_each_methods_step_time_and_update_peak_memory(tmp_path):
    sweep = _sweep(tmp_path / "s")
    for s in range(5):  # LSM jobs measured their cost; the baseline's did not
        path = sweep / f"lsm_{s}" / "metrics.json"
        payload = json.loads(path.read_text())
        payload["metrics"].update({"mean_time/sample_s": 0.1, "mean_time/score_s": 0.2, "mean_time/update_s": 0.3 + s,
                                   "update_peak_bytes": 2**20 * (s + 1)})
        path.write_text(json.dumps(payload))
    t = tables.build("baselines", sweep, min_seeds=5, min_items=20, command="test")
    lsm = next(r for r in t["rows"] if r["key"] == "lsm")
    base = next(r for r in t["rows"] if r["key"] == "sampled_token")
    assert lsm["step_s"] == pytest.approx(0.6 + 2) and lsm["peak_mem_bytes"] == 5 * 2**20
    assert base["step_s"] is None and base["peak_mem_bytes"] is None
    assert "| 2.60 | 5.0 |" in tables.markdown(t)


def test_table3_reads_table1s_sweep_beside_the_swapped_cells_and_pairs_at_each_top_p(tmp_path):
    table1 = _sweep(tmp_path / "t1")
    for s in range(5):  # table1's masked jobs are not table3's
        _job(table1, f"lsm_mask_{s}", loss="lsm", seed=s, p=0.1, mask=True)
    swapped = tmp_path / "t3"
    for s in range(5):
        _job(swapped, f"lsm_p1_{s}", loss="lsm", seed=s, p=0.6, top_p=1.0)
        _job(swapped, f"st_p09_{s}", loss="sampled_token", seed=s, p=0.55, top_p=0.9)
    t = tables.build("table3", [table1, swapped], min_seeds=5, min_items=20, command="test")
    assert {r["key"] for r in t["rows"] if r["key"]} == {"lsm @ top-p 0.9", "lsm @ top-p 1",
                                                         "sampled_token @ top-p 0.9", "sampled_token @ top-p 1"}
    assert t["jobs"] == 20
    diffs = {(h["a"], h["b"]): h["paired_diff"] for h in t["headline"]}
    assert len(diffs) == 2
    assert diffs[("LSM (teacher top-K) @ top-p 0.9", "Sampled-token OPD @ top-p 0.9")] > 0.05  # 0.7 vs 0.55
    # one objective at one top-p (table1): the key does not name it
    assert {r["key"] for r in tables.build("table1", table1, min_seeds=5, min_items=20, command="test")["rows"]
            if r["key"]} == {"lsm", "lsm + mask", "sampled_token"}


def test_ablation_top_p_reads_table3s_cells_beside_the_new_top_p_and_pairs_within_each(tmp_path):
    """table3's four unmasked cells beside 0.95 and 0.8 for both objectives: eight methods ordered by top-p,
    LSM against sampled-token OPD at each top-p, and each objective against itself at its paper top-p."""
    table3 = tmp_path / "t3"
    new = tmp_path / "new"
    for s in range(5):
        for top_p, sweep in ((1.0, table3), (0.95, new), (0.9, table3), (0.8, new)):
            _job(sweep, f"lsm_{top_p}_{s}", loss="lsm", seed=s, p=0.5 + 0.1 * top_p, top_p=top_p)
            _job(sweep, f"st_{top_p}_{s}", loss="sampled_token", seed=s, p=0.5, top_p=top_p)
        _job(table3, f"lsm_mask_{s}", loss="lsm", seed=s, p=0.1, mask=True)  # not this block's
    t = tables.build("ablation_top_p", [table3, new], min_seeds=5, min_items=20, command="test")
    assert [r["key"] for r in t["rows"] if r["key"]] == [
        f"{o} @ top-p {p}" for o in ("lsm", "sampled_token") for p in ("0.8", "0.9", "0.95", "1")]
    pairs = [(h["a"], h["b"]) for h in t["headline"]]
    lsm, st = tables.NAMES["lsm"], tables.NAMES["sampled_token"]
    assert pairs[:4] == [(f"{lsm} @ top-p {p}", f"{st} @ top-p {p}") for p in ("1", "0.95", "0.9", "0.8")]
    assert (f"{lsm} @ top-p 0.8", f"{lsm} @ top-p 0.9") in pairs and (f"{st} @ top-p 0.95", f"{st} @ top-p 1") in pairs
    assert len(pairs) == 10
    # the block's figure reads the table: both objectives per top-p, and their paired difference at each
    from paper_figs import fig_ablation_top_p

    by_objective = fig_ablation_top_p.points(t)
    assert {o: [r["top_p"] for r in rows] for o, rows in by_objective.items()} == {
        "lsm": [0.8, 0.9, 0.95, 1.0], "sampled_token": [0.8, 0.9, 0.95, 1.0]}
    diffs = fig_ablation_top_p.paired(t, by_objective)
    assert [p for p, _ in diffs] == [0.8, 0.9, 0.95, 1.0] and all(h["b"].startswith(st) for _, h in diffs)
    (tmp_path / "ablation_top_p.json").write_text(json.dumps(t))
    assert fig_ablation_top_p.main(["--table", str(tmp_path / "ablation_top_p.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ablation_top_p.png").stat().st_size > 0


def test_support_variants_read_v1_from_table1_and_pair_each_variant_with_it(tmp_path):
    table1 = _sweep(tmp_path / "t1")  # LSM (V1) and sampled-token OPD
    for s in range(5):
        _job(table1, f"lsm_mask_{s}", loss="lsm", seed=s, p=0.1, mask=True)
    variants = tmp_path / "v"
    for s in range(5):
        for v in (2, 3, 4, 5):
            _job(variants, f"v{v}_{s}", loss=f"support_v{v}", seed=s, p=0.6, top_p=0.9)
    t = tables.build("support_variants", [table1, variants], min_seeds=5, min_items=20, command="test")
    assert [r["key"] for r in t["rows"] if r["key"]] == ["lsm"] + [f"support_v{v}" for v in (2, 3, 4, 5)]
    assert [(h["a"], h["b"]) for h in t["headline"]] == [
        (tables.NAMES[f"support_v{v}"], tables.NAMES["lsm"]) for v in (2, 3, 4, 5)]


def test_tables_that_add_cells_to_table1_read_its_unmasked_jobs_of_their_objectives(tmp_path):
    table1 = _sweep(tmp_path / "t1")  # lsm 0.7, sampled-token 0.5
    for s in range(5):
        _job(table1, f"lsm_mask_{s}", loss="lsm", seed=s, p=0.1, mask=True)
        _job(tmp_path / "renorm", f"lsm_no_renorm_{s}", loss="lsm_no_renorm", seed=s, p=0.4)
    t = tables.build("ablation_renorm", [table1, tmp_path / "renorm"], min_seeds=5, min_items=20, command="test")
    assert {r["key"] for r in t["rows"] if r["key"]} == {"lsm", "lsm_no_renorm"} and t["jobs"] == 10
    (h,) = t["headline"]
    assert (h["a"], h["b"]) == ("LSM without renormalization", "LSM (teacher top-K)")
    assert h["paired_diff"] < -0.15  # 0.4 vs 0.7
    # baselines reads every unmasked objective of table1's sweep beside the added cells, and pairs each
    # teacher-driven objective with the control
    for s in range(5):
        _job(tmp_path / "control", f"control_{s}", loss="constant_negative", seed=s, p=0.5)
    b = tables.build("baselines", [table1, tmp_path / "control"], min_seeds=5, min_items=20, command="test")
    assert {r["key"] for r in b["rows"] if r["key"]} == {"lsm", "constant_negative", "sampled_token"}
    diffs = {(h["a"], h["b"]): h["paired_diff"] for h in b["headline"]}
    control = "Constant negative advantage (control)"
    assert set(diffs) == {("LSM (teacher top-K)", "Sampled-token OPD"), ("Sampled-token OPD", control),
                          ("LSM (teacher top-K)", control)}
    assert diffs[("LSM (teacher top-K)", control)] > 0.1 and abs(diffs[("Sampled-token OPD", control)]) < 0.1


def test_a_table_regenerates_byte_identically_from_its_packed_rows(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    first = _table_cli(tmp_path, str(sweep), "--table", "table1")
    assert first.returncode == 0, first.stderr
    table = (tmp_path / "tables" / "table1.json").read_bytes()
    rows = (tmp_path / "rows" / "table1.jsonl.gz").read_bytes()
    shutil.rmtree(sweep)  # the sweep directories stay local; the packed rows are what is committed
    again = _table_cli(tmp_path, "--table", "table1")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "tables" / "table1.json").read_bytes() == table
    assert (tmp_path / "rows" / "table1.jsonl.gz").read_bytes() == rows
    # the curves read the same rows
    jobs = load_jobs(tmp_path / "rows" / "table1.jsonl.gz")
    assert len(jobs) == 10 and [r["step"] for r in jobs[0]["rows"]] == [1, 2]
    assert sum(r["phase"] == "final" for r in jobs[0]["items"]) == 40


def test_a_table_without_a_sweep_or_committed_rows_is_one_line_and_writes_nothing(tmp_path):
    proc = _table_cli(tmp_path, "--table", "table2")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "no committed rows for this table" in lines[0], lines
    assert not (tmp_path / "tables").exists() and not (tmp_path / "rows").exists()


# results/tables with their rows in results/rows; results/r7 (Table 1 in the regime's version 3) beside its rows
COMMITTED = sorted((ROOT / "results" / "tables").glob("*.json")) + sorted((ROOT / "results" / "r7").glob("table*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=[f"{p.parent.name}/{p.stem}" for p in COMMITTED])
def test_each_committed_table_regenerates_from_its_committed_rows(path):
    """The numbers in RESULTS.md are what the packed rows say, not a hand edit or a stale build."""
    committed = json.loads(path.read_text())
    rows = (ROOT / "results" / "rows" if path.parent.name == "tables" else path.parent) / f"{path.stem}.jsonl.gz"
    assert rows.exists(), f"{path} has no packed rows"
    jobs, failed = tables.load([rows])
    rebuilt = tables.from_jobs(path.stem, tables.select(path.stem, jobs), failed, min_seeds=5, min_items=1000,
                               command=committed["command"])
    assert json.loads(json.dumps(rebuilt)) == committed


def test_reproduce_counts_identical_outcomes_and_names_the_jobs_that_differ(tmp_path, capsys):
    """paper_figs/reproduce.py matches jobs by method and seed across a rows file and a sweep directory, counts
    the identical final outcomes, and names each job whose outcomes differ."""
    reference = _sweep(tmp_path / "ref", seeds=(0, 1))
    packed = tmp_path / "ref.jsonl.gz"
    packed_rows.write(packed, tables.load([reference])[0], tmp_path)
    rerun = _sweep(tmp_path / "rerun", seeds=(0, 1, 2))
    items = rerun / "st_1" / "eval_items.jsonl"
    rows = [json.loads(x) for x in items.read_text().splitlines()]
    flip = next(n for n, r in enumerate(rows) if r["phase"] == "final")  # one final outcome of one job
    rows[flip]["correct"] = 1.0 - rows[flip]["correct"]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))

    assert reproduce.main([str(packed), str(reference)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "identical final outcomes: 160 of 160 in 4 matched jobs (0 only in the reference, 0 only in the rerun)"]
    assert reproduce.main([str(packed), str(rerun)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("sampled_token @ top-p 1 seed 1: 1 of 40 outcomes differ")
    assert out[-1] == ("identical final outcomes: 159 of 160 in 4 matched jobs "
                       "(0 only in the reference, 2 only in the rerun)")
    assert reproduce.main([str(tmp_path / "missing"), str(rerun)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reference/rerun" in err[0] and "missing" in err[0]
    (tmp_path / "empty").mkdir()  # the loader's refusal names the argument it was given
    assert reproduce.main([str(packed), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rerun: no finished jobs"), err
