"""scripts/conv_levers.py: amax pooling is max-pooling, and every lever's row is measured on the same meta-gradient."""

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
    assert [row["lever"] for row in rows] == ["as it is", "channels-last", "amax pooling"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["relative_gap"] == 0.0
    assert rows[1]["relative_gap"] < 1e-4 and all(row["seconds"] > 0 for row in rows)
