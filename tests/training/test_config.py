"""Tests of metaopt/training/config.py (and the option sets of metaopt/options.py it is made of): sections,
checks, unknown keys and options, JSON round trips, and the presets."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import numpy as np
import pytest
import torch

from metaopt.datasets import child_training, fashion_mnist, miniimagenet, mnist, omniglot, task_suite
from metaopt.datasets._common import TensorClassDataset
from metaopt.datasets.miniimagenet import miniimagenet_split
from metaopt.engine.meta_learner import adapted_parameter_names
from metaopt.evaluation.tuned_baselines import GRID
from metaopt.options import ConfigError, Options
from metaopt.registry import entry, load_plugins
from metaopt.training.config import BaselinesConfig, RunConfig, Section, TrainerConfig, load_preset, preset_names
from metaopt.training.experiment import build_experiment

load_plugins()

BASE = {"algorithm": {"name": "maml"}, "data": {"name": "sinusoid"}, "model": {"name": "mlp"}}
L2L = {"algorithm": {"name": "l2l"}, "data": {"name": "quadratics"}}


def run_config(base: dict = BASE, **sections: dict) -> RunConfig:
    """``base`` with ``sections`` merged in (a section's options update the base's)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return RunConfig.from_dict(raw)


def options_of(kind: str, name: str) -> str:
    return ", ".join(entry(kind, name).options.field_names())


def test_defaults_are_valid_and_frozen():
    trainer = TrainerConfig()
    assert trainer.eval_episodes == 600 and trainer.test_episodes is None
    config = run_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.algorithm.options.inner_lr = 0.1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.iterations = 1  # type: ignore[misc]


def test_a_run_config_is_a_trainer_config_and_one_section_per_part():
    config = run_config()
    assert isinstance(config.trainer, TrainerConfig) and config.trainer == TrainerConfig()
    assert (config.seed, config.device, config.baselines) == (0, "auto", None)
    for section, kind, name in ((config.algorithm, "algorithm", "maml"), (config.data, "dataset", "sinusoid"),
                                (config.model, "model", "mlp")):
        assert isinstance(section, Section) and (section.kind, section.name) == (kind, name)
        assert section.entry == entry(kind, name)
        assert type(section.options) is entry(kind, name).options and isinstance(section.options, Options)
        assert section.options == entry(kind, name).options()  # the part's defaults
    assert config.algorithm.options.inner_lr == 0.4  # MAMLOptions' default
    l2l = RunConfig.from_dict({**L2L, "baselines": {}})
    assert l2l.model is None and l2l.baselines == BaselinesConfig()
    assert l2l.baselines.grid == GRID and l2l.baselines.tune_problems == 4 and l2l.baselines.transfer == {}


def test_required_options_exist():
    """What 0.1's flat config held lives in the section of its owner."""
    run = {"algorithm", "data", "model", "trainer", "baselines", "seed", "device", "threads", "world_size"}
    assert run == {f.name for f in dataclasses.fields(RunConfig)}
    trainer = {"meta_lr", "iterations", "grad_clip", "grad_clip_value", "eval_every", "eval_episodes",
               "test_episodes", "checkpoint_every", "log_every", "max_nonfinite", "meta_optimizer",
               "meta_optimizer_checkpoint", "time_budget", "budget_clock", "lr_schedule", "min_meta_lr", "epoch_length"}
    assert trainer == set(TrainerConfig.field_names())
    assert {"inner_lr", "inner_steps", "eval_inner_steps", "first_order", "adapt", "strategy", "bn_policy",
            "checkpoint_steps", "learn_inner_lr"} == set(entry("algorithm", "maml").options.field_names())
    assert {"shots", "query", "eval_query", "meta_batch"} == set(entry("dataset", "sinusoid").options.field_names())
    assert {"ways", "shots", "query", "eval_query", "meta_batch", "protocol", "data_root"} == set(
        entry("dataset", "omniglot").options.field_names())
    assert {"hidden"} == set(entry("model", "mlp").options.field_names())
    assert {"filters", "strided"} == set(entry("model", "conv4").options.field_names())


