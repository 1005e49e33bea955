"""Child trainings that score rules: determinism, the λ sweep, invalid rules, splits, missing data, real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from metaopt.algorithms.rule_dsl import parse
from metaopt.datasets import child_training
from metaopt.datasets.child_training import ChildConvNet, ChildTask, RuleRewards, fake_data, load_child_data
from metaopt.options import ConfigError

DATA = os.environ.get("METAOPT_DATA")
needs_fashion = pytest.mark.skipif(DATA is None or not (Path(DATA) / "fashion-mnist").is_dir(),
                                   reason="set METAOPT_DATA to the folder holding fashion-mnist/ (the four IDX files)")


@pytest.fixture
def task() -> ChildTask:
    return ChildTask(steps=20, lrs=(0.01, 0.1, 1.0), val_images=256, data=fake_data(512))


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def test_a_training_is_a_pure_function_of_the_seed(task: ChildTask) -> None:
    assert task.train(sgd, 0.1, seed=3) == task.train(sgd, 0.1, seed=3)
    assert task.train(sgd, 0.1, seed=3) != task.train(sgd, 0.1, seed=4)


def test_score_is_the_best_validation_accuracy_over_the_grid(task: ChildTask) -> None:
    score = task.score(sgd, seed=0, test=True)
    assert set(score.accuracies) == {0.01, 0.1, 1.0}
    assert score.accuracy == max(score.accuracies.values()) and score.accuracies[score.lr] == score.accuracy
    assert score.accuracy > 0.3  # the stand-in is learnable: far above chance (0.1) in 20 steps
    assert score.test_accuracy == score.test_accuracies[score.lr]


def test_a_rule_that_breaks_down_gets_the_minimum_reward(task: ChildTask) -> None:
    assert task.reward(parse("sub(g, g); log(o1)")) == 0.0  # log|0| = -inf
    assert task.reward(parse("sub(g, g); div(1, o1); exp(o2)")) == 0.0  # overflow: e^(1/δ)
    score = task.rule_score(parse("pow(g, v)"), seed=0)  # a negative base to a fractional power
    assert score.lr is None and set(score.accuracies.values()) == {0.0}


def test_decay_operands_span_the_budget(task: ChildTask) -> None:
    assert 0.0 <= task.reward(parse("mul(g, ld)")) <= 1.0  # decay_steps given only to rules that read a decay


def test_split_seeds_are_disjoint_and_the_test_split_scores_test_accuracy(task: ChildTask) -> None:
    seeds = {split: set(RuleRewards(task, 3, split, 0).batch(0).seeds) for split in ("train", "val", "test")}
    assert not (seeds["train"] & seeds["val"] or seeds["val"] & seeds["test"] or seeds["train"] & seeds["test"])
    test_batch = RuleRewards(task, 2, "test", 0).batch(1)
    expected = [task.rule_score(parse("g"), seed, test=True).test_accuracy for seed in test_batch.seeds]
    assert test_batch.test and test_batch.scores(parse("g")).tolist() == pytest.approx(expected)


def test_networks_fit_grey_and_colour_images() -> None:
    assert ChildConvNet(1)(torch.zeros(2, 1, 14, 14)).shape == (2, 10)
    assert ChildConvNet(3)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    mlp = ChildTask(network="mlp", steps=2, data=fake_data(128))
    assert 0 <= mlp.train(sgd, 0.1, seed=0)[0] <= 1


def test_missing_and_bad_data_are_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(child_training, "_LOADED", {})
    with pytest.raises(FileNotFoundError, match="CIFAR-10 is not in .*cifar-10-batches-py"):
        load_child_data("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="fashion-mnist"):
        load_child_data("fashion-mnist", tmp_path)
    with pytest.raises(ConfigError, match="unknown child dataset 'svhn'"):
        ChildTask("svhn")
    with pytest.raises(ConfigError, match="unknown child network 'resnet'"):
        ChildTask(network="resnet", data=fake_data(64))
    with pytest.raises(ConfigError, match="batch 128 is larger than the 64 training images"):
        ChildTask(batch=128, data=fake_data(64)).train(sgd, 0.1, 0)


@needs_fashion
def test_on_fashion_mnist_tuned_adam_learns_and_a_tiny_step_does_not() -> None:
    task = ChildTask()  # the search's budget: 100 steps of 64 images, 14x14
    assert task.data.train[0].shape == (50000, 1, 14, 14) and task.data.val[0].shape == (10000, 1, 14, 14)
    adam = task.score(lambda params, lr: torch.optim.Adam(params, lr=lr), seed=0, lrs=(1e-2,))
    assert adam.accuracy > 0.6
    assert task.train(sgd, 1e-4, seed=0)[0] < 0.4
