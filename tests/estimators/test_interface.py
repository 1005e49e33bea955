"""The estimator interface admits estimators that are not backpropagation, without touching the trainer.

A test double, central finite differences of the meta-loss, estimates the meta-gradient of a rule
with three meta-parameters on quadratics. Its estimate equals backpropagation's (float64), and the
one trainer runs it as it runs backpropagation: it trains, checkpoints the estimator's own state
and resumes exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import StepInfo, UpdateRule
from metaopt.estimators import Backprop, Estimate, Estimator
from metaopt.problems.optimizees import OptimizeeStream
from metaopt.training.config import TrainerConfig
from metaopt.training.trainer import MetaTrainer


class AffineRule(UpdateRule):
    """``θ ← (1 - decay) θ - lr · g + shift`` with three meta-parameters ``φ = (lr, decay, shift)``."""

    def __init__(self) -> None:
        super().__init__()
        self.phi = nn.Parameter(torch.tensor([0.05, 0.01, 0.0], dtype=torch.float64))

    def step(self, params: dict, grads: dict, state: Any, info: StepInfo) -> tuple[dict, Any]:
        lr, decay, shift = self.phi
        return {k: (1 - decay) * p - lr * grads[k] + shift for k, p in params.items()}, state


class FiniteDifferences(Estimator):
    """Central differences of ``learner.meta_loss`` per meta-parameter entry; counts its evaluations (its state)."""

    def __init__(self, h: float = 1e-6) -> None:
        self.h, self.evaluations = h, 0

    def _loss(self, learner: OptimizerLearner, problem: Any) -> float:
        self.evaluations += 1
        with torch.no_grad():
            return learner.meta_loss(problem)[0].item()

    def estimate(self, learner: OptimizerLearner, problems: Any, iteration: int, track_steps: bool = False) -> Estimate:
        problem = problems.batch(iteration)
        for p in learner.parameters():
            grad = torch.zeros_like(p)
            for i in range(p.numel()):
                with torch.no_grad():
                    p.view(-1)[i] += self.h
                up = self._loss(learner, problem)
                with torch.no_grad():
                    p.view(-1)[i] -= 2 * self.h
                down = self._loss(learner, problem)
                with torch.no_grad():
                    p.view(-1)[i] += self.h
                grad.view(-1)[i] = (up - down) / (2 * self.h)
            p.grad = grad
        loss = self._loss(learner, problem) / learner.horizon
        return Estimate(loss, {"loss": loss})

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluations = state["evaluations"]


def _setup() -> tuple[OptimizerLearner, OptimizeeStream]:
    torch.manual_seed(0)
    learner = OptimizerLearner(AffineRule(), horizon=5, first_order=False)
    return learner, OptimizeeStream(Quadratics(dim=3, batch=2, dtype=torch.float64), first=0)


def test_finite_differences_agree_with_backpropagation():
    learner, problems = _setup()
    Backprop().estimate(learner, problems, iteration=0)
    exact = learner.rule.phi.grad.clone()
    learner.zero_grad()
    FiniteDifferences().estimate(learner, problems, iteration=0)
    torch.testing.assert_close(learner.rule.phi.grad, exact, rtol=1e-6, atol=1e-8)
    assert exact.abs().min() > 1e-3  # every meta-parameter matters


def test_the_trainer_runs_a_non_backprop_estimator_and_resumes_it_exactly(tmp_path):
    config = TrainerConfig(iterations=6, meta_lr=1e-3, eval_every=3, eval_episodes=2, checkpoint_every=3,
                           log_every=1)
    learner, problems = _setup()
    full = MetaTrainer(learner, problems, config, estimator=FiniteDifferences(), val_problems=problems,
                       run_dir=tmp_path / "full")
    summary = full.fit()
    assert summary["iteration"] == 6 and full.estimator.evaluations == 6 * 7
    assert not torch.equal(learner.rule.phi.detach(), torch.tensor([0.05, 0.01, 0.0], dtype=torch.float64))

    learner, problems = _setup()
    first = MetaTrainer(learner, problems, config.replace(iterations=3), estimator=FiniteDifferences(),
                        val_problems=problems, run_dir=tmp_path / "split")
    first.fit()
    learner, problems = _setup()
    resumed = MetaTrainer(learner, problems, config, estimator=FiniteDifferences(), val_problems=problems,
                          run_dir=tmp_path / "split")
    resumed.fit(resume=True)
    assert resumed.estimator.evaluations == full.estimator.evaluations  # the estimator's state was checkpointed
    assert torch.equal(resumed.learner.rule.phi, full.learner.rule.phi)
