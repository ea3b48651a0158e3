"""Every option of every config group composes onto the typed schema, every experiment composes, and
validation accepts the composed defaults (lightning-hydra-template style, style.md E11)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opd import objectives
from opd.cli import experiment_presets
from opd.train.config import LOSSES, register_configs, validate
from opd.train.loop import rollout_top_p

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="opd", overrides=overrides)


def test_default_composes_and_validates():
    cfg = _compose([])
    assert cfg.loss.name == "lsm"
    built = validate(cfg)
    assert list(built["routes"]) == ["arithmetic"]
    assert built["student"].vocab_size == built["routes"]["arithmetic"]["teacher"].vocab_size
    assert cfg.loss.k <= built["student"].vocab_size
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_a_teachers_vocabulary_may_be_padded_past_the_students():
    """One tokenizer, a teacher head with rows past it (as Qwen2.5-7B's against Qwen2.5-0.5B's): accepted, the
    student keeps the tokenizer's size."""
    built = validate(_compose(["tasks.arithmetic.teacher.vocab_size=512"]))
    assert built["routes"]["arithmetic"]["teacher"].vocab_size == 512
    assert built["student"].vocab_size == validate(_compose([]))["student"].vocab_size < 512


@pytest.mark.parametrize(
    ("group", "target"),
    [("loss", "loss"), ("rollout", "rollout"), ("optimizer", "optimizer"), ("task", "tasks.arithmetic.task"),
     ("model", "student"), ("model", "tasks.arithmetic.teacher")],
)
def test_every_group_option_composes(group, target):
    options = _options(group)
    assert options, f"conf/{group} has no options"
    for option in options:
        overrides = [f"{group}@{target}={option}" if "." in target or group == "model" else f"{group}={option}"]
        if option == "hf":  # a checkpoint-directory option: its required path comes from the command line
            overrides.append(f"{target}.path=/some/checkpoint")
        cfg = _compose(overrides)
        OmegaConf.to_container(OmegaConf.select(cfg, target), resolve=True, throw_on_missing=True)


def test_every_loss_option_is_a_known_objective_and_validates():
    names = set()
    for option in _options("loss"):
        cfg = _compose([f"loss={option}"])
        validate(cfg)
        names.add(cfg.loss.name)
    assert names == set(LOSSES)


def test_loss_sets_the_papers_rollout_top_p():
    assert _compose(["loss=lsm"]).loss.rollout_top_p == 0.9
    assert _compose(["loss=sampled_token"]).loss.rollout_top_p == 1.0
    assert _compose(["loss=sampled_token", "rollout=nucleus"]).rollout.top_p == 0.9


def test_each_objectives_own_preset_sets_its_registered_rollout_top_p():
    for name in LOSSES:  # conf/loss/<name>.yaml is the objective's own preset (others pair it differently)
        assert _compose([f"loss={name}"]).loss.rollout_top_p == objectives.get(name).rollout_top_p, name


@pytest.mark.parametrize(("overrides", "expected"), [
    (["loss=lsm"], 0.9), (["loss=sampled_token"], 1.0),
    # table3's swapped cells: the preset's top-p, not the objective's registered one
    (["loss=lsm_top_p1"], 1.0), (["loss=sampled_token_top_p09"], 0.9),
    (["loss=lsm_top_p1", "rollout.top_p=0.8"], 0.8),  # an explicit rollout.top_p wins
])
def test_the_rollouts_run_at_the_loss_presets_top_p(overrides, expected):
    assert rollout_top_p(_compose(overrides)) == expected


@pytest.mark.parametrize("experiment", experiment_presets("opd"))
def test_every_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    validate(cfg)


def test_a_preset_of_another_entry_point_is_one_clear_line():
    from opd.cli import ConfigError, check_group_choices

    with pytest.raises(ConfigError, match=r"^experiment: expected one of .*\(for experiments.toy_coupling\), "
                                          r"got 'multitask'"):
        check_group_choices(["experiment=multitask"], {"experiment": "experiment"}, "toy_coupling")
    check_group_choices(["experiment=multitask"], {"experiment": "experiment"}, "opd")


def test_group_at_package_options_are_checked():
    from opd.cli import ConfigError, check_group_choices

    with pytest.raises(ConfigError, match=r"^model@tasks\.arithmetic\.teacher: expected one of .*got 'nope'"):
        check_group_choices(["model@tasks.arithmetic.teacher=nope"], {}, "opd")
    check_group_choices(["model@tasks.arithmetic.teacher=hf", "task@tasks.extra.task=textworld"], {}, "opd")


def test_typed_schema_rejects_unknown_keys_and_wrong_types():
    from hydra.errors import ConfigCompositionException as HydraCompose

    with pytest.raises(HydraCompose):
        _compose(["loss.not_a_field=1"])
    with pytest.raises(HydraCompose):
        _compose(["steps=many"])
