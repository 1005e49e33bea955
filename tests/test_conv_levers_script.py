"""scripts/conv_levers.py: amax pooling is max-pooling, every lever's row is measured on the same meta-gradient,
and the convolutions replayed alone are the meta-gradient's own."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch

from metaopt.bench.workloads import Workload

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "conv_levers.py"


def test_amax_pooling_equals_max_pooling_on_even_and_odd_sizes() -> None:
    pool = runpy.run_path(str(SCRIPT))["AmaxPool2d"]()
    for size in (8, 7):
        x = torch.randn(2, 3, size, size)
        assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 2))


def test_each_lever_changes_the_network_not_the_meta_gradient_beyond_rounding() -> None:
    rows = runpy.run_path(str(SCRIPT))["compare"](Workload(tasks=2, query=2, hidden=8), repeats=1)
    assert [row["lever"] for row in rows[:-1]] == ["as it is", "channels-last", "amax pooling", "query pass compiled"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["relative_gap"] == 0.0
    assert all(row["relative_gap"] < 1e-4 for row in rows[1:-1]) and all(row["seconds"] > 0 for row in rows)


def test_the_replayed_convolutions_are_every_convolution_of_the_meta_gradient() -> None:
    """One task, one inner step, first order: the 4 convolutions of the support pass and of the query pass, and a
    backward of each; second order adds the convolutions of the support backward's double backward."""
    replay = runpy.run_path(str(SCRIPT))["convolution_replay"]
    _, first, _ = replay(Workload(tasks=1, query=1, hidden=4, first_order=True))
    _, second, _ = replay(Workload(tasks=1, query=1, hidden=4))
    assert first == 4 * 4 and second > first
    _, two_tasks, _ = replay(Workload(tasks=2, query=1, hidden=4))
    assert two_tasks == 2 * second


def test_the_convolutions_floating_point_operations_are_counted_from_their_shapes() -> None:
    """First order, one task: the support's and the query's forward convolutions, twice that for their backward
    (grad_input and grad_weight), less the first layer's grad_input (its input needs no gradient)."""
    workload = Workload(tasks=1, ways=2, query=1, hidden=4, image_size=16, first_order=True)
    _, _, flops = runpy.run_path(str(SCRIPT))["convolution_replay"](workload)
    sizes = [16 * 16, 8 * 8, 4 * 4, 2 * 2]  # output pixels of each 3x3 'same' convolution (2x2 pooling between)
    inputs = [1, 4, 4, 4]
    forward = [2 * 4 * pixels * c * 9 for pixels, c in zip(sizes, inputs)]  # per image, 4 filters
    per_image = 3 * sum(forward) - forward[0]
    assert flops == (2 + 2) * per_image  # 2 support and 2 query images
