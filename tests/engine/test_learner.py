"""Tests of metaopt/engine/learner.py: the base that the trainer and the estimators rely on."""

from __future__ import annotations

import pytest
import torch

from metaopt.engine.learner import Evaluation, Learner
from metaopt.engine.rules import sgd


class Bare(Learner):
    def __init__(self) -> None:
        super().__init__()
        self.rule = sgd(0.25)
        self.weight = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        self.eval_steps = 3


def test_defaults_of_the_base():
    learner = Bare()
    assert learner.device == torch.device("cpu")
    learner.set_epoch(7)  # no schedule by default
    assert learner.protocol() == {} and learner.logged() == {"lr/inner": 0.25}
    with pytest.raises(NotImplementedError):
        learner.meta_loss(None)
    with pytest.raises(NotImplementedError):
        learner.evaluate(None)


def test_an_evaluation_holds_one_value_per_problem():
    evaluation = Evaluation("accuracy", torch.tensor([0.5, 1.0]))
    assert evaluation.metric == "accuracy" and evaluation.values.shape == (2,)
