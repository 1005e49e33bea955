"""Task batching: run one function over the tasks of a meta-batch, by a loop or by ``torch.func.vmap``.

Two strategies give the same results to rounding error:

* ``"loop"``: one task after another, gradients by :func:`torch.autograd.grad` (fastest for
  convolutional networks on a CPU);
* ``"vmap"``: one batched computation through :func:`torch.func.vmap` and :func:`torch.func.grad`
  (few, large kernels: the GPU path; also faster for small MLPs on a CPU). Batch norm then runs
  from elementary operations (:mod:`metaopt.engine.composite_batchnorm`);
* ``"compiled"``: the ``vmap`` computation and its meta-gradient compiled into one graph by
  ``torch.compile`` (:mod:`metaopt.engine.compiled`; the meta-learner runs it, and ``vmap`` where
  no gradient is taken). Here it is :func:`map_tasks`'s ``"vmap"``.

``"auto"`` is ``vmap`` on CUDA and ``loop`` elsewhere, and ``loop`` wherever tasks cannot be
batched; :func:`resolve_strategy` is the one place that decides. A training run replaces an
``"auto"`` learner's strategy before it starts by the fastest one on its first batch
(:mod:`metaopt.training.strategy_probe`).

Example:
    >>> import torch
    >>> def task(x, functional):
    ...     return (x.sum(),)
    >>> map_tasks(task, (torch.ones(3, 2),), "vmap")
    (tensor([2., 2., 2.]),)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from metaopt.engine.composite_batchnorm import composite_batch_norm

__all__ = ["STRATEGIES", "map_tasks", "resolve_strategy"]

STRATEGIES = ("auto", "loop", "vmap", "compiled")


def resolve_strategy(strategy: str, device: torch.device, loop_only: str | None = None) -> str:
    """The strategy to run: ``"auto"`` becomes ``"vmap"`` on CUDA and ``"loop"`` elsewhere.

    Args:
        strategy: ``"auto"``, ``"loop"``, ``"vmap"`` or ``"compiled"``.
        device: where the tasks run.
        loop_only: why the tasks must run one after another (``None``: they may be batched);
            ``"auto"`` then means ``"loop"``, and ``"vmap"`` or ``"compiled"`` is an error quoting the reason.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown task-batching strategy {strategy!r}; choose one of {STRATEGIES}")
    if loop_only is not None:
        if strategy in ("vmap", "compiled"):
            raise ValueError(f"strategy={strategy!r} is not available: {loop_only}; use strategy='loop' (or 'auto')")
        return "loop"
    if strategy == "auto":
        return "vmap" if device.type == "cuda" else "loop"
    return strategy


def map_tasks(task: Callable[..., tuple[torch.Tensor, ...]], tensors: Sequence[torch.Tensor],
              strategy: str) -> tuple[torch.Tensor, ...]:
    """``task(*slices, functional=...)`` on every task's slices of ``tensors`` (leading task dimension), stacked.

    ``functional`` is ``True`` under ``vmap``: the task must then take its gradients with
    :func:`torch.func.grad` (see :meth:`metaopt.engine.inner.InnerLoop.unroll`).
    """
    if strategy == "loop":
        per_task = [task(*slices, functional=False) for slices in zip(*tensors)]
        return tuple(torch.stack(parts) for parts in zip(*per_task))
    with composite_batch_norm():
        return torch.func.vmap(lambda *slices: task(*slices, functional=True), randomness="different")(*tensors)
