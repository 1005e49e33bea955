"""What the trainer meta-trains: a :class:`Learner` holds the meta-parameters φ and scores them on problems.

Two kinds share the engine (rules, inner loop, estimators, trainer):

* :class:`metaopt.engine.meta_learner.MetaLearner` learns the initial parameters (and the rule)
  of a network adapted to few-shot tasks (MAML and its family);
* :class:`metaopt.engine.optimizer_learner.OptimizerLearner` learns an update rule on optimizees,
  problems that bring their own starting point (learned optimizers).

The trainer (:class:`metaopt.training.trainer.MetaTrainer`) and the estimators
(:mod:`metaopt.estimators`) use only what this base class declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metaopt.engine.rules import UpdateRule

__all__ = ["Evaluation", "Learner"]


@dataclass(frozen=True)
class Evaluation:
    """Per-problem scores of a batch of held-out problems, without meta-gradients.

    Attributes:
        metric: what ``values`` measure: ``"accuracy"`` (higher is better), ``"mse"`` or ``"loss"``.
        values: one value per problem of the batch.
    """

    metric: str
    values: torch.Tensor


class Learner(nn.Module):
    """Base of the meta-learners: ``parameters()`` are the meta-parameters φ.

    Attributes:
        rule: the inner update rule (its figures are logged: :meth:`UpdateRule.logged`).
        eval_steps: inner steps of an evaluation.
    """

    rule: UpdateRule
    eval_steps: int

    @property
    def device(self) -> torch.device:
        """Where the meta-parameters are."""
        return next(self.parameters()).device

    def set_epoch(self, epoch: int) -> None:
        """Apply epoch schedules (the trainer calls it before every meta-update); none by default."""
        del epoch

    def meta_loss(self, batch: Any, track_steps: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """The differentiable meta-loss of a batch of problems and its metrics (``loss`` first)."""
        raise NotImplementedError

    def evaluate(self, batch: Any, steps: int | None = None) -> Evaluation:
        """Scores of held-out problems after ``steps`` inner steps (default: ``eval_steps``)."""
        raise NotImplementedError

    def protocol(self) -> dict[str, Any]:
        """Settings of the learner that every evaluation result records (e.g. the batch-norm policy)."""
        return {}

    def logged(self) -> dict[str, float]:
        """Scalar figures logged with every training record."""
        return self.rule.logged()
