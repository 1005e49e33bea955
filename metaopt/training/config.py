"""Typed, checked run configurations, loaded from dicts, JSON files and named presets.

:class:`TrainerConfig` holds what the outer loop (:class:`metaopt.trainer.MetaTrainer`) reads:
meta-optimizer, clipping, evaluation, checkpoint and logging periods. :class:`ExperimentConfig`
adds what to train: algorithm, task family, model and inner loop. Both are frozen dataclasses
that check every value when built; loading a dict rejects unknown keys and suggests the closest
valid one. A preset is an :class:`ExperimentConfig` stored as JSON in ``metaopt/presets/``.

Example:
    >>> config = load_preset("maml-sinusoid-10shot")
    >>> config.shots, config.inner_lr, config.meta_batch
    (10, 0.01, 25)
    >>> config.replace(inner_lr=0.02).inner_lr
    0.02
    >>> ExperimentConfig.from_dict({"inner_rl": 0.02})
    Traceback (most recent call last):
        ...
    metaopt.config.ConfigError: unknown config key 'inner_rl' (did you mean 'inner_lr'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch

from metaopt.batchnorm import BatchNormPolicy
from metaopt.inner import STRATEGIES

__all__ = ["ConfigError", "ExperimentConfig", "TrainerConfig", "load_preset", "preset_names"]

C = TypeVar("C", bound="TrainerConfig")

META_OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
BUDGET_CLOCKS = ("wall", "cpu")
MODELS = ("mlp", "conv4")
METASGD_INITS = ("uniform", "constant")
MTNET_MASKS = ("unit", "weight")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names it and what is allowed."""


