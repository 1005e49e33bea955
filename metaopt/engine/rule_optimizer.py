"""A learned update rule run as a ``torch.optim`` optimizer: what every learned optimizer shares.

A trained rule leaves the engine as an ordinary optimizer (``opt.zero_grad(); loss.backward();
opt.step()``). :class:`RuleOptimizer` is the part that does not depend on the rule: every
parameter group has a learning-rate multiplier ``lr`` (default 1.0, the rule as trained) that
scales the rule's update, so ``torch.optim.lr_scheduler`` schedules work as with any optimizer;
``step`` takes an optional closure; a rule loaded from a file moves to the parameters' device
and dtype. A subclass implements :meth:`RuleOptimizer.apply` for the parameters that have a
gradient (the rule runs without autograd and is never trained here).

Example:
    >>> import torch
    >>> class HalfGradient(RuleOptimizer):
    ...     def apply(self, scaled, loss):
    ...         for p, lr in scaled:
    ...             add_update(p, -0.5 * p.grad, lr)
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = HalfGradient([w], rule=torch.nn.Identity(), lr=0.5)
    >>> w.sum().backward(); opt.step(); w.tolist()
    [0.75, 0.75]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["RuleOptimizer", "add_update", "check_multiplier", "closure_loss", "one_source"]


def check_multiplier(lr: object, owner: str) -> float:
    """``lr`` as a float: a finite number >= 0 (a one-element tensor is taken as its value)."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{owner}'s lr multiplies the learned rule's update and must be a finite number >= 0, got "
                         f"{lr!r}; pass lr=1.0 (the rule as trained) or a fraction such as lr=0.5")
    return float(lr)


def one_source(owner: str, sources: dict[str, object], takes: str) -> str:
    """The one name of ``sources`` whose value is given (not ``None``); ``takes`` says what each one is.

    Raises:
        ValueError: none or several are given.
    """
    given = [name for name, value in sources.items() if value is not None]
    if len(given) != 1:
        raise ValueError(f"{owner} takes {takes}, exactly one of them; got {given or 'none'}")
    return given[0]


def closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """The loss of a ``torch.optim`` step's ``closure``, evaluated with gradients on (None without a closure)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def add_update(param: torch.Tensor, update: torch.Tensor, lr: float) -> None:
    """``param += lr · update`` in place; ``lr = 1`` adds the rule's update exactly (no multiplication)."""
    if lr == 1.0:
        param.add_(update.view_as(param))
    else:
        param.add_(update.view_as(param), alpha=lr)


class RuleOptimizer(torch.optim.Optimizer):
    """Base of the optimizers that run a learned rule (see the module docs).

    Args:
        params: parameters (or parameter groups, which may set their own ``lr``) to optimize.
        rule: the rule to run (a module; a subclass loads it and passes it through :meth:`placed`).
        lr: the default multiplier of the rule's update (a finite number >= 0).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: nn.Module | None,
                 lr: float = 1.0) -> None:
        super().__init__(params, defaults={"lr": check_multiplier(lr, type(self).__name__)})
        self.rule = rule

    def placed(self, rule: nn.Module) -> nn.Module:
        """``rule`` on the device (and, for floating parameters, the dtype) of the first parameter."""
        first = self.param_groups[0]["params"][0]
        return rule.to(first.device, first.dtype) if first.is_floating_point() else rule.to(first.device)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters; its ``lr`` (default: the optimizer's) is checked."""
        if "lr" in param_group:
            param_group = {**param_group, "lr": check_multiplier(param_group["lr"], type(self).__name__)}
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output; groups saved before groups had an ``lr`` get 1.0 (the rule as trained)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("lr", 1.0)

    def apply(self, scaled: list[tuple[torch.Tensor, float]], loss: torch.Tensor | None) -> None:
        """Update in place each parameter of ``scaled`` (those with a gradient), with its group's ``lr``.

        ``loss`` is the loss whose gradients the parameters hold, when the caller gave it (rules that
        read the loss use it; the others ignore it).
        """
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             loss: torch.Tensor | float | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient; ``closure`` re-evaluates the loss (returned, as in torch.optim).

        Rules that read the loss get the closure's, or ``loss`` when the gradients were taken outside
        (``loss.backward(); opt.step(loss=loss)``); giving both is an error.
        """
        if closure is not None and loss is not None:
            raise ValueError("give step() a closure or a loss, not both: the closure's loss is the one the rule reads")
        returned = closure_loss(closure)
        if closure is not None:
            loss = returned
        scaled = [(p, group["lr"]) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if scaled:
            self.apply(scaled, None if loss is None else torch.as_tensor(loss).detach())
        return returned
