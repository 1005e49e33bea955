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

:class:`LearnedOptimizer` runs a rule, a checkpoint of a trained run, or a pretrained rule shipped
with the package (:mod:`metaopt.algorithms.pretrained_optimizers`; ``pretrained="l2l-mnist"``), as an
ordinary ``torch.optim`` optimizer. Each parameter group has a learning-rate multiplier ``lr``
(default 1.0, the rule as trained) that scales the rule's update, so ``torch.optim.lr_scheduler``
schedules work as with any optimizer.

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
    >>> schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # halves the update every step
    >>> opt.step(); schedule.step(); opt.param_groups[0]["lr"]
    0.5
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaopt.algorithms.pretrained_optimizers import read_pretrained, write_pretrained
from metaopt.engine.coordinatewise import CoordinateLSTM, LSTMState, chunks, flatten, preprocess, unflatten
from metaopt.engine.functional import Params
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rule_optimizer import RuleOptimizer, add_update, one_source
from metaopt.engine.rules import StepInfo, UpdateRule
from metaopt.estimators.base import Estimator
from metaopt.estimators.unroll_options import UnrollOptions, estimator_of
from metaopt.options import ConfigError
from metaopt.registry import BuildContext, register_algorithm
from metaopt.training.checkpoint import CheckpointError, load_checkpoint, load_module_state
from metaopt.training.config import load_preset, preset_names
from metaopt.training.experiment import load_rule
from metaopt.training.legacy import read_run_config

