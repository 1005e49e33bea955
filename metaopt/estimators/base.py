"""The estimator interface: problems in, a meta-gradient (estimate) out, state carried across calls.

An estimator turns a learner and its training problems into the meta-gradient ∇_φ of the
meta-loss, or an estimate of it, written into the ``.grad`` of the learner's parameters, and
returns the meta-loss and metrics (:class:`Estimate`). It may carry state from one call to the
next (a truncated unroll keeps the inner parameters between truncations); that state is part of
every checkpoint (:meth:`Estimator.state_dict`), so a resumed run continues exactly. The trainer
(:class:`metaopt.training.trainer.MetaTrainer`) calls nothing else, so backpropagation through the
whole unroll, truncated backpropagation, evolution strategies or policy gradients are each one
file that replaces another (after google/learned_optimization's ``GradientEstimator``).

Estimators guard their own numerics: an estimator that carries inner state drops it when the
meta-loss or meta-gradient of a call is not finite. The trainer then skips the update and
counts it.

Example:
    >>> import torch
    >>> class Zero(Estimator):
    ...     def estimate(self, learner, problems, iteration, track_steps=False):
    ...         for p in learner.parameters():
    ...             p.grad = torch.zeros_like(p)
    ...         return Estimate(0.0, {"loss": 0.0})
    >>> Zero().state_dict()
    {}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metaopt.engine.learner import Learner
from metaopt.training.distributed import SINGLE, DistributedError, World

__all__ = ["Estimate", "Estimator"]


@dataclass(frozen=True)
class Estimate:
    """What one call of an estimator returns besides the gradients it wrote.

    Attributes:
        loss: the meta-loss of the call (a float; non-finite when the call failed).
        metrics: figures to log under ``train/`` (``loss`` among them).
    """

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class Estimator:
    """Base of the meta-gradient estimators (see the module docs)."""

    #: The processes that share each estimate (:meth:`distribute`); one by default.
    world: World = SINGLE

    def distribute(self, world: World) -> None:
        """Share the work of every estimate over the ranks of ``world`` (:mod:`metaopt.training.distributed`).

        Every rank must end each call with the same gradients, state and metrics.

        Raises:
            DistributedError: this estimator cannot share its work.
        """
        raise DistributedError(f"{type(self).__name__} cannot share its estimates over processes; run it on one "
                               "process (without torchrun or --nproc)")

    def estimate(self, learner: Learner, problems: Any, iteration: int, track_steps: bool = False) -> Estimate:
        """Write the meta-gradient for meta-update ``iteration`` into the ``.grad`` of ``learner``'s parameters.

        Args:
            learner: the meta-learner; its gradients are zero or ``None`` on entry.
            problems: the training problem source; ``problems.batch(i)`` is batch ``i``.
            iteration: the meta-update about to be taken (0 for the first).
            track_steps: add per-step figures to the metrics (the trainer asks on logged iterations).
        """
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The estimator's settings (JSON values), recorded in checkpoints: a resumed run must keep them."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the estimator carries between calls (tensors, numbers, containers of them); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        del state
