"""Initialisers: θ_0(φ, task), the starting parameters of one task's inner loop.

MAML starts every task from the meta-learned parameters themselves (no initialiser). A learned
initialiser is an :class:`Initialiser` module: it owns meta-parameters of its own and turns the
shared θ_0 into this task's start from the task's support set, possibly adding a term to the
task's outer loss (ARML gates θ_0 from a task embedding and adds reconstruction losses; Yao et
al. 2020). It runs inside each task's function, so per task under ``vmap`` too.

Example:
    >>> import torch
    >>> class Halve(Initialiser):
    ...     def forward(self, params, task):
    ...         return {k: v / 2 for k, v in params.items()}, None
    >>> Halve()({"w": torch.ones(2)}, task=None)
    ({'w': tensor([0.5000, 0.5000])}, None)
"""

from __future__ import annotations

import torch
from torch import nn

from metaopt.engine.functional import Params
from metaopt.problems.episode_task import EpisodeTask

__all__ = ["Initialiser"]


class Initialiser(nn.Module):
    """Base of per-task initialisers: ``forward(params, task) -> (θ_0 of the task, extra outer loss or None)``."""

    def forward(self, params: Params, task: EpisodeTask) -> tuple[Params, torch.Tensor | None]:
        raise NotImplementedError
