"""Batch normalisation as an explicit, recorded policy of the inner loop.

MAML's convention (Finn et al. 2017; cbfinn/maml#37) normalises every forward pass with the
statistics of the batch at hand, support or query, at meta-train and at meta-test time: this is
:attr:`BatchNormPolicy.BATCH` ("transductive": query statistics are used for the query).
:attr:`BatchNormPolicy.FROZEN` normalises with the running statistics stored in the model,
as ``model.eval()`` would, and never updates them.

Under either policy a forward pass never writes to the model's running statistics, so
adaptation leaves the model untouched.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> with batchnorm_policy(bn, "batch"):
    ...     out = bn(torch.randn(8, 3))
    >>> int(bn.num_batches_tracked)
    0
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["BatchNormPolicy", "batchnorm_policy", "composite_batch_norm"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


class BatchNormPolicy(str, enum.Enum):
    """How batch-norm layers normalise during adaptation and evaluation."""

    BATCH = "batch"
    FROZEN = "frozen"


@contextlib.contextmanager
def batchnorm_policy(model: nn.Module, policy: BatchNormPolicy | str) -> Iterator[None]:
    """Run ``model``'s batch-norm layers under ``policy``; everything is restored on exit."""
    policy = BatchNormPolicy(policy)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [(m, m.training, {name: getattr(m, name) for name in _STATS}) for m in layers]
    try:
        for m in layers:
            if policy is BatchNormPolicy.BATCH:
                for name in _STATS:
                    setattr(m, name, None)
            else:
                if m.running_mean is None:
                    raise ValueError(f"batch-norm policy 'frozen' needs running statistics, but {m} has none "
                                     "(track_running_stats=False); use policy 'batch'")
                m.training = False
        yield
    finally:
        for m, training, stats in saved:
            m.training = training
            for name, value in stats.items():
                setattr(m, name, value)


class composite_batch_norm(TorchFunctionMode):  # noqa: N801  (used like a function: `with composite_batch_norm():`)
    """Compute batch-statistics batch norm from elementary ops (mean, var, rsqrt).

    ``torch.func.vmap`` gives wrong *second-order* gradients through the fused batch-norm
    kernel in training mode (checked against a per-task loop and finite differences with
    torch 2.14; first-order is right; see pytorch/functorch#534, the batch-norm backward batching
    rule). The vmap driver runs under this mode so that its meta-gradients equal the loop's.
    Calls with running statistics pass through unchanged.
    """

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
