"""MAML++'s per-step batch norm: running statistics and affine weights with one row per inner step.

Antoniou et al. 2019, "How to train your MAML", §4: per-step batch-norm running statistics
(BNRS) and per-step batch-norm weights and biases (BNWB). :class:`PerStepBatchNorm` reads the
inner step of each forward pass from :func:`metaopt.engine.step_context.current_inner_step`,
which the inner loops set; :func:`per_step_batchnorm` swaps it in for a model's batch-norm layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.step_context import current_inner_step

__all__ = ["PerStepBatchNorm", "per_step_batchnorm"]


class PerStepBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with running statistics and/or affine weights per inner step (MAML++ BNRS / BNWB).

    Antoniou et al. 2019, "How to train your MAML", §4: per-step batch-norm running statistics
    (BNRS) and per-step batch-norm weights and biases (BNWB). Statistics and weights that are per
    step have a leading dimension ``steps``; a forward pass uses row ``min(t, steps - 1)`` for
    inner step ``t`` (:func:`metaopt.engine.step_context.inner_step`). So evaluation with more inner steps than training
    reuses the last step's statistics and weights, where the official code fails with an index
    error. In training mode only the statistics of the current step are updated.

    Normalisation follows the module's mode as in :class:`torch.nn.BatchNorm2d`, and so the
    batch-norm policy: ``"batch"`` uses batch statistics (the official MAML++ code, which
    accumulates its per-step statistics but never normalises with them), ``"running"``
    accumulates them in meta-training and uses them at evaluation.

    Args:
        num_features: channels ``C``.
        steps: inner steps during meta-training (rows).
        per_step_stats: running mean and variance of shape ``[steps, C]`` (else ``[C]``).
        per_step_affine: weight and bias of shape ``[steps, C]`` (else ``[C]``).
        eps, momentum, affine, track_running_stats: as :class:`torch.nn.BatchNorm2d`
            (``momentum=None``, a cumulative average, is not supported).

    Example:
        >>> import torch
        >>> from metaopt.engine.step_context import inner_step
        >>> bn = PerStepBatchNorm(3, steps=2)
        >>> bn.weight.shape, bn.running_mean.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
        >>> with inner_step(1):
        ...     _ = bn(torch.randn(4, 3, 5, 5))
        >>> bool(bn.running_mean[0].eq(0).all()), bool(bn.running_mean[1].ne(0).all())
        (True, True)
    """

    def __init__(self, num_features: int, steps: int, per_step_stats: bool = True, per_step_affine: bool = True,
                 eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        if steps < 1:
            raise ValueError(f"PerStepBatchNorm needs steps >= 1, got {steps}")
        if momentum is None:
            raise ValueError("PerStepBatchNorm needs a momentum (a cumulative average, momentum=None, is not "
                             "kept per step)")
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.steps = steps
        self.per_step_stats = per_step_stats and track_running_stats
        self.per_step_affine = per_step_affine and affine
        with torch.no_grad():
            if self.per_step_affine:
                self.weight = nn.Parameter(self.weight.expand(steps, -1).clone())
                self.bias = nn.Parameter(self.bias.expand(steps, -1).clone())
            if self.per_step_stats:
                self.running_mean = self.running_mean.expand(steps, -1).clone()
                self.running_var = self.running_var.expand(steps, -1).clone()

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, steps: int, per_step_stats: bool = True,
                       per_step_affine: bool = True) -> PerStepBatchNorm:
        """A per-step copy of ``bn``: every row starts from ``bn``'s weights and statistics."""
        new = cls(bn.num_features, steps, per_step_stats, per_step_affine, bn.eps, bn.momentum, bn.affine,
                  bn.track_running_stats)
        like = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
        if like is not None:
            new = new.to(like)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                source = getattr(bn, name)
                if source is not None:
                    getattr(new, name).copy_(source.expand_as(getattr(new, name)))
            if bn.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        new.train(bn.training)
        return new

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"PerStepBatchNorm expects [batch, channels, ...] input, got shape {list(input.shape)}")

    def _row(self, tensor: torch.Tensor | None, per_step: bool) -> torch.Tensor | None:
        if tensor is None or not per_step:
            return tensor
        return tensor[min(current_inner_step(), self.steps - 1)]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(input, self._row(self.running_mean, self.per_step_stats),
                            self._row(self.running_var, self.per_step_stats),
                            self._row(self.weight, self.per_step_affine), self._row(self.bias, self.per_step_affine),
                            use_batch_stats, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, steps={self.steps}, per_step_stats={self.per_step_stats}, " \
               f"per_step_affine={self.per_step_affine}"


def per_step_batchnorm(model: nn.Module, steps: int, per_step_stats: bool = True,
                       per_step_affine: bool = True) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by a :class:`PerStepBatchNorm` copy, in place.

    Returns ``model``. Each row of the new layers starts from the old layer's values, so the
    network computes the same function until the rows are trained apart.

    Example:
        >>> net = per_step_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), steps=5)
        >>> type(net[1]).__name__, tuple(net[1].weight.shape)
        ('PerStepBatchNorm', (5, 4))
    """
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, PerStepBatchNorm):
            setattr(model, name, PerStepBatchNorm.from_batchnorm(child, steps, per_step_stats, per_step_affine))
        else:
            per_step_batchnorm(child, steps, per_step_stats, per_step_affine)
    return model

