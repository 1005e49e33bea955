"""Batch normalisation as an explicit, recorded policy of the inner loop.

MAML's convention (Finn et al. 2017; cbfinn/maml#37) normalises every forward pass with the
statistics of the batch at hand, support or query, at meta-train and at meta-test time: this is
:attr:`BatchNormPolicy.BATCH` ("transductive": query statistics are used for the query).
:attr:`BatchNormPolicy.FROZEN` normalises with the running statistics stored in the model,
as ``model.eval()`` would, and never updates them. Under these two a forward pass never writes to
the model's running statistics, so adaptation leaves the model untouched.

:attr:`BatchNormPolicy.RUNNING` is torch's own train/eval behaviour, for non-transductive
evaluation: meta-training passes normalise with batch statistics *and* accumulate the running
statistics; evaluation normalises with the accumulated statistics.

:attr:`BatchNormPolicy.SUPPORT` is Ravi & Larochelle's (2017, §3.3): every task starts from fresh
statistics, the support passes of the inner loop normalise with batch statistics and accumulate
them, and the query passes normalise with what the support set accumulated (no transduction).
The inner loop marks query passes with :func:`query_pass` and opens
:func:`episode_statistics` per task.

MAML++ (Antoniou et al. 2019, §4, "BNRS" and "BNWB") gives every inner step its own batch-norm
statistics and affine weights: :class:`PerStepBatchNorm` holds one row per step and reads the
step from :func:`inner_step`, which the inner loops set around every forward pass.

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
import contextvars
import enum
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["BatchNormPolicy", "PerStepBatchNorm", "batchnorm_policy", "composite_batch_norm", "current_inner_step",
           "episode_statistics", "in_query_pass", "inner_step", "per_step_batchnorm", "query_pass"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


class BatchNormPolicy(str, enum.Enum):
    """How batch-norm layers normalise during adaptation and evaluation."""

    BATCH = "batch"
    FROZEN = "frozen"
    RUNNING = "running"
    SUPPORT = "support"


@contextlib.contextmanager
def _restored(layers: list[nn.Module]) -> Iterator[None]:
    """Put the layers' training flags and statistics back as they were, on exit."""
    saved = [(m, m.training, {name: getattr(m, name) for name in _STATS}) for m in layers]
    try:
        yield
    finally:
        for m, training, stats in saved:
            m.training = training
            for name, value in stats.items():
                setattr(m, name, value)


@contextlib.contextmanager
def _setting(variable: contextvars.ContextVar, value: object) -> Iterator[None]:
    """``variable`` holds ``value`` inside the context."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


@contextlib.contextmanager
def batchnorm_policy(model: nn.Module, policy: BatchNormPolicy | str, update: bool = False) -> Iterator[None]:
    """Run ``model``'s batch-norm layers under ``policy``; everything is restored on exit.

    Args:
        update: :attr:`BatchNormPolicy.RUNNING` only: normalise with batch statistics and update
            the running statistics (meta-training) instead of normalising with them (evaluation).

    Under :attr:`BatchNormPolicy.SUPPORT` the layers are left as they are here; the inner loop
    runs each task inside :func:`episode_statistics`.
    """
    policy = BatchNormPolicy(policy)
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    with _restored(layers):
        for m in layers:
            if policy is BatchNormPolicy.BATCH:
                for name in _STATS:
                    setattr(m, name, None)
                continue
            if policy is BatchNormPolicy.SUPPORT:
                continue
            if m.running_mean is None:
                raise ValueError(f"batch-norm policy {policy.value!r} needs running statistics, but {m} has none "
                                 "(track_running_stats=False); use policy 'batch'")
            m.training = policy is BatchNormPolicy.RUNNING and update
        yield


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


_INNER_STEP: contextvars.ContextVar[int] = contextvars.ContextVar("metaopt_inner_step", default=0)


@contextlib.contextmanager
def inner_step(t: int) -> Iterator[None]:
    """Forward passes inside this context belong to inner step ``t`` (read by :class:`PerStepBatchNorm`).

    The inner loops use step ``t`` for the support pass that takes step ``t`` and for the query
    pass on the parameters that step produced (as MAML++'s official code does).
    """
    with _setting(_INNER_STEP, t):
        yield


def current_inner_step() -> int:
    """The inner step set by the innermost :func:`inner_step` context (0 outside any)."""
    return _INNER_STEP.get()


class PerStepBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm with running statistics and/or affine weights per inner step (MAML++ BNRS / BNWB).

    Antoniou et al. 2019, "How to train your MAML", §4: per-step batch-norm running statistics
    (BNRS) and per-step batch-norm weights and biases (BNWB). Statistics and weights that are per
    step have a leading dimension ``steps``; a forward pass uses row ``min(t, steps - 1)`` for
    inner step ``t`` (:func:`inner_step`). So evaluation with more inner steps than training
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


_QUERY_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar("metaopt_query_pass", default=False)


@contextlib.contextmanager
def query_pass() -> Iterator[None]:
    """Forward passes inside this context score a query set (read by :func:`episode_statistics`)."""
    with _setting(_QUERY_PASS, True):
        yield


def in_query_pass() -> bool:
    """Whether the current forward pass scores a query set (:func:`query_pass`)."""
    return _QUERY_PASS.get()


@contextlib.contextmanager
def episode_statistics(model: nn.Module) -> Iterator[None]:
    """One task under :attr:`BatchNormPolicy.SUPPORT` (Ravi & Larochelle 2017, §3.3).

    Every batch-norm layer starts from fresh running statistics (mean 0, variance 1); support
    passes normalise with batch statistics and accumulate them (with the layer's momentum), query
    passes (:func:`query_pass`) normalise with the accumulated statistics. The model's own
    statistics and modes are restored on exit. Shared statistics are written in place, so tasks
    must run one after another (the ``"loop"`` strategy).
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def set_mode(module: nn.Module, args: tuple) -> None:
        del args
        module.training = not in_query_pass()

    hooks = []
    try:
        with _restored(layers):
            for m in layers:
                like = next((t for t in (m.weight, m.running_mean) if t is not None), torch.empty(0))
                per_step = isinstance(m, PerStepBatchNorm) and m.per_step_stats
                shape = (m.steps, m.num_features) if per_step else (m.num_features,)
                m.running_mean = torch.zeros(shape, dtype=like.dtype, device=like.device)
                m.running_var = torch.ones(shape, dtype=like.dtype, device=like.device)
                m.num_batches_tracked = torch.zeros((), dtype=torch.long, device=like.device)
                hooks.append(m.register_forward_pre_hook(set_mode))
            yield
    finally:
        for hook in hooks:
            hook.remove()
