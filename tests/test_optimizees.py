"""Quadratic optimizees: the two conventions, and a batch behaving as independent single-function runs."""

from __future__ import annotations

import functools

import pytest
import torch

from metaopt.learned_training import run_optimizer
from metaopt.optimizees import Optimizee, OptimizeeFamily, Quadratic, Quadratics


def test_conventions_draw_the_documented_distributions() -> None:
    gaussian = Quadratics(batch=2000, convention="gaussian").sample(0)
    uniform = Quadratics(batch=2000, convention="uniform").sample(0)
    assert abs(gaussian.w.mean()) < 0.01 and abs(gaussian.w.std() - 1) < 0.01 and abs(gaussian.theta0.std() - 1) < 0.05
    assert uniform.w.min() >= 0 and uniform.w.max() <= 1 and abs(uniform.w.mean() - 0.5) < 0.01
    assert abs(uniform.theta0.std() - 0.01) < 0.001
    # the loss levels differ by orders of magnitude (reference notes §1.5: about 107 versus 3.3 at θ_0)
    assert 80 < gaussian.losses(gaussian.init_params()).mean() < 140
    assert 2 < uniform.losses(uniform.init_params()).mean() < 5


def test_a_batch_is_independent_runs_of_its_functions() -> None:
    """The loss is the sum over functions, so Adam on a batch of two equals Adam on each alone."""
    pair = Quadratics(batch=2).sample(3)
    singles = [Quadratic(pair.w[i:i + 1], pair.y[i:i + 1], pair.theta0[i:i + 1]) for i in range(2)]
    adam = functools.partial(torch.optim.Adam, lr=0.1)
    together = run_optimizer(adam, pair, steps=20)
    apart = sum(run_optimizer(adam, single, steps=20) for single in singles)
    torch.testing.assert_close(together, apart)


def test_sampling_is_a_pure_function_of_the_seed() -> None:
    family = Quadratics(batch=3)
    a, b, c = family.sample(5), family.sample(5), family.sample(6)
    assert torch.equal(a.w, b.w) and not torch.equal(a.w, c.w)
    assert isinstance(a, Optimizee) and isinstance(family, OptimizeeFamily)
    theta = a.init_params()
    theta["theta"].add_(1.0)
    assert torch.equal(a.init_params()["theta"], b.theta0)  # init_params hands out fresh copies


@pytest.mark.parametrize("kwargs, message", [({"convention": "normal"}, "unknown quadratic convention 'normal'"),
                                             ({"dim": 0}, "dim and batch must be >= 1")])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Quadratics(**kwargs)
