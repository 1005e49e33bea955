"""Backpropagation through the whole unroll: the exact meta-gradient (MAML and its family).

The meta-loss of batch ``i`` of the problems is differentiated by autograd through every inner
step (second order unless the learner is first-order; Finn et al. 2017, Algorithm 2). A
non-finite meta-loss is not backpropagated.

On several processes (:meth:`Backprop.distribute`) rank ``r`` takes its contiguous share of the
batch's tasks (:meth:`metaopt.training.distributed.World.share`), backpropagates the mean loss of
its share, and the ranks sum their gradients weighted by their shares of the tasks, in one flat
bucket: the mean meta-gradient of the whole batch, as one process computes it up to the order of
the float sums.

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
from metaopt.problems.episode import Episode
from metaopt.training.distributed import DistributedError, World

__all__ = ["Backprop"]


class Backprop(Estimator):
    """The exact meta-gradient of ``learner.meta_loss(problems.batch(iteration))`` by backpropagation."""

    def distribute(self, world: World) -> None:
        self.world = world

    def estimate(self, learner: Learner, problems: Any, iteration: int, track_steps: bool = False) -> Estimate:
        batch, weight = problems.batch(iteration), 1.0
        if self.world.active:
            batch, weight = self._share(batch)
        loss, metrics = learner.meta_loss(batch.to(learner.device), track_steps=track_steps)
        if math.isfinite(metrics["loss"]):
            loss.backward()
        if self.world.active:
            metrics = self.world.all_reduce_gradients([p for p in learner.parameters() if p.requires_grad],
                                                      weight, metrics)
        return Estimate(metrics["loss"], metrics)

    def _share(self, batch: Any) -> tuple[Episode, float]:
        """This rank's share of the tasks of ``batch``, and its fraction of them."""
        if not isinstance(batch, Episode):
            raise DistributedError(f"backpropagation shares the tasks of an episode batch over processes, but this "
                                   f"problem source gives a {type(batch).__name__}; train it on one process, or "
                                   "with truncated backpropagation or ES (whose tasks the ranks share)")
        batch = batch if batch.is_batched else Episode.stack([batch])
        share = self.world.share(len(batch))
        if not share:
            raise DistributedError(f"a batch of {len(batch)} tasks cannot be shared over {self.world.size} processes: "
                                   f"raise the batch size to at least {self.world.size} or start fewer processes")
        return batch[share.start:share.stop], len(share) / len(batch)
