"""From a config to a finished run: build the parts, meta-train, evaluate, record the results.

The algorithm and the task family are looked up by name in :mod:`metaopt.registry`, which the
plugin packages ``metaopt.algorithms`` and ``metaopt.datasets`` fill when
:func:`load_plugins` imports them; the backbone's input and output sizes are read off a sample
meta-batch. Train, validation and test tasks come from the same builder with distinct seeds
(:func:`split_seed`).

Example:
    >>> config = ExperimentConfig(shots=5, hidden=(8,), meta_batch=2)
    >>> experiment = build_experiment(config)
    >>> type(experiment.algorithm).__name__, experiment.test_tasks.seed
    ('MAML', 2)
"""

from __future__ import annotations

import importlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metaopt.checkpoint import CheckpointError, load_checkpoint, load_module_state, write_json
from metaopt.config import ConfigError, ExperimentConfig
from metaopt.episode import Episode
from metaopt.evaluation import EvalResult, evaluate
from metaopt.meta_learner import MetaLearner
from metaopt.models import MLP, Conv4
from metaopt.registry import algorithm_builder, dataset_builder
from metaopt.sampling import TaskSampler
from metaopt.trainer import MetaTrainer

__all__ = [
    "SPLITS",
    "Experiment",
    "build_experiment",
    "build_model",
    "default_run_dir",
    "evaluate_run",
    "load_plugins",
    "resolve_device",
    "split_seed",
    "train",
]

SPLITS = ("train", "val", "test")


def load_plugins() -> None:
    """Import the packages that register algorithms and datasets (core never imports them statically)."""
    for package in ("metaopt.algorithms", "metaopt.datasets"):
        importlib.import_module(package)


def split_seed(seed: int, split: str) -> int:
    """Seed of the ``split`` task stream: ``3·seed + {train: 0, val: 1, test: 2}`` (distinct for all seeds)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return 3 * seed + SPLITS.index(split)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; other names are passed to :class:`torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: ExperimentConfig, example: Episode) -> nn.Module:
    """The backbone ``config.model`` sized for the inputs and targets of a sample meta-batch."""
    features = tuple(example.support_x.shape[2:])
    outputs = example.ways if example.is_classification else example.query_y.shape[-1]
    if config.model == "mlp":
        if len(features) != 1:
            raise ConfigError(f"model 'mlp' takes vectors, but dataset {config.dataset!r} gives examples of shape "
                              f"{features}; use model 'conv4'")
        return MLP(features[0], outputs, hidden=config.hidden)
    if len(features) != 3 or features[1] != features[2]:
        raise ConfigError(f"model 'conv4' takes square images [channels, side, side], but dataset "
                          f"{config.dataset!r} gives examples of shape {features}; use model 'mlp'")
    return Conv4(features[0], outputs, hidden=config.filters, image_size=features[1], strided=config.strided)


@dataclass(frozen=True)
class Experiment:
    """The parts of a run, built from its config."""

    config: ExperimentConfig
    algorithm: MetaLearner
    train_tasks: TaskSampler
    val_tasks: TaskSampler
    test_tasks: TaskSampler
    device: torch.device

    def tasks(self, split: str) -> TaskSampler:
        """The task sampler of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
        return {"train": self.train_tasks, "val": self.val_tasks, "test": self.test_tasks}[split]


def _registered(lookup: Any, field: str, name: str) -> Any:
    try:
        return lookup(name)
    except ValueError as err:
        raise ConfigError(f"config field {field!r}: {err}") from None


