"""Truncated backpropagation through a learned optimizer's unroll (Andrychowicz et al. 2016, §2-3).

Each run of an optimizee problem lasts the learner's ``horizon`` steps and is cut into
truncations of ``truncation`` steps, one per call (one meta-update): the truncation's loss
``f(θ_{s+1}) + ... + f(θ_{s+truncation})`` is backpropagated into the rule's parameters, and θ and
the rule's state are carried on as constants into the next call (the paper's 100 steps in
truncations of 20, as google-deepmind/learning-to-learn's ``train.py``). When a run ends the next
call starts problem ``k + 1`` of the training stream, so a run of the trainer is a pure function
of its seed; the carried state is part of every checkpoint. A truncation whose meta-loss or
meta-gradient is not finite ends its run (the next call starts the next problem).

The gradient is biased: it ignores the effect of a truncation's rule on the losses of later ones
(the reason for ES and PES, Metz et al. 2020; Vicol et al. 2021).

Example:
    >>> from metaopt.algorithms import LSTMOptimizerRule
    >>> from metaopt.datasets import Quadratics
    >>> from metaopt.engine.optimizer_learner import OptimizerLearner
    >>> from metaopt.problems.optimizees import optimizee_stream
    >>> learner = OptimizerLearner(LSTMOptimizerRule(), horizon=4)
    >>> estimator, problems = TruncatedBackprop(truncation=2), optimizee_stream(Quadratics(batch=2), "train", seed=0)
    >>> for iteration in range(3):                      # two truncations per run, then the next problem
    ...     estimate = estimator.estimate(learner, problems, iteration)
    >>> estimator.started, estimator.state_dict()["carried"]["step"]
    (2, 2)
"""

from __future__ import annotations

from typing import Any

import torch

from metaopt.engine.functional import map_tensors
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators.base import Estimate, Estimator

__all__ = ["TruncatedBackprop"]


class TruncatedBackprop(Estimator):
    """Truncated backpropagation: one truncation of ``truncation`` steps of a run per call.

    Args:
        truncation: optimizee steps per meta-update (the paper: 20); the last truncation of a
            run is shorter when the horizon is not a multiple.
    """

    def __init__(self, truncation: int = 20) -> None:
        if truncation < 1:
            raise ValueError(f"truncation must be >= 1, got {truncation}")
        self.truncation = truncation
        self.started = 0  # problems of the training stream started so far
        self._problem: Any = None
        self._carried: dict[str, Any] | None = None  # step, params and rule state of the live run

    def estimate(self, learner: OptimizerLearner, problems: Any, iteration: int,
                 track_steps: bool = False) -> Estimate:
        del iteration, track_steps
        if self._carried is None:
            self._problem = problems.batch(self.started).to(learner.device)
            self.started += 1
            self._carried = {"step": 0, "params": self._problem.init_params(), "state": None}
        elif self._problem is None:  # resumed from a checkpoint: rebuild the live run's problem
            self._problem = problems.batch(self.started - 1).to(learner.device)
            self._carried = map_tensors(lambda t: t.to(learner.device), self._carried)
        step = self._carried["step"]
        length = min(self.truncation, learner.horizon - step)
        score, trajectory = learner.truncation(self._problem, self._carried["params"], self._carried["state"], step,
                                               length)
        finite = bool(torch.isfinite(score.loss))
        if finite:
            score.loss.backward()
            finite = all(bool(torch.isfinite(p.grad).all()) for p in learner.parameters() if p.grad is not None)
        if finite and step + length < learner.horizon:
            self._carried = map_tensors(torch.Tensor.detach, {"step": step + length, "params": trajectory.params[-1],
                                                               "state": trajectory.state})
        else:
            self._problem, self._carried = None, None
        loss = score.step_losses[1:].mean().item()  # non-finite gradients the trainer sees itself and skips
        return Estimate(loss, {"loss": loss})

    def settings(self) -> dict[str, Any]:
        return {"truncation": self.truncation}

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started, "carried": self._carried}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started, self._carried, self._problem = int(state["started"]), state["carried"], None

