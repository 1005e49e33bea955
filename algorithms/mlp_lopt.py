"""The per-parameter MLP learned optimizer of learned_optimization (``MLPLOpt``, "LOLv2").

One small MLP (19 -> 32 -> 32 -> 2, ReLU) is shared by every coordinate of every parameter
tensor. At step ``t`` (the count of the rule's updates, from 0) each tensor ``p`` with gradient
``g`` first updates its momenta ``m_β ← β m_β + (1 - β) g`` for β in (0.1, 0.5, 0.9, 0.99, 0.999,
0.9999), then every coordinate gets the 19 inputs

    x = [g, p, m_0.1, ..., m_0.9999],   x_j ← x_j · rsqrt(1e-5 + mean over the tensor of x_j²)   (8)
    tanh(t / τ - 1)   for τ in (1, 3, 10, 30, ..., 1e5)                                          (11)

and the MLP's two outputs, a direction ``d`` and a magnitude ``m``, make the step

    p ← p - d · exp(1e-3 · m) · 1e-3.

This is ``learned_optimization/learned_optimizers/mlp_lopt.py`` of google/learned_optimization:
the same inputs in the same order, the same normalisation, step and initialisation (haiku's
``Linear``: weights from a normal of std ``1/sqrt(fan_in)`` truncated at ±2 std, biases zero, so
the untrained rule already takes steps of about 1e-3). It is the per-parameter part of Metz et
al. 2020's hierarchical optimizer, without the per-tensor LSTM (the reference code traces it to
Metz et al. 2019). Because of the normalisation over each tensor, the functions of a batch of
quadratics (one tensor ``[batch, dim]``) are not independent runs under this rule, unlike under
the coordinate-wise LSTM. The algorithm ``"mlp-lopt"`` meta-trains it as ``"l2l"`` does, with
:class:`metaopt.engine.optimizer_learner.OptimizerLearner`, by the estimator its options choose.

Results (reference vs ours: learned_optimization's ``LOpt_MLPLOpt_FahionMnist_50``, the mean
clipped train loss of a 50-step FashionMnist8 run after 100 / 300 / 1000 outer Adam steps; ours on
8 validation problems, one CPU core; commands and protocol in the README):

    ============================  ======================  ===========================
    meta-gradient                 reference (envelope of  metaopt
                                  tuned baselines)
    ============================  ======================  ===========================
    backprop                      1.906 / 1.344 / 0.976   1.007 / 0.981 / 0.926 (3e-3)
    truncated ES, 4 pairs         -                       2.006 / 1.328 / 1.045
    PES, 8 pairs, truncation 10   -                       2.024 / 1.307 / 1.065
    ============================  ======================  ===========================

References:
    Metz, Maheswaranathan, Freeman, Poole, Sohl-Dickstein, 2020. Tasks, stability, architecture,
    and compute: training more effective learned optimizers, and using them to train themselves.
    https://arxiv.org/abs/2009.11243
    Metz, Maheswaranathan, Nixon, Freeman, Sohl-Dickstein, 2019. Understanding and correcting
    pathologies in the training of learned optimizers. https://arxiv.org/abs/1810.10180

Example:
    >>> import torch
    >>> rule = MLPLOptRule(generator=torch.Generator().manual_seed(0))
    >>> params = {"w": torch.randn(3, 2), "b": torch.zeros(3), "scale": torch.tensor(1.0)}
    >>> state = rule.init(params)                      # momenta [*shape, 6] and the step count
    >>> tuple(state["momenta"]["w"].shape), int(state["step"])
    ((3, 2, 6), 0)
    >>> grads = {name: torch.ones_like(p) for name, p in params.items()}
    >>> new, state = rule.step(params, grads, state, StepInfo(0))
    >>> tuple(new["scale"].shape), int(state["step"])
    ((), 1)
    >>> model = torch.nn.Linear(4, 1)                  # the same rule in a plain PyTorch loop
    >>> opt = MLPLOptimizer(model.parameters(), rule=rule)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     model(torch.randn(8, 4)).square().mean().backward()
    ...     opt.step()
    >>> opt.state[model.weight]["step"], tuple(opt.state[model.weight]["momenta"].shape)
    (3, (1, 4, 6))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaopt.engine.coordinatewise import by_chunks
from metaopt.engine.functional import Params
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rule_optimizer import RuleOptimizer, add_update, one_source
from metaopt.engine.rules import StepInfo, UpdateRule
from metaopt.estimators.base import Estimator
from metaopt.estimators.unroll_options import UnrollOptions, estimator_of
from metaopt.registry import BuildContext, register_algorithm
from metaopt.training.experiment import load_rule

__all__ = ["DECAYS", "INPUTS", "TIMESCALES", "MLPLOptOptions", "MLPLOptRule", "MLPLOptimizer", "build_mlp_lopt",
           "haiku_linear", "haiku_mlp", "second_moment_normalize"]

#: The momentum decays, one accumulator each (the reference's ``decays``).
DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
#: The timescales τ of the step features ``tanh(t / τ - 1)`` (the reference's ``_tanh_embedding``).
TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
#: Inputs per coordinate: g, p, the momenta, the step features.
INPUTS = 2 + len(DECAYS) + len(TIMESCALES)


def haiku_linear(fan_in: int, fan_out: int, generator: torch.Generator | None = None) -> nn.Linear:
    """A linear layer initialised as haiku's ``Linear``: weights N(0, 1/fan_in) truncated at ±2 std, zero bias."""
    linear = nn.utils.skip_init(nn.Linear, fan_in, fan_out)  # haiku's init below, not torch's
    std = 1 / math.sqrt(fan_in)
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std, generator=generator)
    nn.init.zeros_(linear.bias)
    return linear