__all__ = ["L2LOptions", "LSTMOptimizerRule", "LearnedOptimizer", "build_l2l", "export_pretrained"]


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

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments: ``LSTMOptimizerRule(**rule.settings())`` is a rule of the same shape."""
        return {"preprocessing": self.preprocessing, "p": self.p, "output_scale": self.output_scale,
                "hidden": self.lstm.hidden, "layers": len(self.lstm.cells)}

    @classmethod
    def pretrained(cls, name: str | Path) -> LSTMOptimizerRule:
        """A pretrained rule shipped with the package (``"l2l-mnist"``), or of a file of that format, on the CPU.

        Loading draws no random numbers: the global generators are left as they were.

        The file's provenance (preset, iterations, best validation loss, metaopt version) is
        :func:`metaopt.algorithms.pretrained_optimizers.read_pretrained` ``(name).provenance``.

        Raises:
            ValueError: an unknown name; the message lists the shipped ones.
            CheckpointError: naming the file: missing, corrupt, or not of this rule.
        """
        found = read_pretrained(name)
        if found.rule != cls.__name__:
            raise CheckpointError(f"pretrained optimizer file {found.path} holds a {found.rule} rule, not an "
                                  f"{cls.__name__}")
        try:
            with torch.random.fork_rng(devices=[]):  # the weights are overwritten: leave the global generator alone
                rule = cls(**found.settings)
        except TypeError as err:
            raise CheckpointError(f"pretrained optimizer file {found.path} has settings {found.settings} that an "
                                  f"{cls.__name__} does not take ({err}); it was written by another metaopt "
                                  "release") from err
        weights = next(iter(found.weights.values()), None)
        if isinstance(weights, torch.Tensor) and weights.is_floating_point():
            rule = rule.to(weights.dtype)
        load_module_state(rule, found.weights, found.path)
        return rule

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
            with torch.random.fork_rng(devices=[]):  # the weights are overwritten: leave the global generator alone
                rule = cls(**hparams).to(next(iter(state["rule"].values())).dtype)
            load_module_state(rule, state["rule"], path)
            return rule
        return load_rule(path, cls)

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

    def update(self, grad: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        """The update ``s · W h`` of every coordinate of the flat gradient ``grad``, and the new LSTM state."""
        update, state = self.network(self.features(grad), state)
        return self.output_scale * update, state

    def step(self, params: Params, grads: Params, state: LSTMState, info: StepInfo) -> tuple[Params, LSTMState]:
        """One update of all the coordinates of ``params`` as one batch (the rule reads neither step nor loss)."""
        del info
        update, state = self.update(flatten({name: grads[name] for name in params}), state)
        return unflatten(flatten(params) + update, params), state

    def optimizer(self, params: Iterable[torch.Tensor], lr: float = 1.0) -> LearnedOptimizer:
        """This rule as a :class:`LearnedOptimizer` of ``params``, its step scaled by ``lr``."""
        return LearnedOptimizer(params, rule=self, lr=lr)

    def extra_repr(self) -> str:
        return f"preprocessing={self.preprocessing}, p={self.p}, output_scale={self.output_scale}"


def _pack(state: LSTMState) -> torch.Tensor:
    """An LSTM state as one tensor ``[layers, 2, coordinates, hidden]``."""
    return torch.stack([torch.stack(hc) for hc in state])


def _unpack(packed: torch.Tensor) -> LSTMState:
    return [(layer[0], layer[1]) for layer in packed]


class LearnedOptimizer(RuleOptimizer):
    """A learned rule as a ``torch.optim`` optimizer: ``opt.zero_grad(); loss.backward(); opt.step()``.

    Every :meth:`step` runs the rule once on all the parameters that have a gradient, as one batch
    of coordinates (Andrychowicz et al. 2016, §2.1), and adds its update, scaled by the parameter
    group's ``lr``, to them in place:

        θ ← θ + lr · s · W h        (lr = 1: the rule's own step)

    ``lr`` is a multiplier of the rule's output, not a step size of its own; a
    ``torch.optim.lr_scheduler`` schedule changes it like any optimizer's learning rate (it does
    not change the rule's input, so the LSTM state follows the same gradients). Each parameter's
    slice of the LSTM state is its optimizer state ``state[p]["lstm"]``
    (``[layers, 2, numel, hidden]``) next to its update count ``state[p]["step"]``, so
    :meth:`state_dict` / :meth:`load_state_dict` carry it, with every group's ``lr``. The rule's
    own weights are not part of the optimizer's state: they come from ``rule``, ``checkpoint`` or
    ``pretrained``. The rule runs without autograd and is never trained here.

    Args:
        params: parameters (or parameter groups, which may set their own ``lr``) to optimize.
        rule: the rule to run, on the parameters' dtype and device.
        checkpoint: instead of ``rule``, a ``best.pt`` / ``last.pt`` of a trained ``l2l`` run
            (:meth:`LSTMOptimizerRule.from_checkpoint`); its rule moves to the parameters' device and dtype.
        pretrained: instead of ``rule``, a pretrained rule shipped with the package, by name
            (``"l2l-mnist"``; :func:`metaopt.algorithms.pretrained_optimizers.available_pretrained`),
            or the path of such a file (:meth:`LSTMOptimizerRule.pretrained`); it moves to the
            parameters' device and dtype.
        lr: the default multiplier of the rule's update (a finite number >= 0; 1.0 runs the rule as trained).

    Raises:
        ValueError: not exactly one of ``rule``, ``checkpoint`` and ``pretrained``; a bad ``lr``; an
            unknown pretrained name (the message lists the shipped ones).
        CheckpointError: ``checkpoint`` or the pretrained file is missing or unusable (the message names the file).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 rule: LSTMOptimizerRule | None = None, checkpoint: str | Path | None = None, *,
                 pretrained: str | Path | None = None, lr: float = 1.0) -> None:
        source = one_source("LearnedOptimizer", {"rule": rule, "checkpoint": checkpoint, "pretrained": pretrained},
                            "rule= (an LSTMOptimizerRule), checkpoint= (a path to a best.pt or last.pt of a trained "
                            "l2l run) or pretrained= (a shipped name such as 'l2l-mnist', or a file of "
                            "scripts/export_pretrained.py)")
        super().__init__(params, rule, lr)
        if source == "checkpoint":
            self.rule = self.placed(LSTMOptimizerRule.from_checkpoint(checkpoint))
        elif source == "pretrained":
            self.rule = self.placed(LSTMOptimizerRule.pretrained(pretrained))

    def apply(self, scaled: list[tuple[torch.Tensor, float]], loss: torch.Tensor | None) -> None:
        """One run of the rule on all the coordinates of ``scaled`` as one batch; each update scaled by its ``lr``.

        The LSTM states of all the parameters live in one buffer, of which each ``state[p]["lstm"]`` is a
        view: the rule reads it and its new state is written back in place, chunk by chunk of
        coordinates (:data:`metaopt.engine.coordinatewise.CHUNK`), so a step moves no state but the
        rule's own output and its temporaries stay small (on a 1M-parameter model, a concatenation
        and split per step cost 1.7x the rule's network, and the network at once 2x its chunks).
        """
        del loss  # the rule does not read the loss
        params = [p for p, _ in scaled]
        packed = self._packed(params)
        grad = flatten({str(i): p.grad for i, p in enumerate(params)})
        update = torch.empty_like(grad)
        for rows in chunks(len(grad)):
            update[rows], lstm = self.rule.update(grad[rows], _unpack(packed[:, :, rows]))
            for layer, (h, c) in zip(packed, lstm):
                layer[0, rows] = h
                layer[1, rows] = c
        for (p, lr), piece in zip(scaled, update.split([p.numel() for p in params])):
            add_update(p, piece, lr)
            self.state[p]["step"] += 1

    def _packed(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The one buffer ``[layers, 2, coordinates, hidden]`` whose slices are the ``state[p]["lstm"]`` of ``params``.

        Built again (one concatenation) at the first step, when the parameters with a gradient change,
        and after :meth:`load_state_dict` (the loaded states are no views of it).
        """
        views = getattr(self, "_views", ())
        if len(views) == len(params) and all(self.state[p].get("lstm") is v for p, v in zip(params, views)):
            return self._buffer
        for p in params:
            if not self.state[p]:
                self.state[p] = {"step": 0, "lstm": _pack(self.rule.init({"p": p}))}
        self._buffer = torch.cat([self.state[p]["lstm"] for p in params], dim=2)
        self._views = self._buffer.split([p.numel() for p in params], dim=2)
        for p, view in zip(params, self._views):
            self.state[p]["lstm"] = view
        return self._buffer

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict, each parameter's LSTM state a copy of its own rows (later steps leave it)."""
        saved = super().state_dict()
        saved["state"] = {k: {**v, "lstm": v["lstm"].clone()} if "lstm" in v else v for k, v in saved["state"].items()}
        return saved


@dataclass(frozen=True)
class L2LOptions(UnrollOptions):
    """The LSTM optimizer's options (Andrychowicz et al. 2016; defaults: the quadratics setting).

    The unroll and its estimator are :class:`metaopt.estimators.unroll_options.UnrollOptions`'
    (the paper: truncated backpropagation without second derivatives, §2.1).

    Args:
        preprocessing: feed log-magnitude / sign features of each gradient coordinate (Appendix A).
        p: the preprocessing constant (None: the paper's 10; preprocessing only).
        output_scale: factor of the network's output (1.0 quadratics, 0.1 MNIST).
        lstm_units: LSTM units per layer.
        lstm_layers: stacked LSTM layers.
    """

    positive = ("p", "output_scale", "lstm_units", "lstm_layers", *UnrollOptions.positive)
    preprocessing: bool = False
    p: float | None = None
    output_scale: float = 1.0
    lstm_units: int = 20
    lstm_layers: int = 2

    def check(self) -> None:
        super().check()
        if self.p is not None and not self.preprocessing:
            raise ConfigError("option 'p' is the constant of the gradient preprocessing; it does nothing without "
                              "preprocessing=True")


@register_algorithm("l2l", L2LOptions, problems="optimizees")
def build_l2l(options: L2LOptions, context: BuildContext) -> tuple[OptimizerLearner, Estimator]:
    """Andrychowicz et al. 2016's coordinate-wise LSTM optimizer, trained by the estimator its options choose."""
    del context
    rule = LSTMOptimizerRule(options.preprocessing, 10.0 if options.p is None else options.p, options.output_scale,
                             hidden=options.lstm_units, layers=options.lstm_layers)
    learner = OptimizerLearner(rule, options.horizon, first_order=not options.second_derivatives)
    return learner, estimator_of(options)


def _metaopt_version() -> str:
    try:
        return importlib.metadata.version("metaopt")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _preset_of(config: dict[str, Any] | None, preset: str | None) -> str | None:
    """``preset`` checked, or the one preset of the run's algorithm and dataset (``None`` if not exactly one)."""
    names = preset_names()
    if preset is not None:
        if preset not in names:
            raise ValueError(f"unknown preset {preset!r}; the presets are {', '.join(names)}")
        return preset
    if config is None:
        return None
    ours = config["algorithm"]["name"], config["data"]["name"]
    presets = {name: load_preset(name) for name in names}
    matches = [name for name, found in presets.items() if (found.algorithm.name, found.data.name) == ours]
    return matches[0] if len(matches) == 1 else None


def export_pretrained(checkpoint: str | Path, path: str | Path, preset: str | None = None) -> dict[str, Any]:
    """Write the rule of a trained ``l2l`` run's checkpoint as a pretrained optimizer file; returns its provenance.

    The file's format is :mod:`metaopt.algorithms.pretrained_optimizers`'; the rule is rebuilt from
    the run's config, which the checkpoint carries (:func:`metaopt.training.experiment.load_learner`).
    ``scripts/export_pretrained.py RUN_DIR NAME`` calls it.

    Args:
        checkpoint: ``best.pt`` (or ``last.pt``) of a trained ``l2l`` run.
        path: the file to write, e.g. ``algorithms/pretrained/l2l-mnist.pt``.
        preset: the preset the run started from (default: the one preset of the run's algorithm
            and dataset, else ``None``).

    Returns:
        The provenance written: ``preset``, ``iterations``, ``best_val_loss`` and ``best``,
        ``metaopt_version``, ``torch_version``, ``checkpoint``, ``config``.

    Raises:
        CheckpointError: the checkpoint is missing, corrupt, or not of an ``l2l`` run (naming it).
        ValueError: an unknown ``preset``.
    """
    checkpoint = Path(checkpoint)
    rule = LSTMOptimizerRule.from_checkpoint(checkpoint)
    state = load_checkpoint(checkpoint)
    config = state.get("config")
    if config is None:  # written before checkpoints carried their config
        try:
            config = read_run_config(checkpoint.parent / "config.json").to_dict()
        except ConfigError:
            config = None
    best = state.get("best")
    provenance = {"preset": _preset_of(config, preset),
                  "iterations": None if state.get("iteration") is None else int(state["iteration"]),
                  "best_val_loss": None if not best or best.get("metric", "loss") != "loss" else float(best["value"]),
                  "best": None if best is None else dict(best),
                  "metaopt_version": _metaopt_version(), "torch_version": str(torch.__version__),
                  "checkpoint": f"{checkpoint.parent.name}/{checkpoint.name}", "config": config}
    write_pretrained(path, type(rule).__name__, rule.settings(), rule.state_dict(), provenance)
    return provenance
