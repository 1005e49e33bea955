"""Li & Malik's problem families (datasets/li_malik_problems.py): objectives against hand-written formulas, seeded
draws, disjoint splits, finite gradients, the registered dataset and its options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metaopt.datasets.li_malik_problems import (
    FAMILY_NAMES,
    GEMAN_MCCLURE_C,
    L2,
    LiMalikProblems,
    LiMalikProblemsOptions,
    LogisticRegression,
    RobustLinearRegression,
    TwoLayerNet,
)
from metaopt.options import ConfigError
from metaopt.registry import entry


def numpy_params(params: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy() for name, p in params.items()}


def reference_loss(problem, params: dict[str, np.ndarray]) -> float:
    """The family's objective written out with numpy, point by point."""
    x, y = problem.x.numpy(), problem.y.numpy()
    total = 0.0
    for xi, yi in zip(x, y):
        if isinstance(problem, LogisticRegression):
            p = 1 / (1 + np.exp(-(params["w"] @ xi + params["b"])))
            total -= yi * np.log(p) + (1 - yi) * np.log(1 - p)
        elif isinstance(problem, RobustLinearRegression):
            r = yi - params["w"] @ xi - params["b"]
            total += r**2 / (GEMAN_MCCLURE_C**2 + r**2)
        else:
            logits = params["U"] @ np.maximum(params["W"] @ xi + params["b"], 0) + params["c"]
            total -= logits[yi] - np.log(np.exp(logits).sum())
    decay = {"logistic": np.sum(params.get("w", 0) ** 2), "robust-linear": 0.0,
             "two-layer-net": np.sum(params.get("W", 0) ** 2) + np.sum(params.get("U", 0) ** 2)}[problem.family]
    return total / len(x) + 0.5 * L2 * decay


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_objective_matches_a_hand_written_formula(family: str) -> None:
    problem = LiMalikProblems(family, dtype=torch.float64).sample(seed=7)
    start = problem.init_params()
    moved = {name: p + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype)
             for name, p in start.items()}
    for params in (start, moved):
        assert problem.loss(params, step=0).item() == pytest.approx(reference_loss(problem, numpy_params(params)),
                                                                     rel=1e-12)
        assert torch.equal(problem.loss(params, step=0), problem.loss(params, step=9))  # full batch: step ignored


def test_the_data_follow_the_protocol() -> None:
    """Two classes of 50 points (logistic), four clusters of 25 with both labels (two-layer net), the default dims."""
    logistic = LiMalikProblems("logistic").sample(0)
    assert logistic.x.shape == (100, 3) and logistic.y.tolist() == [0.0] * 50 + [1.0] * 50
    assert logistic.init_params()["w"].shape == (3,) and logistic.init_params()["b"].shape == ()
    robust = LiMalikProblems("robust-linear", dim=5, points=40).sample(1)
    assert robust.x.shape == (40, 5) and robust.y.dtype == torch.float32
    for seed in range(10):
        net = LiMalikProblems("two-layer-net", hidden=3).sample(seed)
        assert isinstance(net, TwoLayerNet) and net.x.shape == (100, 2)
        assert sorted(net.y.reshape(4, 25)[:, 0].tolist()) == [0, 0, 1, 1]  # a label per cluster, both used
        assert {k: tuple(v.shape) for k, v in net.init_params().items()} == {"W": (3, 2), "b": (3,), "U": (2, 3),
                                                                              "c": (2,)}
    assert robust.describe() == {"family": "robust-linear", "seed": 1, "dim": 5, "points": 40}


@pytest.mark.parametrize("family", [*FAMILY_NAMES, "mixed"])
def test_a_problem_is_a_pure_function_of_its_seed(family: str) -> None:
    state = torch.random.get_rng_state()
    a, b, c = (LiMalikProblems(family).sample(seed) for seed in (5, 5, 6))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is not used
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert all(torch.equal(a.init_params()[k], b.init_params()[k]) for k in a.theta0)
    assert a.family != c.family or not torch.equal(a.x, c.x)
    params = a.init_params()
    params[next(iter(params))].add_(1.0)  # init_params gives fresh tensors
    assert torch.equal(a.init_params()[next(iter(params))], b.init_params()[next(iter(params))])


def test_mixed_goes_round_the_families() -> None:
    family = LiMalikProblems("mixed")
    assert [family.sample(seed).family for seed in range(6)] == list(FAMILY_NAMES) * 2
    assert torch.equal(family.sample(4).x, LiMalikProblems("robust-linear").sample(4).x)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_splits_are_disjoint_seed_ranges(family: str) -> None:
    build = entry("dataset", "li-malik").build
    options = LiMalikProblemsOptions(family=family)
    streams = {split: build(options, split, seed=3) for split in ("train", "val", "test")}
    assert {s: streams[s].first for s in streams} == {"train": 3 * 10**6, "val": 10**9, "test": 2 * 10**9}
    seeds = {s: {streams[s].batch(i).seed for i in range(50)} for s in streams}
    assert not (seeds["train"] & seeds["val"] or seeds["train"] & seeds["test"] or seeds["val"] & seeds["test"])
    firsts = [streams[s].batch(0).x for s in streams]
    assert not any(torch.equal(firsts[i], firsts[j]) for i in range(3) for j in range(i + 1, 3))
    assert streams["test"].protocol() == {"family": family, "points": 100}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradients_are_finite_along_a_run(family: str) -> None:
    for seed in range(5):
        problem = LiMalikProblems(family).sample(10**9 + seed)
        params = {k: v.requires_grad_() for k, v in problem.init_params().items()}
        opt = torch.optim.SGD(list(params.values()), lr=0.3)
        for _ in range(20):
            opt.zero_grad()
            loss = problem.loss(params, 0)
            loss.backward()
            assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in params.values())
            assert sum(p.grad.abs().sum() for p in params.values()) > 0
            opt.step()


def test_bad_families_and_sizes_are_named() -> None:
    assert entry("dataset", "li-malik").problems == "optimizees"
    with pytest.raises(ConfigError, match="option 'family' must be one of .*got 'logistics' \\(did you mean "
                                          "'logistic'\\?\\)"):
        LiMalikProblemsOptions(family="logistics")
    with pytest.raises(ConfigError, match="option 'points' must be a multiple of 4"):
        LiMalikProblemsOptions(points=10)
    with pytest.raises(ConfigError, match="option 'hidden' sizes the two-layer net; family='logistic' has none"):
        LiMalikProblemsOptions(hidden=4)
    with pytest.raises(ConfigError, match="option 'dim' must be > 0"):
        LiMalikProblemsOptions(dim=0)
    with pytest.raises(ValueError, match="unknown Li & Malik family 'quadratic'"):
        LiMalikProblems("quadratic")
    with pytest.raises(ValueError, match="points a positive multiple of 4, got dim=None, points=6"):
        LiMalikProblems(points=6)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        LiMalikProblems().sample(-1)