def haiku_mlp(widths: Sequence[int], generator: torch.Generator | None = None) -> nn.Sequential:
    """haiku's ``nets.MLP``: :func:`haiku_linear` layers of ``widths`` with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [haiku_linear(fan_in, fan_out, generator), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def second_moment_normalize(x: torch.Tensor) -> torch.Tensor:
    """Every column of ``x`` ``[rows, columns]`` scaled by ``rsqrt(1e-5 + mean(column²))`` (the reference's)."""
    return x * torch.rsqrt(1e-5 + x.square().mean(dim=0, keepdim=True))


class MLPLOptRule(UpdateRule):
    """learned_optimization's ``MLPLOpt`` as an update rule: ``p ← p - d · exp(exp_mult · m) · step_mult``.

    The state is ``{"momenta": {name: [*shape, 6]}, "step": count}`` (:meth:`init`); the step
    features read the state's count, as the reference reads its ``iteration``, not ``info.t``.

    Args:
        hidden_size: units of each hidden layer (32).
        hidden_layers: hidden layers, ReLU after each (2).
        exp_mult: factor of the magnitude output in the exponent (1e-3).
        step_mult: factor of the step (1e-3).
        generator: random generator of the initial weights (default: torch's global one).
    """

    def __init__(self, hidden_size: int = 32, hidden_layers: int = 2, exp_mult: float = 1e-3, step_mult: float = 1e-3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.exp_mult, self.step_mult = exp_mult, step_mult
        self.mlp = haiku_mlp([INPUTS] + [hidden_size] * hidden_layers + [2], generator)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MLPLOptRule:
        """The rule of a checkpoint of a trained ``mlp-lopt`` run (``best.pt`` or ``last.pt``), on the CPU.

        Raises:
            CheckpointError: naming ``path``: missing, corrupt, or not of a run of this rule.
        """
        return load_rule(path, cls)

    @staticmethod
    def accumulate(momenta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The momenta ``[*grad.shape, 6]`` after gradient ``grad``: ``β m + (1 - β) g`` for every decay β."""
        decays = torch.tensor(DECAYS, dtype=grad.dtype, device=grad.device)
        return decays * momenta + (1 - decays) * grad.unsqueeze(-1)

    @staticmethod
    def features(param: torch.Tensor, grad: torch.Tensor, momenta: torch.Tensor,
                 step: int | torch.Tensor) -> torch.Tensor:
        """The 19 inputs of every coordinate of one tensor, ``[numel, 19]``, from its updated ``momenta``."""
        x = torch.cat([grad.reshape(-1, 1), param.reshape(-1, 1), momenta.reshape(-1, len(DECAYS))], dim=1)
        x = second_moment_normalize(x)  # each input over the tensor
        t = torch.as_tensor(step, device=param.device).to(param.dtype)
        timescales = torch.tensor(TIMESCALES, dtype=param.dtype, device=param.device)
        return torch.cat([x, torch.tanh(t / timescales - 1).expand(x.shape[0], -1)], dim=1)

    def steps(self, tensors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | torch.Tensor]],
              ) -> list[torch.Tensor]:
        """The step ``d · exp(exp_mult · m) · step_mult`` of each ``(param, grad, updated momenta, step)``.

        All the tensors' coordinates go through the MLP as one batch; each step has its tensor's shape.
        """
        output = by_chunks(self.mlp, torch.cat([self.features(*tensor) for tensor in tensors]))
        step = output[:, 0] * torch.exp(output[:, 1] * self.exp_mult) * self.step_mult
        sizes = [param.numel() for param, *_ in tensors]
        return [piece.view_as(param) for piece, (param, *_) in zip(step.split(sizes), tensors)]

    def init(self, params: Params) -> dict[str, Any]:
        """Zero momenta for every parameter, in its dtype and on its device, and the step count 0."""
        if not params:
            raise ValueError("MLPLOptRule needs at least one parameter to optimize")
        first = next(iter(params.values()))
        return {"momenta": {name: p.new_zeros(*p.shape, len(DECAYS)) for name, p in params.items()},
                "step": torch.zeros((), dtype=torch.long, device=first.device)}

    def step(self, params: Params, grads: Params, state: dict[str, Any], info: StepInfo,
             ) -> tuple[Params, dict[str, Any]]:
        """One update of every tensor of ``params``; differentiable in the MLP's weights, θ and the state."""
        del info  # the step features read the state's count (the reference's ``iteration``)
        momenta = {name: self.accumulate(state["momenta"][name], grads[name]) for name in params}
        steps = self.steps([(p, grads[name], momenta[name], state["step"]) for name, p in params.items()])
        return ({name: p - s for (name, p), s in zip(params.items(), steps)},
                {"momenta": momenta, "step": state["step"] + 1})

    def optimizer(self, params: Iterable[torch.Tensor], lr: float = 1.0) -> MLPLOptimizer:
        """This rule as a :class:`MLPLOptimizer` of ``params``, its step scaled by ``lr``."""
        return MLPLOptimizer(params, rule=self, lr=lr)

    def extra_repr(self) -> str:
        return f"exp_mult={self.exp_mult:g}, step_mult={self.step_mult:g}"


class MLPLOptimizer(RuleOptimizer):
    """An :class:`MLPLOptRule` as a ``torch.optim`` optimizer: ``opt.zero_grad(); loss.backward(); opt.step()``.

    Every :meth:`step` updates each parameter that has a gradient as the rule does (all of them
    through the MLP as one batch), the step scaled by its group's ``lr``:

        m ← β m + (1 - β) g;    p ← p - lr · d · exp(exp_mult · m_out) · step_mult    (lr = 1: the rule's step)

    ``lr`` multiplies the rule's step (it is no step size of its own), so ``torch.optim.lr_scheduler``
    schedules change it as any learning rate; the rule's inputs do not depend on it. A parameter's
    state is its momenta ``state[p]["momenta"]`` (``[*p.shape, 6]``) and its update count
    ``state[p]["step"]``, the ``t`` of its step features; :meth:`state_dict` carries both, with
    every group's ``lr``. (The reference counts one ``iteration`` for all the parameters: the same
    count as long as every parameter gets a gradient at every step.) The rule's weights are not
    part of the optimizer's state: they come from ``rule`` or ``checkpoint``. The rule runs without
    autograd and is never trained here.

    Args:
        params: parameters (or parameter groups, which may set their own ``lr``) to optimize.
        rule: the rule to run, on the parameters' dtype and device.
        checkpoint: instead of ``rule``, a ``best.pt`` / ``last.pt`` of a trained ``mlp-lopt`` run
            (:meth:`MLPLOptRule.from_checkpoint`); its rule moves to the parameters' device and dtype.
        lr: the default multiplier of the rule's step (a finite number >= 0; 1.0 runs the rule as trained).

    Raises:
        ValueError: not exactly one of ``rule`` and ``checkpoint``; a bad ``lr``.
        CheckpointError: ``checkpoint`` is missing or unusable (the message names the file).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: MLPLOptRule | None = None,
                 checkpoint: str | Path | None = None, *, lr: float = 1.0) -> None:
        one_source("MLPLOptimizer", {"rule": rule, "checkpoint": checkpoint},
                   "rule= (an MLPLOptRule) or checkpoint= (a path to a best.pt or last.pt of a trained mlp-lopt run)")
        super().__init__(params, rule, lr)
        if rule is None:
            self.rule = self.placed(MLPLOptRule.from_checkpoint(checkpoint))

    def apply(self, scaled: list[tuple[torch.Tensor, float]], loss: torch.Tensor | None) -> None:
        """The rule's step of every tensor of ``scaled`` (one batch through the MLP), each scaled by its ``lr``."""
        del loss  # the rule does not read the loss
        for p, _ in scaled:
            if not self.state[p]:
                self.state[p] = {"step": 0, "momenta": self.rule.init({"p": p})["momenta"]["p"]}
        momenta = [self.rule.accumulate(self.state[p]["momenta"], p.grad) for p, _ in scaled]
        steps = self.rule.steps([(p, p.grad, m, self.state[p]["step"]) for (p, _), m in zip(scaled, momenta)])
        for (p, lr), m, step in zip(scaled, momenta, steps):
            add_update(p, -step, lr)
            self.state[p]["momenta"] = m
            self.state[p]["step"] += 1


@dataclass(frozen=True)
class MLPLOptOptions(UnrollOptions):
    """The per-parameter MLP optimizer's options (defaults: learned_optimization's ``MLPLOpt``; l2l's unroll).

    The unroll and its estimator are :class:`metaopt.estimators.unroll_options.UnrollOptions`'.

    Args:
        hidden_size: units of each hidden layer of the MLP.
        hidden_layers: hidden layers of the MLP.
        exp_mult: factor of the magnitude output in the step's exponent.
        step_mult: factor of the step.
    """

    positive = ("hidden_size", "hidden_layers", "exp_mult", "step_mult", *UnrollOptions.positive)
    hidden_size: int = 32
    hidden_layers: int = 2
    exp_mult: float = 1e-3
    step_mult: float = 1e-3


@register_algorithm("mlp-lopt", MLPLOptOptions, problems="optimizees")
def build_mlp_lopt(options: MLPLOptOptions, context: BuildContext) -> tuple[OptimizerLearner, Estimator]:
    """learned_optimization's per-parameter MLP optimizer (Metz et al. 2020), trained as its options choose."""
    del context
    rule = MLPLOptRule(options.hidden_size, options.hidden_layers, options.exp_mult, options.step_mult)
    learner = OptimizerLearner(rule, options.horizon, first_order=not options.second_derivatives)
    return learner, estimator_of(options)
