"""The inner loop driven by ``higher``: any ``torch.optim`` optimizer as the inner update rule.

:class:`HigherRule` names the inner optimizer: a factory of any ``torch.optim`` optimizer that
``higher`` supports (SGD, Adam, RMSprop, ...) with meta-learned hyper-parameters (``override``),
or an update rule that has a ``torch.optim`` counterpart (``sgd``, per-step rates). Given one, a
:class:`metaopt.engine.meta_learner.MetaLearner` unrolls its inner loop with :class:`HigherLoop`
instead of :class:`metaopt.engine.inner.InnerLoop`; both produce the same
:class:`metaopt.engine.inner.Trajectory`, scored the same way, and with SGD the same
meta-gradients (tested).

Three choices matter (checked against the source of higher 0.2.1):

* ``copy_initial_weights=False``: the patched model starts from the model's own weights rather
  than from detached copies, so meta-gradients reach them.
* First-order detaches the inner gradients in ``grad_callback``. ``track_higher_grads=False``
  would detach the *parameters* after every step and cut the meta-gradient entirely; it is used
  only when gradients are disabled (evaluation), where it frees each step's graph at once.
* Only the adapted parameters are handed to the optimizer; the others enter the loss but are
  never stepped (ANIL).

``higher`` cannot be batched with ``vmap``: tasks run one after another. Its differentiable
RMSprop warns that its gradients can be wrong (where a second moment is exactly zero); the
warning is passed on, not silenced.

References:
    Grefenstette et al., 2019. Generalized Inner Loop Meta-Learning.
    https://arxiv.org/abs/1910.01727

Example:
    >>> import torch
    >>> from metaopt.problems.episode_task import EpisodeTask, default_loss
    >>> model = torch.nn.Linear(1, 1)
    >>> rule = HigherRule(lambda params: torch.optim.Adam(params, lr=0.1), override={"lr": 0.1})
    >>> x = torch.randn(10, 1)
    >>> trajectory = HigherLoop(model, rule).unroll(EpisodeTask(model, default_loss, x, 2 * x, x, 2 * x),
    ...                                             dict(model.named_parameters()), steps=2)
    >>> len(trajectory.params)
    3
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import higher
import torch
from torch import nn

from metaopt.engine.functional import Params
from metaopt.engine.inner import InnerLoop, Trajectory
from metaopt.engine.rules import HyperParameters, OptimizerFactory, UpdateRule
from metaopt.engine.step_context import inner_step
from metaopt.problems.problem import Problem

__all__ = ["HigherLoop", "HigherRule"]


def _as_parameter(value: float | torch.Tensor) -> nn.Parameter:
    """``value`` as a meta-parameter: an ``nn.Parameter`` is kept, a tensor or float becomes one."""
    if isinstance(value, nn.Parameter):
        return value
    return nn.Parameter(value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value)))


class HigherRule(nn.Module):
    """A ``torch.optim`` optimizer as the inner rule, run by ``higher``.

    Args:
        optimizer: a factory ``params -> torch.optim.Optimizer`` (e.g. ``lambda params:
            torch.optim.Adam(params, lr=1e-2)``), or an :class:`UpdateRule` with a ``torch.optim``
            counterpart (:meth:`UpdateRule.torch_optimizer`, e.g. ``sgd(0.4)``), whose own
            meta-parameters are then learned.
        override: factory only: hyper-parameters of the optimizer to meta-learn, e.g.
            ``{"lr": 0.01}``. Each value becomes an ``nn.Parameter`` (a float, a 0-d one) in
            ``self.override`` and replaces the optimizer's own value in every parameter group.
    """

    def __init__(self, optimizer: OptimizerFactory | UpdateRule,
                 override: Mapping[str, float | torch.Tensor] | None = None) -> None:
        super().__init__()
        self.override = nn.ParameterDict({k: _as_parameter(v) for k, v in (override or {}).items()})
        self.source = optimizer if isinstance(optimizer, UpdateRule) else None
        if self.source is not None:
            if override is not None:
                raise ValueError("override sets hyper-parameters of an optimizer factory; a rule's meta-parameters "
                                 "are its own (e.g. sgd(lr, learnable=True))")
            self.make_optimizer, self.hyperparameters = self.source.torch_optimizer()
        else:
            self.make_optimizer = optimizer
            self.hyperparameters: HyperParameters = lambda t: {k: [v] for k, v in self.override.items()}

    def logged(self) -> dict[str, float]:
        """The figures of the rule it runs, if any (:meth:`UpdateRule.logged`)."""
        return {} if self.source is None else self.source.logged()


class HigherLoop:
    """K steps of a ``torch.optim`` optimizer on a problem's inner loss, unrolled by ``higher``.

    Args:
        model: the network; ``higher`` patches a functional copy per task, ``model`` is never
            mutated.
        rule: the optimizer and its meta-learned hyper-parameters.
        adapted: names of the parameters the optimizer updates (default: all of ``params``).
        first_order: treat inner gradients as constants (first-order meta-gradients).
    """

    score = staticmethod(InnerLoop.score)

    def __init__(self, model: nn.Module, rule: HigherRule, adapted: Sequence[str] | None = None,
                 first_order: bool = False) -> None:
        self.model = model
        self.rule = rule
        self.adapted = None if adapted is None else tuple(adapted)
        self.first_order = first_order
        probe = self._optimizer([name for name, p in model.named_parameters() if p.requires_grad])
        unknown = sorted(set(rule.hyperparameters(0)) - set(probe.defaults))
        if unknown:
            raise ValueError(f"override names {unknown}, which {type(probe).__name__} does not have; its "
                             f"hyper-parameters are {sorted(probe.defaults)}")

    def _optimizer(self, names: Sequence[str]) -> torch.optim.Optimizer:
        keep = set(names) if self.adapted is None else set(names) & set(self.adapted)
        optimizer = self.rule.make_optimizer([p for name, p in self.model.named_parameters() if name in keep])
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"the inner optimizer factory must return a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        return optimizer

    def unroll(self, problem: Problem, params: Params, steps: int, start: int = 0, state: Any = None,
               functional: bool = False) -> Trajectory:
        """Run ``steps`` optimizer steps on ``problem``; the parameters at steps 0..K.

        ``params`` holds θ_0 by name (parameters of ``model`` missing from it are used as they
        are). With gradients enabled the result is differentiable with respect to θ_0 and the
        rule's hyper-parameters; under :func:`torch.no_grad` it is detached. The optimizer starts
        afresh (``start`` must be 0, ``state`` ``None``) and cannot run under ``vmap``.
        """
        if start or state is not None or functional:
            raise ValueError("the higher driver runs whole unrolls from a fresh optimizer, outside vmap")
        tracking = torch.is_grad_enabled()
        fast = [name for name in params if self.adapted is None or name in self.adapted]
        if not tracking:
            params = {k: v.detach().requires_grad_(k in fast) for k, v in params.items()}
        names = [name for name, _ in self.model.named_parameters()]
        position = {name: i for i, name in enumerate(names)}
        flat = [params.get(name, p) for name, p in self.model.named_parameters()]

        def checked(gradients: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
            for name in fast:
                if gradients[position[name]] is None:
                    raise ValueError(f"parameter {name!r} received no gradient from the inner loss; leave it out "
                                     "of the adapted set (adapt=...) or make the loss depend on it")
            if self.first_order:
                return [None if g is None else g.detach() for g in gradients]
            return list(gradients)

        context = higher.innerloop_ctx(self.model, self._optimizer(fast), copy_initial_weights=False,
                                       track_higher_grads=tracking)
        path = [params]
        with torch.enable_grad(), context as (_, diffopt):
            for t in range(steps):
                with inner_step(t):
                    loss = problem.inner_loss(dict(zip(names, flat)), t)
                flat = diffopt.step(loss, params=flat, override=self.rule.hyperparameters(t), grad_callback=checked)
                path.append({name: flat[position[name]] for name in params})
        if not tracking:
            path = [{k: v.detach() for k, v in theta.items()} for theta in path]
        return Trajectory(path, None, 0, [])
