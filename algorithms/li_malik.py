"""Li & Malik's learned optimizer: an MLP policy over the recent history of gradients and objective changes.

"Learning to Optimize" (Li & Malik 2016) casts an optimization algorithm as a policy π that maps
what the optimizer has seen to its next step, ``θ_{t+1} = θ_t + π(features_t)``. The policy is a
small MLP, one hidden layer of 50 softplus units and a linear output, and its features are the
last H = 25 iterations of the history: the gradients ∇f(θ_{t-i}), i = 0..24, and the changes of
the objective at the current iterate relative to the i-th most recent one, f(θ_t) − f(θ_{t-i}),
i = 1..25 (§3.2, §4). Here, at step ``t`` of a problem with gradient ``g_t`` and objective ``f_t``:

    history   G ← [g_t, G_{:-1}] per coordinate,  D ← [f_t − f_{t−1}, D_{:-1}]        (25 each, zero at the start)
    scales    v_g ← β v_g + (1 − β) mean(g_t²),   v_d ← β v_d + (1 − β) (f_t − f_{t−1})²     (β = 0.99)
    features  x_j = [G_j / s_g  (25),  (f_t − f_{t−i}) / s_d for i = 1..25 (the cumulative sums of D; 0 for i > t)]
    step      θ_j ← θ_j + step_mult · MLP(x_j)

``s_g`` and ``s_d`` are the bias-corrected running RMS of the gradients (over every coordinate
of the problem) and of the objective's changes: a scale that is not in the paper (which feeds raw
values on one family of problems at a time) but is the usual way to make a learned optimizer's
inputs independent of the units of the problem (Andrychowicz et al. 2016; Metz et al. 2020). The
policy's output is multiplied by a fixed ``step_mult`` and its weights start where the policy is
normalised gradient descent: two hidden units compute ``softplus(x₀) − softplus(−x₀) = x₀ = g_j /
s_g`` and the output reads ``−x₀``, the other 48 units start with zero output weights, so the
untrained rule steps ``θ ← θ − step_mult · g / s_g``, a sane small-step optimizer to start from.

Deviations from the paper, on purpose: (1) the policy is trained by the engine's estimators
(antithetic truncated ES or PES, :mod:`metaopt.estimators.es`, :mod:`~metaopt.estimators.pes`)
on the sum of the objective along the trajectory, not by guided policy search, and it acts
deterministically (GPS's policy is a Gaussian around this mean); (2) the policy is applied
**coordinatewise**, as in the follow-up (Li & Malik 2017, arXiv 1703.00441): every coordinate sees
its own 25 gradients and the shared 25 objective changes and gets its own step from one shared
MLP, so one policy runs on problems of any dimension (the paper's policy reads and writes the whole
parameter vector of one fixed dimension); (3) the normalisation and the gradient-descent
initialisation above.

Results (paper vs ours). The paper reports its learned algorithm beating gradient descent,
momentum, conjugate gradient and L-BFGS "in terms of convergence speed and/or the final objective
value" on all three families (abstract, §4). Ours (``scripts/li_malik_vs_baselines.py``,
``docs/results/li-malik.md``): ES for 5 CPU-minutes per family (``metaopt train --preset
li-malik-FAMILY``), then the mean objective after T = 50 iterations on 20 held-out problems,
every baseline's learning rate tuned on validation problems:

    ==============  =======  ======  ========  ======  ======  ======
    family          learned  GD      momentum  CG      L-BFGS  Adam
    ==============  =======  ======  ========  ======  ======  ======
    logistic        0.0555   0.159   0.0644    0.0353  0.0353  0.0540
    robust-linear   0.543    0.570   0.539     0.518   0.522   0.520
    two-layer-net   0.353    0.434   0.376     0.295   0.318   0.305
    ==============  =======  ======  ========  ======  ======  ======

It beats tuned gradient descent everywhere and momentum on two families, and loses to conjugate
gradient, L-BFGS and Adam on all three (counting iterations: CG and L-BFGS evaluate the objective
3 to 6 times per iteration, the others once); past its horizon it oscillates on logistic regression.

References:
    Li & Malik, 2016. Learning to Optimize. https://arxiv.org/abs/1606.01885 (ICLR 2017)
    Li & Malik, 2017. Learning to Optimize Neural Nets. https://arxiv.org/abs/1703.00441

Example:
    >>> import torch
    >>> rule = LiMalikRule(generator=torch.Generator().manual_seed(0))
    >>> params = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor(0.5)}
    >>> state = rule.init(params)                      # 25 gradients per coordinate, 25 objective changes
    >>> tuple(state["grads"]["w"].shape), tuple(state["changes"].shape)
    ((2, 25), (25,))
    >>> grads = {"w": torch.tensor([0.3, -0.4]), "b": torch.tensor(0.0)}
    >>> new, state = rule.step(params, grads, state, StepInfo(0, loss=torch.tensor(1.2)))
    >>> ((params["w"] - new["w"]) / rule.step_mult).tolist()   # untrained: g / rms(g), rms over all coordinates
    [1.0392..., -1.3856...]
    >>> model = torch.nn.Linear(3, 1)                  # the same rule in a plain PyTorch loop; it needs the loss
    >>> opt = LiMalikOptimizer(model.parameters(), rule=rule)
    >>> x = torch.randn(16, 3)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = model(x).square().mean()
    ...     loss.backward()
    ...     return loss
    >>> first = closure().item()
    >>> for _ in range(20):
    ...     _ = opt.step(closure)
    >>> closure().item() < first, opt.steps
    (True, 20)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaopt.algorithms.mlp_lopt import haiku_linear
from metaopt.engine.coordinatewise import by_chunks
from metaopt.engine.functional import Params
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rule_optimizer import RuleOptimizer, add_update, one_source
from metaopt.engine.rules import StepInfo, UpdateRule
from metaopt.estimators.base import Estimator
from metaopt.estimators.unroll_options import UnrollOptions, estimator_of
from metaopt.registry import BuildContext, register_algorithm
from metaopt.training.experiment import load_rule

__all__ = ["EPS", "SCALE_DECAY", "LiMalikOptimizer", "LiMalikOptions", "LiMalikRule", "build_li_malik"]

#: Decay β of the running mean squares that scale the gradients and the objective's changes.
SCALE_DECAY = 0.99
#: Added to the mean squares before the square root (a zero history scales to zero features).
EPS = 1e-24
#: The state shared by all the coordinates of a problem (besides the per-tensor gradient histories).
_SHARED = ("changes", "loss", "scales", "step")


class LiMalikRule(UpdateRule):
    """Li & Malik's policy as an update rule ``θ ← θ + step_mult · MLP(features)`` (see the module docs).

    The state is ``{"grads": {name: [*shape, history]}, "changes": [history], "loss": f_{t-1},
    "scales": [v_g, v_d], "step": count}``, most recent first; the rule needs the objective of every
    step (``info.loss``, which the engine's inner loop gives).

    Args:
        history: iterations of gradients and objective changes the policy sees (the paper: 25).
        hidden_size: softplus units of the hidden layer (the paper: 50; at least 2).
        step_mult: factor of the policy's output (the untrained step: ``step_mult · g / rms(g)``).
        generator: random generator of the initial weights of the hidden units beyond the first two.
    """

    def __init__(self, history: int = 25, hidden_size: int = 50, step_mult: float = 0.1,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if history < 1 or hidden_size < 2 or not step_mult > 0:
            raise ValueError(f"LiMalikRule needs history >= 1, hidden_size >= 2 and step_mult > 0, got history="
                             f"{history}, hidden_size={hidden_size}, step_mult={step_mult}")
        self.history, self.step_mult = history, step_mult
        self.policy = nn.Sequential(haiku_linear(2 * history, hidden_size, generator), nn.Softplus(),
                                    haiku_linear(hidden_size, 1, generator))
        with torch.no_grad():  # start as normalised gradient descent: -(softplus(x0) - softplus(-x0)) = -x0
            hidden, out = self.policy[0], self.policy[2]
            hidden.weight[:2] = 0.0
            hidden.weight[0, 0], hidden.weight[1, 0] = 1.0, -1.0
            out.weight.zero_()
            out.weight[0, 0], out.weight[0, 1] = -1.0, 1.0

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> LiMalikRule:
        """The rule of a checkpoint of a trained ``li-malik`` run (``best.pt`` or ``last.pt``), on the CPU.

        Raises:
            CheckpointError: naming ``path``: missing, corrupt, or not of a run of this rule.
        """
        return load_rule(path, cls)

    def init(self, params: Params) -> dict[str, Any]:
        """Zero histories and scales for the parameters, in their dtype and on their device; the step count 0."""
        if not params:
            raise ValueError("LiMalikRule needs at least one parameter to optimize")
        first = next(iter(params.values()))
        return {"grads": {name: p.new_zeros(*p.shape, self.history) for name, p in params.items()},
                "changes": first.new_zeros(self.history), "loss": first.new_zeros(()), "scales": first.new_zeros(2),
                "step": torch.zeros((), dtype=torch.long, device=first.device)}

    def remember(self, state: dict[str, Any], grads: Params, loss: torch.Tensor) -> dict[str, Any]:
        """The state after the gradients ``grads`` and the objective ``loss`` of the current iterate."""
        seen = (state["step"] > 0).to(loss.dtype)  # no change of the objective before the second iterate
        change = seen * (loss - state["loss"])
        square = torch.cat([g.reshape(-1) for g in grads.values()]).square().mean()
        v_g, v_d = state["scales"]
        scales = torch.stack([SCALE_DECAY * v_g + (1 - SCALE_DECAY) * square,
                              v_d + seen * (1 - SCALE_DECAY) * (change.square() - v_d)])
        return {"grads": {name: torch.cat([g.unsqueeze(-1), state["grads"][name][..., :-1]], dim=-1)
                          for name, g in grads.items()},
                "changes": torch.cat([change.reshape(1), state["changes"][:-1]]), "loss": loss, "scales": scales,
                "step": state["step"] + 1}

    def features(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The policy's inputs ``[numel, 2 · history]`` of every tensor, from the state :meth:`remember` left."""
        seen = state["step"].to(state["scales"].dtype)  # gradients seen (>= 1); changes seen: one fewer
        s_g = torch.sqrt(state["scales"][0] / (1 - SCALE_DECAY**seen) + EPS)
        s_d = torch.sqrt(state["scales"][1] / (1 - SCALE_DECAY ** (seen - 1).clamp(min=1)) + EPS)
        lags = torch.arange(1, self.history + 1, device=seen.device)
        changes = torch.cumsum(state["changes"], 0) * (lags <= seen - 1) / s_d  # f_t - f_{t-i}, zero before f_0
        rows = {name: g.reshape(-1, self.history) for name, g in state["grads"].items()}
        return {name: torch.cat([g / s_g, changes.expand(len(g), -1)], dim=1) for name, g in rows.items()}

    def update(self, grads: Params, state: dict[str, Any], loss: torch.Tensor) -> tuple[Params, dict[str, Any]]:
        """The step of every tensor (all coordinates through the MLP as one batch) and the state after it."""
        state = self.remember(state, grads, loss.to(state["loss"].dtype))
        features = self.features(state)
        out = by_chunks(self.policy, torch.cat(list(features.values()))).squeeze(-1) * self.step_mult
        pieces = out.split([len(x) for x in features.values()])
        return {name: piece.view_as(g) for (name, g), piece in zip(grads.items(), pieces)}, state

    def step(self, params: Params, grads: Params, state: dict[str, Any], info: StepInfo,
             ) -> tuple[Params, dict[str, Any]]:
        """One step ``θ + step_mult · MLP(x)`` of every tensor; differentiable in the policy's weights, θ, the state.

        The objective ``info.loss`` enters as the engine gives it, detached: the meta-gradient of backpropagation
        takes the objective's changes as constants (ES and PES read losses only).
        """
        if info.loss is None:
            raise ValueError("LiMalikRule reads the objective f(θ_t) of every step (its features are the objective's "
                             "changes): pass it as StepInfo(t, loss=...)")
        steps, state = self.update({name: grads[name] for name in params}, state, info.loss)
        return {name: p + steps[name] for name, p in params.items()}, state

    def optimizer(self, params: Iterable[torch.Tensor], lr: float = 1.0) -> LiMalikOptimizer:
        """This rule as a :class:`LiMalikOptimizer` of ``params``, its step scaled by ``lr``."""
        return LiMalikOptimizer(params, rule=self, lr=lr)

    def extra_repr(self) -> str:
        return f"history={self.history}, step_mult={self.step_mult:g}"


class LiMalikOptimizer(RuleOptimizer):
    """A :class:`LiMalikRule` as a ``torch.optim`` optimizer; it reads the loss, so give it one.

    ``opt.step(closure)`` (the closure zeroes the gradients, computes the loss, backpropagates and
    returns it, as for ``torch.optim.LBFGS``), or ``loss.backward(); opt.step(loss=loss)``. Every
    step runs the rule once on all the parameters that have a gradient, each step scaled by its
    group's ``lr`` (1.0: the rule as trained). A parameter's state is its gradient history
    ``state[p]["grads"]`` (``[*p.shape, history]``); the state shared by all of them (the objective's
    changes, the last objective, the running scales and the step count) is ``state["shared"]``, so
    :meth:`state_dict` round trips all of it. The rule's weights come from ``rule`` or ``checkpoint``
    and are not trained here.

    Args:
        params: parameters or parameter groups (which may set their own ``lr``).
        rule: the rule to run, on the parameters' dtype and device.
        checkpoint: instead of ``rule``, a ``best.pt`` / ``last.pt`` of a trained ``li-malik`` run.
        lr: the default multiplier of the rule's step (a finite number >= 0).

    Raises:
        ValueError: not exactly one of ``rule`` and ``checkpoint``; a bad ``lr``; at :meth:`step`, no loss.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], rule: LiMalikRule | None = None,
                 checkpoint: str | Path | None = None, *, lr: float = 1.0) -> None:
        one_source("LiMalikOptimizer", {"rule": rule, "checkpoint": checkpoint},
                   "rule= (a LiMalikRule) or checkpoint= (a path to a best.pt or last.pt of a trained li-malik run)")
        super().__init__(params, rule, lr)
        if rule is None:
            self.rule = self.placed(LiMalikRule.from_checkpoint(checkpoint))

    @property
    def steps(self) -> int:
        """Steps taken so far (the rule's step count)."""
        return int(self.state["shared"]["step"]) if "shared" in self.state else 0

    def apply(self, scaled: list[tuple[torch.Tensor, float]], loss: torch.Tensor | None) -> None:
        """One step of the rule on every tensor of ``scaled``, each scaled by its ``lr``."""
        if loss is None:
            raise ValueError("LiMalikOptimizer reads the loss of every step: call opt.step(closure) with a closure "
                             "that returns the loss, or loss.backward(); opt.step(loss=loss)")
        if "shared" not in self.state:
            fresh = self.rule.init({"p": scaled[0][0]})
            self.state["shared"] = {k: fresh[k] for k in _SHARED}
        for p, _ in scaled:
            if not self.state[p]:
                self.state[p] = {"grads": p.new_zeros(*p.shape, self.rule.history)}
        names = [str(i) for i in range(len(scaled))]
        state = {**self.state["shared"], "grads": {k: self.state[p]["grads"] for k, (p, _) in zip(names, scaled)}}
        steps, state = self.rule.update({k: p.grad for k, (p, _) in zip(names, scaled)}, state, loss)
        for name, (p, lr) in zip(names, scaled):
            add_update(p, steps[name], lr)
            self.state[p] = {"grads": state["grads"][name]}
        self.state["shared"] = {k: state[k] for k in _SHARED}


@dataclass(frozen=True)
class LiMalikOptions(UnrollOptions):
    """Li & Malik's learned optimizer's options (the policy: the paper's; the estimator: ES by default).

    The unroll and its estimator are :class:`metaopt.estimators.unroll_options.UnrollOptions`'.

    Args:
        history: iterations of gradients and objective changes the policy sees.
        hidden_size: softplus units of the policy's hidden layer (at least 2).
        step_mult: factor of the policy's output.
    """

    positive = ("history", "hidden_size", "step_mult", *UnrollOptions.positive)
    estimator: str = "es"
    history: int = 25
    hidden_size: int = 50
    step_mult: float = 0.1


@register_algorithm("li-malik", LiMalikOptions, problems="optimizees")
def build_li_malik(options: LiMalikOptions, context: BuildContext) -> tuple[OptimizerLearner, Estimator]:
    """Li & Malik's (2016) optimizer: an MLP policy over 25 iterations of gradients and objective changes."""
    del context
    rule = LiMalikRule(options.history, options.hidden_size, options.step_mult)
    learner = OptimizerLearner(rule, options.horizon, first_order=not options.second_derivatives)
    return learner, estimator_of(options)
