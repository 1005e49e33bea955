"""Optimizees and their streams (metaopt/problems/optimizees.py): problems whose outer loss is their loss, and the
disjoint seed ranges of the splits (the quadratic family itself: tests/datasets/test_quadratics.py)."""

from __future__ import annotations

import pytest
import torch

from metaopt.datasets.quadratics import Quadratics
from metaopt.options import ConfigError
from metaopt.problems.optimizees import (
    EPOCH_SEEDS,
    TEST_SEED,
    TUNING_OFFSET,
    VAL_SEED,
    OptimizeeStream,
    optimizee_stream,
)
from metaopt.problems.problem import Problem


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