def _closest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _conform(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint`` (int -> float, list -> tuple), or a ConfigError."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = options[0]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if hint is float and is_int:
        return float(value)
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    elif (hint is int and is_int) or (hint in (float, str, bool) and type(value) is hint):
        return value
    expected = "a tuple of ints" if typing.get_origin(hint) is tuple else hint.__name__
    raise ConfigError(f"config field {name!r} must be {expected}, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class TrainerConfig:
    """The outer loop: length, meta-optimizer, gradient clipping, evaluation, checkpoints and logging.

    Args:
        iterations: meta-updates (meta-batches) in the run.
        time_budget: also stop after the meta-update during which this many minutes of training
            time have passed (``None``: no limit). Training time is the time of the meta-updates
            alone; validation, checkpoints and logging do not count.
        budget_clock: what ``time_budget`` counts: ``"wall"`` time, or the ``"cpu"`` time of the
            process (all its threads), which runs sharing a machine cannot take from each other
            (equal-budget comparisons; with one thread the two agree on an idle machine).
        meta_optimizer: ``"adam"`` (MAML's) or ``"sgd"``.
        meta_lr: learning rate of the meta-optimizer.
        lr_schedule: ``"constant"``, or ``"cosine"`` annealing from ``meta_lr`` to ``min_meta_lr``
            over the run's epochs, a step per epoch (MAML++'s CA, Antoniou et al. 2019, §4).
        min_meta_lr: the meta learning rate that cosine annealing ends at (MAML++ Omniglot: 1e-5).
        epoch_length: meta-iterations per epoch, the unit of the epoch schedules (cosine
            annealing, MAML++'s multi-step loss and derivative-order annealing; 500 in MAML++).
        grad_clip: clip the meta-gradient to this global L2 norm (``None``: no clipping).
        grad_clip_value: clip each meta-gradient entry to ``[-v, v]`` (MAML's miniImageNet
            code clips at 10; cbfinn/maml ``maml.py``).
        eval_every: evaluate on the validation tasks every this many iterations (and at the end).
        eval_episodes: validation / test tasks per evaluation (MAML's protocol: 600).
        checkpoint_every: write ``last.pt`` every this many iterations (and at the end).
        log_every: log training metrics every this many iterations.
        max_nonfinite: stop after this many consecutive meta-batches with a non-finite
            meta-loss or meta-gradient (each is skipped).
    """

    iterations: int = 70000
    time_budget: float | None = None
    budget_clock: str = "wall"
    meta_optimizer: str = "adam"
    meta_lr: float = 1e-3
    lr_schedule: str = "constant"
    min_meta_lr: float = 0.0
    epoch_length: int = 500
    grad_clip: float | None = None
    grad_clip_value: float | None = None
    eval_every: int = 1000
    eval_episodes: int = 600
    checkpoint_every: int = 1000
    log_every: int = 100
    max_nonfinite: int = 10

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _conform(f.name, getattr(self, f.name), hints[f.name]))
        self._check()

    def _check(self) -> None:
        positive = ("iterations", "time_budget", "eval_every", "eval_episodes", "checkpoint_every", "log_every",
                    "max_nonfinite", "meta_lr", "grad_clip", "grad_clip_value", "epoch_length")
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"config field {name!r} must be > 0, got {value}")
        if not 0 <= self.min_meta_lr <= self.meta_lr:
            raise ConfigError(f"config field 'min_meta_lr' must be in [0, meta_lr={self.meta_lr}], got "
                              f"{self.min_meta_lr}")
        self._check_choice("meta_optimizer", META_OPTIMIZERS)
        self._check_choice("lr_schedule", LR_SCHEDULES)
        self._check_choice("budget_clock", BUDGET_CLOCKS)

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ConfigError(f"config field {name!r} must be one of {choices}, got {value!r}"
                              f"{_closest(value, list(choices))}")

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the config's fields, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls: type[C], raw: Mapping[str, Any]) -> C:
        """Build from a mapping; unknown keys are an error naming the closest valid key."""
        valid = cls.field_names()
        unknown = [key for key in raw if key not in valid]
        if unknown:
            listed = ", ".join(f"{key!r}{_closest(key, valid)}" for key in unknown)
            raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} {listed}")
        return cls(**raw)

    @classmethod
    def from_json(cls: type[C], path: str | Path) -> C:
        """Load a JSON file written by :meth:`to_json` (or by hand); errors name the file."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a JSON object, got {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready values (tuples become lists)."""
        return {name: list(v) if isinstance(v, tuple) else v for name, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied and checked (unknown names are an error)."""
        return type(self).from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class ExperimentConfig(TrainerConfig):
    """A whole run: what to meta-train (algorithm, tasks, model, inner loop) and how (the outer loop).

    Defaults are MAML's sinusoid regression (Finn et al. 2017, §5.1; cbfinn/maml ``main.py``).
    The outer-loop fields are those of :class:`TrainerConfig`.

    Args:
        algorithm: registered algorithm name (``metaopt.registry.algorithm_names()``).
        dataset: registered dataset name (``metaopt.registry.dataset_names()``).
        ways: classes per task (classification datasets; ``None`` for regression).
        shots: support examples per class (per task for regression): the K of K-shot.
        query: query examples per class (per task for regression) of the meta-training tasks.
        eval_query: query examples per class of the validation and test tasks (``None``:
            ``query``); few-shot benchmarks score 15 per class whatever the training query.
        protocol: class split of the dataset, e.g. ``"maml"`` or ``"vinyals"`` for Omniglot
            (ignored by generated tasks).
        model: backbone, ``"mlp"`` or ``"conv4"`` (:mod:`metaopt.models`).
        hidden: hidden layer sizes of the MLP.
        filters: channels of each Conv4 convolution (64 Omniglot, 32 miniImageNet).
        strided: Conv4 down-samples with stride-2 convolutions instead of max-pooling.
        inner_lr: inner-loop step size α.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at evaluation (``None``: ``inner_steps``).
        first_order: drop second-order terms of the meta-gradient (first-order MAML).
        checkpoint_steps: recompute each second-order inner step in the meta-backward instead of
            storing its activations (memory no longer grows with the inner steps; loop strategy).
        adapt: parameters the inner loop updates: ``"all"``, ``"head"`` (ANIL) or
            comma-separated parameter names.
        strategy: task batching, ``"auto"`` | ``"loop"`` | ``"vmap"`` (:mod:`metaopt.inner`).
        bn_policy: batch-norm policy, ``"batch"``, ``"frozen"`` or ``"running"`` (:mod:`metaopt.batchnorm`).
        msl_epochs: MAML++ multi-step loss annealed over this many epochs (``None``: off).
        second_order_from_epoch: MAML++ derivative-order annealing: first-order before this
            epoch (``None``: off).
        per_step_bn_stats: MAML++ per-step batch-norm running statistics (BNRS).
        per_step_bn_weights: MAML++ per-step batch-norm weights and biases (BNWB).
        per_step_lr: MAML++ learned per-layer per-step learning rates, starting at ``inner_lr`` (LSLR).
        metasgd_init: Meta-SGD's initial step sizes: ``"uniform"`` in [0.005, 0.1] (the paper)
            or ``"constant"`` (every entry ``inner_lr``, as learn2learn).
        mtnet_mask: MT-net's mask logits: ``"unit"`` (one per output unit, the paper's) or
            ``"weight"`` (one per weight entry); algorithm ``"tnet"`` has none.
        arml_vertices: ARML's meta-knowledge graph vertices.
        arml_sigma: ARML's prototype-to-vertex Gaussian bandwidth.
        arml_loss_weight: ARML's weight μ of the two reconstruction losses.
        metalstm_bn_momentum: the Ravi & Larochelle learner's batch-norm momentum (0.9 for
            1-shot, 0.95 for 5-shot; eps is 1e-3).
        meta_batch: tasks per meta-batch.
        seed: fixes the model's initialisation and the task streams; train, validation and
            test tasks use the distinct seeds ``3·seed``, ``3·seed + 1`` and ``3·seed + 2``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        data_root: folder holding the datasets, one sub-folder each (``data_root/omniglot``);
            ``None``: ``$METAOPT_DATA``. Unused by generated tasks such as sinusoid.
    """

    algorithm: str = "maml"
    dataset: str = "sinusoid"
    ways: int | None = None
    shots: int = 10
    query: int = 10
    eval_query: int | None = None
    protocol: str = "maml"
    model: str = "mlp"
    hidden: tuple[int, ...] = (40, 40)
    filters: int = 64
    strided: bool = False
    inner_lr: float = 0.01
    inner_steps: int = 1
    eval_inner_steps: int | None = None
    first_order: bool = False
    checkpoint_steps: bool = False
    adapt: str = "all"
    strategy: str = "auto"
    bn_policy: str = "batch"
    msl_epochs: int | None = None
    second_order_from_epoch: int | None = None
    per_step_bn_stats: bool = False
    per_step_bn_weights: bool = False
    per_step_lr: bool = False
    metasgd_init: str = "uniform"
    mtnet_mask: str = "unit"
    arml_vertices: int = 4
    arml_sigma: float = 8.0
    arml_loss_weight: float = 0.01
    metalstm_bn_momentum: float = 0.9
    meta_batch: int = 25
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None

    def _check(self) -> None:
        super()._check()
        positive = ("ways", "shots", "query", "eval_query", "filters", "inner_lr", "inner_steps", "eval_inner_steps",
                    "meta_batch", "msl_epochs", "arml_vertices", "arml_sigma")
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"config field {name!r} must be > 0, got {value}")
        if any(size < 1 for size in self.hidden):
            raise ConfigError(f"config field 'hidden' must hold layer sizes >= 1, got {list(self.hidden)}")
        if self.seed < 0:
            raise ConfigError(f"config field 'seed' must be >= 0, got {self.seed}")
        for name in ("algorithm", "dataset", "adapt"):
            if not getattr(self, name).strip():
                raise ConfigError(f"config field {name!r} must not be empty")
        self._check_choice("model", MODELS)
        self._check_choice("strategy", STRATEGIES)
        self._check_choice("bn_policy", tuple(p.value for p in BatchNormPolicy))
        self._check_choice("metasgd_init", METASGD_INITS)
        self._check_choice("mtnet_mask", MTNET_MASKS)
        if self.arml_loss_weight < 0:
            raise ConfigError(f"config field 'arml_loss_weight' must be >= 0, got {self.arml_loss_weight}")
        if self.second_order_from_epoch is not None and self.second_order_from_epoch < 0:
            raise ConfigError("config field 'second_order_from_epoch' must be >= 0, got "
                              f"{self.second_order_from_epoch}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ConfigError(f"config field 'device' must be 'auto' or a torch device such as 'cpu' or "
                                  f"'cuda:0', got {self.device!r}") from err

    def adapt_spec(self) -> str | list[str]:
        """``adapt`` as :class:`metaopt.meta_learner.MetaLearner` takes it: ``"all"``, ``"head"`` or names."""
        if self.adapt in ("all", "head"):
            return self.adapt
        return [name.strip() for name in self.adapt.split(",") if name.strip()]


def preset_names() -> list[str]:
    """Names of the presets shipped in ``metaopt/presets/`` (the JSON file names), sorted."""
    folder = resources.files("metaopt.presets")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of preset ``name``; unknown names suggest the closest preset."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}{_closest(name, names)}; presets: {names}")
    raw = json.loads(resources.files("metaopt.presets").joinpath(f"{name}.json").read_text())
    try:
        return ExperimentConfig.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"preset {name!r}: {err}") from None
