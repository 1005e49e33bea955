"""The subprocess protocol: a measurement in a fresh Python process, and its failures."""

from __future__ import annotations

import pytest

from metaopt.bench import isolated
from metaopt.bench.isolated import measure_isolated
from metaopt.bench.measure import max_abs_difference
from tests.bench.helpers import TINY, meta_gradients


def test_measure_isolated_runs_the_same_measurement_in_a_fresh_process() -> None:
    found, grads = measure_isolated("plain", TINY, repeats=1, threads=1)
    assert found.method == "plain" and len(found.seconds) == 1 and found.peak_rss > 0
    assert max_abs_difference(grads, meta_gradients("plain", TINY)) == 0
    with pytest.raises(RuntimeError, match="unknown method 'jax'"):
        measure_isolated("jax", TINY, repeats=1)


def test_the_child_command_runs_this_modules_entry_point() -> None:
    assert "from metaopt.bench.isolated import _measure_child" in isolated._CHILD
