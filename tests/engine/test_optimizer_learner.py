"""Tests of metaopt/engine/optimizer_learner.py: a rule meta-learned on problems that bring their own start."""

from __future__ import annotations

import functools

import torch

from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates
from metaopt.evaluation.tuned_baselines import run_optimizer

RATE = 0.02


def _learner(horizon: int = 6) -> OptimizerLearner:
    return OptimizerLearner(LearnedRates({"theta": torch.tensor(RATE, dtype=torch.float64)}, per_step=False),
                            horizon=horizon)


def _problem(seed: int = 0):
    return Quadratics(dim=4, batch=3, dtype=torch.float64).sample(seed)


def test_the_frozen_rule_runs_as_the_torch_optimizer_it_equals():
    problem = _problem()
    ours = _learner().losses(problem, steps=8)
    theirs = run_optimizer(functools.partial(torch.optim.SGD, lr=RATE), problem, steps=8)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert not ours.requires_grad and ours.shape == (9,)


def test_the_meta_loss_is_the_sum_of_the_losses_of_the_run():
    learner, problem = _learner(), _problem()
    loss, metrics = learner.meta_loss(problem)
    losses = learner.losses(problem)
    torch.testing.assert_close(loss.detach(), losses[1:].sum(), rtol=1e-12, atol=0)
    assert metrics["loss"] == losses[1:].mean().item()
    evaluation = learner.evaluate(problem)
    assert evaluation.metric == "loss" and torch.equal(evaluation.values, losses[1:].mean().reshape(1))


def test_a_truncation_starts_from_constants_and_scores_its_own_steps():
    learner, problem = _learner(), _problem()
    params = {k: v.requires_grad_() for k, v in problem.init_params().items()}
    score, trajectory = learner.truncation(problem, params, None, start=2, steps=3)
    assert trajectory.start == 2 and trajectory.end == 5 and len(score.step_losses) == 4
    (grad,) = torch.autograd.grad(score.loss, [params["theta"]], allow_unused=True)
    assert grad is None  # the truncation boundary: nothing flows into the carried parameters
    torch.testing.assert_close(score.loss.detach(), score.step_losses[1:].sum(), rtol=1e-12, atol=0)


def test_truncating_the_run_biases_the_meta_gradient():
    """One truncation over the whole horizon is the full meta-gradient; two ignore the first's effect on the second."""
    problem = _problem()
    full = _learner()
    full.meta_loss(problem)[0].backward()
    exact = full.rule.rates["theta"].grad

    whole = _learner()
    score, _ = whole.truncation(problem, problem.init_params(), None, 0, 6)
    score.loss.backward()
    torch.testing.assert_close(whole.rule.rates["theta"].grad, exact, rtol=1e-12, atol=0)

    halves = _learner()
    first, trajectory = halves.truncation(problem, problem.init_params(), None, 0, 3)
    second, _ = halves.truncation(problem, trajectory.params[-1], trajectory.state, 3, 3)
    (first.loss + second.loss).backward()
    assert not torch.allclose(halves.rule.rates["theta"].grad, exact, rtol=1e-3)
    torch.testing.assert_close((first.loss + second.loss).detach(), full.meta_loss(problem)[0].detach(), rtol=1e-12,
                               atol=0)
