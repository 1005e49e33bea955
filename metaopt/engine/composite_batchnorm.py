"""Batch norm from elementary operations, for correct second-order gradients under ``torch.func.vmap``.

``torch.func.vmap`` gives wrong *second-order* gradients through the fused batch-norm kernel in
training mode (checked against a per-task loop and finite differences with torch 2.14;
first-order is right; pytorch/functorch#534, the batch-norm backward batching rule). The vmap
strategy (:mod:`metaopt.engine.batching`) runs under :class:`composite_batch_norm`, which
computes batch-statistics batch norm from mean, variance and rsqrt, so that its meta-gradients
equal the loop's. A test watches the bug, so that the workaround can go once torch fixes it.

Example:
    >>> import torch
    >>> x = torch.randn(8, 3, 4, 4)
    >>> with composite_batch_norm():
    ...     ours = torch.nn.functional.batch_norm(x, None, None, training=True)
    >>> torch.allclose(ours, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["composite_batch_norm"]


class composite_batch_norm(TorchFunctionMode):  # noqa: N801  (used like a function: `with composite_batch_norm():`)
    """Compute batch-statistics batch norm from elementary ops; calls with running statistics pass through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_stats_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _batch_stats_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                      momentum: float | None = 0.1, eps: float = 1e-5) -> torch.Tensor:
    if not training or running_mean is not None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    mean = input.mean(dim=dims, keepdim=True)
    var = input.var(dim=dims, unbiased=False, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out
