"""The learned-optimizer meta-learner: an update rule meta-trained on optimizees.

Andrychowicz et al. 2016 (§2) train an optimizer with meta-parameters φ on the losses of the
optimizee along its trajectory,

    L(φ) = Σ_{t=1..T} w_t f(θ_t),    θ_{t+1} = θ_t + g_φ(∇f(θ_t)),    w_t = 1,

over problems that bring their own starting point θ_0 (:class:`metaopt.problems.optimizees.Optimizee`);
only the rule is meta-learned. :class:`OptimizerLearner` runs that unroll with the engine's
:class:`metaopt.engine.inner.InnerLoop`: whole (:meth:`~OptimizerLearner.meta_loss`, for
backpropagation through all ``horizon`` steps), in truncations that carry θ and the rule's state
(:meth:`~OptimizerLearner.truncation`, for :class:`metaopt.estimators.truncated.TruncatedBackprop`),
or frozen, to score the rule on held-out problems (:meth:`~OptimizerLearner.losses`). The
evolution-strategies estimators batch their perturbed truncations with :func:`torch.func.vmap`
through :meth:`~OptimizerLearner.functional_truncation`, which takes the optimizee's gradients with
:func:`torch.func.grad_and_value` instead of :func:`torch.autograd.grad`.

Example:
    >>> import torch
    >>> from metaopt.datasets import Quadratics
    >>> from metaopt.engine.rules import LearnedRates
    >>> learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=5)
    >>> problem = Quadratics(batch=4).sample(seed=0)
    >>> loss, metrics = learner.meta_loss(problem)     # Σ_t f(θ_t) of a whole run, by backpropagation
    >>> loss.backward()
    >>> learner.losses(problem).shape                  # f(θ_0), ..., f(θ_5) of the frozen rule
    torch.Size([6])
"""

from __future__ import annotations

from typing import Any

import torch

from metaopt.engine.functional import Params, map_tensors
from metaopt.engine.inner import InnerLoop, Score, Trajectory
from metaopt.engine.learner import Evaluation, Learner
from metaopt.engine.rules import UpdateRule
from metaopt.problems.optimizees import Optimizee

__all__ = ["OptimizerLearner"]


class OptimizerLearner(Learner):
    """Meta-learn the update rule ``rule`` on optimizees over a horizon of ``horizon`` steps.

    Args:
        rule: the learned rule; its parameters are the meta-parameters φ.
        horizon: optimizee steps of a run, in training and in evaluation (the paper: 100).
        first_order: treat the optimizee's gradients as constants in the meta-gradient (the
            paper's choice, §2.1); ``False`` backpropagates through them (second derivatives).
    """

    def __init__(self, rule: UpdateRule, horizon: int = 100, first_order: bool = True) -> None:
        super().__init__()
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.rule = rule
        self.horizon = self.eval_steps = horizon
        self.inner = InnerLoop(rule, first_order=first_order)

    def truncation(self, problem: Optimizee, params: Params, state: Any, start: int,
                   steps: int) -> tuple[Score, Trajectory]:
        """``steps`` differentiable steps from ``params`` and the rule ``state`` (``None``: fresh) at step ``start``.

        θ and the state enter as constants (the truncation boundary). The score's loss is
        ``Σ_{t=start+1..start+steps} f(θ_t, t)``, differentiable in the rule's parameters; its
        step losses are ``f(θ_start), ..., f(θ_{start+steps})``, detached.
        """
        params = {name: p.detach().requires_grad_() for name, p in params.items()}
        trajectory = self.inner.unroll(problem, params, steps, start, map_tensors(torch.Tensor.detach, state))
        return self.inner.score(problem, trajectory, [1.0] * steps, track=True), trajectory

    def init_state(self, params: Params) -> Any:
        """The rule's state before its first step on ``params``: what a truncation from state ``None`` starts from."""
        return self.rule.init(params)  # the inner loop adapts every parameter (no ``adapted`` subset)

    def functional_truncation(self, problem: Optimizee, params: Params, state: Any, start: int,
                              steps: int) -> tuple[torch.Tensor, Params, Any]:
        """:meth:`truncation`'s steps and losses without :func:`torch.autograd.grad`, so that it runs under ``vmap``.

        The optimizee's gradients come from :func:`torch.func.grad_and_value`
        (:meth:`InnerLoop.unroll` with ``functional=True``). Returns the losses
        ``f(θ_{start+1}), ..., f(θ_{start+steps})`` (the step losses of :meth:`truncation`'s score
        after the first), the last parameters and the rule's state after the last step; ``state``
        ``None`` starts from :meth:`init_state`. Nothing is differentiable through it: run it under
        :func:`torch.no_grad` (as :mod:`metaopt.estimators.es` does).
        """
        trajectory = self.inner.unroll(problem, params, steps, start, state, functional=True)
        score = self.inner.score(problem, trajectory, [0.0] * steps, track=True)
        return score.step_losses[1:], trajectory.params[-1], trajectory.state

    def truncation_loss(self, problem: Optimizee, trajectory: Trajectory, kept: torch.Tensor) -> torch.Tensor:
        """The loss of :meth:`truncation` over the kept steps only: ``Σ_{t kept} f(θ_t, t)``, differentiable.

        ``kept`` (bool, one entry per step ``start+1..end`` of ``trajectory``) leaves the other steps
        out of the sum and of its gradient; with none kept the result is a zero without a graph. This is
        how :class:`metaopt.estimators.truncated.TruncatedBackprop` clips a diverging run's losses.
        """
        return self.inner.score(problem, trajectory, [float(k) for k in kept.tolist()], track=False).loss

    def meta_loss(self, batch: Optimizee, track_steps: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """The meta-loss Σ_{t=1..horizon} f(θ_t) of one whole run on ``batch`` (one problem), and its mean per step."""
        del track_steps
        score, _ = self.truncation(batch, batch.init_params(), None, 0, self.horizon)
        return score.loss, {"loss": score.step_losses[1:].mean().item()}

    @torch.no_grad()
    def losses(self, problem: Optimizee, steps: int | None = None) -> torch.Tensor:
        """``f(θ_0), ..., f(θ_steps)`` (``[steps + 1]``) of the frozen rule on ``problem`` (default: the horizon)."""
        steps = self.horizon if steps is None else steps
        trajectory = self.inner.unroll(problem, problem.init_params(), steps)
        return self.inner.score(problem, trajectory, [0.0] * steps, track=True).step_losses

    def evaluate(self, batch: Optimizee, steps: int | None = None) -> Evaluation:
        """The mean loss of the frozen rule's run over steps ``1..steps`` (the meta-objective per step)."""
        return Evaluation("loss", self.losses(batch, steps)[1:].mean().reshape(1))