def build_experiment(config: ExperimentConfig) -> Experiment:
    """Build task samplers, model and algorithm; their initial values depend on ``config.seed`` only.

    The global random generators are left as they were.
    """
    load_plugins()
    build_tasks = _registered(dataset_builder, "dataset", config.dataset)
    build_algorithm = _registered(algorithm_builder, "algorithm", config.algorithm)
    train_tasks, val_tasks, test_tasks = (build_tasks(config, split, split_seed(config.seed, split))
                                          for split in SPLITS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        algorithm = build_algorithm(build_model(config, train_tasks.batch(0)), config)
    device = resolve_device(config.device)
    algorithm = algorithm.to(device)
    return Experiment(config, algorithm, train_tasks, val_tasks, test_tasks, device)


def default_run_dir(config: ExperimentConfig, root: str | Path = "runs") -> Path:
    """A fresh, readable run folder, e.g. ``runs/maml-sinusoid-10shot-20240131-142502``."""
    shape = f"{config.ways}w{config.shots}s" if config.ways else f"{config.shots}shot"
    name = f"{'fo' if config.first_order else ''}{config.algorithm}-{config.dataset}-{shape}"
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _seed_global_generators(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _evaluate_checkpoint(experiment: Experiment, path: Path, split: str, episodes: int | None,
                         steps: int | None) -> tuple[EvalResult, dict[str, Any]]:
    state = load_checkpoint(path, required=("algorithm", "model", "iteration"))
    ours = type(experiment.algorithm).__name__
    if state["algorithm"] != ours:
        raise CheckpointError(f"checkpoint {path} holds a {state['algorithm']} learner, but the run's config builds "
                              f"{ours}; evaluate it with the config of its run")
    load_module_state(experiment.algorithm, state["model"], path)
    result = evaluate(experiment.algorithm, experiment.tasks(split), episodes or experiment.config.eval_episodes,
                      steps=steps, device=experiment.device)
    record = {"result": result.to_dict(), "summary": str(result), "split": split, "checkpoint": path.name,
              "checkpoint_iteration": int(state["iteration"])}
    return result, record


def train(config: ExperimentConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Meta-train as ``config`` says, then score the best checkpoint on the test tasks.

    A fresh run seeds the global random generators with ``config.seed``; a resumed one
    restores them from ``run_dir/last.pt``. The test result is written atomically to
    ``run_dir/final.json``.

    Args:
        config: the run's config (written to ``run_dir/config.json``).
        run_dir: the run folder (default: :func:`default_run_dir`).
        resume: continue the run in ``run_dir`` from its ``last.pt``.

    Returns:
        The content of ``final.json``: the test ``result`` (dict and ``summary`` string), the
        checkpoint it used, and the trainer's ``train`` summary (:meth:`MetaTrainer.fit`: final
        iteration, ``stopped_by`` iterations or time budget, training and total wall time).
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    if not resume:
        _seed_global_generators(config.seed)
    experiment = build_experiment(config)
    trainer = MetaTrainer(experiment.algorithm, experiment.train_tasks, config, val_tasks=experiment.val_tasks,
                          run_dir=run_dir, device=experiment.device)
    summary = trainer.fit(resume=resume)
    best = run_dir / "best.pt"
    _, record = _evaluate_checkpoint(experiment, best if best.exists() else run_dir / "last.pt", "test", None, None)
    final = {**record, "run_dir": str(run_dir), "train": summary}
    write_json(run_dir / "final.json", final)
    return final


def evaluate_run(run_dir: str | Path, checkpoint: str = "best", episodes: int | None = None, steps: int | None = None,
                 split: str = "test") -> EvalResult:
    """Evaluate checkpoint ``best`` or ``last`` of a run and write the result to ``run_dir/eval.json``.

    Args:
        run_dir: a run folder written by :func:`train`.
        checkpoint: ``"best"`` (best validation figure) or ``"last"``.
        episodes: tasks to evaluate on (default: the run's ``eval_episodes``).
        steps: inner steps (default: the run's ``eval_inner_steps``).
        split: ``"test"`` or ``"val"`` tasks.
    """
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    run_dir = Path(run_dir)
    experiment = build_experiment(ExperimentConfig.from_json(run_dir / "config.json"))
    result, record = _evaluate_checkpoint(experiment, run_dir / f"{checkpoint}.pt", split, episodes, steps)
    write_json(run_dir / "eval.json", record)
    return result
