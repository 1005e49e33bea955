"""Fixtures shared by the engine tests: batch-norm layers with known statistics, and tasks run through the engine."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from metaopt.engine.batching import map_tasks
from metaopt.engine.functional import Params, named_params
from metaopt.engine.inner import InnerLoop, resolve_weights
from metaopt.engine.meta_learner import TaskOutputs
from metaopt.engine.per_step_batchnorm import PerStepBatchNorm
from metaopt.problems.episode import Episode
from metaopt.problems.episode_task import EpisodeTask, LossFn

__all__ = ["STEPS", "bn_with_stats", "images", "inputs", "per_step_bn", "run_tasks", "stats"]

STEPS = 3  # rows of the per-step batch-norm layers


def bn_with_stats() -> nn.BatchNorm1d:
    """A float64 batch norm over 3 features whose running statistics are not the defaults."""
    bn = nn.BatchNorm1d(3).double()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    bn.num_batches_tracked.fill_(7)
    return bn


def inputs(n: int = 16) -> torch.Tensor:
    """``[n, 3]`` float64 inputs far from mean 0 and variance 1."""
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1


def stats(bn: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state (parameters and buffers)."""
    return {k: v.clone() for k, v in bn.state_dict().items()}


def per_step_bn(steps: int = STEPS, channels: int = 3, **kwargs: bool) -> PerStepBatchNorm:
    """A float64 per-step batch norm whose rows of statistics and affine weights all differ."""
    bn = PerStepBatchNorm(channels, steps, **kwargs).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("running_mean", "weight", "bias"):
            tensor = getattr(bn, name)
            if tensor is not None:
                tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=torch.float64))
        if bn.running_var is not None:
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=torch.float64) * 2 + 0.5)
    return bn


def images(n: int = 6, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """``[n, channels, 4, 4]`` float64 images far from mean 0 and variance 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, 4, 4, generator=g, dtype=torch.float64) * 2 + 0.5


def run_tasks(loop: InnerLoop, model: nn.Module, loss_fn: LossFn, batch: Episode, params: Params | None = None,
              steps: int = 2, weights: Sequence[float] | None = None, strategy: str = "loop",
              track: bool = False) -> TaskOutputs:
    """``loop`` on every task of ``batch`` from a shared θ_0 (``params``, default the model's), batched by ``strategy``.

    What ``InnerLoop.run_tasks`` did before the engine rebuild. Each task is an :class:`EpisodeTask`
    unrolled and scored by ``loop``, as a :class:`metaopt.engine.meta_learner.MetaLearner` runs it
    (without initialiser and per-task batch-norm context), and
    :func:`metaopt.engine.batching.map_tasks` batches the tasks. The
    caller chooses the batch-norm policy.
    """
    params = named_params(model) if params is None else params
    weights = resolve_weights(steps, weights)

    def task(support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor,
             functional: bool) -> tuple[torch.Tensor, ...]:
        problem = EpisodeTask(model, loss_fn, support_x, support_y, query_x, query_y)
        score = loop.score(problem, loop.unroll(problem, params, steps, functional=functional), weights, track)
        return score.loss, score.step_losses, score.loss.new_zeros(()) if score.accuracy is None else score.accuracy

    losses, step_losses, accuracy = map_tasks(task, batch.tensors(), strategy)
    return TaskOutputs(losses, step_losses if track else None, None if batch.query_y.is_floating_point() else accuracy)
