"""What the inner loop runs on: an inner loss it descends and an outer loss that scores where it got.

A few-shot task (:class:`metaopt.problems.episode.EpisodeTask`) descends its support loss and is
scored on its query set; a learned optimizer's training problem
(:class:`metaopt.problems.optimizees.Optimizee`) descends its training loss and is scored on that
same loss along the way (Andrychowicz et al. 2016, §2: the meta-loss is the sum of the losses of
the trajectory). Both give the losses of a parameter dict at an inner step, so one unrolled inner
loop (:class:`metaopt.engine.inner.InnerLoop`) serves both.

Example:
    >>> import torch
    >>> class Parabola(Problem):
    ...     def inner_loss(self, params, step):
    ...         return params["x"].square().sum()
    ...     def outer_loss(self, params, step):
    ...         return (params["x"] - 1).square().sum(), None
    >>> Parabola().outer_loss({"x": torch.zeros(2)}, step=0)
    (tensor(2.), None)
"""

from __future__ import annotations

from typing import ClassVar

import torch

from metaopt.engine.functional import Params

__all__ = ["Problem"]


class Problem:
    """One inner problem: ``inner_loss`` is descended by the inner loop, ``outer_loss`` scores the result.

    Attributes:
        outer_is_inner: the outer loss of ``θ_t`` is the inner loss at step ``t`` (a learned
            optimizer is scored on the training loss itself). The inner loop then reuses the
            inner losses it computes instead of evaluating every loss twice.
    """

    outer_is_inner: ClassVar[bool] = False

    def inner_loss(self, params: Params, step: int) -> torch.Tensor:
        """The scalar loss whose gradient the update rule receives at inner step ``step``."""
        raise NotImplementedError

    def outer_loss(self, params: Params, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scalar outer loss of the parameters after ``step`` inner steps, and its accuracy (detached),
        for problems that have one (classification), else ``None``."""
        raise NotImplementedError

    def validation_loss(self, params: Params, step: int) -> torch.Tensor | None:
        """The loss of ``params`` on held-out data at step ``step`` (which picks the minibatch), or ``None``.

        Update rules that read validation losses (the hierarchical optimizer of Metz et al. 2020,
        §3.1) get it every ``rule.validation_every`` inner steps; problems without held-out data
        return ``None`` (the default).
        """
        del params, step
        return None
