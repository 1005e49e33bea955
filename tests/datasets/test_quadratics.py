"""Random quadratics: the two conventions, a batch as independent single-function runs, the registered family."""

from __future__ import annotations

import functools

import pytest
import torch

import metaopt.datasets
from metaopt.datasets.quadratics import CONVENTIONS, Quadratic, Quadratics, QuadraticsOptions, build_quadratics
from metaopt.evaluation.tuned_baselines import run_optimizer
from metaopt.options import ConfigError
from metaopt.problems.optimizees import Optimizee, OptimizeeFamily, OptimizeeStream
from metaopt.problems.sampling import SPLITS
from metaopt.registry import entry
from metaopt.training.config import Section


def test_conventions_draw_the_documented_distributions() -> None:
    assert CONVENTIONS == ("gaussian", "uniform") and metaopt.datasets.Quadratics is Quadratics
    gaussian = Quadratics(batch=2000, convention="gaussian").sample(0)
    uniform = Quadratics(batch=2000, convention="uniform").sample(0)
    assert abs(gaussian.w.mean()) < 0.01 and abs(gaussian.w.std() - 1) < 0.01 and abs(gaussian.theta0.std() - 1) < 0.05
    assert uniform.w.min() >= 0 and uniform.w.max() <= 1 and abs(uniform.w.mean() - 0.5) < 0.01
    assert abs(uniform.theta0.std() - 0.01) < 0.001
    # the loss levels differ by orders of magnitude (reference notes §1.5: about 107 versus 3.3 at θ_0)
    assert 80 < gaussian.losses(gaussian.init_params()).mean() < 140
    assert 2 < uniform.losses(uniform.init_params()).mean() < 5


def test_the_loss_is_the_sum_of_the_batch() -> None:
    problem = Quadratics(dim=3, batch=4).sample(1)
    theta = problem.init_params()
    losses = problem.losses(theta)
    assert losses.shape == (4,) and problem.loss(theta, step=0).shape == ()
    torch.testing.assert_close(problem.loss(theta, step=7), losses.sum())
    residual = problem.w[2] @ theta["theta"][2] - problem.y[2]
    torch.testing.assert_close(losses[2], residual.square().sum())
    theta["theta"].requires_grad_()
    (grad,) = torch.autograd.grad(problem.loss(theta, step=0), [theta["theta"]])
    (own,) = torch.autograd.grad(problem.losses(theta)[2], [theta["theta"]])
    torch.testing.assert_close(grad[2], own[2])  # each coordinate sees the gradient of its own function alone
    assert problem.inner_loss(theta, 0).item() == problem.outer_loss(theta, 0)[0].item() == problem.loss(theta, 0)


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
    assert torch.equal(a.y, b.y) and torch.equal(a.theta0, b.theta0) and not torch.equal(a.theta0, c.theta0)
    assert torch.equal(Quadratics(batch=3, convention="uniform").sample(5).w,
                       Quadratics(batch=3, convention="uniform").sample(5).w)
    assert isinstance(a, Optimizee) and isinstance(family, OptimizeeFamily)
    theta = a.init_params()
    theta["theta"].add_(1.0)
    assert torch.equal(a.init_params()["theta"], b.theta0)  # init_params hands out fresh copies


def test_dtype() -> None:
    problem = Quadratics(dim=2, batch=2, dtype=torch.float64).sample(0)
    assert problem.w.dtype == problem.y.dtype == problem.init_params()["theta"].dtype == torch.float64
    assert problem.loss(problem.init_params(), 0).dtype == torch.float64


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_to_moves_every_tensor(device: str) -> None:
    problem = Quadratics(dim=3, batch=2).sample(0)
    moved = problem.to(device)
    assert isinstance(moved, Quadratic) and moved is not problem
    assert {t.device.type for t in (moved.w, moved.y, moved.theta0, moved.init_params()["theta"])} == {device}
    assert problem.w.device.type == "cpu", "the original stays where it was"
    assert moved.loss(moved.init_params(), 0).device.type == device
    if device != "meta":
        torch.testing.assert_close(moved.loss(moved.init_params(), 0).cpu(), problem.loss(problem.init_params(), 0))


@pytest.mark.parametrize("kwargs, message", [({"convention": "normal"}, "unknown quadratic convention 'normal'"),
                                             ({"dim": 0}, "dim and batch must be >= 1"),
                                             ({"batch": 0}, "dim and batch must be >= 1, got dim=10, batch=0")])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Quadratics(**kwargs)


def test_registered_builder_gives_each_split_its_problems() -> None:
    registered = entry("dataset", "quadratics")
    assert registered.options is QuadraticsOptions and registered.build is build_quadratics
    assert registered.problems == "optimizees"
    section = Section.from_dict("dataset", {"name": "quadratics", "dim": 4, "batch": 3, "test_batch": 2,
                                            "convention": "uniform"})
    firsts = {"train": 7 * 10**6, "val": 10**9, "test": 2 * 10**9}  # seed 7: problems 7·10⁶ + i, 10⁹ + i, 2·10⁹ + i
    for split in SPLITS:
        stream = section.entry.build(section.options, split, 7)
        functions = 2 if split == "test" else 3
        assert isinstance(stream, OptimizeeStream) and stream.first == firsts[split], split
        assert stream.protocol() == {"functions": functions, "convention": "uniform"}
        problem = stream.batch(4)
        expected = Quadratics(dim=4, batch=functions, convention="uniform").sample(firsts[split] + 4)
        assert problem.w.shape == (functions, 4, 4) and problem.init_params()["theta"].shape == (functions, 4)
        assert torch.equal(problem.w, expected.w) and torch.equal(problem.theta0, expected.theta0)
    defaults = Section.from_dict("dataset", {"name": "quadratics"}).options
    assert (defaults.dim, defaults.batch, defaults.test_batch, defaults.convention) == (10, 128, 1, "gaussian")
    test = build_quadratics(defaults, "test", 0).batch(0)
    assert test.w.shape == (1, 10, 10), "test problems hold one function each: results are per function"
    assert build_quadratics(defaults, "val", 0).batch(0).w.shape == (128, 10, 10)
    with pytest.raises(ConfigError, match=r"optimizee runs take a seed in \[0, 1000\)"):
        build_quadratics(defaults, "train", 1000)


def test_an_option_it_does_not_take_is_refused() -> None:
    with pytest.raises(ConfigError, match="^'ways' is not an option of dataset 'quadratics'; its options are dim, "
                                          "batch, test_batch, convention$"):
        Section.from_dict("dataset", {"name": "quadratics", "ways": 5})
    bad_convention = r"option 'convention' must be one of \('gaussian', 'uniform'\), got 'normal'"
    with pytest.raises(ConfigError, match=bad_convention):
        Section.from_dict("dataset", {"name": "quadratics", "convention": "normal"})
    with pytest.raises(ConfigError, match="option 'test_batch' must be > 0, got 0"):
        Section.from_dict("dataset", {"name": "quadratics", "test_batch": 0})
