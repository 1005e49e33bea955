"""Evaluation (metaopt/evaluation/evaluate.py): the 95% interval, the recorded protocol, accuracy after brief
meta-training, and the same evaluation of a learned optimizer on optimizees."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.algorithms import MAML
from metaopt.datasets import Sinusoid
from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates
from metaopt.evaluation import EvalResult, confidence_interval, evaluate
from metaopt.models import MLP
from metaopt.problems.optimizees import optimizee_stream
from metaopt.problems.sampling import EpisodeSampler


def test_confidence_interval_by_hand() -> None:
    values = torch.tensor([0.5, 0.75, 1.0, 0.25])
    mean = sum(values.tolist()) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in values.tolist()) / 3)  # sample standard deviation
    assert confidence_interval(values) == pytest.approx(1.96 * std / 2)
    assert confidence_interval(torch.full((10,), 0.8)) == 0.0
    assert math.isnan(confidence_interval(torch.tensor([0.5])))


def test_result_reports_mean_interval_and_protocol() -> None:
    result = EvalResult("accuracy", 0.4567, 0.0123, 600, {"ways": 5, "shots": 1})
    assert str(result) == "accuracy 45.67% ± 1.23% (95% CI; ways=5, shots=1)"
    assert str(EvalResult("mse", 0.5, 0.1, 10)) == "mse 0.50 ± 0.10 (95% CI; )"
    assert result.to_dict() == {"metric": "accuracy", "mean": 0.4567, "ci95": 0.0123, "episodes": 600,
                                "protocol": {"ways": 5, "shots": 1}}


def test_regression_evaluation_is_repeatable_and_recorded() -> None:
    torch.manual_seed(0)
    maml = MAML(MLP(1, 1, hidden=(8,)), inner_lr=0.01)
    tasks = Sinusoid(shots=5, query=7, batch_size=4, seed=3)
    result = evaluate(maml, tasks, episodes=10, steps=2)
    assert result == evaluate(maml, tasks, episodes=10, steps=2)  # the first 10 tasks of the seeded stream
    assert (result.metric, result.episodes) == ("mse", 10)
    assert result.protocol == {"shots": 5, "query": 7, "inner_steps": 2, "episodes": 10, "bn_policy": "batch"}
    assert result.protocol == {**tasks.protocol(), "inner_steps": 2, "episodes": 10, **maml.protocol()}
    assert evaluate(maml, tasks, episodes=10).protocol["inner_steps"] == maml.eval_steps == 1  # default steps
    scored = [maml.evaluate(tasks.batch(i), steps=2) for i in range(3)]
    assert {s.metric for s in scored} == {"mse"}
    per_task = torch.cat([s.values for s in scored])[:10]
    assert result.mean == pytest.approx(per_task.mean().item())
    assert result.ci95 == pytest.approx(confidence_interval(per_task))
    with pytest.raises(ValueError, match="episodes must be >= 1, got 0"):
        evaluate(maml, tasks, episodes=0)


def clusters(seed: int = 0) -> dict[int, torch.Tensor]:
    """40 classes: 20 noisy copies of a random centre in R^16 each (linearly separable)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, 16, generator=g)
    return {c: centres[c] + 0.3 * torch.randn(20, 16, generator=g) for c in range(40)}


def test_accuracy_above_chance_on_new_classes_after_brief_meta_training() -> None:
    data = clusters()
    train = EpisodeSampler({c: data[c] for c in range(30)}, ways=5, shots=1, query=5, batch_size=8, num_batches=100)
    test = EpisodeSampler({c: data[c] for c in range(30, 40)}, ways=5, shots=1, query=5, batch_size=50, seed=1)
    torch.manual_seed(0)
    maml = MAML(MLP(16, 5, hidden=(32,)), inner_lr=0.1)
    before = evaluate(maml, test, episodes=100)
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    for batch in train:
        loss, _ = maml.meta_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate(maml, test, episodes=100)
    assert after.metric == "accuracy" and after.protocol["ways"] == 5
    assert after.mean > 0.6, f"chance is 0.2; got {after}"
    assert after.mean - after.ci95 > before.mean + before.ci95, f"before {before}, after {after}"


def test_a_learned_optimizer_is_scored_by_the_mean_loss_of_its_runs() -> None:
    """The same evaluation for an OptimizerLearner: one problem per batch, its run's mean loss over steps 1..K."""
    learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=6)
    problems = optimizee_stream(Quadratics(dim=3, batch=2), "test", seed=0, description={"functions": 2})
    result = evaluate(learner, problems, episodes=3)
    assert (result.metric, result.episodes) == ("loss", 3)
    assert result.protocol == {"functions": 2, "inner_steps": 6, "episodes": 3}
    per_problem = []
    for i in range(3):
        problem, theta = problems.batch(i), problems.batch(i).init_params()["theta"]
        losses = []
        for t in range(6):  # plain gradient descent with rate 0.01, by hand
            theta = theta.detach().requires_grad_()
            grad, = torch.autograd.grad(problem.loss({"theta": theta}, t), theta)
            theta = theta - 0.01 * grad
            losses.append(problem.loss({"theta": theta}, t + 1).item())
        per_problem.append(sum(losses) / 6)
    assert result.mean == pytest.approx(sum(per_problem) / 3, rel=1e-5)
    assert result.ci95 == pytest.approx(confidence_interval(torch.tensor(per_problem)), rel=1e-4)
    assert evaluate(learner, problems, episodes=3, steps=2).protocol["inner_steps"] == 2
