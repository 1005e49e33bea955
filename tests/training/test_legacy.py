"""Tests of metaopt/training/legacy.py: run folders of metaopt 0.1 evaluate, compare and resume today."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from metaopt.algorithms import ARML, LearnedOptimizer, LSTMOptimizerRule
from metaopt.cli import main
from metaopt.models import Conv4
from metaopt.options import ConfigError
from metaopt.training.checkpoint import load_checkpoint
from metaopt.training.legacy import LEGACY_DEFAULTS, convert_config, convert_state, read_run_config
from metaopt.training.logging import read_metrics

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"


@pytest.fixture
def fewshot_run(tmp_path: Path) -> Path:
    run = tmp_path / "maml-sinusoid-5shot"
    shutil.copytree(LEGACY / "maml-sinusoid-5shot", run)
    return run


def test_a_flat_config_becomes_sections_with_what_its_algorithm_read(fewshot_run):
    flat = json.loads((fewshot_run / "config.json").read_text())
    config = read_run_config(fewshot_run / "config.json")
    assert (config.algorithm.name, config.data.name, config.model.name) == ("maml", "sinusoid", "mlp")
    assert config.algorithm.options.inner_lr == flat["inner_lr"] and config.data.options.shots == flat["shots"]
    assert config.trainer.iterations == flat["iterations"] and config.model.options.hidden == tuple(flat["hidden"])


def test_a_legacy_run_evaluates_to_its_recorded_result(fewshot_run, capsys):
    assert main(["eval", "--run", str(fewshot_run)]) == 0
    recorded = json.loads((fewshot_run / "final.json").read_text())["result"]
    result = json.loads((fewshot_run / "eval.json").read_text())["result"]
    assert result.keys() == recorded.keys()
    for key, value in recorded.items():  # bit for bit on the recording's CPU; other CPUs' kernels round differently
        assert result[key] == (pytest.approx(value, rel=1e-7) if isinstance(value, float) else value), key
    assert recorded["protocol"]["bn_policy"] in capsys.readouterr().out


def test_a_legacy_run_compares_and_resumes_in_todays_format(fewshot_run, capsys):
    assert main(["compare", str(fewshot_run), "--out", str(fewshot_run / "c.png")]) == 0
    assert "| maml | sinusoid | - | 5 |" in capsys.readouterr().out
    assert main(["train", "--resume", str(fewshot_run), "--iterations", "53"]) == 0
    assert read_metrics(fewshot_run / "metrics.jsonl")[-1]["iteration"] == 53
    assert json.loads((fewshot_run / "config.json").read_text())["algorithm"]["name"] == "maml"  # rewritten
    state = load_checkpoint(fewshot_run / "last.pt")
    assert (state["version"], state["iteration"], state["estimator"]["name"]) == (2, 53, "Backprop")


def test_a_legacy_learned_optimizer_run_says_what_still_works(tmp_path, capsys):
    run = tmp_path / "l2l"
    shutil.copytree(LEGACY / "l2l-quadratics", run)
    assert main(["eval", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "written by metaopt 0.1's LearnedOptimizerTrainer" in err
    assert f"LearnedOptimizer(params, checkpoint='{run}/best.pt')" in err and "--preset l2l-quadratics" in err
    rule = LSTMOptimizerRule.from_checkpoint(run / "best.pt")
    weights = load_checkpoint(run / "best.pt")["rule"]
    assert all(torch.equal(rule.state_dict()[k], v) for k, v in weights.items())
    net = torch.nn.Linear(3, 1)
    optimizer = LearnedOptimizer(net.parameters(), checkpoint=run / "best.pt")
    net(torch.ones(2, 3)).sum().backward()
    before = net.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(net.weight, before)


@pytest.mark.parametrize(("changes", "algorithm", "expected"), [
    ({"algorithm": "maml", "msl_epochs": 5, "inner_steps": 3}, "mamlpp",
     {"msl_epochs": 5, "per_step_lr": False, "per_step_bn_stats": False, "second_order_from_epoch": None}),
    ({"algorithm": "metasgd", "metasgd_init": "constant", "inner_lr": 0.02}, "metasgd",
     {"init": "constant", "init_lr": 0.02}),
    ({"algorithm": "metalstm", "inner_lr": 0.4, "first_order": True, "metalstm_bn_momentum": 0.95}, "metalstm",
     {"bn_momentum": 0.95}),
    ({"algorithm": "mtnet", "mtnet_mask": "weight", "adapt": "all"}, "mtnet", {"mask": "weight"}),
    ({"algorithm": "arml", "arml_vertices": 6, "ways": 5, "dataset": "omniglot", "model": "conv4"}, "arml",
     {"vertices": 6, "sigma": 8.0}),
    ({"algorithm": "maml", "first_order": True, "checkpoint_steps": True}, "maml", {"checkpoint_steps": False}),
])
def test_each_algorithm_keeps_exactly_the_fields_its_builder_read(changes, algorithm, expected):
    config = convert_config(changes)
    assert config.algorithm.name == algorithm
    options = config.algorithm.options.to_dict()
    assert {k: options[k] for k in expected} == expected


def test_unconvertible_configs_say_why():
    with pytest.raises(ConfigError, match="has no fields \\['typo'\\]"):
        convert_config({"typo": 1})
    with pytest.raises(ConfigError, match="combined metasgd with MAML\\+\\+'s msl_epochs"):
        convert_config({"algorithm": "metasgd", "msl_epochs": 3})
    assert set(LEGACY_DEFAULTS) >= {"arml_sigma", "metasgd_init", "mtnet_mask"}


def test_version_one_checkpoints_map_onto_todays_learner():
    torch.manual_seed(0)
    learner = ARML(Conv4(1, 5, hidden=4), ways=5, input_shape=(1, 28, 28), inner_lr=0.4, inner_steps=1)
    today = learner.state_dict()
    old = {key.removeprefix("initialiser."): value for key, value in today.items()}  # 0.1 kept the gate at the top
    old["rule.lr"] = torch.tensor(0.4)  # and the fixed rate as a buffer
    converted = convert_state({"version": 1, "algorithm": "ARML", "model": old}, learner)
    assert converted["model"].keys() == today.keys()
    assert converted["estimator"] == {"name": "Backprop", "settings": {}, "state": {}}
    learner.load_state_dict(converted["model"])
    unchanged = {"version": 2, "algorithm": "ARML", "model": today}
    assert convert_state(unchanged, learner) is unchanged
