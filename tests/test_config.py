"""Tests of metaopt/config.py: checks, unknown keys, JSON round trips and the presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from metaopt.config import ConfigError, ExperimentConfig, TrainerConfig, load_preset, preset_names


def test_defaults_are_valid_and_frozen():
    config = ExperimentConfig()
    assert config.eval_episodes == 600
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.inner_lr = 0.1  # type: ignore[misc]


def test_experiment_config_is_a_trainer_config():
    assert set(TrainerConfig.field_names()) < set(ExperimentConfig.field_names())
    assert isinstance(ExperimentConfig(), TrainerConfig)


def test_required_fields_exist():
    required = {"algorithm", "dataset", "ways", "shots", "query", "model", "hidden", "inner_lr", "inner_steps",
                "eval_inner_steps", "first_order", "adapt", "strategy", "bn_policy", "meta_lr", "meta_batch",
                "iterations", "grad_clip", "grad_clip_value", "eval_every", "eval_episodes", "checkpoint_every",
                "log_every", "seed", "device", "max_nonfinite", "meta_optimizer", "time_budget"}
    assert required <= set(ExperimentConfig.field_names())


@pytest.mark.parametrize(("key", "suggestion"), [("inner_rl", "inner_lr"), ("metabatch", "meta_batch"),
                                                 ("eval_episode", "eval_episodes")])
def test_unknown_key_suggests_the_closest(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}' \\(did you mean '{suggestion}'\\?\\)"):
        ExperimentConfig.from_dict({key: 1})


def test_unknown_key_without_close_match_is_still_rejected():
    with pytest.raises(ConfigError, match="unknown config key 'zzzzzz'$"):
        ExperimentConfig.from_dict({"zzzzzz": 1})


def test_trainer_config_rejects_experiment_keys():
    with pytest.raises(ConfigError, match="'inner_lr'"):
        TrainerConfig.from_dict({"inner_lr": 0.1})


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"meta_lr": -1.0}, "'meta_lr' must be > 0, got -1.0"),
    ({"iterations": 0}, "'iterations' must be > 0, got 0"),
    ({"time_budget": 0}, "'time_budget' must be > 0, got 0.0"),
    ({"time_budget": "1h"}, "'time_budget' must be float, got '1h' \\(str\\)"),
    ({"inner_lr": 0}, "'inner_lr' must be > 0"),
    ({"grad_clip": -2}, "'grad_clip' must be > 0"),
    ({"eval_inner_steps": 0}, "'eval_inner_steps' must be > 0"),
    ({"hidden": (8, 0)}, "'hidden' must hold layer sizes >= 1, got \\[8, 0\\]"),
    ({"seed": -1}, "'seed' must be >= 0"),
    ({"strategy": "vmapp"}, "'strategy' must be one of .*got 'vmapp' \\(did you mean 'vmap'\\?\\)"),
    ({"bn_policy": "transductive"}, "'bn_policy' must be one of \\('batch', 'frozen', 'running', 'support'\\)"),
    ({"meta_optimizer": "adamw"}, "'meta_optimizer' must be one of \\('adam', 'sgd'\\).*did you mean 'adam'"),
    ({"model": "conv6"}, "'model' must be one of"),
    ({"device": "gpu"}, "'device' must be 'auto' or a torch device"),
    ({"algorithm": " "}, "'algorithm' must not be empty"),
    ({"iterations": "10"}, "'iterations' must be int, got '10' \\(str\\)"),
    ({"iterations": True}, "'iterations' must be int, got True \\(bool\\)"),
    ({"iterations": 10.0}, "'iterations' must be int"),
    ({"first_order": 1}, "'first_order' must be bool"),
    ({"hidden": [8, "a"]}, "'hidden' must be a tuple of ints"),
])
def test_bad_values_name_the_field(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ExperimentConfig(**changes)


def test_values_are_converted_to_the_field_types():
    config = ExperimentConfig.from_dict({"meta_lr": 1, "hidden": [8, 4], "grad_clip": 5, "eval_inner_steps": None})
    assert config.meta_lr == 1.0 and isinstance(config.meta_lr, float)
    assert config.hidden == (8, 4)
    assert config.grad_clip == 5.0 and isinstance(config.grad_clip, float)
    assert config.eval_inner_steps is None


def test_json_round_trip(tmp_path):
    config = ExperimentConfig(hidden=(8,), inner_lr=0.05, first_order=True, grad_clip=1.0)
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    assert json.loads(path.read_text())["hidden"] == [8]
    assert ExperimentConfig.from_json(path) == config


def test_from_json_names_the_file(tmp_path):
    bad_key = tmp_path / "bad_key.json"
    bad_key.write_text(json.dumps({"inner_lrr": 0.1}))
    with pytest.raises(ConfigError, match="bad_key.json: unknown config key 'inner_lrr' \\(did you mean 'inner_lr'"):
        ExperimentConfig.from_json(bad_key)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file .*broken.json"):
        ExperimentConfig.from_json(broken)
    with pytest.raises(ConfigError, match="cannot read config file .*missing.json"):
        ExperimentConfig.from_json(tmp_path / "missing.json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        ExperimentConfig.from_json(listed)


def test_replace_checks_values_and_names():
    config = ExperimentConfig()
    assert config.replace(inner_lr=0.5).inner_lr == 0.5
    assert config.inner_lr == 0.01
    with pytest.raises(ConfigError, match="'inner_lr' must be > 0"):
        config.replace(inner_lr=-0.5)
    with pytest.raises(ConfigError, match="did you mean 'inner_steps'"):
        config.replace(inner_step=2)


def test_adapt_spec():
    assert ExperimentConfig().adapt_spec() == "all"
    assert ExperimentConfig(adapt="head").adapt_spec() == "head"
    assert ExperimentConfig(adapt="2.weight, 2.bias").adapt_spec() == ["2.weight", "2.bias"]


def test_presets_are_listed_and_valid():
    names = preset_names()
    assert {"maml-sinusoid-5shot", "maml-sinusoid-10shot", "fomaml-sinusoid-10shot"} <= set(names)
    for name in names:
        assert isinstance(load_preset(name), ExperimentConfig)


@pytest.mark.parametrize(("name", "shots", "first_order"), [("maml-sinusoid-5shot", 5, False),
                                                            ("maml-sinusoid-10shot", 10, False),
                                                            ("fomaml-sinusoid-10shot", 10, True)])
def test_sinusoid_presets_hold_the_maml_paper_settings(name, shots, first_order):
    config = load_preset(name)
    assert (config.algorithm, config.dataset, config.model, config.hidden) == ("maml", "sinusoid", "mlp", (40, 40))
    assert (config.inner_steps, config.inner_lr, config.meta_optimizer, config.meta_lr) == (1, 0.01, "adam", 1e-3)
    assert (config.meta_batch, config.iterations, config.query, config.eval_episodes) == (25, 70000, 10, 600)
    assert (config.shots, config.first_order) == (shots, first_order)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown preset 'maml-sinusoid-10shots' \\(did you mean "
                                          "'maml-sinusoid-10shot'\\?\\)"):
        load_preset("maml-sinusoid-10shots")
