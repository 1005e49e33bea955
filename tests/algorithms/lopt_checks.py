"""Checks shared by the learned-optimizer tests: a model of every tensor rank; meta-gradients by differences."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import UpdateRule
from metaopt.training.config import RunConfig
from metaopt.training.experiment import build_experiment
from metaopt.training.trainer import MetaTrainer


def model_with_every_rank() -> nn.Module:
    """A convolution (rank 4 and 1), a linear layer (rank 2 and 1) and a scalar parameter, in float64."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.head = nn.Linear(8, 1)
            self.scale = nn.Parameter(torch.tensor(1.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * self.head(torch.tanh(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    return Net().double()


def assert_meta_gradients_match_finite_differences(rule: UpdateRule, eps: float = 1e-7) -> None:
    """d/dφ Σ_t f(θ_t) of a float64 ``rule`` through a 3-step second-order unroll on a quadratic, against central
    differences along 3 random directions of all its weights (every weight must be in the graph)."""
    learner = OptimizerLearner(rule, horizon=3, first_order=False)
    problem = Quadratics(dim=4, batch=3, dtype=torch.float64).sample(seed=0)
    score, _ = learner.truncation(problem, problem.init_params(), None, start=0, steps=3)
    weights = list(rule.parameters())
    exact = torch.autograd.grad(score.loss, weights)
    assert all(e.abs().sum() > 0 for e in exact)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        direction = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in weights]
        losses = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, v in zip(weights, direction):
                    w.add_(sign * eps * v)
            losses.append(learner.losses(problem, 3)[1:].sum())
            with torch.no_grad():
                for w, v in zip(weights, direction):
                    w.sub_(sign * eps * v)
        numeric = (losses[0] - losses[1]) / (2 * eps)
        analytic = sum((e * v).sum() for e, v in zip(exact, direction))
        assert abs(analytic) > 1e-3
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-6)


def assert_meta_training_halves_the_loss(algorithm: str, run_dir: Path, **options: object) -> OptimizerLearner:
    """Meta-train ``algorithm`` 30 truncations on 10-d quadratics through the registered builder, its estimator
    and MetaTrainer (checkpoints in ``run_dir``); the trained rule's mean loss on 4 validation problems must be
    below half its start's. Returns the trained learner."""
    config = RunConfig.from_dict({
        "data": {"name": "quadratics", "dim": 10, "batch": 8},
        "algorithm": {"name": algorithm, "horizon": 20, "truncation": 10, **options},
        "trainer": {"iterations": 30, "meta_lr": 0.01, "eval_every": 100, "eval_episodes": 1, "checkpoint_every": 100,
                    "log_every": 10}})
    experiment = build_experiment(config.replace(device="cpu"))
    learner, validation = experiment.learner, experiment.problems("val")
    problems = [validation.batch(i) for i in range(4)]
    start = copy.deepcopy(learner)
    MetaTrainer(learner, experiment.problems("train"), config, estimator=experiment.estimator,
                val_problems=validation, run_dir=run_dir).fit()
    before = torch.cat([start.evaluate(problem).values for problem in problems]).mean()
    after = torch.cat([learner.evaluate(problem).values for problem in problems]).mean()
    assert after < 0.5 * before
    return learner


def one_iteration_checkpoint(algorithm: str, run_dir: Path, **options: object) -> Path:
    """``last.pt`` of a one-truncation ``algorithm`` run on tiny quadratics (a checkpoint of another rule)."""
    config = RunConfig.from_dict({"data": {"name": "quadratics", "dim": 3, "batch": 2},
                                  "algorithm": {"name": algorithm, "horizon": 2, "truncation": 2, **options},
                                  "trainer": {"iterations": 1, "eval_every": 100, "eval_episodes": 1,
                                              "checkpoint_every": 100, "log_every": 1}})
    other = build_experiment(config)
    MetaTrainer(other.learner, other.problems("train"), config, estimator=other.estimator, run_dir=run_dir).fit()
    return run_dir / "last.pt"


def assert_resumes_mid_run(make_model: Callable[[], nn.Module], make_opt: Callable[[nn.Module], torch.optim.Optimizer],
                           data: torch.Tensor, check: Callable[[nn.Module, torch.optim.Optimizer], None]) -> None:
    """Train on ``data[:3]``, save model and optimizer through torch.save, train on ``data[3:]``; a fresh model and
    optimizer loaded from the save (``check`` sees them) and trained on ``data[3:]`` end with equal parameters.
    Steps take a closure, so optimizers that read the loss get it."""

    def train(model: nn.Module, opt: torch.optim.Optimizer, batches: torch.Tensor) -> None:
        for x in batches:
            def closure(x: torch.Tensor = x) -> torch.Tensor:
                opt.zero_grad()
                loss = model(x).square().mean()
                loss.backward()
                return loss

            opt.step(closure)

    model = make_model()
    opt = make_opt(model)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[3:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    opt2 = make_opt(resumed)
    opt2.load_state_dict(saved["opt"])
    check(resumed, opt2)
    train(resumed, opt2, data[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
