"""The benchmark report: what ``metaopt bench`` (``scripts/benchmark.py``) prints, as Markdown tables.

:func:`run_benchmark` measures the workloads of :mod:`metaopt.bench.workloads` with
:mod:`metaopt.bench.measure` (each throughput and memory row in a fresh process,
:func:`metaopt.bench.isolated.measure_isolated`) and writes, after a line describing the
environment (torch, Python, CPU, cores, threads, load), three sections: meta-training throughput
and peak memory against the plain loop, ATen operators per meta-iteration (loop versus vmap),
and second-order memory with inner steps stored versus recomputed. Ratios are taken within the
run, so that they hold on the machine at hand.

Example:
    >>> print(markdown_table(["method", "tasks/s"], [["plain", 13.0]]))
    | method | tasks/s |
    |---|---|
    | plain | 13.0 |
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch

from metaopt.bench.isolated import measure_isolated
from metaopt.bench.measure import iteration_op_count, max_abs_difference
from metaopt.bench.workloads import Workload, learn2learn_unavailable

__all__ = ["markdown_table", "run_benchmark"]

_MIB = 2.0**20


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
        for method in ("plain", "loop", "vmap", "compiled", "higher", "learn2learn"):
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
