"""Sinusoid tasks: shapes, seeded stream, and every task really is A sin(x - phi) within the ranges."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.datasets import Sinusoid


def fit_sinusoid(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Least squares y = a sin x + b cos x: amplitude, phase (y = A sin(x - phi)) and largest residual."""
    x, y = x.double().flatten(), y.double().flatten()
    design = torch.stack([torch.sin(x), torch.cos(x)], 1)
    a, b = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.flatten()
    residual = (design @ torch.stack([a, b]) - y).abs().max().item()
    return math.hypot(a.item(), b.item()), math.atan2(-b.item(), a.item()), residual


def test_shapes_and_dtypes() -> None:
    batch = Sinusoid(shots=5, query=7, batch_size=3).batch(0)
    assert batch.support_x.shape == batch.support_y.shape == (3, 5, 1)
    assert batch.query_x.shape == batch.query_y.shape == (3, 7, 1)
    assert not batch.is_classification and batch.ways is None and batch.support_x.dtype == torch.float32


def test_tasks_are_sinusoids_within_the_paper_ranges() -> None:
    batch = Sinusoid(shots=10, query=10, batch_size=50, seed=2).batch(0)
    amplitudes = []
    for task in batch.unbind():
        x = torch.cat([task.support_x, task.query_x])
        assert x.min() >= -5 and x.max() <= 5
        amplitude, phase, residual = fit_sinusoid(x, torch.cat([task.support_y, task.query_y]))
        assert residual < 1e-5 and 0.1 - 1e-5 <= amplitude <= 5 + 1e-5 and -1e-5 <= phase <= math.pi + 1e-5
        amplitudes.append(amplitude)
    assert max(amplitudes) - min(amplitudes) > 2, "amplitudes must vary across tasks"


def test_custom_ranges() -> None:
    batch = Sinusoid(shots=4, query=4, batch_size=5, amplitude=(2.0, 2.0), phase=(0.5, 0.5), x_range=(0, 1)).batch(0)
    torch.testing.assert_close(batch.support_y, 2 * torch.sin(batch.support_x - 0.5))


def test_the_seed_fixes_the_stream() -> None:
    a, b, c = (Sinusoid(batch_size=4, seed=s, num_batches=2) for s in (1, 1, 2))
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x.query_y, y.query_y, rtol=0, atol=0)
        assert not torch.equal(x.query_y, z.query_y)
    assert len(list(Sinusoid(num_batches=3))) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"shots": 0}, "shots and query must be >= 1, got shots=0"),
    ({"query": 0}, "shots and query must be >= 1"),
    ({"amplitude": (5.0, 0.1)}, r"amplitude range must be \(low, high\) with low <= high, got \(5.0, 0.1\)"),
    ({"x_range": (1.0, -1.0)}, "x_range range must be"),
])
def test_invalid_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sinusoid(**kwargs)
