"""The benchmark workload and the implementations it compares: same batch, same meta-gradients."""

from __future__ import annotations

import sys

import pytest
import torch

from metaopt.bench.measure import max_abs_difference
from metaopt.bench.workloads import METHODS, Workload, build_meta_loss, learn2learn_unavailable
from tests.bench.helpers import AVAILABLE, TINY, meta_gradients


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_every_method_gives_the_plain_loops_meta_gradients(first_order: bool) -> None:
    workload = Workload(tasks=2, query=1, hidden=4, inner_steps=2, first_order=first_order)
    expected = meta_gradients("plain", workload)
    for method in AVAILABLE:
        assert max_abs_difference(meta_gradients(method, workload), expected) < 1e-5, method
    first_order_gap = max_abs_difference(meta_gradients("plain", Workload(tasks=2, query=1, hidden=4, inner_steps=2,
                                                                            first_order=not first_order)), expected)
    assert first_order_gap > 1e-4, "the two orders must differ here, or the comparison proves nothing"


def test_the_workload_is_a_function_of_its_fields() -> None:
    assert METHODS == ("plain", "loop", "vmap", "compiled", "checkpointed", "higher", "learn2learn")
    assert (TINY.label, TINY.order) == ("5-way 1-shot", "second")
    assert (Workload(ways=20, shots=5, first_order=True).label, Workload(first_order=True).order) == (
        "20-way 5-shot", "first")
    batch = Workload(tasks=3, ways=4, shots=2, query=5, image_size=14).batch()
    assert batch.is_batched and batch.ways == 4
    assert batch.support_x.shape == (3, 8, 1, 14, 14) and batch.query_x.shape == (3, 20, 1, 14, 14)
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and torch.equal(batch.query_y[0], batch.query_y[2])
    again, other = TINY.batch(), Workload(tasks=2, query=1, hidden=4, seed=1).batch()
    assert torch.equal(TINY.batch().query_x, again.query_x) and not torch.equal(again.query_x, other.query_x)
    first, second = (dict(w.model().named_parameters()) for w in (TINY, TINY))
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert TINY.model()[-1].out_features == TINY.ways and TINY.model()[0][0].out_channels == TINY.hidden


def test_learn2learn_unavailable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # what an absent package looks like to import
    reason = learn2learn_unavailable()
    assert reason is not None and reason.startswith("ModuleNotFoundError: ") and "learn2learn" in reason


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'jax'; choose one of \('plain', 'loop'"):
        build_meta_loss("jax", TINY)
