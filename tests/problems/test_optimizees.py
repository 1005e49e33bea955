"""Optimizees and their streams (metaopt/problems/optimizees.py), and the quadratic family of datasets/quadratics.py:
the two conventions, a batch behaving as independent single-function runs, the seed ranges of the splits."""

from __future__ import annotations

import functools

import pytest
import torch

from metaopt.datasets.quadratics import Quadratic, Quadratics, QuadraticsOptions, build_quadratics
from metaopt.evaluation.tuned_baselines import run_optimizer
from metaopt.options import ConfigError
from metaopt.problems.optimizees import (
    EPOCH_SEEDS,
    TEST_SEED,
    TUNING_OFFSET,
    VAL_SEED,
    Optimizee,
    OptimizeeFamily,
    OptimizeeStream,
    optimizee_stream,
)
from metaopt.problems.problem import Problem


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


def test_an_optimizee_is_a_problem_whose_outer_loss_is_its_loss() -> None:
    problem = Quadratics(batch=3).sample(1)
    theta = problem.init_params()
    assert isinstance(problem, Problem) and problem.outer_is_inner
    loss = problem.loss(theta, step=4)
    torch.testing.assert_close(problem.inner_loss(theta, 4), loss, rtol=0, atol=0)
    outer, accuracy = problem.outer_loss(theta, 4)
    torch.testing.assert_close(outer, loss, rtol=0, atol=0)
    assert accuracy is None
    torch.testing.assert_close(loss, problem.losses(theta).sum(), rtol=0, atol=0)
    moved = problem.to("meta")  # a real device move that needs no accelerator
    assert all(t.device.type == "meta" for t in (moved.w, moved.y, moved.theta0))


def test_a_stream_serves_problem_first_plus_i() -> None:
    family = Quadratics(batch=2)
    stream = OptimizeeStream(family, first=17, description={"functions": 2})
    assert (stream.batch_size, stream.start) == (1, 0)  # one problem per meta-update, read from the start
    assert torch.equal(stream.batch(3).w, family.sample(20).w)
    protocol = stream.protocol()
    assert protocol == {"functions": 2}
    protocol["functions"] = 5  # a copy: results cannot change the stream's description
    assert stream.protocol() == {"functions": 2} and OptimizeeStream(family, 0).protocol() == {}


@pytest.mark.parametrize(("seed", "split", "first"), [(0, "train", 0), (3, "train", 3 * EPOCH_SEEDS),
                                                      (999, "train", 999 * EPOCH_SEEDS), (0, "val", VAL_SEED),
                                                      (7, "val", VAL_SEED), (7, "test", TEST_SEED)])
def test_the_splits_of_a_run_are_disjoint_seed_ranges(seed: int, split: str, first: int) -> None:
    assert optimizee_stream(Quadratics(), split, seed).first == first
    assert (EPOCH_SEEDS, VAL_SEED, TEST_SEED, TUNING_OFFSET) == (10**6, 10**9, 2 * 10**9, 10**6)
    assert 999 * EPOCH_SEEDS + EPOCH_SEEDS <= VAL_SEED and VAL_SEED + TUNING_OFFSET < TEST_SEED


def test_stream_seeds_and_splits_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"optimizee runs take a seed in \[0, 1000\) .*got 1000"):
        optimizee_stream(Quadratics(), "train", 1000)
    with pytest.raises(ConfigError, match="got -1"):
        optimizee_stream(Quadratics(), "val", -1)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        optimizee_stream(Quadratics(), "dev", 0)


def test_the_registered_quadratics_have_one_function_per_test_problem() -> None:
    options = QuadraticsOptions(dim=3, batch=5, test_batch=1, convention="uniform")
    train, val, test = (build_quadratics(options, split, seed=2) for split in ("train", "val", "test"))
    assert (train.first, val.first, test.first) == (2 * EPOCH_SEEDS, VAL_SEED, TEST_SEED)
    assert train.batch(0).w.shape == (5, 3, 3) and val.batch(0).w.shape == (5, 3, 3)
    assert test.batch(0).w.shape == (1, 3, 3)
    assert test.protocol() == {"functions": 1, "convention": "uniform"}
    assert train.protocol() == {"functions": 5, "convention": "uniform"}
    reference = Quadratics(dim=3, batch=5, convention="uniform").sample(2 * EPOCH_SEEDS + 4)
    assert torch.equal(train.batch(4).w, reference.w) and torch.equal(train.batch(4).theta0, reference.theta0)
