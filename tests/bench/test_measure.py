"""The measurement helpers: operator counts, time and memory records, comparison of meta-gradients."""

from __future__ import annotations

import sys

import pytest
import torch

from metaopt.bench.measure import (
    Measurement,
    OpCounter,
    count_ops,
    iteration_op_count,
    max_abs_difference,
    measure,
    peak_tensor_bytes,
)
from metaopt.bench.workloads import Workload
from tests.bench.helpers import TINY, meta_gradients


def test_vmap_dispatches_as_many_operators_for_any_number_of_tasks() -> None:
    loop = {tasks: iteration_op_count("loop", Workload(tasks=tasks, query=1, hidden=4)) for tasks in (1, 2, 4)}
    vmap = {tasks: iteration_op_count("vmap", Workload(tasks=tasks, query=1, hidden=4)) for tasks in (1, 2, 4)}
    assert vmap[2] == vmap[4]
    assert abs(vmap[1] - vmap[2]) < 0.05 * vmap[2]  # a size-one task dimension saves a few copies
    per_task = loop[2] - loop[1]  # each task dispatches its own operators, the Adam step a fixed number
    assert loop[4] - loop[2] == 2 * per_task and per_task > 0.5 * loop[1]
    assert loop[4] > 2 * vmap[4]


def test_measure_records_time_memory_and_the_first_meta_gradients() -> None:
    found, grads = measure("loop", TINY, repeats=2)
    assert found.method == "loop" and len(found.seconds) == 2 and min(found.seconds) > 0
    assert found.peak_tensors > 0 and found.tasks_per_second(TINY.tasks) > 0
    assert found.rss_exact == sys.platform.startswith("linux")
    assert max_abs_difference(grads, meta_gradients("loop", TINY)) == 0


def test_tasks_per_second_uses_the_median_time() -> None:
    found = Measurement("plain", [0.5, 4.0, 0.25], peak_rss=0, rss_exact=True, peak_tensors=0)
    assert found.tasks_per_second(16) == 32.0


def test_peak_tensor_bytes_and_count_ops_see_what_runs() -> None:
    def temporary() -> torch.Tensor:
        return (torch.ones(2**18) * 2).sum()  # two 1 MiB temporaries alive at once

    assert 2 * 2**20 <= peak_tensor_bytes(temporary) < 3 * 2**20
    assert count_ops(temporary) == 3
    with OpCounter() as counter:
        temporary()
        temporary()
    assert counter.count == 6


def test_max_abs_difference_compares_equally_long_lists() -> None:
    assert max_abs_difference([torch.zeros(2), torch.ones(3)], [torch.tensor([0.0, -0.25]), torch.ones(3)]) == 0.25
    with pytest.raises(ValueError, match="2 tensors compared with 1"):
        max_abs_difference([torch.ones(1)] * 2, [torch.ones(1)])
