"""Update rules: ``init(params) -> state`` and ``step(params, grads, state, info) -> (params, state)``.

A rule is an :class:`torch.nn.Module` so that it owns its meta-parameters (learned learning
rates, LSTM weights...): they appear in ``learner.parameters()`` and in checkpoints. Rules are
pure: ``step`` returns new tensors and never changes its inputs, so the unrolled inner loop is
differentiable end to end. ``info`` (:class:`StepInfo`) carries the step index and the inner
loss, for rules that read them (the Ravi & Larochelle meta-learner reads the loss).

Fixed hyper-parameters are Python numbers, so that they take the parameters' dtype and device
exactly (a learning rate of 0.3 is 0.3 in float64, not float32's 0.30000001192); learned ones
are ``nn.Parameter`` s created in the dtype of the parameters they act on.

Example:
    >>> import torch
    >>> rule = sgd(lr=0.5)
    >>> params = {"w": torch.ones(2)}
    >>> state = rule.init(params)
    >>> new, state = rule.step(params, {"w": torch.ones(2)}, state, StepInfo(0))
    >>> new["w"]
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metaopt.engine.functional import Params

__all__ = ["HyperParameters", "LearnedRates", "OptimizerFactory", "StepInfo", "UpdateRule", "check_lr", "meta_sgd",
           "per_step_sgd", "sgd"]

#: Builds a ``torch.optim`` optimizer over the parameters it is given (the ``higher`` driver's inner optimizer).
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
#: The meta-learned hyper-parameters of a ``torch.optim`` optimizer at inner step ``t``, as ``higher``'s
#: ``override`` takes them: name -> one tensor for every parameter group, or one per group.
HyperParameters = Callable[[int], dict[str, list[torch.Tensor]]]


def check_lr(lr: object, name: str = "inner_lr") -> float:
    """``lr`` as a float, checked: a real number (not a string or a bool), finite and > 0.

    Every rule and algorithm that takes a step size checks it here, once, when it is built.

    Args:
        lr: the step size as given (a Python or numpy number, or a one-element tensor).
        name: the argument's name, for the message.

    Raises:
        ValueError: naming the value and the fix.

    Example:
        >>> check_lr(0.1)
        0.1
        >>> check_lr("0.1")
        Traceback (most recent call last):
            ...
        ValueError: inner_lr must be a number, got the string '0.1'; pass inner_lr=0.1 (a float, not a str)
    """
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.is_floating_point():
        lr = lr.item()
    if isinstance(lr, str):
        try:
            hint = f"pass {name}={float(lr)!r} (a float, not a str)"
        except ValueError:
            hint = f"pass a number, e.g. {name}=0.01"
        raise ValueError(f"{name} must be a number, got the string {lr!r}; {hint}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise ValueError(f"{name} must be a number, got {lr!r} ({type(lr).__name__}); pass a float, e.g. {name}=0.01")
    value = float(lr)
    if not (value > 0 and math.isfinite(value)):
        broken = "finite" if math.isinf(value) else "> 0"
        raise ValueError(f"inner learning rate must be {broken}, got {value}; pass a finite positive step size as "
                         f"{name}, e.g. {name}=0.01")
    return value


@dataclass(frozen=True)
class StepInfo:
    """What an update rule may read besides the parameters, their gradients and its state.

    Attributes:
        t: the inner step (0 for the first).
        loss: the inner loss ``L_in(θ_t)`` whose gradients the rule receives (detached), or
            ``None`` where the caller has none (a ``torch.optim`` step without a closure).
    """

    t: int
    loss: torch.Tensor | None = None


class UpdateRule(nn.Module):
    """Base class of update rules ``θ_{t+1}, s_{t+1} = step(θ_t, ∇L_in(θ_t), s_t, info)``.

    Attributes:
        validation_every: a rule that reads validation losses sets it to ``k``: the inner loop then
            calls :meth:`validate` after every ``k``-th step with the problem's validation loss
            (where the problem has one). 0: the rule reads none.
    """

    validation_every: int = 0

    def init(self, params: Params) -> Any:
        """The rule's state before the first inner step (stateless rules return ``()``)."""
        del params
        return ()

    def step(self, params: Params, grads: Params, state: Any, info: StepInfo) -> tuple[Params, Any]:
        raise NotImplementedError

    def validate(self, state: Any, loss: torch.Tensor) -> Any:
        """The state after seeing the validation loss ``loss`` (detached); the parameters do not move."""
        raise NotImplementedError(f"{type(self).__name__} reads no validation losses (validation_every = 0)")

    def optimizer(self, params: Iterable[torch.Tensor], lr: float = 1.0) -> torch.optim.Optimizer:
        """The trained rule as a ``torch.optim`` optimizer of ``params``, its step scaled by ``lr``.

        Learned rules implement it (their :class:`metaopt.engine.rule_optimizer.RuleOptimizer`); it is how
        a trained learned optimizer becomes the meta-optimizer of another run.
        """
        del params, lr
        raise NotImplementedError(f"{type(self).__name__} is not a learned optimizer with a torch.optim interface")

    def logged(self) -> dict[str, float]:
        """Scalar figures of the rule the trainer logs with every record (tag -> value), e.g. a learned rate."""
        return {}

    def torch_optimizer(self) -> tuple[OptimizerFactory, HyperParameters]:
        """The same rule as a ``torch.optim`` optimizer, for the ``higher`` driver.

        Returns:
            A factory ``params -> torch.optim.Optimizer`` and the rule's meta-learned
            hyper-parameters at each inner step (its ``nn.Parameter`` s), which ``higher``
            receives as ``override`` so that meta-gradients reach them.

        Raises:
            NotImplementedError: the rule has no ``torch.optim`` counterpart.
        """
        raise NotImplementedError(f"{type(self).__name__} has no torch.optim counterpart; run it with the torch.func "
                                  "driver, or give the higher driver an inner optimizer (HigherRule(factory))")


