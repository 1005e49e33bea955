"""A check shared by the ES and PES tests: the one trainer meta-trains with the estimator and resumes exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from metaopt.algorithms.lstm_optimizer import LSTMOptimizerRule
from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators.base import Estimator
from metaopt.problems.optimizees import optimizee_stream
from metaopt.training.config import TrainerConfig
from metaopt.training.trainer import MetaTrainer


def assert_trains_and_resumes_exactly(run_dir: Path, estimator: Callable[[], Estimator], started: int) -> MetaTrainer:
    """6 meta-updates of a small LSTM optimizer on 4-step quadratic runs move its weights, start ``started``
    problems and equal 3 meta-updates resumed to 6, bit for bit. Returns the uninterrupted trainer."""
    family = Quadratics(dim=3, batch=2)

    def trainer(folder: Path, iterations: int) -> MetaTrainer:
        torch.manual_seed(0)
        config = TrainerConfig(iterations=iterations, meta_lr=0.003, eval_every=3, eval_episodes=2,
                               checkpoint_every=3, log_every=1)
        return MetaTrainer(OptimizerLearner(LSTMOptimizerRule(hidden=4), horizon=4),
                           optimizee_stream(family, "train", 0), config, estimator=estimator(),
                           val_problems=optimizee_stream(family, "val", 0), run_dir=folder)

    whole = trainer(run_dir / "whole", 6)
    before = [p.detach().clone() for p in whole.learner.parameters()]
    summary = whole.fit()
    assert summary["iteration"] == 6 and summary["nonfinite_skipped"] == 0 and whole.estimator.started == started
    assert not all(torch.equal(a, b) for a, b in zip(before, whole.learner.parameters()))
    trainer(run_dir / "cut", 3).fit()
    resumed = trainer(run_dir / "cut", 6)
    resumed.fit(resume=True)
    for a, b in zip(whole.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)
    return whole
