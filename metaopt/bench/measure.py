"""Measure one meta-iteration of a workload (:mod:`metaopt.bench.workloads`): time, peak memory, operators.

Three measures:

* **time**: the median over ``repeats`` meta-iterations, after a first one that is not timed;
* **peak memory**, two ways. *Peak RSS*: how far the resident set of the process grows during
  its first meta-iteration, what it takes from the OS (allocator caches and the one-time buffers
  of a first call included); it is clean only in a fresh Python process where nothing else has
  lived (:func:`metaopt.bench.isolated.measure_isolated`). On Linux the kernel's high-water mark
  ``VmHWM`` is reset to the current size just before (``/proc/self/clear_refs``) and read just
  after. ``ru_maxrss`` is not used there: a process started by :mod:`subprocess` inherits its
  parent's high-water mark in it and cannot lower it. Without ``/proc``, the growth of
  ``ru_maxrss`` is reported, marked ``>=`` (a lower bound). *Peak tensors*: the peak of live
  tensor memory during one later meta-iteration above its start, summed from the allocation
  events of :mod:`torch.profiler`; repeatable, but blind to memory that is not a tensor;
* **operators**: the number of ATen operators dispatched (:func:`count_ops`), the cost proxy for
  a GPU, where a loop over small per-task kernels is bound by launches: a per-task loop dispatches
  about ``T`` times the operators of one task, ``vmap`` the same number for any ``T``.

:func:`max_abs_difference` compares the meta-gradients that two implementations give.

Example:
    >>> import torch
    >>> count_ops(lambda: torch.ones(3).add(1))
    2
    >>> max_abs_difference([torch.ones(2)], [torch.tensor([1.0, 0.5])])
    0.5
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from metaopt.bench.workloads import Workload, build_meta_loss

__all__ = ["Measurement", "OpCounter", "count_ops", "iteration_op_count", "max_abs_difference", "measure",
           "peak_tensor_bytes"]


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while it is active (views and copies included).

    Under :func:`torch.func.vmap` it sees the batched operators that actually run: about one per
    operator of the per-task program, whatever the number of tasks (a task dimension of size one
    saves a few copies).
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    """The number of ATen operators that ``fn()`` dispatches."""
    with OpCounter() as counter:
        fn()
    return counter.count


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU tensor memory while ``fn()`` runs, above the memory live when it starts.

    Summed in time order from the allocation and release events of :mod:`torch.profiler`.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _max_rss_bytes() -> int:
    """The process's resident-set high-water mark (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return high if sys.platform == "darwin" else high * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark to the current size (Linux); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _rss_status() -> tuple[int, int]:
    """The resident set size now and its high-water mark (``VmRSS``, ``VmHWM``), in bytes (Linux)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith(("VmRSS", "VmHWM")))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _peak_rss_growth(fn: Callable[[], object]) -> tuple[int, bool]:
    """How far the resident set grows above its size at the start while ``fn()`` runs, and whether exactly.

    Exact on Linux (``VmHWM`` reset first). Elsewhere, the growth of ``ru_maxrss`` above the
    process's earlier high-water mark: a lower bound.
    """
    gc.collect()
    if _reset_peak_rss():
        start, _ = _rss_status()
        fn()
        return _rss_status()[1] - start, True
    start = _max_rss_bytes()
    fn()
    return _max_rss_bytes() - start, False


@dataclass(frozen=True)
class Measurement:
    """What :func:`measure` found for one method on one workload.

    Attributes:
        method: the implementation measured (one of ``METHODS``).
        seconds: wall time of each timed meta-iteration.
        peak_rss: growth of the resident set during the first meta-iteration.
        rss_exact: ``peak_rss`` is exact (Linux), not a lower bound.
        peak_tensors: peak of live tensor memory during one meta-iteration above its start.
    """

    method: str
    seconds: list[float]
    peak_rss: int
    rss_exact: bool
    peak_tensors: int

    def tasks_per_second(self, tasks: int) -> float:
        """Throughput of a meta-batch of ``tasks`` tasks at the median time per meta-iteration."""
        return tasks / statistics.median(self.seconds)


def _meta_iteration(model: nn.Module, meta_loss: Callable[[], torch.Tensor]) -> Callable[..., None]:
    """One meta-iteration (meta-loss, backward, Adam step); it copies the meta-gradients into ``grads`` if given."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def iteration(grads: list[torch.Tensor] | None = None) -> None:
        optimizer.zero_grad()
        meta_loss().backward()
        if grads is not None:
            grads.extend(p.grad.detach().clone() for p in model.parameters())
        optimizer.step()

    return iteration


def iteration_op_count(method: str, workload: Workload) -> int:
    """ATen operators that one meta-iteration of ``method`` dispatches (after a first that creates Adam's state)."""
    iteration = _meta_iteration(*build_meta_loss(method, workload))
    iteration()
    return count_ops(iteration)


def measure(method: str, workload: Workload, repeats: int = 3) -> tuple[Measurement, list[torch.Tensor]]:
    """Time, memory and meta-gradients of ``method`` on ``workload``, in this process.

    The first meta-iteration gives the peak RSS and the meta-gradients (before its Adam step);
    ``repeats`` more are timed and one last is profiled for tensor memory. In a process that has
    done other work, memory that the allocator kept from it hides part of the RSS growth: use
    :func:`metaopt.bench.isolated.measure_isolated` for a clean figure.

    Returns:
        The measurement and the meta-gradients of the first meta-iteration, in the order of
        ``model.parameters()``.
    """
    iteration = _meta_iteration(*build_meta_loss(method, workload))
    grads: list[torch.Tensor] = []
    peak_rss, rss_exact = _peak_rss_growth(lambda: iteration(grads))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        iteration()
        seconds.append(time.perf_counter() - start)
    return Measurement(method, seconds, peak_rss, rss_exact, peak_tensor_bytes(iteration)), grads


def max_abs_difference(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between corresponding tensors of two equally long lists."""
    if len(actual) != len(expected):
        raise ValueError(f"{len(actual)} tensors compared with {len(expected)}")
    return max((a - e).abs().max().item() for a, e in zip(actual, expected))
