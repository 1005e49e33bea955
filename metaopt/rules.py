"""Inner-loop update rules: ``init(params) -> state`` and ``step(params, grads, state, t) -> (params, state)``.

A rule is an :class:`torch.nn.Module` so that it owns its meta-parameters (learned learning
rates, LSTM weights...): they appear in ``algorithm.parameters()`` and in checkpoints. Rules are
pure: ``step`` returns new tensors and never changes its inputs, so the unrolled inner loop is
differentiable end to end.

Example:
    >>> import torch
    >>> rule = sgd(lr=0.5)
    >>> params = {"w": torch.ones(2)}
    >>> state = rule.init(params)
    >>> new, state = rule.step(params, {"w": torch.ones(2)}, state, t=0)
    >>> new["w"]
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from metaopt.functional import Params

__all__ = ["OptimizerFactory", "UpdateRule", "sgd"]

#: Builds a ``torch.optim`` optimizer over the parameters it is given (the ``higher`` driver's inner optimizer).
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class UpdateRule(nn.Module):
    """Base class of update rules ``θ_{t+1}, s_{t+1} = step(θ_t, ∇L_in(θ_t), s_t, t)``."""

    def init(self, params: Params) -> Any:
        """The rule's state before the first inner step (stateless rules return ``()``)."""
        del params
        return ()

    def step(self, params: Params, grads: Params, state: Any, t: int) -> tuple[Params, Any]:
        raise NotImplementedError

    def torch_optimizer(self) -> tuple[OptimizerFactory, dict[str, torch.Tensor]]:
        """The same rule as a ``torch.optim`` optimizer, for the ``higher`` driver.

        Returns:
            A factory ``params -> torch.optim.Optimizer`` and the rule's meta-learned
            hyper-parameters (its ``nn.Parameter`` s), which ``higher`` receives as ``override`` so
            that meta-gradients reach them.

        Raises:
            NotImplementedError: the rule has no ``torch.optim`` counterpart.
        """
        raise NotImplementedError(f"{type(self).__name__} has no torch.optim counterpart; use driver='func', or "
                                  "driver='higher' with inner_optimizer=... instead of a rule")


class _SGD(UpdateRule):
    def __init__(self, lr: float, learnable: bool) -> None:
        super().__init__()
        value = torch.tensor(float(lr))
        if learnable:
            self.lr = nn.Parameter(value)
        else:
            self.register_buffer("lr", value)

    def step(self, params: Params, grads: Params, state: Any, t: int) -> tuple[Params, Any]:
        del t
        return {name: p - self.lr * grads[name] for name, p in params.items()}, state

    def torch_optimizer(self) -> tuple[OptimizerFactory, dict[str, torch.Tensor]]:
        learned = {"lr": self.lr} if isinstance(self.lr, nn.Parameter) else {}
        return (lambda params: torch.optim.SGD(params, lr=self.lr.item())), learned

    def extra_repr(self) -> str:
        return f"lr={self.lr.item():g}, learnable={isinstance(self.lr, nn.Parameter)}"


def sgd(lr: float, learnable: bool = False) -> UpdateRule:
    """Plain gradient descent ``θ ← θ - lr · ∇L`` (MAML's inner rule, Finn et al. 2017, §2.2).

    Args:
        lr: the inner learning rate (> 0).
        learnable: make ``lr`` a meta-parameter learned in the outer loop (one scalar).
    """
    if not lr > 0:
        raise ValueError(f"inner learning rate must be > 0, got {lr}")
    return _SGD(lr, learnable)