class _SGD(UpdateRule):
    def __init__(self, lr: float, learnable: bool, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.learnable = learnable
        self.lr: float | nn.Parameter = nn.Parameter(torch.tensor(lr, dtype=dtype)) if learnable else lr

    def step(self, params: Params, grads: Params, state: Any, info: StepInfo) -> tuple[Params, Any]:
        del info
        return {name: p - self.lr * grads[name] for name, p in params.items()}, state

    def value(self) -> float:
        """The current learning rate as a number (a learned one read without its graph)."""
        return self.lr.item() if isinstance(self.lr, torch.Tensor) else self.lr

    def logged(self) -> dict[str, float]:
        return {"lr/inner": self.value()}

    def torch_optimizer(self) -> tuple[OptimizerFactory, HyperParameters]:
        return (lambda params: torch.optim.SGD(params, lr=self.value())), \
            (lambda t: {"lr": [self.lr]} if self.learnable else {})

    def extra_repr(self) -> str:
        return f"lr={self.value():g}, learnable={self.learnable}"


def sgd(lr: float, learnable: bool = False, dtype: torch.dtype | None = None) -> UpdateRule:
    """Plain gradient descent ``θ ← θ - lr · ∇L`` (MAML's inner rule, Finn et al. 2017, §2.2).

    Args:
        lr: the inner learning rate (a finite number > 0, :func:`check_lr`).
        learnable: make ``lr`` a meta-parameter learned in the outer loop (one scalar).
        dtype: dtype of the learnable ``lr`` (default: torch's default dtype); a fixed ``lr``
            is a Python float and takes the parameters' dtype.

    Raises:
        ValueError: ``lr`` is not a number (a string, say), not finite, or not > 0.
    """
    return _SGD(check_lr(lr), learnable, dtype)


def _key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` key (no dots allowed there)."""
    return name.replace(".", "-")


class LearnedRates(UpdateRule):
    """Gradient descent with meta-learned step sizes ``θ ← θ - α[name] ∘ ∇L``, one tensor of rates per parameter.

    Per step (LSLR, ``per_step=True``): ``α[name]`` has shape ``[steps]`` and step ``t`` uses
    entry ``min(t, steps - 1)``, so evaluation with more steps than training reuses the last
    step's rates. Per entry (Meta-SGD): ``α[name]`` has the shape of the parameter and every
    step uses it whole. Build it with :func:`per_step_sgd` or :func:`meta_sgd`.

    Args:
        rates: initial rates by parameter name.
        per_step: the leading dimension of every rate tensor indexes the inner step.
    """

    def __init__(self, rates: dict[str, torch.Tensor], per_step: bool) -> None:
        super().__init__()
        if not rates:
            raise ValueError("LearnedRates needs at least one parameter to adapt")
        self.names = list(rates)
        self.per_step = per_step
        self.rates = nn.ParameterDict({_key(name): nn.Parameter(value.detach().clone())
                                       for name, value in rates.items()})

    def rate(self, name: str, t: int) -> torch.Tensor:
        """The step size of parameter ``name`` at inner step ``t``."""
        if _key(name) not in self.rates:
            raise ValueError(f"{type(self).__name__} has no learned rate for parameter {name!r}; it was built for "
                             f"{self.names}; build the rule for the parameters the inner loop adapts")
        rates = self.rates[_key(name)]
        return rates[min(t, len(rates) - 1)] if self.per_step else rates

    def step(self, params: Params, grads: Params, state: Any, info: StepInfo) -> tuple[Params, Any]:
        return {name: p - self.rate(name, info.t) * grads[name] for name, p in params.items()}, state

    def torch_optimizer(self) -> tuple[OptimizerFactory, HyperParameters]:
        if not self.per_step:
            return super().torch_optimizer()

        def one_group_per_parameter(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            if len(params) != len(self.names):
                raise ValueError(f"the per-step rates were built for {len(self.names)} parameters ({self.names}), "
                                 f"but the inner loop adapts {len(params)}; build the rule for the adapted ones")
            return torch.optim.SGD([{"params": [p]} for p in params], lr=1.0)

        return one_group_per_parameter, lambda t: {"lr": [self.rate(name, t) for name in self.names]}

    def extra_repr(self) -> str:
        return f"parameters={len(self.names)}, per_step={self.per_step}"


def per_step_sgd(params: Params, steps: int, lr: float) -> LearnedRates:
    """Learned per-layer per-step learning rates (LSLR; Antoniou et al. 2019, §4).

    One learnable rate per parameter tensor (weights and biases separately) and inner step,
    all starting at ``lr``. (The official MAML++ code starts every rate at its ``task_learning_rate``
    flag, 0.1 by default, whatever the config's ``init_inner_loop_learning_rate`` says; here the
    start is what you pass.)

    Args:
        params: the parameters the inner loop adapts, by name (only names and tensors' dtypes are used).
        steps: inner steps during meta-training.
        lr: initial rate of every parameter and step (a finite number > 0, :func:`check_lr`).

    Example:
        >>> rule = per_step_sgd({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, steps=5, lr=0.1)
        >>> round(rule.rate("w", 0).item(), 6), tuple(rule.rates["w"].shape)
        (0.1, (5,))
    """
    if steps < 1:
        raise ValueError(f"per_step_sgd needs steps >= 1, got {steps}")
    lr = check_lr(lr)
    return LearnedRates({name: torch.full((steps,), lr, dtype=p.dtype, device=p.device)
                         for name, p in params.items()},
                        per_step=True)


def meta_sgd(params: Params, init: float | tuple[float, float] = (0.005, 0.1),
             generator: torch.Generator | None = None) -> LearnedRates:
    """Meta-SGD's learned step sizes (Li et al. 2017, §3): one rate per parameter entry.

    ``θ' = θ - α ∘ ∇L(θ)`` with ``α`` of exactly the shape of ``θ``, learned jointly with ``θ``;
    its sign is free, so it learns a direction as well as a step size.

    Args:
        params: the parameters the inner loop adapts, by name.
        init: ``(low, high)`` for rates drawn uniformly (the paper: ``[0.005, 0.1]``) or one
            constant (learn2learn's choice: its ``lr``); finite numbers, and a constant > 0.
        generator: random generator for the uniform draw (default: torch's global one).

    Example:
        >>> rule = meta_sgd({"w": torch.zeros(3, 2)}, init=0.01)
        >>> rule.rate("w", 0).shape
        torch.Size([3, 2])
    """
    if isinstance(init, (tuple, list)):
        if len(init) != 2:
            raise ValueError(f"meta_sgd's uniform init is (low, high), got {init!r}; pass e.g. init=(0.005, 0.1)")
        init = low, high = tuple(_finite(bound, "meta_sgd's uniform init bound") for bound in init)
        if not 0 <= low <= high:
            raise ValueError(f"meta_sgd's uniform init needs 0 <= low <= high, got {init}")
    else:
        init = check_lr(init, "init")
    rates = {}
    for name, p in params.items():
        if isinstance(init, tuple):
            drawn = torch.empty(p.shape, dtype=p.dtype).uniform_(low, high, generator=generator)
            rates[name] = drawn.to(p.device)
        else:
            rates[name] = torch.full(p.shape, init, dtype=p.dtype, device=p.device)
    return LearnedRates(rates, per_step=False)


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}; pass e.g. init=(0.005, 0.1)")
    return float(value)
