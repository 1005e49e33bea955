"""Run configurations: the trainer's options and a run's sections, loaded from dicts, JSON files and presets.

A run config (:class:`RunConfig`) is the common part, the seed, the device and the trainer's
options (:class:`TrainerConfig`), plus one section per part the registry builds, each a name and
that part's own options (:class:`Section`): the ``algorithm``, the ``data`` (problem source) and,
for few-shot algorithms, the ``model``. Runs of learned optimizers may add ``baselines``
(:class:`BaselinesConfig`), how their evaluation compares the trained optimizer with tuned
``torch.optim`` baselines. As JSON::

    {"seed": 0, "device": "auto",
     "trainer": {"iterations": 60000, "meta_lr": 0.001, ...},
     "data": {"name": "omniglot", "ways": 5, "shots": 1, ...},
     "model": {"name": "conv4", "filters": 64, "strided": true},
     "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1, ...}}

Every key is checked: an option the named part does not take is an error that lists what it
takes. A preset is a run config stored in ``metaopt/presets/``.

Example:
    >>> config = load_preset("maml-sinusoid-10shot")
    >>> config.data.options.shots, config.algorithm.options.inner_lr, config.trainer.meta_lr
    (10, 0.01, 0.001)
    >>> config.replace(algorithm={"inner_lr": 0.02}).algorithm.options.inner_lr
    0.02
    >>> load_preset("metalstm-omniglot-5w1s").replace(algorithm={"inner_lr": 0.1})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    metaopt.options.ConfigError: 'inner_lr' ... is not an option of algorithm 'metalstm'; its options are adapt, ...
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from metaopt.evaluation.tuned_baselines import GRID
from metaopt.options import ConfigError, Options, closest
from metaopt.registry import Entry, Kind, entry, load_plugins, names

__all__ = ["BaselinesConfig", "RunConfig", "Section", "TrainerConfig", "load_preset", "preset_names"]


@dataclass(frozen=True)
class TrainerConfig(Options):
    """The outer loop: length, meta-optimizer, gradient clipping, evaluation, checkpoints and logging.

    Args:
        iterations: meta-updates in the run (a learned optimizer's truncation is one).
        time_budget: also stop after the meta-update during which this many minutes of training
            time have passed (None: no limit). Training time is the time of the meta-updates
            alone; validation, checkpoints and logging do not count.
        budget_clock: what time_budget counts: "wall" time, or the "cpu" time of the process (all
            its threads), which runs sharing a machine cannot take from each other.
        meta_optimizer: "adam" (MAML's), "sgd", or "learned": the trained learned optimizer of the
            run whose checkpoint meta_optimizer_checkpoint names, through its torch.optim interface
            (Metz et al. 2020, §6: a learned optimizer training learned optimizers).
        meta_optimizer_checkpoint: best.pt or last.pt of a trained learned-optimizer run, for
            meta_optimizer="learned" only.
        meta_lr: learning rate of the meta-optimizer; with meta_optimizer="learned" the multiplier
            of the learned rule's step (1.0: the rule as trained).
        lr_schedule: "constant", or "cosine" annealing from meta_lr to min_meta_lr over the run's
            epochs, a step per epoch (MAML++'s CA, Antoniou et al. 2019, §4).
        min_meta_lr: the meta learning rate that cosine annealing ends at (MAML++ Omniglot: 1e-5).
        epoch_length: meta-iterations per epoch, the unit of the epoch schedules (cosine annealing,
            MAML++'s multi-step loss and derivative-order annealing; 500 in MAML++).
        grad_clip: clip the meta-gradient to this global L2 norm (None: no clipping).
        grad_clip_value: clip each meta-gradient entry to [-v, v] (MAML's miniImageNet code clips
            at 10; cbfinn/maml maml.py).
        eval_every: evaluate on the validation problems every this many iterations (and at the end).
        eval_episodes: validation problems (tasks) per evaluation (MAML's protocol: 600).
        test_episodes: test problems of the final evaluation (None: eval_episodes).
        checkpoint_every: write last.pt every this many iterations (and at the end).
        log_every: log training metrics every this many iterations.
        max_nonfinite: stop after this many consecutive meta-updates with a non-finite meta-loss or
            meta-gradient (each is skipped).
    """

    positive = ("iterations", "time_budget", "eval_every", "eval_episodes", "test_episodes", "checkpoint_every",
                "log_every", "max_nonfinite", "meta_lr", "grad_clip", "grad_clip_value", "epoch_length")
    iterations: int = 70000
    time_budget: float | None = None
    budget_clock: Literal["wall", "cpu"] = "wall"
    meta_optimizer: Literal["adam", "sgd", "learned"] = "adam"
    meta_optimizer_checkpoint: str | None = None
    meta_lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_meta_lr: float = 0.0
    epoch_length: int = 500
    grad_clip: float | None = None
    grad_clip_value: float | None = None
    eval_every: int = 1000
    eval_episodes: int = 600
    test_episodes: int | None = None
    checkpoint_every: int = 1000
    log_every: int = 100
    max_nonfinite: int = 10

    def check(self) -> None:
        super().check()
        if not 0 <= self.min_meta_lr <= self.meta_lr:
            raise ConfigError(f"option 'min_meta_lr' must be in [0, meta_lr={self.meta_lr}], got {self.min_meta_lr}")
        if (self.meta_optimizer == "learned") != (self.meta_optimizer_checkpoint is not None):
            raise ConfigError("option 'meta_optimizer_checkpoint' goes with meta_optimizer='learned' and only with it: "
                              "pass both (--meta-optimizer learned --meta-optimizer-checkpoint RUN/best.pt) or "
                              "neither")


@dataclass(frozen=True)
class BaselinesConfig(Options):
    """How a learned optimizer's evaluation compares it with tuned torch.optim baselines.

    Args:
        tune_problems: validation problems each baseline's learning rate is tuned on (final loss
            at the horizon).
        grid: the learning rates tried.
        transfer: variants of the data options the trained optimizer is also scored on, without
            retraining, by name (the paper's architecture transfer), e.g. {"ReLU": {"activation": "relu"}}.
    """

    positive = ("tune_problems",)
    tune_problems: int = 4
    grid: tuple[float, ...] = GRID
    transfer: dict[str, dict[str, Any]] = field(default_factory=dict)

    def check(self) -> None:
        super().check()
        if not self.grid or min(self.grid) <= 0:
            raise ConfigError(f"option 'grid' must hold learning rates > 0, got {list(self.grid)}")


@dataclass(frozen=True)
class Section:
    """A part of a run: the registered name of an algorithm, dataset or model, and its options."""

    kind: Kind
    name: str
    options: Options

    @classmethod
    def from_dict(cls, kind: Kind, raw: Any) -> Section:
        """``{"name": ..., **options}``, checked against the options of the registered ``name``."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
            raise ConfigError(f"the {kind} section must be a mapping with a 'name' (e.g. {{\"name\": ...}}), "
                              f"got {raw!r}")
        found = entry(kind, raw["name"])
        options = {k: v for k, v in raw.items() if k != "name"}
        return cls(kind, found.name, found.options.from_dict(options, owner=f"{kind} {found.name!r}"))

    @property
    def entry(self) -> Entry:
        """The registry entry of this part."""
        return entry(self.kind, self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.to_dict()}

    def replace(self, **changes: Any) -> Section:
        """The same part with option ``changes``, checked."""
        return Section.from_dict(self.kind, {**self.to_dict(), **changes})


_KIND: dict[str, Kind] = {"data": "dataset", "model": "model", "algorithm": "algorithm"}  # section -> registry kind


@dataclass(frozen=True)
class RunConfig:
    """A whole run: what to meta-train (algorithm, data, model) and how (trainer, seed, device).

    Args:
        algorithm: the algorithm and its options.
        data: the problem source (a few-shot dataset or an optimizee family) and its options.
        model: the network of few-shot algorithms and its options (None for learned optimizers,
            whose problems define their networks).
        trainer: the outer loop's options.
        baselines: learned optimizers only: the comparison with tuned baselines in evaluation.
        seed: fixes the initialisation and the problem streams (few-shot: train, validation and
            test tasks use the seeds 3·seed, 3·seed + 1 and 3·seed + 2).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1"...
        threads: intra-op CPU threads of training and evaluation (None: torch's default, one per core).
        world_size: the processes that trained the run (recorded by :func:`metaopt.training.experiment.train`
            from the launch, ``torchrun`` or ``--nproc``; not an input).
    """

    algorithm: Section
    data: Section
    model: Section | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    baselines: BaselinesConfig | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    world_size: int = 1

    def __post_init__(self) -> None:
        for name, kind, what in (("seed", int, "an integer"), ("threads", int | None, "an integer or null"),
                                 ("device", str, "a string"), ("world_size", int, "an integer")):
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"config field {name!r} must be {what}, got {value!r}")
        if self.seed < 0:
            raise ConfigError(f"config field 'seed' must be >= 0, got {self.seed}")
        if self.world_size < 1:
            raise ConfigError(f"config field 'world_size' must be >= 1, got {self.world_size}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"config field 'threads' must be >= 1, got {self.threads}")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except RuntimeError as err:
                raise ConfigError(f"config field 'device' must be 'auto' or a torch device such as 'cpu' or "
                                  f"'cuda:0', got {self.device!r}") from err
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError(f"device {self.device!r} asked for, but torch sees no CUDA device here; use "
                                  "--device cpu (or auto, which takes CUDA when there is one)")
        problems = self.algorithm.entry.problems
        if self.data.entry.problems != problems:
            fitting = [name for name in names("dataset") if entry("dataset", name).problems == problems]
            raise ConfigError(f"algorithm {self.algorithm.name!r} meta-learns from {problems}, but dataset "
                              f"{self.data.name!r} gives {self.data.entry.problems}; pick a dataset of {problems}: "
                              f"{', '.join(fitting)}")
        if problems == "episodes" and self.model is None:
            raise ConfigError(f"algorithm {self.algorithm.name!r} adapts a network: give a model section, e.g. "
                              "{\"name\": \"conv4\"}")
        if problems != "episodes" and self.model is not None:
            raise ConfigError(f"algorithm {self.algorithm.name!r} trains on problems that define their own networks "
                              "(optimizees, child trainings); drop the model section")
        if problems != "optimizees" and self.baselines is not None:
            raise ConfigError("the baselines section compares learned optimizers with tuned torch.optim optimizers; "
                              f"algorithm {self.algorithm.name!r} is not a learned optimizer: drop it")
        for name, change in (self.baselines.transfer if self.baselines is not None else {}).items():
            try:
                self.data.replace(**change)
            except ConfigError as err:
                raise ConfigError(f"baselines transfer variant {name!r}: {err}") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from a mapping (a preset, a ``config.json``); every key is checked."""
        load_plugins()
        valid = [f for f in cls.__dataclass_fields__]
        unknown = [key for key in raw if key not in valid]
        if unknown:
            listed = ", ".join(f"{key!r}{closest(key, valid)}" for key in unknown)
            raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} {listed}; a run config has "
                              f"{', '.join(valid)}")
        for required in ("algorithm", "data"):
            if required not in raw:
                raise ConfigError(f"the config has no {required!r} section")
        sections = {name: None if raw.get(name) is None else Section.from_dict(_KIND[name], raw[name])
                    for name in _KIND if name in raw}
        return cls(**sections, trainer=TrainerConfig.from_dict(raw.get("trainer", {}), owner="the trainer"),
                   baselines=None if raw.get("baselines") is None else
                   BaselinesConfig.from_dict(raw["baselines"], owner="the baselines section"),
                   **{k: raw[k] for k in ("seed", "device", "threads", "world_size") if k in raw})

    @classmethod
    def from_json(cls, path: str | Path) -> RunConfig:
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
        """The config as plain JSON-ready values."""
        out: dict[str, Any] = {"seed": self.seed, "device": self.device, "threads": self.threads}
        if self.world_size != 1:
            out["world_size"] = self.world_size
        out.update(trainer=self.trainer.to_dict(), data=self.data.to_dict())
        if self.model is not None:
            out["model"] = self.model.to_dict()
        out["algorithm"] = self.algorithm.to_dict()
        if self.baselines is not None:
            out["baselines"] = self.baselines.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied and checked: ``seed``/``device`` values, or option dicts per section.

        Options given for a section update it; a section given with another ``name`` replaces it
        (that part with its defaults and the options given). Example:
        ``config.replace(trainer={"iterations": 10}, algorithm={"inner_lr": 0.1})``.
        """
        raw = self.to_dict()
        for key, value in changes.items():
            current = raw.get(key)
            swapped = isinstance(value, Mapping) and isinstance(current, dict) and "name" in current \
                and value.get("name", current["name"]) != current["name"]
            if isinstance(value, Mapping) and isinstance(current, dict) and not swapped:
                raw[key] = {**current, **value}
            else:
                raw[key] = value
        return RunConfig.from_dict(raw)


def preset_names() -> list[str]:
    """Names of the presets shipped in ``metaopt/presets/`` (the JSON file names), sorted."""
    folder = resources.files("metaopt.presets")
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> RunConfig:
    """The :class:`RunConfig` of preset ``name``; unknown names suggest the closest preset."""
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}{closest(name, names)}; presets: {names}")
    raw = json.loads(resources.files("metaopt.presets").joinpath(f"{name}.json").read_text())
    try:
        return RunConfig.from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"preset {name!r}: {err}") from None
