"""One few-shot task as an inner problem: a model and a loss on its support set (inner) and query set (outer).

:class:`EpisodeTask` is the :class:`metaopt.problems.problem.Problem` view of one task of an
:class:`metaopt.problems.episode.Episode`: the inner loop descends its support loss and scores
its query loss (and accuracy, for classification). The few-shot learner builds one per task,
inside ``vmap`` too.

Every forward pass checks the prediction's shape against the targets (a comparison of Python
sizes, so it costs nothing and runs under ``vmap``): a classifier must output one score per class
(``ways`` of them, when the task knows its ways), and :func:`default_loss` takes floating targets
for regression only, of the prediction's shape. Both mistakes otherwise fail deep inside torch,
or silently train on the wrong loss.

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

__all__ = ["EpisodeTask", "LossFn", "check_class_scores", "default_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class labels, mean squared error for regression targets.

    Raises:
        ValueError: floating targets whose shape is not the prediction's: class ids given as
            floats (or regression targets of the wrong shape), which MSE would broadcast.
    """
    if target.is_floating_point():
        if prediction.shape != target.shape:
            raise ValueError(f"the model predicts shape {tuple(prediction.shape)} but the targets have shape "
                             f"{tuple(target.shape)} ({target.dtype}): labels must be integer class ids (torch.long) "
                             "for classification; float targets mean regression, one target per model output "
                             f"(shape {tuple(prediction.shape)}); convert labels with .long()")
        return F.mse_loss(prediction, target)
    return F.cross_entropy(prediction, target)


def check_class_scores(prediction: torch.Tensor, labels: torch.Tensor, ways: int | None) -> None:
    """Check that a classifier's ``prediction`` holds one score per class for each of ``labels``.

    Args:
        prediction: the model's output, ``[N, C]`` for ``N`` labels ``[N]``.
        labels: integer class ids.
        ways: the task's number of classes (``C`` must equal it), or ``None`` when unknown.

    Raises:
        ValueError: naming both sizes and the fix.

    Example:
        >>> check_class_scores(torch.zeros(6, 5), torch.zeros(6, dtype=torch.long), ways=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: the model outputs 5 class scores per example but the episode is 3-way (labels 0..2); ...
    """
    if prediction.dim() != labels.dim() + 1:
        expected = f"({', '.join(str(n) for n in labels.shape)}, {ways or 'ways'})"
        raise ValueError(f"the model outputs shape {tuple(prediction.shape)} for labels of shape "
                         f"{tuple(labels.shape)}; classification needs one score per class for every example, "
                         f"shape {expected}: give the model one output per class")
    scores = prediction.shape[-1]
    if ways is not None and scores != ways:
        raise ValueError(f"the model outputs {scores} class scores per example but the episode is {ways}-way "
                         f"(labels 0..{ways - 1}); build the model with {ways} outputs (e.g. Conv4(num_classes="
                         f"{ways}) or MLP(in_features, {ways})), or sample {scores}-way episodes")


class EpisodeTask(Problem):
    """One few-shot task as an inner problem: ``model``'s support loss inside, its query loss outside.

    The tensors are one task's (under ``vmap``, one task's slice of a batch). The outer loss
    comes with the query accuracy of the same forward pass for classification tasks.

    Args:
        model: the network, run functionally on the parameters it is given.
        loss_fn: ``loss_fn(prediction, target) -> scalar``, for both sets.
        support_x, support_y, query_x, query_y: the task's sets.
        ways: the task's number of classes, which a classifier's outputs must match
            (:func:`check_class_scores`); ``None`` checks the outputs' rank only.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, support_x: torch.Tensor, support_y: torch.Tensor,
                 query_x: torch.Tensor, query_y: torch.Tensor, ways: int | None = None) -> None:
        self.model, self.loss_fn, self.ways = model, loss_fn, ways
        self.support_x, self.support_y, self.query_x, self.query_y = support_x, support_y, query_x, query_y

    def _predict(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        prediction = model_call(self.model, params, x)
        if not y.is_floating_point():
            check_class_scores(prediction, y, self.ways)
        return prediction

    def inner_loss(self, params: Params, step: int) -> torch.Tensor:
        del step
        return self.loss_fn(self._predict(params, self.support_x, self.support_y), self.support_y)

    def outer_loss(self, params: Params, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        del step
        prediction = self._predict(params, self.query_x, self.query_y)
        loss = self.loss_fn(prediction, self.query_y)
        if self.query_y.is_floating_point():
            return loss, None
        return loss, (prediction.argmax(-1) == self.query_y).float().mean().detach()
