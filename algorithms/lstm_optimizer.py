"""The learned optimizer of Andrychowicz et al. 2016: a coordinate-wise LSTM that outputs the update.

    θ_{t+1} = θ_t + s · W h_t,    (h_t, c_t) = LSTM(x(∇f(θ_t)), (h_{t-1}, c_{t-1}))

One two-layer LSTM of 20 units and a linear read-out (20 -> 1) is shared by every coordinate of
every parameter: the coordinates are the batch, each with its own hidden and cell states (§2.1).
Its input ``x`` is the raw gradient coordinate, or with ``preprocessing`` the two log-magnitude /
sign features with ``p = 10`` (Appendix A); ``s`` is the output scale (1 on the quadratics, 0.1 on
MNIST, §3). The gradients enter as constants (option ``second_derivatives=False``, the paper's
choice, §2.1): meta-gradients flow through θ and the LSTM but not through ∇f. The algorithm
``"l2l"`` meta-trains it with :class:`metaopt.engine.optimizer_learner.OptimizerLearner` by
truncated backpropagation (:class:`metaopt.estimators.truncated.TruncatedBackprop`; ``metaopt
train --preset l2l-quadratics`` or ``l2l-mnist``); the evaluation of such a run scores it against
tuned baselines.

References:
    Andrychowicz, Denil, Gomez, Hoffman, Pfau, Schaul, Shillingford, de Freitas, 2016. Learning
    to learn by gradient descent by gradient descent. https://arxiv.org/abs/1606.04474 (§2.1,
    §3, Appendix A).

Results (paper vs ours; the paper reports curves on a log scale, no table; commands and
protocol in the README):

    ====================  ===============================================  ===========================
    benchmark             paper (Fig. 2 and 4, qualitative)                metaopt (mean f100, tuned)
    ====================  ===============================================  ===========================
    Quadratics 10-d       below tuned SGD, RMSprop, Adam, NAG for 100      0.194 vs best baseline
                          steps                                            0.268 (momentum); below
                                                                           all for 200 steps
    MNIST MLP 20 sigmoid  below the tuned baselines at 100 and 200 steps   0.280 vs best baseline
                                                                           0.299 (NAG); also below
                                                                           at 200 steps, 40 units
                                                                           and 2 layers
    MNIST MLP, ReLU       fails: the tuned baselines win                   fails: 0.639 vs 0.320
                                                                           (Adam)
    ====================  ===============================================  ===========================

Baselines tune their learning rate per problem family on validation problems
(:func:`metaopt.evaluation.tuned_baselines.tune_learning_rate`).

:class:`LearnedOptimizer` runs a rule, or a checkpoint of a trained run, as an ordinary
``torch.optim`` optimizer.

Example:
    >>> import torch
    >>> rule = LSTMOptimizerRule(preprocessing=True, output_scale=0.1)
    >>> params = {"w": torch.randn(3, 2), "b": torch.zeros(3)}
    >>> state = rule.init(params)                      # per layer (h, c), one row per coordinate
    >>> tuple(state[0][0].shape)
    (9, 20)
    >>> new, state = rule.step(params, {"w": torch.randn(3, 2), "b": torch.randn(3)}, state, StepInfo(0))
    >>> tuple(new["w"].shape), tuple(new["b"].shape)
    ((3, 2), (3,))
    >>> model = torch.nn.Linear(4, 1)                  # the same rule in a plain PyTorch loop
    >>> opt = LearnedOptimizer(model.parameters(), rule=rule)
    >>> for _ in range(3):
    ...     opt.zero_grad()
    ...     model(torch.randn(8, 4)).square().mean().backward()
    ...     opt.step()
    >>> tuple(opt.state[model.weight]["lstm"].shape)  # [layers, (h, c), coordinates, hidden]
    (2, 2, 4, 20)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaopt.engine.coordinatewise import CoordinateLSTM, LSTMState, flatten, preprocess, unflatten
from metaopt.engine.functional import Params
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import StepInfo, UpdateRule
from metaopt.estimators.truncated import TruncatedBackprop
from metaopt.options import ConfigError, Options
from metaopt.registry import BuildContext, register_algorithm
from metaopt.training.checkpoint import CheckpointError, load_checkpoint, load_module_state
from metaopt.training.experiment import load_learner

__all__ = ["L2LOptions", "LSTMOptimizerRule", "LearnedOptimizer", "build_l2l"]


class LSTMOptimizerRule(UpdateRule):
    """Coordinate-wise LSTM optimizer (Andrychowicz et al. 2016, §2.1): ``θ ← θ + s · Linear(LSTM(x(∇f)))``.

    The defaults are the paper's quadratic setup; its MNIST setup is ``preprocessing=True,
    output_scale=0.1`` (§3). The state is the LSTM's hidden and cell states, one row per coordinate
    of all the parameters together (:meth:`init`).

    Args:
        preprocessing: feed the log-magnitude / sign features of each gradient coordinate
            (Appendix A, two inputs), instead of the raw coordinate (one input).
        p: the preprocessing's ``p`` (10 in the paper).
        output_scale: factor ``s`` of the network output (1.0 quadratics, 0.1 MNIST).
        hidden: LSTM units per layer (20).
        layers: stacked LSTM layers (2).
    """

    def __init__(self, preprocessing: bool = False, p: float = 10.0, output_scale: float = 1.0, hidden: int = 20,
                 layers: int = 2) -> None:
        super().__init__()
        self.preprocessing, self.p, self.output_scale = preprocessing, p, output_scale
        self.lstm = CoordinateLSTM(2 if preprocessing else 1, hidden=hidden, layers=layers)
        self.output = nn.Linear(hidden, 1)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> LSTMOptimizerRule:
        """The rule of a checkpoint of a trained ``l2l`` run (``best.pt`` or ``last.pt``), on the CPU.

        Checkpoints of the ``LearnedOptimizerTrainer`` of metaopt 0.1 load too.

        Raises:
            CheckpointError: naming ``path``: missing, corrupt, or not of a run of this rule.
        """
        state = load_checkpoint(path)
        if "rule_class" in state:  # metaopt 0.1: the rule's class, constructor arguments and weights
            if state["rule_class"] != cls.__name__:
                raise CheckpointError(f"checkpoint {path} holds a {state['rule_class']} rule, not an {cls.__name__}")
            hparams = {k: v for k, v in state["rule_hparams"].items() if k != "second_derivatives"}
            rule = cls(**hparams).to(next(iter(state["rule"].values())).dtype)
            load_module_state(rule, state["rule"], path)
            return rule
        rule = load_learner(path).rule
        if not isinstance(rule, cls):
            raise CheckpointError(f"checkpoint {path} holds a {type(rule).__name__} rule, not an {cls.__name__}")
        return rule

    def features(self, grad: torch.Tensor) -> torch.Tensor:
        """The LSTM input of every gradient coordinate: ``[coordinates, 2]`` preprocessed, else ``[coordinates, 1]``."""
        return preprocess(grad, self.p) if self.preprocessing else grad.unsqueeze(-1)

    def network(self, features: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """The unscaled update of every coordinate, ``[coordinates]``, and the new LSTM state."""
        top, state = self.lstm(features, state)
        return self.output(top).squeeze(-1), state

    def init(self, params: Params) -> LSTMState:
        """Zero LSTM states for all the coordinates of ``params``, in their dtype and on their device."""
        if not params:
            raise ValueError("LSTMOptimizerRule needs at least one parameter to optimize")
        first = next(iter(params.values()))
        return self.lstm.init_state(sum(p.numel() for p in params.values()), first.dtype, first.device)

    def step(self, params: Params, grads: Params, state: LSTMState, info: StepInfo) -> tuple[Params, LSTMState]:
        """One update of all the coordinates of ``params`` as one batch (the rule reads neither step nor loss)."""
        del info
        grad = flatten({name: grads[name] for name in params})
        update, state = self.network(self.features(grad), state)
        return unflatten(flatten(params) + self.output_scale * update, params), state

    def extra_repr(self) -> str:
        return f"preprocessing={self.preprocessing}, p={self.p}, output_scale={self.output_scale}"


def _pack(state: LSTMState) -> torch.Tensor:
    """An LSTM state as one tensor ``[layers, 2, coordinates, hidden]``."""
    return torch.stack([torch.stack(hc) for hc in state])


def _unpack(packed: torch.Tensor) -> LSTMState:
    return [(layer[0], layer[1]) for layer in packed]


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned rule as a ``torch.optim`` optimizer: ``opt.zero_grad(); loss.backward(); opt.step()``.

    Every :meth:`step` runs the rule once on all the parameters that have a gradient, as one batch
    of coordinates (Andrychowicz et al. 2016, §2.1), and writes the result into them in place.
    Each parameter's slice of the LSTM state is its optimizer state ``state[p]["lstm"]``
    (``[layers, 2, numel, hidden]``) next to its update count ``state[p]["step"]``, so
    :meth:`state_dict` / :meth:`load_state_dict` carry it. The rule's own weights are not part of
    the optimizer's state: they come from ``rule`` or ``checkpoint``. The rule runs without
    autograd and is never trained here.

    Args:
        params: parameters (or parameter groups) to optimize; the rule has no per-group options.
        rule: the rule to run, on the parameters' dtype and device.
        checkpoint: instead of ``rule``, a ``best.pt`` / ``last.pt`` of a trained ``l2l`` run
            (:meth:`LSTMOptimizerRule.from_checkpoint`); its rule moves to the parameters' device.

    Raises:
        ValueError: both or neither of ``rule`` and ``checkpoint``.
        CheckpointError: ``checkpoint`` is missing or unusable (the message names the file).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 rule: LSTMOptimizerRule | None = None, checkpoint: str | Path | None = None) -> None:
        if (rule is None) == (checkpoint is None):
            raise ValueError("LearnedOptimizer takes either rule= (an LSTMOptimizerRule) or checkpoint= (a path to a "
                             "best.pt or last.pt of a trained l2l run), exactly one of them")
        super().__init__(params, defaults={})
        if checkpoint is not None:
            device = self.param_groups[0]["params"][0].device
            rule = LSTMOptimizerRule.from_checkpoint(checkpoint).to(device)
        self.rule = rule

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Update every parameter that has a gradient; ``closure`` re-evaluates the loss (returned)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        for p in params:
            if not self.state[p]:
                self.state[p] = {"step": 0, "lstm": _pack(self.rule.init({"p": p}))}
        lstm = _unpack(torch.cat([self.state[p]["lstm"] for p in params], dim=2))
        named = {str(i): p for i, p in enumerate(params)}
        info = StepInfo(self.state[params[0]]["step"], None if loss is None else loss.detach())
        new, lstm = self.rule.step(named, {str(i): p.grad for i, p in enumerate(params)}, lstm, info)
        slices = _pack(lstm).split([p.numel() for p in params], dim=2)
        for i, (p, piece) in enumerate(zip(params, slices)):
            p.copy_(new[str(i)])
            self.state[p]["lstm"] = piece.clone()  # its own storage: a saved state holds this parameter's rows only
            self.state[p]["step"] += 1
        return loss


@dataclass(frozen=True)
class L2LOptions(Options):
    """The LSTM optimizer's options (Andrychowicz et al. 2016; defaults: the quadratics setting).

    Args:
        preprocessing: feed log-magnitude / sign features of each gradient coordinate (Appendix A).
        p: the preprocessing constant (None: the paper's 10; preprocessing only).
        output_scale: factor of the network's output (1.0 quadratics, 0.1 MNIST).
        lstm_units: LSTM units per layer.
        lstm_layers: stacked LSTM layers.
        second_derivatives: backpropagate through the optimizee's gradients (the paper: no, §2.1).
        horizon: optimizee steps of a run, in training and evaluation.
        truncation: optimizee steps per meta-update (truncated backpropagation).
    """

    positive = ("p", "output_scale", "lstm_units", "lstm_layers", "horizon", "truncation")
    preprocessing: bool = False
    p: float | None = None
    output_scale: float = 1.0
    lstm_units: int = 20
    lstm_layers: int = 2
    second_derivatives: bool = False
    horizon: int = 100
    truncation: int = 20

    def check(self) -> None:
        super().check()
        if self.p is not None and not self.preprocessing:
            raise ConfigError("option 'p' is the constant of the gradient preprocessing; it does nothing without "
                              "preprocessing=True")
        if self.truncation > self.horizon:
            raise ConfigError(f"option 'truncation' ({self.truncation}) must not exceed the horizon ({self.horizon})")


@register_algorithm("l2l", L2LOptions, problems="optimizees")
def build_l2l(options: L2LOptions, context: BuildContext) -> tuple[OptimizerLearner, TruncatedBackprop]:
    """Andrychowicz et al. 2016's coordinate-wise LSTM optimizer, trained by truncated backpropagation."""
    del context
    rule = LSTMOptimizerRule(options.preprocessing, 10.0 if options.p is None else options.p, options.output_scale,
                             hidden=options.lstm_units, layers=options.lstm_layers)
    learner = OptimizerLearner(rule, options.horizon, first_order=not options.second_derivatives)
    return learner, TruncatedBackprop(options.truncation)
