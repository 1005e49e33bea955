"""One few-shot task as an inner problem: a model and a loss on its support set (inner) and query set (outer).

:class:`EpisodeTask` is the :class:`metaopt.problems.problem.Problem` view of one task of an
:class:`metaopt.problems.episode.Episode`: the inner loop descends its support loss and scores
its query loss (and accuracy, for classification). The few-shot learner builds one per task,
inside ``vmap`` too.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 3)
    >>> x, y = torch.randn(6, 2), torch.arange(3).repeat(2)
    >>> task = EpisodeTask(model, default_loss, x, y, x, y)
    >>> loss, accuracy = task.outer_loss(dict(model.named_parameters()), step=0)
    >>> loss.shape, 0 <= accuracy <= 1
    (torch.Size([]), tensor(True))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.functional import Params, model_call
from metaopt.problems.problem import Problem

__all__ = ["EpisodeTask", "LossFn", "default_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class labels, mean squared error for regression targets."""
    if target.is_floating_point():
        return F.mse_loss(prediction, target)
    return F.cross_entropy(prediction, target)


class EpisodeTask(Problem):
    """One few-shot task as an inner problem: ``model``'s support loss inside, its query loss outside.

    The tensors are one task's (under ``vmap``, one task's slice of a batch). The outer loss
    comes with the query accuracy of the same forward pass for classification tasks.

    Args:
        model: the network, run functionally on the parameters it is given.
        loss_fn: ``loss_fn(prediction, target) -> scalar``, for both sets.
        support_x, support_y, query_x, query_y: the task's sets.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, support_x: torch.Tensor, support_y: torch.Tensor,
                 query_x: torch.Tensor, query_y: torch.Tensor) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.support_x, self.support_y, self.query_x, self.query_y = support_x, support_y, query_x, query_y

    def inner_loss(self, params: Params, step: int) -> torch.Tensor:
        del step
        return self.loss_fn(model_call(self.model, params, self.support_x), self.support_y)

    def outer_loss(self, params: Params, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        del step
        prediction = model_call(self.model, params, self.query_x)
        loss = self.loss_fn(prediction, self.query_y)
        if self.query_y.is_floating_point():
            return loss, None
        return loss, (prediction.argmax(-1) == self.query_y).float().mean().detach()
