"""Antithetic truncated ES (metaopt/estimators/es.py) against the truth: the convention ε(L⁺ − L⁻)/(2σ²), the
1/√pairs convergence to the true gradient of ‖Aφ − b‖², the carried positive branch, exact resume, the guards and
meta-training under the one trainer."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from metaopt.algorithms.lstm_optimizer import LSTMOptimizerRule
from metaopt.datasets.quadratics import Quadratic, Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates, StepInfo, UpdateRule
from metaopt.estimators import PES, Estimator, TruncatedES, perturbation
from metaopt.estimators.es import perturbed_truncation
from metaopt.problems.optimizees import Optimizee, OptimizeeStream
from metaopt.training.logging import read_metrics
from tests.estimators.trainer_checks import assert_trains_and_resumes_exactly

DIM = 5


class SetTo(UpdateRule):
    """``θ ← φ``: one step makes the optimizee's loss a function of the meta-parameters alone."""

    def __init__(self, phi: torch.Tensor) -> None:
        super().__init__()
        self.phi = nn.Parameter(phi.clone())

    def step(self, params: dict, grads: dict, state: Any, info: StepInfo) -> tuple[dict, Any]:
        return {"x": self.phi}, state


class LeastSquares(Optimizee):
    """``f(x) = ‖A x − b‖²`` in float64 with a fixed seeded ``A`` (``DIM × DIM``) and ``b``."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
        self.b = torch.randn(DIM, generator=g, dtype=torch.float64)

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(DIM, dtype=torch.float64)}

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return (self.a @ params["x"] - self.b).square().sum()

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.a.T @ (self.a @ x - self.b)


class One:
    """The problem source of the least-squares tests: the same problem at every index."""

    def __init__(self, problem: Optimizee) -> None:
        self.problem = problem

    def batch(self, index: int) -> Optimizee:
        return self.problem


class NaNQuadratics(Quadratics):
    """Quadratics that start at NaN: every loss is NaN."""

    def sample(self, seed: int) -> Quadratic:
        problem = super().sample(seed)
        return Quadratic(problem.w, problem.y, torch.full_like(problem.theta0, math.nan))


def least_squares_learner() -> OptimizerLearner:
    return OptimizerLearner(SetTo(torch.linspace(-1, 1, DIM, dtype=torch.float64)), horizon=1)


def rate_learner(horizon: int = 6) -> OptimizerLearner:
    return OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=horizon)


def test_one_pair_is_z_times_the_loss_difference_over_two_sigma() -> None:
    """The convention: mean_i ε_i (L⁺_i − L⁻_i) / (2σ²) with ε = σz, z from the key (seed, iteration, task, pair)."""
    learner, problem = least_squares_learner(), LeastSquares()
    sigma = 0.1
    TruncatedES(sigma=sigma, pairs=1, truncation=1, seed=3).estimate(learner, One(problem), iteration=4)
    phi = learner.rule.phi.detach()
    z = perturbation((3, 4, 0, 0), {"rule.phi": phi})["rule.phi"]
    up, down = (problem.loss({"x": phi + s * sigma * z}, 1) for s in (1, -1))
    torch.testing.assert_close(learner.rule.phi.grad, sigma * z * (up - down) / (2 * sigma**2), rtol=1e-12, atol=0)


def test_the_estimate_converges_to_the_true_gradient_as_one_over_root_pairs() -> None:
    """RMS error over 8 seeds at 2, 8, 32, 128 pairs: log-log slope −½, and √((d + 1)/N)·‖∇f‖ as theory says.

    For a quadratic the antithetic difference is exact, ĝ = mean_i z_i z_iᵀ ∇f, so E‖ĝ − ∇f‖² = (d + 1)‖∇f‖²/N.
    """
    problem, pairs, seeds = LeastSquares(), [2, 8, 32, 128], range(8)
    truth = problem.gradient(least_squares_learner().rule.phi.detach())
    rms = []
    for n in pairs:
        errors = []
        for seed in seeds:
            learner = least_squares_learner()
            TruncatedES(sigma=0.01, pairs=n, truncation=1, seed=seed).estimate(learner, One(problem), iteration=0)
            errors.append((learner.rule.phi.grad - truth).square().sum().item())
        rms.append(math.sqrt(sum(errors) / len(errors)))
    logs = torch.tensor([[math.log(n), math.log(e)] for n, e in zip(pairs, rms)], dtype=torch.float64)
    slope = torch.linalg.lstsq(torch.stack([logs[:, 0], torch.ones(4, dtype=torch.float64)], 1), logs[:, 1]).solution[0]
    assert -0.65 < slope.item() < -0.35, rms
    theory = [math.sqrt((DIM + 1) / n) * truth.norm().item() for n in pairs]
    for measured, expected in zip(rms, theory):
        assert 0.6 < measured / expected < 1.5, (rms, theory)


def test_each_call_unrolls_one_truncation_and_carries_the_positive_branch_of_pair_zero() -> None:
    learner = rate_learner(horizon=5)
    stream = OptimizeeStream(Quadratics(dim=3, batch=2), first=7)
    estimator = TruncatedES(sigma=0.01, pairs=3, truncation=2, seed=1)
    phi = {name: p.detach() for name, p in learner.named_parameters()}
    problem, params, state = stream.batch(0), stream.batch(0).init_params(), None
    for iteration, (start, length) in enumerate(((0, 2), (2, 2), (4, 1))):
        estimate = estimator.estimate(learner, stream, iteration)
        z = perturbation((1, iteration, 0, 0), phi)
        plus, trajectory = perturbed_truncation(learner, {k: phi[k] + 0.01 * z[k] for k in phi}, problem, params,
                                                state, start, length)
        params, state = trajectory.params[-1], trajectory.state
        if start + length < 5:
            assert torch.equal(estimator.state_dict()["runs"][0]["params"]["theta"], params["theta"])
        assert len(plus) == length and math.isfinite(estimate.loss)
        assert estimate.metrics["nonfinite_pairs"] == estimate.metrics["zeroed_grads"] == 0
    assert estimator.state_dict() == {"started": 1, "runs": [None], "task_runs": [1]}  # the next call starts problem 1


@pytest.mark.parametrize("estimator", [TruncatedES, PES])
def test_the_state_round_trips_and_resumes_exactly(estimator: type) -> None:
    """ES and PES share their state (the carried runs, and PES's ± states and ξ): both resume bit for bit."""
    torch.manual_seed(0)
    learner = OptimizerLearner(LSTMOptimizerRule(hidden=4), horizon=5)
    stream = OptimizeeStream(Quadratics(dim=3, batch=2), first=0)

    def grads() -> list[torch.Tensor]:
        return [p.grad.clone() for p in learner.parameters()]

    whole, history = estimator(pairs=2, truncation=2, tasks=2), []
    for i in range(5):
        learner.zero_grad(set_to_none=True)
        history.append((whole.estimate(learner, stream, i).loss, grads()))
    cut = estimator(pairs=2, truncation=2, tasks=2)
    for i in range(2):
        cut.estimate(learner, stream, i)
    buffer = io.BytesIO()
    torch.save(cut.state_dict(), buffer)  # as checkpoints store it
    buffer.seek(0)
    resumed = estimator(pairs=2, truncation=2, tasks=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for i in range(2, 5):
        learner.zero_grad(set_to_none=True)
        assert resumed.estimate(learner, stream, i).loss == history[i][0]
        assert all(torch.equal(a, b) for a, b in zip(grads(), history[i][1]))
    assert resumed.state_dict()["started"] == whole.state_dict()["started"] == 4
    with pytest.raises(ValueError, match="tasks=1"):
        estimator(tasks=1).load_state_dict(cut.state_dict())


def test_settings_are_checked_and_recorded() -> None:
    assert TruncatedES().settings() == {"sigma": 0.01, "pairs": 8, "truncation": 20, "tasks": 1, "seed": 0}
    assert isinstance(TruncatedES(), Estimator)
    for kwargs, message in (({"sigma": 0.0}, "sigma must be"), ({"sigma": math.nan}, "sigma must be"),
                            ({"pairs": 0}, "pairs must be >= 1, got 0"), ({"truncation": 0}, "truncation must be"),
                            ({"tasks": 0}, "tasks must be"), ({"seed": -1}, "seed must be")):
        with pytest.raises(ValueError, match=message):
            TruncatedES(**kwargs)


def test_non_finite_pairs_add_nothing_are_counted_and_end_the_run() -> None:
    learner = rate_learner(horizon=4)
    stream = OptimizeeStream(NaNQuadratics(dim=3, batch=2), first=0)
    estimator = TruncatedES(pairs=3, truncation=2)
    estimate = estimator.estimate(learner, stream, 0)
    assert math.isnan(estimate.loss) and estimate.metrics["nonfinite_pairs"] == 3
    assert torch.equal(next(learner.parameters()).grad, torch.zeros(()))
    assert estimator.state_dict() == {"started": 1, "runs": [None], "task_runs": [1]}  # the next call: the next problem


class Signs(Optimizee):
    """``f(x) = Σ sign(x_k)`` in float32: bounded losses whose differences over a tiny σ are huge."""

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(DIM)}

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return torch.sign(params["x"]).sum()


def test_non_finite_entries_of_the_estimate_are_set_to_zero_and_counted() -> None:
    """A finite loss difference over a subnormal σ: z · Δ/(2σ) overflows float32 in every entry."""
    learner = OptimizerLearner(SetTo(torch.zeros(DIM)), horizon=1)
    estimate = TruncatedES(sigma=1e-39, pairs=1, truncation=1).estimate(learner, One(Signs()), 0)
    assert math.isfinite(estimate.loss) and estimate.metrics["nonfinite_pairs"] == 0
    assert estimate.metrics["zeroed_grads"] == DIM and torch.equal(learner.rule.phi.grad, torch.zeros(DIM))


def test_the_trainer_meta_trains_with_es_and_resumes_exactly(tmp_path) -> None:
    assert_trains_and_resumes_exactly(tmp_path, lambda: TruncatedES(pairs=2, truncation=2), started=3)
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert all(r["train/nonfinite_pairs"] == 0 for r in records if "train/loss" in r)
