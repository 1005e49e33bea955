"""Batch normalisation as an explicit, recorded policy of the inner loop.

A policy says which statistics a model's batch-norm layers normalise with while tasks are
adapted and scored, and whether the stored statistics change. Every result records its policy's
name. Four policies:

* ``"batch"`` (:class:`BatchStatistics`), MAML's convention (Finn et al. 2017; cbfinn/maml#37):
  every forward pass normalises with the statistics of the batch at hand, support or query, at
  meta-train and meta-test time ("transductive": query statistics are used for the query);
* ``"frozen"`` (:class:`FrozenStatistics`): the running statistics stored in the model, as
  ``model.eval()`` would, never updated;
* ``"running"`` (:class:`RunningStatistics`), torch's own train/eval behaviour, for
  non-transductive evaluation: meta-training passes normalise with batch statistics *and*
  accumulate the running statistics; evaluation normalises with the accumulated statistics;
* ``"support"`` (:class:`SupportStatistics`), Ravi & Larochelle's (2017, §3.3): every task starts
  from fresh statistics, its support passes normalise with batch statistics and accumulate them,
  and its outer passes (:func:`metaopt.engine.step_context.outer_pass`) normalise with what the
  support set accumulated (no transduction).

Under ``"batch"`` and ``"frozen"`` a forward pass never writes to the model's statistics, so
adaptation leaves the model untouched and tasks may be batched by ``vmap``. ``"running"`` and
``"support"`` write statistics that the tasks share (:attr:`BatchNormPolicy.shares_statistics`),
so tasks run one after another.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> policy = batchnorm_policy("batch")
    >>> with policy.meta_batch(bn, training=True):
    ...     out = bn(torch.randn(8, 3))
    >>> int(bn.num_batches_tracked), policy.name
    (0, 'batch')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from metaopt.engine.functional import Params
from metaopt.engine.per_step_batchnorm import PerStepBatchNorm
from metaopt.engine.step_context import in_outer_pass

__all__ = ["POLICIES", "BatchNormPolicy", "BatchStatistics", "FrozenStatistics", "RunningStatistics",
           "SupportStatistics", "batchnorm_policy", "restored_statistics"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


@contextlib.contextmanager
def restored_statistics(model: nn.Module) -> Iterator[None]:
    """Put the training flags and statistics of ``model``'s batch-norm layers back as they were, on exit."""
    saved = [(m, m.training, {name: getattr(m, name) for name in _STATS}) for m in _layers(model)]
    try:
        yield
    finally:
        for m, training, stats in saved:
            m.training = training
            for name, value in stats.items():
                setattr(m, name, value)


class BatchNormPolicy:
    """How batch-norm layers normalise during adaptation and evaluation (see the module docs).

    Attributes:
        name: the name configs and results use.
        shares_statistics: forward passes write statistics shared by the tasks of a meta-batch, so
            tasks must run one after another (not under ``vmap``).
    """

    name: ClassVar[str]
    shares_statistics: ClassVar[bool] = False

    @contextlib.contextmanager
    def meta_batch(self, model: nn.Module, training: bool) -> Iterator[None]:
        """Run a meta-batch under the policy; ``training``: meta-training (not evaluation). Restores on exit."""
        with restored_statistics(model):
            for layer in _layers(model):
                self._prepare(layer, training)
            yield

    def _prepare(self, layer: nn.Module, training: bool) -> None:
        del layer, training

    def task(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """The context each task of a meta-batch runs in (none but under ``"support"``)."""
        del model
        return contextlib.nullcontext()

    def predictor(self, model: nn.Module, params: Params) -> tuple[Params, BatchNormPolicy]:
        """What an adapted predictor runs with after the task's adaptation: parameters (and buffers) and policy."""
        del model
        return params, self

    def __repr__(self) -> str:
        return f"batchnorm_policy({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(self.name)


def _needs_running_statistics(layer: nn.Module, policy: str) -> None:
    if layer.running_mean is None:
        raise ValueError(f"batch-norm policy {policy!r} needs running statistics, but {layer} has none "
                         "(track_running_stats=False); use policy 'batch'")


class BatchStatistics(BatchNormPolicy):
    """Normalise every pass with its own batch's statistics, never store any (MAML's convention)."""

    name = "batch"

    def _prepare(self, layer: nn.Module, training: bool) -> None:
        del training
        for name in _STATS:
            setattr(layer, name, None)


class FrozenStatistics(BatchNormPolicy):
    """Normalise with the model's stored running statistics; never update them."""

    name = "frozen"

    def _prepare(self, layer: nn.Module, training: bool) -> None:
        del training
        _needs_running_statistics(layer, self.name)
        layer.training = False


class RunningStatistics(BatchNormPolicy):
    """Torch's train/eval behaviour: meta-training accumulates running statistics, evaluation uses them."""

    name = "running"
    shares_statistics = True

    def _prepare(self, layer: nn.Module, training: bool) -> None:
        _needs_running_statistics(layer, self.name)
        layer.training = training


class SupportStatistics(BatchNormPolicy):
    """Per-task statistics accumulated by the support passes and used by the outer passes (Ravi & Larochelle)."""

    name = "support"
    shares_statistics = True

    @contextlib.contextmanager
    def task(self, model: nn.Module) -> Iterator[None]:
        """One task: fresh statistics (mean 0, variance 1) that support passes accumulate and outer passes use.

        The model's own statistics and modes are restored on exit. Statistics are written in
        place, so tasks must run one after another.
        """
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

        def set_mode(module: nn.Module, args: tuple) -> None:
            del args
            module.training = not in_outer_pass()

        hooks = []
        try:
            with restored_statistics(model):
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

    def predictor(self, model: nn.Module, params: Params) -> tuple[Params, BatchNormPolicy]:
        """The adapted parameters with the statistics the support set accumulated, used frozen."""
        statistics = {name: b.clone() for name, b in model.named_buffers()}
        return {**params, **statistics}, FrozenStatistics()


POLICIES: dict[str, type[BatchNormPolicy]] = {cls.name: cls for cls in (BatchStatistics, FrozenStatistics,
                                                                       RunningStatistics, SupportStatistics)}


def batchnorm_policy(policy: str | BatchNormPolicy) -> BatchNormPolicy:
    """The policy named ``policy`` (``"batch"``, ``"frozen"``, ``"running"``, ``"support"``), or ``policy`` itself."""
    if isinstance(policy, BatchNormPolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown batch-norm policy {policy!r}; choose one of {tuple(POLICIES)}")
    return POLICIES[policy]()
