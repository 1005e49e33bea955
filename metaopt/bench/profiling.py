"""Measure meta-training: throughput, peak memory and dispatched operators of MAML implementations.

Every measure here is of *one meta-iteration*: the meta-loss of a batch of ``T`` tasks, its
backward pass and an Adam step on the meta-parameters. The implementations (``METHODS``) start
from the same initial parameters and see the same batch, so their meta-gradients can be compared:

* ``"plain"``: the reference peer, a per-task loop written directly with
  :func:`torch.func.functional_call` and :func:`torch.autograd.grad`;
* ``"loop"`` and ``"vmap"``: :class:`metaopt.MetaLearner` (func driver) with either strategy;
* ``"checkpointed"``: ``"loop"`` with ``checkpoint_steps=True`` (inner steps recomputed);
* ``"higher"``: :class:`metaopt.MetaLearner` with the ``higher`` driver;
* ``"learn2learn"``: ``l2l.algorithms.MAML`` with ``clone()`` and ``adapt()``, when it imports.

Three measures:

* **time**: the median over ``repeats`` meta-iterations, after a first one that is not timed;
* **peak memory**, two ways, in a fresh Python process per measurement (:func:`measure_isolated`)
  so that nothing else has lived in it. *Peak RSS*: how far the resident set of the process grows
  during its first meta-iteration, what it takes from the OS (allocator caches and the one-time
  buffers of a first call included). On Linux the kernel's high-water mark ``VmHWM`` is reset to
  the current size just before (``/proc/self/clear_refs``) and read just after. ``ru_maxrss``
  is not used there: a process started by :mod:`subprocess` inherits its parent's high-water mark
  in it and cannot lower it. Without ``/proc``, the growth of ``ru_maxrss`` is reported, marked
  ``>=`` (a lower bound). *Peak tensors*: the peak of live tensor memory during one later
  meta-iteration above its start, summed from the allocation events of :mod:`torch.profiler`;
  repeatable, but blind to memory that is not a tensor;
* **operators**: the number of ATen operators dispatched (:func:`count_ops`), the cost proxy for
  a GPU, where a loop over small per-task kernels is bound by launches: a per-task loop dispatches
  about ``T`` times the operators of one task, ``vmap`` the same number for any ``T``.

:func:`run_benchmark` runs all of it and writes Markdown tables (``scripts/benchmark.py``).

Example:
    >>> import torch
    >>> count_ops(lambda: torch.ones(3).add(1))
    2
    >>> print(markdown_table(["method", "tasks/s"], [["plain", 13.0]]))
    | method | tasks/s |
    |---|---|
    | plain | 13.0 |
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from metaopt.episode import Episode
from metaopt.meta_learner import MetaLearner
from metaopt.models import Conv4
from metaopt.rules import sgd

__all__ = [
    "METHODS",
    "Measurement",
    "OpCounter",
    "Workload",
    "build_meta_loss",
    "count_ops",
    "iteration_op_count",
    "learn2learn_unavailable",
    "markdown_table",
    "max_abs_difference",
    "measure",
    "measure_isolated",
    "peak_tensor_bytes",
    "run_benchmark",
]

#: MetaLearner options of the metaopt implementations.
_METAOPT = {
    "loop": {"strategy": "loop"},
    "vmap": {"strategy": "vmap"},
    "checkpointed": {"strategy": "loop", "checkpoint_steps": True},
    "higher": {"driver": "higher", "strategy": "loop"},
}
METHODS = ("plain", *_METAOPT, "learn2learn")
_MIB = 2.0**20


@dataclass(frozen=True)
class Workload:
    """A MAML meta-training problem: N-way K-shot episodes of random images for a Conv4.

    Random inputs of the right shape cost what real ones do (no operator here depends on pixel
    values), so no data set is needed. Model and batch are functions of ``seed``.

    Attributes:
        ways, shots, query: classes per task, support and query examples per class.
        tasks: tasks per meta-batch (``T``).
        inner_steps: SGD steps of the inner loop.
        first_order: drop the second-order terms of the meta-gradient.
        hidden: filters of each Conv4 convolution (64 for Omniglot).
        image_size: side of the square one-channel images (28 for Omniglot).
        inner_lr: inner SGD step size (MAML's 0.4 for Omniglot).
        seed: seeds the model's initial parameters and the batch.
    """

    ways: int = 5
    shots: int = 1
    query: int = 15
    tasks: int = 16
    inner_steps: int = 1
    first_order: bool = False
    hidden: int = 64
    image_size: int = 28
    inner_lr: float = 0.4
    seed: int = 0

    @property
    def label(self) -> str:
        """``"5-way 1-shot"`` and the like."""
        return f"{self.ways}-way {self.shots}-shot"

    @property
    def order(self) -> str:
        """``"first"`` or ``"second"``: the order of the meta-gradient."""
        return "first" if self.first_order else "second"

    def model(self) -> Conv4:
        """A freshly initialised Conv4 (the same parameters for the same seed)."""
        torch.manual_seed(self.seed)
        return Conv4(in_channels=1, num_classes=self.ways, hidden=self.hidden, image_size=self.image_size)

    def batch(self) -> Episode:
        """``tasks`` episodes of random images, labels class by class."""
        g = torch.Generator().manual_seed(self.seed)
        labels = torch.arange(self.ways)
        shape = (self.tasks, -1, 1, self.image_size, self.image_size)
        support = torch.rand(self.tasks * self.ways * self.shots, 1, self.image_size, self.image_size, generator=g)
        query = torch.rand(self.tasks * self.ways * self.query, 1, self.image_size, self.image_size, generator=g)
        return Episode(support.view(shape), labels.repeat_interleave(self.shots).repeat(self.tasks, 1),
                       query.view(shape), labels.repeat_interleave(self.query).repeat(self.tasks, 1), batched=True)


def learn2learn_unavailable() -> str | None:
    """Why ``import learn2learn`` fails here, or ``None`` when it imports."""
    try:
        import learn2learn  # noqa: F401
    except Exception as error:  # missing, or installed but broken on this Python: report either
        return f"{type(error).__name__}: {error}"
    return None


def _plain_meta_loss(model: nn.Module, batch: Episode, workload: Workload) -> Callable[[], torch.Tensor]:
    """MAML as one writes it without a library: functional_call and autograd.grad, task after task."""
    params = dict(model.named_parameters())

    def meta_loss() -> torch.Tensor:
        losses = []
        for sx, sy, qx, qy in zip(*batch.tensors()):
            fast = params
            for _ in range(workload.inner_steps):
                inner = F.cross_entropy(torch.func.functional_call(model, fast, (sx,)), sy)
                grads = torch.autograd.grad(inner, list(fast.values()), create_graph=not workload.first_order)
                fast = {name: p - workload.inner_lr * g for (name, p), g in zip(fast.items(), grads)}
            losses.append(F.cross_entropy(torch.func.functional_call(model, fast, (qx,)), qy))
        return torch.stack(losses).mean()

    return meta_loss


def _learn2learn_meta_loss(model: nn.Module, batch: Episode, workload: Workload) -> Callable[[], torch.Tensor]:
    """MAML the learn2learn way: ``clone()`` the wrapped model per task and ``adapt()`` it."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=workload.inner_lr, first_order=workload.first_order)

    def meta_loss() -> torch.Tensor:
        losses = []
        for sx, sy, qx, qy in zip(*batch.tensors()):
            learner = maml.clone()
            for _ in range(workload.inner_steps):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            losses.append(F.cross_entropy(learner(qx), qy))
        return torch.stack(losses).mean()

    return meta_loss


def build_meta_loss(method: str, workload: Workload) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The model whose parameters are meta-learned, and a closure: the meta-loss of ``workload.batch()``.

    Batch norm normalises with the statistics of the batch at hand in every method (MAML's
    convention): the metaopt learners by their ``"batch"`` policy, the others by running the model
    in training mode (which also updates its running statistics, without effect on the result).
    """
    model, batch = workload.model(), workload.batch()
    if method == "plain":
        return model, _plain_meta_loss(model, batch, workload)
    if method == "learn2learn":
        return model, _learn2learn_meta_loss(model, batch, workload)
    if method not in _METAOPT:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    learner = MetaLearner(model, sgd(workload.inner_lr), inner_steps=workload.inner_steps,
                          first_order=workload.first_order, **_METAOPT[method])
    return model, lambda: learner.meta_loss(batch)[0]


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
    :func:`measure_isolated` for a clean figure.

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


_CHILD = "import sys; from metaopt.profiling import _measure_child; _measure_child(sys.stdin.read())"


def _measure_child(spec: str) -> None:
    """Entry point of the subprocess of :func:`measure_isolated`."""
    options = json.loads(spec)
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    measurement, grads = measure(options["method"], Workload(**options["workload"]), options["repeats"])
    torch.save(grads, options["grads"])
    print(json.dumps(asdict(measurement)))


def measure_isolated(method: str, workload: Workload, repeats: int = 3,
                     threads: int | None = None) -> tuple[Measurement, list[torch.Tensor]]:
    """:func:`measure` in a fresh Python process (so that its peak RSS is the meta-iteration's own).

    Args:
        threads: intra-op threads of the subprocess (default: torch's default).

    Raises:
        RuntimeError: the subprocess failed; the message ends with its error output.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "grads.pt")
        spec = {"method": method, "workload": asdict(workload), "repeats": repeats, "threads": threads,
                "grads": path}
        done = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(spec), capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {method!r} on {workload} failed in its subprocess:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        grads = torch.load(path)
    return Measurement(**result), grads


def max_abs_difference(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    """The largest absolute difference between corresponding tensors of two equally long lists."""
    if len(actual) != len(expected):
        raise ValueError(f"{len(actual)} tensors compared with {len(expected)}")
    return max((a - e).abs().max().item() for a, e in zip(actual, expected))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table with one line per row (cells formatted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _mib(nbytes: int, exact: bool = True) -> str:
    return f"{'' if exact else '>= '}{nbytes / _MIB:.1f}"


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference > 0 else "n/a"


def _environment(threads: int | None) -> str:
    names = [line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0] if names else platform.processor() or "unknown CPU"
    return (f"torch {torch.__version__}, Python {platform.python_version()}, {cpu}, {os.cpu_count()} cores, "
            f"{threads or torch.get_num_threads()} intra-op threads, load average {os.getloadavg()[0]:.2f}")


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as file:
            return file.read().splitlines()
    except OSError:
        return []


def _throughput_section(workloads: Sequence[Workload], repeats: int, threads: int | None) -> str:
    l2l_missing = learn2learn_unavailable()
    rows = []
    for workload in workloads:
        reference, reference_grads = measure_isolated("plain", workload, repeats, threads)
        for method in ("plain", "loop", "vmap", "higher", "learn2learn"):
            head = [workload.label, workload.order, method]
            if method == "learn2learn" and l2l_missing:
                rows.append([*head, f"not available ({l2l_missing})", "", "", "", "", "", ""])
                continue
            if method == "plain":
                found, grads = reference, reference_grads
            else:
                found, grads = measure_isolated(method, workload, repeats, threads)
            speed, reference_speed = found.tasks_per_second(workload.tasks), reference.tasks_per_second(workload.tasks)
            rows.append([*head, f"{speed:.2f}", _ratio(speed, reference_speed),
                         _mib(found.peak_rss, found.rss_exact), _ratio(found.peak_rss, reference.peak_rss),
                         _mib(found.peak_tensors), _ratio(found.peak_tensors, reference.peak_tensors),
                         f"{max_abs_difference(grads, reference_grads):.1e}"])
    headers = ["setting", "order", "method", "tasks/s", "vs plain", "peak RSS (MiB)", "vs plain",
               "peak tensors (MiB)", "vs plain", "max abs diff of meta-grads vs plain"]
    return markdown_table(headers, rows)


def _op_count_section(workload: Workload, task_counts: Sequence[int]) -> str:
    rows = []
    for tasks in task_counts:
        loop, vmap = (iteration_op_count(method, replace(workload, tasks=tasks)) for method in ("loop", "vmap"))
        rows.append([tasks, loop, vmap, _ratio(loop, vmap)])
    return markdown_table(["tasks T", "loop: ATen ops", "vmap: ATen ops", "loop / vmap"], rows)


def _steps_section(workload: Workload, step_counts: Sequence[int], repeats: int, threads: int | None) -> str:
    rows = []
    for steps in step_counts:
        stored, stored_grads = measure_isolated("loop", replace(workload, inner_steps=steps), repeats, threads)
        recomputed, grads = measure_isolated("checkpointed", replace(workload, inner_steps=steps), repeats, threads)
        times = [statistics.median(m.seconds) for m in (stored, recomputed)]
        rows.append([steps, f"{times[0]:.3f}", f"{times[1]:.3f}", _ratio(times[1], times[0]),
                     _mib(stored.peak_rss, stored.rss_exact), _mib(recomputed.peak_rss, recomputed.rss_exact),
                     _ratio(recomputed.peak_rss, stored.peak_rss), _mib(stored.peak_tensors),
                     _mib(recomputed.peak_tensors), _ratio(recomputed.peak_tensors, stored.peak_tensors),
                     f"{max_abs_difference(grads, stored_grads):.1e}"])
    headers = ["inner steps", "s/iteration stored", "s/iteration recomputed", "ratio", "peak RSS stored (MiB)",
               "peak RSS recomputed (MiB)", "ratio", "peak tensors stored (MiB)", "peak tensors recomputed (MiB)",
               "ratio", "max abs diff of meta-grads"]
    return markdown_table(headers, rows)


def run_benchmark(tasks: int = 16, repeats: int = 3, threads: int | None = None, quick: bool = False,
                  sweep_tasks: int = 4, write: Callable[[str], Any] = print) -> None:
    """Measure the three things the README reports and ``write`` them as Markdown, section by section.

    1. Meta-training throughput and peak memory of Omniglot-shaped 5-way and 20-way 1-shot MAML
       (Conv4 with 64 filters, 28x28 images, 15 queries per class, one inner step), second and
       first order, for each method of ``METHODS`` but ``"checkpointed"``, as ratios to the plain
       loop, with the largest difference of each method's meta-gradients from the plain loop's.
    2. ATen operators dispatched per meta-iteration for T = 1, 8, 32 tasks, loop versus vmap.
    3. Time and peak memory of second-order 5-way 1-shot MAML with 5, 10, 25 and 50 inner steps,
       inner steps stored versus recomputed (``checkpoint_steps``).

    Args:
        tasks: meta-batch size of section 1.
        repeats: timed meta-iterations per measurement (the median is reported).
        threads: intra-op threads (default: torch's default; one with ``quick``).
        quick: tiny sizes (8 filters, 2 queries per class, 2 tasks) and fewer rows: a smoke run.
        sweep_tasks: meta-batch size of section 3 (its memory grows with tasks times steps).
        write: receives each piece of Markdown as soon as it is measured.
    """
    base = Workload(tasks=tasks)
    task_counts, step_counts = (1, 8, 32), (5, 10, 25, 50)
    if quick:  # tiny tensors gain nothing from threads, and lose much when a thread waits for a busy core
        base, repeats, sweep_tasks, threads = replace(base, tasks=2, hidden=8, query=2), 1, 2, threads or 1
        task_counts, step_counts = (1, 2, 4), (2, 8)
    if threads:
        torch.set_num_threads(threads)
    write(f"Environment: {_environment(threads)}.\n")
    write(f"## 1. Meta-training throughput and peak memory ({base.tasks} tasks per meta-batch, Conv4 with "
          f"{base.hidden} filters, {base.image_size}x{base.image_size} images, {base.query} queries per class, "
          f"{base.inner_steps} inner step; median of {repeats} iterations)\n")
    workloads = [replace(base, ways=ways, first_order=first_order) for ways in (5, 20) for first_order in (False, True)]
    write(_throughput_section(workloads, repeats, threads) + "\n")
    write("Each row is measured in a fresh process. Peak RSS: growth of its resident set during the first "
          "meta-iteration (kernel high-water mark reset just before). Peak tensors: peak of live tensor memory "
          "during a later meta-iteration, from torch.profiler's allocation events. Both exclude what was allocated "
          "before the meta-iteration (model, batch).\n")
    write("## 2. ATen operators dispatched per meta-iteration (5-way 1-shot, second order)\n")
    write(_op_count_section(base, task_counts) + "\n")
    write(f"## 3. Second-order memory: inner steps stored vs recomputed (5-way 1-shot, {sweep_tasks} tasks)\n")
    write(_steps_section(replace(base, tasks=sweep_tasks), step_counts, repeats, threads) + "\n")
    write(f"Load average at the end: {os.getloadavg()[0]:.2f}.")