@pytest.mark.parametrize(("key", "suggestion"), [("sead", "seed"), ("devise", "device"), ("trainers", "trainer")])
def test_unknown_key_suggests_the_closest(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}' \\(did you mean '{suggestion}'\\?\\); a run "
                                          "config has algorithm, data, model, trainer, baselines, seed, device, "
                                          "threads, world_size$"):
        RunConfig.from_dict({**BASE, key: 1})


@pytest.mark.parametrize(("section", "key", "suggestion", "owner", "listed"), [
    ("algorithm", "inner_rl", "inner_lr", "algorithm 'maml'", options_of("algorithm", "maml")),
    ("data", "metabatch", "meta_batch", "dataset 'sinusoid'", options_of("dataset", "sinusoid")),
    ("model", "hiden", "hidden", "model 'mlp'", "hidden"),
    ("trainer", "eval_episode", "eval_episodes", "the trainer", ", ".join(TrainerConfig.field_names())),
])
def test_unknown_option_names_its_owner_the_closest_and_every_option(section, key, suggestion, owner, listed):
    with pytest.raises(ConfigError) as error:
        run_config(**{section: {key: 1}})
    assert str(error.value) == f"'{key}' (did you mean '{suggestion}'?) is not an option of {owner}; its options are " \
                               f"{listed}"


def test_unknown_option_without_close_match_is_still_rejected():
    with pytest.raises(ConfigError, match="^'zzzzzz' is not an option of algorithm 'maml'; its options are adapt, "):
        run_config(algorithm={"zzzzzz": 1})
    with pytest.raises(ConfigError, match="^'zzzzzz' is not an option of the baselines section; its options are "
                                          "tune_problems, grid, transfer$"):
        RunConfig.from_dict({**L2L, "baselines": {"zzzzzz": 1}})
    with pytest.raises(ConfigError, match="^'zz', 'yy' are not options of the trainer"):
        run_config(trainer={"zz": 1, "yy": 2})


def test_options_of_another_part_are_refused():
    with pytest.raises(ConfigError, match="'inner_lr' .*is not an option of algorithm 'metalstm'; its options are "
                                          f"{options_of('algorithm', 'metalstm')}$"):
        run_config(algorithm={"name": "metalstm"}).replace(algorithm={"inner_lr": 0.1})
    with pytest.raises(ConfigError, match="'meta_lr' is not an option of algorithm 'maml'"):
        run_config(algorithm={"meta_lr": 0.1})  # a trainer option in the algorithm's section
    with pytest.raises(ConfigError, match="'inner_lr'.* is not an option of the trainer"):
        TrainerConfig.from_dict({"inner_lr": 0.1}, owner="the trainer")
    with pytest.raises(ConfigError, match="'ways' is not an option of dataset 'sinusoid'"):
        run_config(data={"ways": 5})


def test_sections_and_part_names_are_checked():
    with pytest.raises(ConfigError, match="the config has no 'algorithm' section"):
        RunConfig.from_dict({"data": {"name": "sinusoid"}})
    with pytest.raises(ConfigError, match="the config has no 'data' section"):
        RunConfig.from_dict({"algorithm": {"name": "maml"}})
    with pytest.raises(ConfigError, match="the algorithm section must be a mapping with a 'name'.*got 'maml'"):
        RunConfig.from_dict({**BASE, "algorithm": "maml"})
    with pytest.raises(ConfigError, match="the dataset section must be a mapping with a 'name'"):
        RunConfig.from_dict({**BASE, "data": {"shots": 5}})
    with pytest.raises(ConfigError, match=r"unknown algorithm 'mamll' \(did you mean 'maml'\?\); registered: \["):
        run_config(algorithm={"name": "mamll"})


