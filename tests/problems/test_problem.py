"""The inner-problem contract (metaopt/problems/problem.py): an inner loss the inner loop descends, an outer loss that
scores where it got, and ``outer_is_inner`` problems whose inner losses the loop reuses as outer losses."""

from __future__ import annotations

import pytest
import torch

from metaopt.engine.inner import InnerLoop
from metaopt.engine.rules import sgd
from metaopt.problems.optimizees import Optimizee
from metaopt.problems.problem import Problem


class Shifted(Problem):
    """Inner loss ``||x||²``, outer loss ``||x - 1||²``; counts its evaluations."""

    def __init__(self) -> None:
        self.calls = {"inner": [], "outer": []}

    def inner_loss(self, params, step):
        self.calls["inner"].append(step)
        return params["x"].square().sum()

    def outer_loss(self, params, step):
        self.calls["outer"].append(step)
        return (params["x"] - 1).square().sum(), None


class Parabola(Optimizee):
    """``f(x) = ||x||²``; counts its evaluations."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def init_params(self):
        return {"x": torch.ones(2)}

    def loss(self, params, step):
        self.calls.append(step)
        return params["x"].square().sum()


def test_the_base_class_declares_both_losses() -> None:
    assert Problem.outer_is_inner is False and Optimizee.outer_is_inner is True
    with pytest.raises(NotImplementedError):
        Problem().inner_loss({}, 0)
    with pytest.raises(NotImplementedError):
        Problem().outer_loss({}, 0)
    with pytest.raises(NotImplementedError):
        Optimizee().init_params()
    with pytest.raises(NotImplementedError):
        Optimizee().loss({}, 0)
    assert Parabola().to("meta").__class__ is Parabola  # problems without data move as they are


def test_the_inner_loop_descends_the_inner_loss_and_scores_the_outer_loss() -> None:
    problem, loop = Shifted(), InnerLoop(sgd(0.25))
    trajectory = loop.unroll(problem, {"x": torch.ones(2, requires_grad=True)}, steps=2, start=3)
    assert problem.calls["inner"] == [3, 4] and problem.calls["outer"] == []
    torch.testing.assert_close(trajectory.params[-1]["x"], torch.full((2,), 0.25))  # x ← x / 2 per step
    score = loop.score(problem, trajectory, [0.5, 1.0], track=True)
    assert problem.calls["outer"] == [3, 4, 5]  # θ_start..θ_end, each after the step that made it
    torch.testing.assert_close(score.loss, torch.tensor(0.5 * 2 * 0.5**2 + 2 * 0.75**2))
    torch.testing.assert_close(score.step_losses, torch.tensor([0.0, 2 * 0.5**2, 2 * 0.75**2]))


def test_an_outer_is_inner_problem_reuses_the_inner_losses() -> None:
    problem, loop = Parabola(), InnerLoop(sgd(0.25))
    trajectory = loop.unroll(problem, {"x": problem.init_params()["x"].requires_grad_()}, steps=3)
    assert problem.calls == [0, 1, 2] and len(trajectory.inner_losses) == 3
    score = loop.score(problem, trajectory, [1.0, 1.0, 1.0], track=True)
    assert problem.calls == [0, 1, 2, 3]  # only the last parameters need a new evaluation
    torch.testing.assert_close(score.step_losses, torch.tensor([2.0, 0.5, 0.125, 0.03125]))
    torch.testing.assert_close(score.loss, torch.tensor(0.5 + 0.125 + 0.03125))
