"""The unrolled inner loop: K functional steps of an update rule on a problem, and their outer score.

For one problem, starting from θ_start the loop takes K steps of an update rule on the inner loss,

    θ_{t+1}, s_{t+1} = rule.step(θ_t, ∇ L_in(θ_t), s_t, StepInfo(t, L_in(θ_t)))     t = start..start+K-1

and :meth:`InnerLoop.score` weighs the outer losses of the parameters it produced,
Σ_t w_t · L_out(θ_t) (MAML: ``w`` = last step only, Finn et al. 2017, Algorithm 2; a learned
optimizer: every step, Andrychowicz et al. 2016, §2). Only the parameters named in ``adapted``
move; the others are used as they are (ANIL adapts the head only). ``first_order`` treats the inner
gradients as constants; it is the only difference between MAML and first-order MAML, and the
Andrychowicz et al. optimizer's choice. A rule that reads validation losses (``rule.validation_every
= k``) gets the problem's validation loss after every ``k``-th step (:meth:`UpdateRule.validate`,
detached). A truncated unroll starts at ``start`` from a carried rule
state and continues where the previous truncation stopped.

Gradients are taken in one of three ways: with :func:`torch.autograd.grad` (differentiable,
second order unless ``first_order``), detached under :func:`torch.no_grad` (evaluation: each
step's memory is freed at once), or with :func:`torch.func.grad_and_value` (``functional=True``,
inside ``vmap``). Batching the tasks of a meta-batch is :mod:`metaopt.engine.batching`'s job.

Second-order memory grows with ``K``: every step keeps the activations of its inner forward and
backward pass for the meta-backward. With ``checkpoint_steps`` each step keeps only the parameters
and rule state it starts from and is recomputed when the meta-backward reaches it
(:mod:`metaopt.engine.recompute`): same meta-gradients, memory of one step.

Example:
    >>> import torch
    >>> from metaopt.engine.rules import sgd
    >>> from metaopt.problems.episode_task import EpisodeTask, default_loss
    >>> model = torch.nn.Linear(1, 1)
    >>> x = torch.randn(10, 1)
    >>> task = EpisodeTask(model, default_loss, x, 2 * x, x, 2 * x)
    >>> loop = InnerLoop(sgd(0.1))
    >>> trajectory = loop.unroll(task, dict(model.named_parameters()), steps=3)
    >>> len(trajectory.params), loop.score(task, trajectory, resolve_weights(3, None), track=False).loss.shape
    (4, torch.Size([]))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metaopt.engine.functional import Params, grads, select
from metaopt.engine.recompute import recomputed
from metaopt.engine.rules import StepInfo, UpdateRule
from metaopt.engine.step_context import inner_step, outer_pass
from metaopt.problems.problem import Problem

__all__ = ["InnerLoop", "Score", "Trajectory", "resolve_weights"]

_GradFn = Callable[[Problem, Params, Params, int], tuple[Params, torch.Tensor]]  # gradients, inner loss


def resolve_weights(steps: int, weights: Sequence[float] | None) -> list[float]:
    """The outer-loss weights of steps 1..K: ``weights`` checked, or the last step only when ``None``."""
    weights = [0.0] * (steps - 1) + [1.0] if weights is None else list(weights)
    if len(weights) != steps:
        raise ValueError(f"{len(weights)} step weights given for {steps} inner steps")
    return weights


@dataclass(frozen=True)
class Trajectory:
    """The parameters an unroll went through and what it carries on.

    Attributes:
        params: θ_start, ..., θ_{start+K}, each the full parameter dict.
        state: the rule's state after the last step.
        start: the step index of ``params[0]``.
        inner_losses: ``L_in(θ_t)`` for ``t = start..start+K-1`` with their graphs, kept only
            for problems whose outer loss is their inner loss (empty otherwise).
    """

    params: list[Params]
    state: Any
    start: int
    inner_losses: list[torch.Tensor]

    @property
    def end(self) -> int:
        """The step index of the last parameters, ``start + K``."""
        return self.start + len(self.params) - 1


@dataclass(frozen=True)
class Score:
    """The outer score of a trajectory.

    Attributes:
        loss: Σ_t w_t L_out(θ_t) (differentiable).
        step_losses: ``L_out(θ_t)`` for every ``t`` of the trajectory (detached), or empty unless tracked.
        accuracy: the accuracy of the last parameters (detached), for problems that have one.
    """

    loss: torch.Tensor
    step_losses: torch.Tensor
    accuracy: torch.Tensor | None


class InnerLoop:
    """K functional steps of ``rule`` on a problem's inner loss (see the module docs).

    Args:
        rule: the update rule (owns its meta-parameters).
        adapted: names of the parameters the rule updates (default: all it is given).
        first_order: treat inner gradients as constants (first-order meta-gradients).
        checkpoint_steps: recompute each second-order step during the meta-backward instead of
            storing its activations; needs ``model`` (whose modes and buffers the recomputation
            must see as the forward pass did) and cannot run under ``vmap``.
        model: the network the problems run, for ``checkpoint_steps``.
    """

    def __init__(self, rule: UpdateRule, adapted: Sequence[str] | None = None, first_order: bool = False,
                 checkpoint_steps: bool = False, model: nn.Module | None = None) -> None:
        if checkpoint_steps and model is None:
            raise ValueError("checkpoint_steps needs the model, whose state each recomputed step must see")
        self.rule = rule
        self.adapted = None if adapted is None else tuple(adapted)
        self.first_order = first_order
        self.checkpoint_steps = checkpoint_steps
        self.model = model

    def _split(self, params: Params) -> tuple[Params, Params]:
        fast = params if self.adapted is None else select(params, self.adapted)
        return fast, {k: v for k, v in params.items() if k not in fast}

    def unroll(self, problem: Problem, params: Params, steps: int, start: int = 0, state: Any = None,
               functional: bool = False) -> Trajectory:
        """Take ``steps`` steps on ``problem`` from ``params`` at step ``start`` (and the rule ``state``, if carried).

        With gradients enabled the result is differentiable with respect to ``params`` and the
        rule's meta-parameters; under :func:`torch.no_grad` it is detached. ``functional`` takes
        gradients with :func:`torch.func.grad_and_value` (inside ``vmap``).
        """
        recompute = False
        if functional:
            grad_fn = self._func_grads
        elif torch.is_grad_enabled():
            grad_fn, recompute = self._autograd_grads, self.checkpoint_steps and not self.first_order
        else:
            grad_fn, params = self._detached_grads, {k: v.detach() for k, v in params.items()}
        fast, fixed = self._split(params)
        state = self.rule.init(fast) if state is None else state
        path, losses = [params], []
        for t in range(start, start + steps):
            if recompute:
                fast, state, loss = recomputed(self.model, self._step, problem, fast, fixed, state, t, grad_fn)
            else:
                fast, state, loss = self._step(problem, fast, fixed, state, t, grad_fn)
            path.append({**fixed, **fast})
            if problem.outer_is_inner:
                losses.append(loss)
        return Trajectory(path, state, start, losses)

    def _step(self, problem: Problem, fast: Params, fixed: Params, state: Any, t: int,
              grad_fn: _GradFn) -> tuple[Params, Any, torch.Tensor]:
        with inner_step(t):
            gradients, loss = grad_fn(problem, fast, fixed, t)
        fast, state = self.rule.step(fast, gradients, state, StepInfo(t, loss.detach()))
        every = self.rule.validation_every
        if every and (t + 1) % every == 0:
            with torch.no_grad():
                valid = problem.validation_loss({**fixed, **fast}, t)
            if valid is not None:
                state = self.rule.validate(state, valid.detach())
        return fast, state, loss

    def _autograd_grads(self, problem: Problem, fast: Params, fixed: Params, t: int) -> tuple[Params, torch.Tensor]:
        loss = problem.inner_loss({**fixed, **fast}, t)
        return grads(loss, fast, create_graph=not self.first_order, retain_graph=problem.outer_is_inner or None), loss

    def _detached_grads(self, problem: Problem, fast: Params, fixed: Params, t: int) -> tuple[Params, torch.Tensor]:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in fast.items()}
            loss = problem.inner_loss({**fixed, **leaves}, t)
            return grads(loss, leaves, create_graph=False), loss.detach()

    def _func_grads(self, problem: Problem, fast: Params, fixed: Params, t: int) -> tuple[Params, torch.Tensor]:
        g, loss = torch.func.grad_and_value(lambda p: problem.inner_loss({**fixed, **p}, t))(fast)
        return ({k: v.detach() for k, v in g.items()} if self.first_order else g), loss

    @staticmethod
    def score(problem: Problem, trajectory: Trajectory, weights: Sequence[float], track: bool) -> Score:
        """Σ_t w_t L_out(θ_t) over the steps of ``trajectory`` (``weights`` for steps start+1..end).

        The outer pass on θ_t belongs to the step that produced it (:func:`inner_step` ``t - 1``).
        Problems whose outer loss is their inner loss reuse the trajectory's inner losses.
        """
        start, end = trajectory.start, trajectory.end
        loss, accuracy = None, None
        step_losses = []
        for t, theta in enumerate(trajectory.params, start):
            w = weights[t - start - 1] if t > start else 0.0
            if not (w or track or t == end):
                continue
            if problem.outer_is_inner and t < end:
                step_loss = trajectory.inner_losses[t - start]
            else:
                with inner_step(max(t - 1, 0)), outer_pass():
                    step_loss, accuracy = problem.outer_loss(theta, t)
            if w:
                loss = w * step_loss if loss is None else loss + w * step_loss
            step_losses.append(step_loss.detach())
        loss = step_losses[-1].new_zeros(()) if loss is None else loss
        tracked = torch.stack(step_losses) if track else loss.new_zeros(0)
        return Score(loss, tracked, accuracy)
