"""Truncated backpropagation through a learned optimizer's unroll (Andrychowicz et al. 2016, §2-3).

Each run of an optimizee problem lasts the learner's ``horizon`` steps (or a length drawn for it,
and the first run may start partway: :mod:`metaopt.estimators.runs`) and is cut into
truncations of ``truncation`` steps, one per call (one meta-update): the truncation's loss
``f(θ_{s+1}) + ... + f(θ_{s+truncation})`` is backpropagated into the rule's parameters, and θ and
the rule's state are carried on as constants into the next call (the paper's 100 steps in
truncations of 20, as google-deepmind/learning-to-learn's ``train.py``). When a run ends the next
call starts problem ``k + 1`` of the training stream, so a run of the trainer is a pure function
of its seed; the carried state (step, the run's length, θ, the rule's state) is part of every
checkpoint. A truncation whose meta-loss or meta-gradient is not finite ends its run (the next call
starts the next problem).

With ``max_loss`` the meta-loss is ``Σ_t clamp(f(θ_t), max=max_loss)``, NaN and +inf counted as
``max_loss``: a clipped step (at or above the maximum, or NaN) adds the constant and, as
:func:`torch.clamp` from its maximum on, no gradient. Its loss is left out of the backpropagated sum
(:meth:`OptimizerLearner.truncation_loss`, which costs a second outer pass over the truncation when
some step is clipped; with every step clipped the gradient is written as zeros). The other steps keep
their gradient, so a rule that diverges late in a truncation still learns from the early steps. The
reported loss is the mean of the clipped losses, ``clipped_losses`` counts the clipped steps, and a
truncation whose unclipped losses are not finite still ends its run (θ has diverged).

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
    >>> estimator.started, estimator.state_dict()["carried"]["step"], estimator.state_dict()["carried"]["length"]
    (2, 2, 4)
"""

from __future__ import annotations

from typing import Any

import torch

from metaopt.engine.functional import map_tensors
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators.base import Estimate, Estimator
from metaopt.estimators.runs import InnerRuns

__all__ = ["TruncatedBackprop"]


class TruncatedBackprop(Estimator):
    """Truncated backpropagation: one truncation of ``truncation`` steps of a run per call.

    Args:
        truncation: optimizee steps per meta-update (the paper: 20); the last truncation of a
            run is shorter when the run's length is not a multiple.
        min_horizon: draw each run's length log-uniformly in [min_horizon, horizon] (None: the horizon).
        random_offset: start the first run at a uniform step of its length (:mod:`metaopt.estimators.runs`).
        max_loss: clip the per-step losses of the meta-loss to this value (None: no clip; module docs).
        seed: first entry of every run-draw key ``(seed, 0, run)``; read only with ``min_horizon`` or
            ``random_offset`` (and only then recorded in :meth:`settings`).
    """

    def __init__(self, truncation: int = 20, min_horizon: int | None = None, random_offset: bool = False,
                 max_loss: float | None = None, seed: int = 0) -> None:
        if truncation < 1:
            raise ValueError(f"truncation must be >= 1, got {truncation}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.truncation, self.seed = truncation, seed
        self.runs = InnerRuns(min_horizon, random_offset, max_loss)
        self.started = 0  # problems of the training stream started so far
        self._problem: Any = None
        self._carried: dict[str, Any] | None = None  # step, length, params and rule state of the live run

    def estimate(self, learner: OptimizerLearner, problems: Any, iteration: int,
                 track_steps: bool = False) -> Estimate:
        del iteration, track_steps
        if self._carried is None:
            step, length = self.runs.begin(learner.horizon, self.seed, 0, self.started)
            self._problem = problems.batch(self.started).to(learner.device)
            self.started += 1
            self._carried = {"step": step, "length": length, "params": self._problem.init_params(), "state": None}
        elif self._problem is None:  # resumed from a checkpoint: rebuild the live run's problem
            self._problem = problems.batch(self.started - 1).to(learner.device)
            self._carried = {"length": learner.horizon,  # states saved before lengths were drawn
                             **map_tensors(lambda t: t.to(learner.device), self._carried)}
        step, end = self._carried["step"], self._carried["length"]
        length = min(self.truncation, end - step)
        score, trajectory = learner.truncation(self._problem, self._carried["params"], self._carried["state"], step,
                                               length)
        losses, clipped = self.runs.clip(score.step_losses[1:])
        meta_loss = score.loss
        if bool(clipped.any()):
            meta_loss = (learner.truncation_loss(self._problem, trajectory, ~clipped)
                         + self.runs.max_loss * int(clipped.sum()))
        finite = bool(torch.isfinite(meta_loss))
        if finite and not meta_loss.requires_grad:  # every step clipped: the gradient is zero, as torch.clamp's
            for p in learner.parameters():
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        elif finite:
            meta_loss.backward()
            finite = all(bool(torch.isfinite(p.grad).all()) for p in learner.parameters() if p.grad is not None)
        if finite and bool(torch.isfinite(score.loss)) and step + length < end:
            self._carried = map_tensors(torch.Tensor.detach, {"step": step + length, "length": end,
                                                               "params": trajectory.params[-1],
                                                               "state": trajectory.state})
        else:
            self._problem, self._carried = None, None
        loss = losses.mean().item()  # non-finite gradients the trainer sees itself and skips
        return Estimate(loss, {"loss": loss, **self.runs.metrics(int(clipped.sum()))})

    def settings(self) -> dict[str, Any]:
        return {"truncation": self.truncation, **({"seed": self.seed} if self.runs.sampled else {}),
                **self.runs.settings()}

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started, "carried": self._carried}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started, self._carried, self._problem = int(state["started"]), state["carried"], None
