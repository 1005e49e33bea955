"""Backpropagation through the whole unroll: the exact meta-gradient (MAML and its family).

The meta-loss of batch ``i`` of the problems is differentiated by autograd through every inner
step (second order unless the learner is first-order; Finn et al. 2017, Algorithm 2). A
non-finite meta-loss is not backpropagated.

Example:
    >>> import torch
    >>> from metaopt.engine.meta_learner import MetaLearner
    >>> from metaopt.engine.rules import sgd
    >>> from metaopt.problems.episode import Episode
    >>> class Tasks:
    ...     def batch(self, index):
    ...         x = torch.randn(2, 5, 1)
    ...         return Episode(x, 2 * x, x, 2 * x, batched=True)
    >>> learner = MetaLearner(torch.nn.Linear(1, 1), sgd(0.1))
    >>> estimate = Backprop().estimate(learner, Tasks(), iteration=0)
    >>> learner.model.weight.grad is not None, sorted(estimate.metrics)
    (True, ['loss'])
"""

from __future__ import annotations

import math
from typing import Any

from metaopt.engine.learner import Learner
from metaopt.estimators.base import Estimate, Estimator

__all__ = ["Backprop"]


class Backprop(Estimator):
    """The exact meta-gradient of ``learner.meta_loss(problems.batch(iteration))`` by backpropagation."""

    def estimate(self, learner: Learner, problems: Any, iteration: int, track_steps: bool = False) -> Estimate:
        batch = problems.batch(iteration).to(learner.device)
        loss, metrics = learner.meta_loss(batch, track_steps=track_steps)
        if math.isfinite(metrics["loss"]):
            loss.backward()
        return Estimate(metrics["loss"], metrics)
