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

With ``tasks`` > 1, that many runs go side by side, each its own problem of the stream (a run
that ends takes the next problem, tasks in order), and the meta-gradient and loss are the means over
the tasks. On several processes (:meth:`TruncatedBackprop.distribute`) rank ``r`` unrolls its share
of the tasks, the ranks sum their gradients in one flat bucket and gather where their runs stand, so
every rank carries every task's run (the state a checkpoint needs, whatever the number of processes).

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
from metaopt.training.distributed import DistributedError, World

__all__ = ["TruncatedBackprop"]


class TruncatedBackprop(Estimator):
    """Truncated backpropagation: one truncation of ``truncation`` steps of every task's run per call.

    Args:
        truncation: optimizee steps per meta-update (the paper: 20); the last truncation of a
            run is shorter when the run's length is not a multiple.
        min_horizon: draw each run's length log-uniformly in [min_horizon, horizon] (None: the horizon).
        random_offset: start each task's first run at a uniform step of its length (:mod:`metaopt.estimators.runs`).
        max_loss: clip the per-step losses of the meta-loss to this value (None: no clip; module docs).
        seed: first entry of every run-draw key ``(seed, task, run)``; read only with ``min_horizon`` or
            ``random_offset`` (and only then recorded in :meth:`settings`).
        tasks: runs unrolled side by side, each its own problem; their meta-gradients averaged.
    """

    def __init__(self, truncation: int = 20, min_horizon: int | None = None, random_offset: bool = False,
                 max_loss: float | None = None, seed: int = 0, tasks: int = 1) -> None:
        for name, value in (("truncation", truncation), ("tasks", tasks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.truncation, self.seed, self.tasks = truncation, seed, tasks
        self.runs = InnerRuns(min_horizon, random_offset, max_loss)
        self.started = 0  # problems of the training stream started so far
        self._task_runs = [0] * tasks  # runs each task has started: the run index of its draws
        self._problems: list[Any] = [None] * tasks  # each task's live problem (rebuilt after a resume)
        self._carried: list[dict[str, Any] | None] = [None] * tasks  # problem, step, length, params, rule state

    def distribute(self, world: World) -> None:
        if self.tasks < world.size:
            raise DistributedError(f"truncated backpropagation with tasks={self.tasks} cannot share its runs over "
                                   f"{world.size} processes: give it at least tasks={world.size} (option tasks)")
        self.world = world

    def _live(self, task: int, problems: Any, learner: OptimizerLearner, build: bool) -> dict[str, Any]:
        """``task``'s carried run, a fresh one on the next problem of the stream when it has none.

        ``build``: build the run's problem (only the rank that unrolls the task needs it).
        """
        carried = self._carried[task]
        if carried is None:
            step, length = self.runs.begin(learner.horizon, self.seed, task, self._task_runs[task])
            index, self.started = self.started, self.started + 1
            self._task_runs[task] += 1
            self._problems[task] = problems.batch(index).to(learner.device) if build else None
            carried = {"problem": index, "step": step, "length": length,
                       "params": None if self._problems[task] is None else self._problems[task].init_params(),
                       "state": None}
        elif build and self._problems[task] is None:  # resumed, or the run came from another rank
            # states saved before runs recorded their problem (one task) or length: the last problem, the horizon
            carried = {"problem": self.started - 1, "length": learner.horizon,
                       **map_tensors(lambda t: t.to(learner.device), carried)}
            self._problems[task] = problems.batch(carried["problem"]).to(learner.device)
        self._carried[task] = carried
        return carried

    def estimate(self, learner: OptimizerLearner, problems: Any, iteration: int,
                 track_steps: bool = False) -> Estimate:
        del iteration, track_steps
        mine = self.world.share(self.tasks)
        params = [p for p in learner.parameters() if p.requires_grad]
        runs = [self._live(task, problems, learner, build=task in mine) for task in range(self.tasks)]
        outcomes = {task: self._truncation(learner, params, task, runs[task]) for task in mine}
        if self.world.active:
            self.world.all_reduce_gradients(params, 1.0, {})
            outcomes = {task: (map_tensors(lambda t: t.to(learner.device), carried), loss, clipped)
                        for shared in self.world.gather({task: (map_tensors(torch.Tensor.cpu, carried), loss, clipped)
                                                         for task, (carried, loss, clipped) in outcomes.items()})
                        for task, (carried, loss, clipped) in shared.items()}
        for task, (carried, _, _) in outcomes.items():
            self._carried[task] = carried
            if carried is None or task not in mine:
                self._problems[task] = None
        loss = sum(outcomes[task][1] for task in range(self.tasks)) / self.tasks
        clipped = sum(outcomes[task][2] for task in range(self.tasks))
        return Estimate(loss, {"loss": loss, **self.runs.metrics(clipped)})

    def _truncation(self, learner: OptimizerLearner, params: list[torch.Tensor], task: int,
                    run: dict[str, Any]) -> tuple[dict[str, Any] | None, float, int]:
        """One truncation of ``task``'s run: its gradient / tasks added to ``params``' ``.grad``.

        Returns where the run stands after it (``None``: it ended), its mean (clipped) loss, and the
        number of clipped steps. A non-finite gradient is added all the same (the trainer skips the update).
        """
        problem, step, end = self._problems[task], run["step"], run["length"]
        length = min(self.truncation, end - step)
        score, trajectory = learner.truncation(problem, run["params"], run["state"], step, length)
        losses, clipped = self.runs.clip(score.step_losses[1:])
        meta_loss = score.loss
        if bool(clipped.any()):
            meta_loss = (learner.truncation_loss(problem, trajectory, ~clipped)
                         + self.runs.max_loss * int(clipped.sum()))
        finite = bool(torch.isfinite(meta_loss))
        if finite and not meta_loss.requires_grad:  # every step clipped: the gradient is zero, as torch.clamp's
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        elif finite:
            grads = torch.autograd.grad(meta_loss / self.tasks, params, allow_unused=True)
            finite = all(bool(torch.isfinite(g).all()) for g in grads if g is not None)
            for p, g in zip(params, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        carried = None
        if finite and bool(torch.isfinite(score.loss)) and step + length < end:
            carried = map_tensors(torch.Tensor.detach, {"problem": run["problem"], "step": step + length,
                                                        "length": end, "params": trajectory.params[-1],
                                                        "state": trajectory.state})
        loss = losses.mean().item()  # non-finite gradients the trainer sees itself and skips
        return carried, loss, int(clipped.sum())

    def settings(self) -> dict[str, Any]:
        return {"truncation": self.truncation, **({"seed": self.seed} if self.runs.sampled else {}),
                **({"tasks": self.tasks} if self.tasks != 1 else {}), **self.runs.settings()}

    def state_dict(self) -> dict[str, Any]:
        if self.tasks == 1:  # the layout of the runs before tasks
            return {"started": self.started, "carried": self._carried[0]}
        return {"started": self.started, "carried": list(self._carried), "task_runs": list(self._task_runs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        carried = state["carried"] if isinstance(state["carried"], list) else [state["carried"]]
        if len(carried) != self.tasks:
            raise ValueError(f"the state holds {len(carried)} runs, but this estimator has tasks={self.tasks}")
        self.started, self._carried, self._problems = int(state["started"]), list(carried), [None] * self.tasks
        self._task_runs = [int(n) for n in state.get("task_runs", [self.started])]
