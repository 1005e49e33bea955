"""The measurement helpers: operator counts, agreement of the implementations, time and memory records."""

from __future__ import annotations

import sys

import pytest
import torch

from metaopt.profiling import (
    METHODS,
    Workload,
    build_meta_loss,
    count_ops,
    iteration_op_count,
    learn2learn_unavailable,
    max_abs_difference,
    measure,
    measure_isolated,
    peak_tensor_bytes,
)

TINY = Workload(tasks=2, query=1, hidden=4)
AVAILABLE = [m for m in METHODS if m != "learn2learn" or learn2learn_unavailable() is None]


def meta_gradients(method: str, workload: Workload) -> list[torch.Tensor]:
    model, meta_loss = build_meta_loss(method, workload)
    return list(torch.autograd.grad(meta_loss(), list(model.parameters())))


def test_vmap_dispatches_as_many_operators_for_any_number_of_tasks() -> None:
    loop = {tasks: iteration_op_count("loop", Workload(tasks=tasks, query=1, hidden=4)) for tasks in (1, 2, 4)}
    vmap = {tasks: iteration_op_count("vmap", Workload(tasks=tasks, query=1, hidden=4)) for tasks in (1, 2, 4)}
    assert vmap[2] == vmap[4]
    assert abs(vmap[1] - vmap[2]) < 0.05 * vmap[2]  # a size-one task dimension saves a few copies
    per_task = loop[2] - loop[1]  # each task dispatches its own operators, the Adam step a fixed number
    assert loop[4] - loop[2] == 2 * per_task and per_task > 0.5 * loop[1]
    assert loop[4] > 2 * vmap[4]


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_every_method_gives_the_plain_loops_meta_gradients(first_order: bool) -> None:
    workload = Workload(tasks=2, query=1, hidden=4, inner_steps=2, first_order=first_order)
    expected = meta_gradients("plain", workload)
    for method in AVAILABLE:
        assert max_abs_difference(meta_gradients(method, workload), expected) < 1e-5, method
    first_order_gap = max_abs_difference(meta_gradients("plain", Workload(tasks=2, query=1, hidden=4, inner_steps=2,
                                                                            first_order=not first_order)), expected)
    assert first_order_gap > 1e-4, "the two orders must differ here, or the comparison proves nothing"


def test_measure_records_time_memory_and_the_first_meta_gradients() -> None:
    found, grads = measure("loop", TINY, repeats=2)
    assert found.method == "loop" and len(found.seconds) == 2 and min(found.seconds) > 0
    assert found.peak_tensors > 0 and found.tasks_per_second(TINY.tasks) > 0
    assert found.rss_exact == sys.platform.startswith("linux")
    assert max_abs_difference(grads, meta_gradients("loop", TINY)) == 0


def test_measure_isolated_runs_the_same_measurement_in_a_fresh_process() -> None:
    found, grads = measure_isolated("plain", TINY, repeats=1, threads=1)
    assert found.method == "plain" and len(found.seconds) == 1 and found.peak_rss > 0
    assert max_abs_difference(grads, meta_gradients("plain", TINY)) == 0
    with pytest.raises(RuntimeError, match="unknown method 'jax'"):
        measure_isolated("jax", TINY, repeats=1)


def test_peak_tensor_bytes_and_count_ops_see_what_runs() -> None:
    def temporary() -> torch.Tensor:
        return (torch.ones(2**18) * 2).sum()  # two 1 MiB temporaries alive at once

    assert 2 * 2**20 <= peak_tensor_bytes(temporary) < 3 * 2**20
    assert count_ops(temporary) == 3


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'jax'; choose one of \('plain', 'loop'"):
        build_meta_loss("jax", TINY)
    with pytest.raises(ValueError, match="2 tensors compared with 1"):
        max_abs_difference([torch.ones(1)] * 2, [torch.ones(1)])
