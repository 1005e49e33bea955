"""Counter-based perturbations (metaopt/estimators/perturbations.py): a pure function of (seed, step, task, pair)."""

from __future__ import annotations

import pytest
import torch

from metaopt.estimators import perturbation

PARAMS = {"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=torch.float64), "s": torch.zeros(())}


def test_the_same_key_gives_the_same_draw_whatever_was_drawn_before() -> None:
    first = perturbation((7, 3, 1, 0), PARAMS)
    torch.manual_seed(123)  # the global generator plays no part
    torch.randn(10)
    for key in [(7, 3, 1, 1), (0, 0, 0, 0), (7, 3, 1, 0)]:  # other keys in between, in any order
        last = perturbation(key, PARAMS)
    for name in PARAMS:
        assert torch.equal(first[name], last[name]), name
    assert {k: (v.shape, v.dtype) for k, v in first.items()} == {k: (v.shape, v.dtype) for k, v in PARAMS.items()}


def test_different_keys_give_different_draws() -> None:
    keys = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 2, 3, 4), (4, 3, 2, 1)]
    draws = [torch.cat([t.flatten().double() for t in perturbation(key, PARAMS).values()]) for key in keys]
    for i in range(len(keys)):
        for j in range(i):
            assert not torch.allclose(draws[i], draws[j]), (keys[i], keys[j])


def test_draws_are_standard_normal() -> None:
    z = perturbation((0, 0, 0, 0), {"x": torch.zeros(20000, dtype=torch.float64)})["x"]
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03


def test_a_key_is_four_non_negative_integers() -> None:
    with pytest.raises(ValueError, match="four integers >= 0"):
        perturbation((0, 0, -1, 0), PARAMS)
    with pytest.raises(ValueError, match="four integers >= 0"):
        perturbation((0, 0, 0), PARAMS)  # type: ignore[arg-type]