def test_parts_must_fit_together():
    with pytest.raises(ConfigError, match="algorithm 'l2l' meta-learns from optimizees, but dataset 'sinusoid' gives "
                                          "episodes; pick a dataset of optimizees"):
        run_config(algorithm={"name": "l2l"})
    with pytest.raises(ConfigError, match="algorithm 'maml' adapts a network: give a model section"):
        RunConfig.from_dict({"algorithm": {"name": "maml"}, "data": {"name": "sinusoid"}})
    with pytest.raises(ConfigError, match="algorithm 'l2l' trains on problems that define their own networks .*drop "
                                          "the model section"):
        RunConfig.from_dict({**L2L, "model": {"name": "mlp"}})
    with pytest.raises(ConfigError, match="the baselines section compares learned optimizers .*'maml' is not a "
                                          "learned optimizer: drop it"):
        run_config(baselines={})
    with pytest.raises(ConfigError, match="baselines transfer variant 'ReLU': 'activation' .*is not an option of "
                                          "dataset 'quadratics'"):
        RunConfig.from_dict({**L2L, "baselines": {"transfer": {"ReLU": {"activation": "relu"}}}})
    with pytest.raises(ConfigError, match=r"option 'grid' must hold learning rates > 0, got \[\]"):
        RunConfig.from_dict({**L2L, "baselines": {"grid": []}})
    with pytest.raises(ConfigError, match=r"option 'grid' must hold learning rates > 0, got \[0.1, 0.0\]"):
        BaselinesConfig(grid=(0.1, 0.0))


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"trainer": {"meta_lr": -1.0}}, "'meta_lr' must be > 0, got -1.0"),
    ({"trainer": {"iterations": 0}}, "'iterations' must be > 0, got 0"),
    ({"trainer": {"time_budget": 0}}, "'time_budget' must be > 0, got 0.0"),
    ({"trainer": {"time_budget": "1h"}}, "'time_budget' must be float, got '1h' \\(str\\)"),
    ({"trainer": {"test_episodes": 0}}, "'test_episodes' must be > 0, got 0"),
    ({"trainer": {"min_meta_lr": 1.0}}, "'min_meta_lr' must be in \\[0, meta_lr=0.001\\], got 1.0"),
    ({"algorithm": {"inner_lr": 0}}, "'inner_lr' must be > 0"),
    ({"trainer": {"grad_clip": -2}}, "'grad_clip' must be > 0"),
    ({"algorithm": {"eval_inner_steps": 0}}, "'eval_inner_steps' must be > 0"),
    ({"model": {"hidden": (8, 0)}}, "'hidden' must hold layer sizes >= 1, got \\[8, 0\\]"),
    ({"seed": -1}, "'seed' must be >= 0"),
    ({"algorithm": {"strategy": "vmapp"}}, "'strategy' must be one of .*got 'vmapp' \\(did you mean 'vmap'\\?\\)"),
    ({"algorithm": {"bn_policy": "transductive"}},
     "'bn_policy' must be one of \\('batch', 'frozen', 'running', 'support'\\)"),
    ({"trainer": {"meta_optimizer": "adamw"}},
     "'meta_optimizer' must be one of \\('adam', 'sgd', 'learned'\\).*did you mean 'adam'"),
    ({"trainer": {"budget_clock": "gpu"}}, "'budget_clock' must be one of \\('wall', 'cpu'\\)"),
    ({"model": {"name": "conv6"}}, "unknown model 'conv6'"),
    ({"device": "gpu"}, "'device' must be 'auto' or a torch device"),
    ({"algorithm": {"name": " "}}, "unknown algorithm ' '"),
    ({"algorithm": {"adapt": " "}}, "'adapt' must not be empty"),
    ({"algorithm": {"first_order": True, "checkpoint_steps": True}}, "'checkpoint_steps' recomputes second-order"),
    ({"trainer": {"iterations": "10"}}, "'iterations' must be int, got '10' \\(str\\)"),
    ({"trainer": {"iterations": True}}, "'iterations' must be int, got True \\(bool\\)"),
    ({"trainer": {"iterations": 10.0}}, "'iterations' must be int"),
    ({"algorithm": {"first_order": 1}}, "'first_order' must be bool"),
    ({"model": {"hidden": [8, "a"]}}, "'hidden' must be int, got 'a' \\(str\\)"),
    ({"model": {"hidden": 8}}, "'hidden' must be a list, got 8 \\(int\\)"),
])
def test_bad_values_name_the_option(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        run_config(**changes)


def test_values_are_converted_to_the_option_types():
    config = run_config(trainer={"meta_lr": 1, "grad_clip": 5}, model={"hidden": [8, 4]},
                        algorithm={"eval_inner_steps": None, "inner_lr": 1})
    assert config.trainer.meta_lr == 1.0 and isinstance(config.trainer.meta_lr, float)
    assert config.model.options.hidden == (8, 4)
    assert config.trainer.grad_clip == 5.0 and isinstance(config.trainer.grad_clip, float)
    assert config.algorithm.options.eval_inner_steps is None
    assert isinstance(config.algorithm.options.inner_lr, float)
    assert RunConfig.from_dict({**L2L, "baselines": {"grid": [1, 0.5]}}).baselines.grid == (1.0, 0.5)


def test_json_round_trip(tmp_path):
    config = run_config(model={"hidden": [8]}, algorithm={"inner_lr": 0.05, "first_order": True},
                        trainer={"grad_clip": 1.0}, seed=3, device="cpu")
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    raw = json.loads(path.read_text())
    assert list(raw) == ["seed", "device", "threads", "trainer", "data", "model", "algorithm"]
    assert raw["model"] == {"name": "mlp", "hidden": [8]} and raw["algorithm"]["name"] == "maml"
    assert raw["trainer"] == config.trainer.to_dict() and raw["seed"] == 3
    assert RunConfig.from_json(path) == config
    assert RunConfig.from_dict(config.to_dict()) == config
    l2l = load_preset("l2l-mnist")
    assert "model" not in l2l.to_dict() and l2l.to_dict()["baselines"]["transfer"]["ReLU"] == {"activation": "relu"}
    assert RunConfig.from_dict(json.loads(l2l.to_json())) == l2l


def test_from_json_names_the_file(tmp_path):
    bad_key = tmp_path / "bad_key.json"
    bad_key.write_text(json.dumps({**BASE, "algorithm": {"name": "maml", "inner_lrr": 0.1}}))
    with pytest.raises(ConfigError, match="bad_key.json: 'inner_lrr' \\(did you mean 'inner_lr'\\?\\) is not an "
                                          "option of algorithm 'maml'"):
        RunConfig.from_json(bad_key)
    bad_top = tmp_path / "bad_top.json"
    bad_top.write_text(json.dumps({**BASE, "inner_lr": 0.1}))
    with pytest.raises(ConfigError, match="bad_top.json: unknown config key 'inner_lr'"):
        RunConfig.from_json(bad_top)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read config file .*broken.json"):
        RunConfig.from_json(broken)
    with pytest.raises(ConfigError, match="cannot read config file .*missing.json"):
        RunConfig.from_json(tmp_path / "missing.json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        RunConfig.from_json(listed)


def test_replace_checks_values_and_names():
    config = load_preset("maml-sinusoid-10shot")
    assert config.replace(algorithm={"inner_lr": 0.5}).algorithm.options.inner_lr == 0.5
    assert config.algorithm.options.inner_lr == 0.01
    changed = config.replace(trainer={"iterations": 4}, data={"shots": 3}, model={"hidden": [8]}, seed=1)
    assert (changed.trainer.iterations, changed.data.options.shots, changed.model.options.hidden, changed.seed) == (
        4, 3, (8,), 1)
    assert changed.trainer.meta_lr == config.trainer.meta_lr and changed.data.options.query == 10  # the rest kept
    other = RunConfig.from_dict({**config.to_dict(), "algorithm": {"name": "metasgd"}})  # another part: its defaults
    assert other.algorithm.options == entry("algorithm", "metasgd").options() and other.data == config.data
    with pytest.raises(ConfigError, match="'inner_lr' must be > 0"):
        config.replace(algorithm={"inner_lr": -0.5})
    with pytest.raises(ConfigError, match="did you mean 'inner_steps'"):
        config.replace(algorithm={"inner_step": 2})
    assert config.algorithm.replace(inner_lr=0.2).options.inner_lr == 0.2
    assert config.trainer.replace(iterations=5).iterations == 5
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        config.trainer.replace(iteration=5)


def test_adapt_takes_all_head_or_comma_separated_names():
    config = run_config(model={"hidden": [8]})
    model = build_experiment(config).learner.model
    assert adapted_parameter_names(model, config.algorithm.options.adapt) is None  # "all"
    head = build_experiment(config.replace(algorithm={"adapt": "head"})).learner
    assert head.inner.adapted == ("2.weight", "2.bias")
    named = build_experiment(config.replace(algorithm={"adapt": "2.weight, 2.bias"})).learner
    assert named.inner.adapted == ("2.weight", "2.bias")
    with pytest.raises(ValueError, match=r"adapt names unknown parameters \['9.bias'\]"):
        build_experiment(config.replace(algorithm={"adapt": "9.bias"}))


#: The data folder each dataset reads under $METAOPT_DATA (None: generated, needs none).
#: every dataset a preset may name (the presets build on generated stand-ins of their data, below)
DATASETS = {"sinusoid", "quadratics", "omniglot", "mnist-mlp", "miniimagenet", "fashion-mnist8-mlp", "task-suite",
            "child-training", "li-malik"}


def test_presets_are_listed_and_valid():
    names = preset_names()
    assert {"maml-sinusoid-5shot", "maml-sinusoid-10shot", "fomaml-sinusoid-10shot", "l2l-quadratics",
            "l2l-mnist"} <= set(names)
    assert names == sorted(names)
    for name in names:
        config = load_preset(name)
        assert isinstance(config, RunConfig) and config.data.name in DATASETS
        assert name.replace("fomaml", "maml").startswith(f"{config.algorithm.name}-")  # the preset names its algorithm
        assert RunConfig.from_dict(config.to_dict()) == config  # presets hold every option: nothing left implicit
        raw = json.loads(resources.files("metaopt.presets").joinpath(f"{name}.json").read_text())
        assert raw == config.to_dict()


def _generated_classes(names: list[str], channels: int, side: int) -> TensorClassDataset:
    """20 random ``side``x``side`` images of each class of ``names``."""
    images = torch.randint(0, 256, (20 * len(names), channels, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return TensorClassDataset(images, list(torch.arange(len(images)).split(20)), names)


def _generated_miniimagenet(root: object = None, split: str = "train") -> TensorClassDataset:
    """A stand-in for the miniImageNet images (not on these machines; the loader is tested on fixtures of its
    formats in tests/datasets/test_miniimagenet.py): the split's classes, 20 random 84x84 images each."""
    del root
    return _generated_classes(miniimagenet_split(split).classes, 3, 84)


def _generated_omniglot(root: object = None, split: str = "train", protocol: str = "maml") -> TensorClassDataset:
    """A stand-in for Omniglot (its loader is tested on the archives in tests/datasets/test_omniglot.py):
    30 classes of 20 random 28x28 images."""
    del root, split, protocol
    return _generated_classes([f"character{i}" for i in range(30)], 1, 28)


def _generated_idx(root: object = None, split: str = "train", spec: object = None) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for MNIST's and Fashion-MNIST's IDX files (read and checked in tests/datasets): 1000 random
    28x28 images, 100 of each class."""
    del root, split, spec
    g = np.random.default_rng(0)
    return g.integers(0, 256, (1000, 784), dtype=np.uint8), np.repeat(np.arange(10, dtype=np.uint8), 100)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_its_experiment(name, monkeypatch):
    config = load_preset(name)
    monkeypatch.setattr(miniimagenet, "MiniImageNet", _generated_miniimagenet)
    monkeypatch.setattr(omniglot, "Omniglot", _generated_omniglot)
    for module in (mnist, fashion_mnist, task_suite):
        monkeypatch.setattr(module, "read_split", _generated_idx)
    monkeypatch.setattr(child_training, "_LOADED", {})  # the stand-ins must not stay cached for later tests
    if "meta_batch" in config.data.options.field_names():
        config = config.replace(data={"meta_batch": 2})  # the sample batch sizes the model; fewer tasks are faster
    experiment = build_experiment(config.replace(device="cpu"))
    learner, estimator = experiment.learner, experiment.estimator
    problems = config.algorithm.entry.problems
    assert type(learner).__name__ == ({"optimizees": "OptimizerLearner", "rules": "RuleSearch"}.get(problems) or
                                      {"maml": "MAML", "mamlpp": "MAMLPlusPlus", "metasgd": "MetaSGD", "mtnet": "MTNet",
                                       "metalstm": "MetaLSTM", "arml": "ARML"}[config.algorithm.name])
    expected = {"backprop": "TruncatedBackprop", "es": "TruncatedES", "pes": "PES"}.get(
        getattr(config.algorithm.options, "estimator", None), "PPO" if problems == "rules" else "Backprop")
    assert type(estimator).__name__ == expected
    assert experiment.device.type == "cpu" and learner.device.type == "cpu"
    assert sum(p.numel() for p in learner.parameters() if p.requires_grad) > 0
    if problems == "optimizees":
        assert (learner.horizon, estimator.truncation) == (config.algorithm.options.horizon,
                                                          config.algorithm.options.truncation)
    elif problems == "rules":  # the search scores rules on the stand-in images
        assert learner.eval_steps == config.data.options.steps
        assert experiment.problems("train").task.data.train[0].shape[1:] == (1, 14, 14)
    else:
        assert learner.eval_steps == config.algorithm.options.eval_inner_steps
        if config.data.name != "sinusoid":
            assert experiment.problems("val").ways == config.data.options.ways


@pytest.mark.parametrize(("name", "shots", "first_order"), [("maml-sinusoid-5shot", 5, False),
                                                            ("maml-sinusoid-10shot", 10, False),
                                                            ("fomaml-sinusoid-10shot", 10, True)])
def test_sinusoid_presets_hold_the_maml_paper_settings(name, shots, first_order):
    config = load_preset(name)
    algorithm, data, trainer = config.algorithm.options, config.data.options, config.trainer
    assert (config.algorithm.name, config.data.name, config.model.name, config.model.options.hidden) == (
        "maml", "sinusoid", "mlp", (40, 40))
    assert (algorithm.inner_steps, algorithm.inner_lr, trainer.meta_optimizer, trainer.meta_lr) == (1, 0.01, "adam",
                                                                                                    1e-3)
    assert (data.meta_batch, trainer.iterations, data.query, trainer.eval_episodes) == (25, 70000, 10, 600)
    assert (data.shots, algorithm.first_order) == (shots, first_order)


def test_the_quadratics_preset_holds_the_learning_to_learn_settings():
    config = load_preset("l2l-quadratics")
    algorithm, data = config.algorithm.options, config.data.options
    assert (config.algorithm.name, config.data.name, config.model) == ("l2l", "quadratics", None)
    assert (algorithm.lstm_units, algorithm.lstm_layers, algorithm.horizon, algorithm.truncation) == (20, 2, 100, 20)
    assert (algorithm.preprocessing, algorithm.second_derivatives) == (False, False)
    assert (data.dim, data.batch, data.test_batch, data.convention) == (10, 128, 1, "gaussian")
    assert config.baselines is not None and config.baselines.grid == GRID


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown preset 'maml-sinusoid-10shots' \\(did you mean "
                                          "'maml-sinusoid-10shot'\\?\\)"):
        load_preset("maml-sinusoid-10shots")
