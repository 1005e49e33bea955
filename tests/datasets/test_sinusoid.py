"""Sinusoid tasks: shapes, seeded stream, and every task really is A sin(x - phi) within the ranges."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.datasets import Sinusoid
from metaopt.datasets.sinusoid import SinusoidOptions, build_sinusoid
from metaopt.options import ConfigError
from metaopt.problems.sampling import SPLITS
from metaopt.registry import entry
from metaopt.training.config import Section


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


def test_registered_builder_gives_each_split_its_sampler() -> None:
    registered = entry("dataset", "sinusoid")
    assert registered.options is SinusoidOptions and registered.build is build_sinusoid
    assert registered.problems == "episodes"
    section = Section.from_dict("dataset", {"name": "sinusoid", "shots": 5, "query": 7, "eval_query": 12,
                                            "meta_batch": 3})
    for offset, split in enumerate(SPLITS):
        sampler = section.entry.build(section.options, split, 4)
        assert isinstance(sampler, Sinusoid) and sampler.seed == 3 * 4 + offset, split
        assert (sampler.shots, sampler.batch_size) == (5, 3)
        assert sampler.query == (7 if split == "train" else 12), "validation and test tasks use eval_query"
        assert sampler.protocol() == {"shots": 5, "query": sampler.query}
        batch = sampler.batch(0)
        assert batch.support_x.shape == (3, 5, 1) and batch.query_x.shape == (3, sampler.query, 1)
        torch.testing.assert_close(batch.query_y, Sinusoid(5, sampler.query, 3, seed=12 + offset).batch(0).query_y,
                                   rtol=0, atol=0)
    defaults = Section.from_dict("dataset", {"name": "sinusoid"}).options
    assert (defaults.shots, defaults.query, defaults.eval_query, defaults.meta_batch) == (10, 10, None, 25)
    assert [build_sinusoid(defaults, split, 0).query for split in SPLITS] == [10, 10, 10], "no eval_query: query"


def test_an_option_it_does_not_take_is_refused() -> None:
    with pytest.raises(ConfigError, match="^'ways' is not an option of dataset 'sinusoid'; its options are shots, "
                                          "query, eval_query, meta_batch$"):
        Section.from_dict("dataset", {"name": "sinusoid", "ways": 5})
