"""Backpropagation through the whole unroll (metaopt/estimators/backprop.py) and the estimator interface
(metaopt/estimators/base.py): the meta-gradient of ``learner.meta_loss(problems.batch(i))``, nothing carried,
non-finite meta-losses not backpropagated."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates, sgd
from metaopt.estimators import Backprop, Estimate, Estimator
from metaopt.problems.episode import Episode
from metaopt.problems.optimizees import OptimizeeStream
from tests.helpers import (
    assert_close_dicts,
    meta_grads,
    tiny_convnet,
    tiny_mlp,
    toy_classification_batch,
    toy_regression_batch,
)


class Batches:
    """Batch ``i`` of a seeded toy stream; records the indices read."""

    def __init__(self, make, nan_targets: bool = False) -> None:
        self.make, self.nan_targets = make, nan_targets
        self.read: list[int] = []

    def batch(self, index: int) -> Episode:
        self.read.append(index)
        batch = self.make(seed=index)
        if self.nan_targets:
            return Episode(batch.support_x, batch.support_y, batch.query_x, batch.query_y * math.nan, batched=True,
                           validate=False)
        return batch


def grads_of(learner) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in learner.named_parameters()}


@pytest.mark.parametrize("first_order", [False, True], ids=["second order", "first order"])
def test_regression_meta_gradient_equals_a_hand_written_backward(first_order: bool) -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1, learnable=True, dtype=torch.float64), inner_steps=2,
                          first_order=first_order)
    problems = Batches(toy_regression_batch)
    estimate = Backprop().estimate(learner, problems, iteration=3)
    assert problems.read == [3]  # meta-update i reads batch i
    loss, expected = meta_grads(learner, toy_regression_batch(seed=3))
    assert_close_dicts(grads_of(learner), expected, rtol=1e-12, atol=1e-14)
    assert isinstance(estimate, Estimate) and estimate.loss == loss.item() == estimate.metrics["loss"]
    assert sorted(estimate.metrics) == ["loss"]


def test_classification_metrics_and_tracked_steps_are_the_learners() -> None:
    learner = MetaLearner(tiny_convnet(), sgd(0.4), inner_steps=2)
    estimate = Backprop().estimate(learner, Batches(toy_classification_batch), iteration=1, track_steps=True)
    batch = toy_classification_batch(seed=1)
    _, metrics = learner.meta_loss(batch, track_steps=True)
    assert estimate.metrics == pytest.approx(metrics, rel=1e-12)
    assert sorted(estimate.metrics) == ["accuracy", "loss", "query_loss_step0", "query_loss_step1", "query_loss_step2"]
    _, expected = meta_grads(learner, batch)
    assert_close_dicts(grads_of(learner), expected, rtol=1e-10, atol=1e-12)


def test_gradients_accumulate_into_grad_as_backward_does() -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1))
    Backprop().estimate(learner, Batches(toy_regression_batch), iteration=0)
    first = {k: v.clone() for k, v in grads_of(learner).items()}
    Backprop().estimate(learner, Batches(toy_regression_batch), iteration=0)  # the trainer zeroes between calls
    assert_close_dicts(grads_of(learner), {k: 2 * v for k, v in first.items()}, rtol=1e-12, atol=0)


def test_a_non_finite_meta_loss_is_not_backpropagated() -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1))
    estimate = Backprop().estimate(learner, Batches(toy_regression_batch, nan_targets=True), iteration=0)
    assert math.isnan(estimate.loss) and math.isnan(estimate.metrics["loss"])
    assert all(p.grad is None for p in learner.parameters())


def test_a_learned_optimizer_is_backpropagated_through_its_whole_horizon() -> None:
    """The same estimator for an OptimizerLearner: Σ_{t=1..horizon} f(θ_t) of problem i, no truncation."""
    learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=5)
    stream = OptimizeeStream(Quadratics(dim=3, batch=2), first=10)
    estimate = Backprop().estimate(learner, stream, iteration=2)
    loss, expected = meta_grads(learner, stream.batch(2))
    assert_close_dicts(grads_of(learner), expected, rtol=1e-6, atol=0)
    assert estimate.loss == pytest.approx(loss.item() / 5, rel=1e-6)  # the metric is the mean loss per step
    theta, rate = stream.batch(2).init_params()["theta"], torch.tensor(0.01, requires_grad=True)
    problem, total = stream.batch(2), 0.0
    for t in range(5):  # by hand: θ ← θ - α ∇f(θ), the gradient a constant (first order)
        leaf = theta.detach().requires_grad_()
        (grad,) = torch.autograd.grad(problem.loss({"theta": leaf}, t), [leaf])
        theta = theta - rate * grad
        total = total + problem.loss({"theta": theta}, t + 1)
    total.backward()
    torch.testing.assert_close(next(learner.parameters()).grad, rate.grad, rtol=1e-5, atol=0)


def test_backprop_carries_nothing() -> None:
    estimator = Backprop()
    assert isinstance(estimator, Estimator) and estimator.state_dict() == {}
    estimator.load_state_dict({})
    with pytest.raises(NotImplementedError):
        Estimator().estimate(MetaLearner(tiny_mlp(), sgd(0.1)), Batches(toy_regression_batch), 0)
