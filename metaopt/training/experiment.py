"""From a config to a finished run: build the parts, meta-train, evaluate, record the results.

The algorithm, the dataset and the model are looked up by name in :mod:`metaopt.registry`
(:func:`metaopt.registry.load_plugins` imports the plugin packages); the model's input and output
sizes are read off a sample batch of the training problems. Train, validation and test problems
come from the same dataset builder, each split with its own seeded stream.

At the end of a run the best checkpoint is scored on the test problems (``final.json``). A
learned optimizer is also compared there with tuned ``torch.optim`` baselines
(:mod:`metaopt.evaluation.tuned_baselines`); ``metaopt eval`` repeats either evaluation.

Example:
    >>> from metaopt.training.config import load_preset
    >>> config = load_preset("maml-sinusoid-5shot").replace(model={"hidden": [8]})
    >>> experiment = build_experiment(config)
    >>> type(experiment.learner).__name__, experiment.problems("test").seed
    ('MAML', 2)
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaopt.engine.learner import Learner
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators import Backprop, Estimator
from metaopt.evaluation.evaluate import EvalResult, evaluate
from metaopt.evaluation.tuned_baselines import compare_with_baselines
from metaopt.options import ConfigError
from metaopt.registry import BuildContext
from metaopt.training.checkpoint import CheckpointError, load_checkpoint, load_module_state, write_json
from metaopt.training.config import RunConfig
from metaopt.training.distributed import init_world, leave_world
from metaopt.training.legacy import convert_state, read_run_config
from metaopt.training.logging import note
from metaopt.training.trainer import MetaTrainer

__all__ = ["SPLITS", "Experiment", "RunCompleteError", "build_experiment", "default_run_dir", "evaluate_run",
           "intra_op_threads", "load_learner", "load_rule", "load_run", "load_weights", "resolve_device", "train"]

SPLITS = ("train", "val", "test")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; other names are passed to :class:`torch.device`.

    Under ``torchrun`` a CUDA device without an index is the local rank's (one GPU per process).
    """
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class Experiment:
    """The parts of a run, built from its config: learner, estimator, problem sources, device.

    The problem sources of the splits are built when first asked for (:meth:`problems`).
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self._problems: dict[str, Any] = {}
        example = self.problems("train").batch(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = None if config.model is None else config.model.entry.build(config.model.options, example)
            try:
                built = config.algorithm.entry.build(config.algorithm.options, BuildContext(model, example))
            except ConfigError:
                raise
            except ValueError as err:  # the algorithm refuses this combination of options: a config error
                raise ConfigError(f"algorithm {config.algorithm.name!r}: {err}") from err
        learner, estimator = built if isinstance(built, tuple) else (built, Backprop())
        self.learner: Learner = learner.to(self.device)
        self.estimator: Estimator = estimator

    def problems(self, split: str, data: Any = None) -> Any:
        """The problem source of ``split`` (``"train"``, ``"val"`` or ``"test"``), of ``data`` (default: the run's)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        data = self.config.data if data is None else data
        key = f"{split}:{data.to_dict()}"
        if key not in self._problems:
            self._problems[key] = data.entry.build(data.options, split, self.config.seed)
        return self._problems[key]


def build_experiment(config: RunConfig) -> Experiment:
    """Build the learner, its estimator and the training problems; initial values depend on ``config.seed`` only.

    The global random generators are left as they were.
    """
    return Experiment(config)


def default_run_dir(config: RunConfig, root: str | Path = "runs") -> Path:
    """A fresh, readable run folder, e.g. ``runs/fomaml-omniglot-5w1s-20240131-142502``, ``runs/l2l-quadratics-...``."""
    algorithm, data = config.algorithm.options.to_dict(), config.data.options.to_dict()
    name = f"{'fo' if algorithm.get('first_order') else ''}{config.algorithm.name}-{config.data.name}"
    if "shots" in data:
        name += f"-{data['ways']}w{data['shots']}s" if "ways" in data else f"-{data['shots']}shot"
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def _seed_global_generators(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def load_weights(learner: Learner, path: str | Path) -> dict[str, Any]:
    """Load the weights of a checkpoint (``best.pt`` or ``last.pt``) into ``learner``; returns the checkpoint.

    For a run trained from Python objects (a :class:`metaopt.training.trainer.MetaTrainer` given
    a learner and a :class:`TrainerConfig`): build the learner as the script did, then load its
    weights here. Runs of ``metaopt train`` (or :func:`train`) rebuild themselves:
    :func:`load_run`.

    Raises:
        CheckpointError: the checkpoint is missing or corrupt, holds another algorithm, or its
            weights do not fit ``learner`` (the message names the file and the tensors).
    """
    path = Path(path)
    return _fill(learner, load_checkpoint(path, required=_REQUIRED), path)


#: What every checkpoint of a trainer holds.
_REQUIRED = ("algorithm", "model", "iteration")


def _fill(learner: Learner, state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Load the weights of checkpoint ``state`` (read from ``path``) into ``learner``; returns the state."""
    state = convert_state(state, learner)
    ours = type(learner).__name__
    if state["algorithm"] != ours:
        raise CheckpointError(f"checkpoint {path} holds a {state['algorithm']} learner, not a {ours}; load it into "
                              f"a {state['algorithm']} built as its run built it")
    load_module_state(learner, state["model"], path)
    return state


def _evaluate_checkpoint(experiment: Experiment, path: Path, split: str, episodes: int | None,
                         steps: int | None) -> tuple[EvalResult, dict[str, Any]]:
    state = load_weights(experiment.learner, path)
    trainer = experiment.config.trainer
    count = episodes or (trainer.test_episodes if split == "test" else None) or trainer.eval_episodes
    note(f"scoring {path.name} (iteration {int(state['iteration'])}) on {count} {split} problems")
    result = evaluate(experiment.learner, experiment.problems(split), count, steps=steps, device=experiment.device)
    record = {"result": result.to_dict(), "summary": str(result), "split": split, "checkpoint": path.name,
              "checkpoint_iteration": int(state["iteration"])}
    if isinstance(experiment.learner, OptimizerLearner):
        record["baselines"] = _baselines(experiment, split, count, steps, path.parent)
    return result, record


def _baselines(experiment: Experiment, split: str, count: int, steps: int | None, run_dir: Path) -> dict[str, Any]:
    """The learned optimizer against tuned baselines on ``count`` problems of ``split``, and its transfer variants."""
    config = experiment.config
    settings = config.baselines.to_dict() if config.baselines is not None else {}
    variants = {config.data.name: config.data,
                **{f"transfer: {name}": config.data.replace(**change)
                   for name, change in settings.pop("transfer", {}).items()}}
    return compare_with_baselines(experiment.learner, {title: (experiment.problems(split, data),
                                                               experiment.problems("val", data))
                                                       for title, data in variants.items()},
                                  count, steps, run_dir / "baselines.png", **settings)


class RunCompleteError(Exception):
    """``train(..., resume=True)`` on a run that has done its iterations; ``final.json`` is left as it was."""


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Torch's intra-op CPU threads set to ``count`` inside the context (``None``: unchanged), restored on exit."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(config: RunConfig, run_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Meta-train as ``config`` says, then score the best checkpoint on the test problems.

    A fresh run seeds the global random generators with ``config.seed``; a resumed one
    restores them from ``run_dir/last.pt``. The test result is written atomically to
    ``run_dir/final.json``.

    Under ``torchrun`` every process calls it: the processes join one process group
    (:func:`metaopt.training.distributed.init_world`), share the meta-training, and rank 0 alone
    writes the run directory and scores the test problems (the other ranks return the trainer's
    summary only); the config records the number of processes (``world_size``).

    Args:
        config: the run's config (written to ``run_dir/config.json``).
        run_dir: the run folder (default: :func:`default_run_dir`).
        resume: continue the run in ``run_dir`` from its ``last.pt``.

    Returns:
        The content of ``final.json``: the test ``result`` (dict and ``summary`` string), the
        checkpoint it used, for learned optimizers the ``baselines`` comparison, and the trainer's
        ``train`` summary (:meth:`MetaTrainer.fit`: final iteration, ``stopped_by`` iterations or
        time budget, training and total wall time).

    Raises:
        RunCompleteError: ``resume`` of a run that has done its iterations (or spent its time budget)
            and has its ``final.json``: nothing is trained or rewritten (``metaopt eval``
            re-evaluates; a larger ``iterations`` or ``time_budget`` trains on).
        metaopt.training.trainer.Interrupted: SIGINT or SIGTERM; ``last.pt`` holds the iteration reached.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file; pass a folder (it is created if missing)")
    world = init_world(resolve_device(config.device))
    config = config.replace(world_size=world.size)
    if not resume:
        _seed_global_generators(config.seed)
    with intra_op_threads(config.threads):
        experiment = build_experiment(config)
        trainer = MetaTrainer(experiment.learner, experiment.problems("train"), config,
                              estimator=experiment.estimator, val_problems=experiment.problems("val"),
                              run_dir=run_dir, device=experiment.device, world=world)
        if resume:
            trainer.restore()
            complete = world.from_leader(lambda: (run_dir / "final.json").exists())
            if trainer.finished and complete:
                raise RunCompleteError(f"{run_dir} is complete (iteration {trainer.iteration} of "
                                  f"{config.trainer.iterations}); final.json is left as it was. Evaluate it again "
                                  f"with: metaopt eval --run {run_dir}; train it on with a larger --iterations")
            if world.leader:
                note(f"resuming {run_dir} from iteration {trainer.iteration}")
        summary = trainer.fit(resume=resume)

        def score() -> dict[str, Any]:
            best = run_dir / "best.pt"
            _, record = _evaluate_checkpoint(experiment, best if best.exists() else run_dir / "last.pt", "test",
                                             None, None)
            final = {**record, "run_dir": str(run_dir), "train": summary}
            write_json(run_dir / "final.json", final)
            return final

        # rank 0 scores the test problems while the others wait, then all leave together (a rank that exits
        # while another still holds the group can abort: "terminate called without an active exception")
        final = world.from_leader(score)
    leave_world()
    return final if world.leader else {"train": summary, "rank": world.rank}


def evaluate_run(run_dir: str | Path, checkpoint: str = "best", episodes: int | None = None, steps: int | None = None,
                 split: str = "test", threads: int | None = None) -> dict[str, Any]:
    """Evaluate checkpoint ``best`` or ``last`` of a run and write the record to ``run_dir/eval.json``.

    Args:
        run_dir: a run folder written by :func:`train`.
        checkpoint: ``"best"`` (best validation figure) or ``"last"``.
        episodes: problems to evaluate on (default: the run's ``test_episodes`` for the test split,
            else its ``eval_episodes``).
        steps: inner steps (default: the learner's evaluation steps).
        split: ``"test"`` or ``"val"`` problems.
        threads: intra-op CPU threads (default: the run's ``threads``).

    Returns:
        The record written: ``result`` and ``summary``, and for learned optimizers ``baselines``
        with its ``table``.
    """
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    run_dir = Path(run_dir)
    config = read_run_config(run_dir / "config.json")
    with intra_op_threads(threads or config.threads):
        experiment = build_experiment(config)
        _, record = _evaluate_checkpoint(experiment, run_dir / f"{checkpoint}.pt", split, episodes, steps)
    write_json(run_dir / "eval.json", record)
    return record


def load_run(run_dir: str | Path, checkpoint: str = "best", device: torch.device | str = "cpu") -> Learner:
    """The learner a run trained, with the weights of its ``best`` (best validation) or ``last`` checkpoint.

    It is the run's algorithm object (``MAML``, ``MetaSGD``, an ``OptimizerLearner``...), in
    evaluation mode: adapt it to a new task (``learner.adapt_to(support_x, support_y)`` for few-shot
    learners) or take its rule (``learner.rule`` of a learned optimizer).

    Example::

        learner = metaopt.load_run("runs/omniglot-5w1s", checkpoint="best")
        predict = learner.adapt_to(support_x, support_y)     # no query labels needed
        labels = predict(query_x).argmax(-1)

    Raises:
        ConfigError: the run was trained from Python objects (a ``MetaTrainer`` given a
            ``TrainerConfig``), so nothing records how to build its learner: build it as the
            script did and call :func:`load_weights`.
        CheckpointError: the checkpoint is missing or corrupt (the message names the file).
    """
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    return load_learner(Path(run_dir) / f"{checkpoint}.pt", device).eval()


def _run_config(path: Path, state: dict[str, Any]) -> RunConfig:
    """The config of the run that wrote checkpoint ``path``: the one it carries, else the ``config.json`` beside it."""
    recorded = state.get("config")
    if isinstance(recorded, dict) and "algorithm" not in recorded:  # a MetaTrainer given a TrainerConfig
        raise ConfigError(f"{path} is of a run trained from Python objects: its config holds the trainer's settings "
                          f"only, not the algorithm, data and model that would rebuild its {state['algorithm']}; "
                          "build the learner as the script did and load the weights into it with "
                          f"metaopt.load_weights(learner, {str(path)!r})")
    return RunConfig.from_dict(recorded) if recorded is not None else read_run_config(path.parent / "config.json")


def load_learner(path: str | Path, device: torch.device | str = "cpu") -> Learner:
    """The learner of a run's checkpoint (``best.pt`` or ``last.pt``) with its weights, built from the run's config.

    The config comes from the checkpoint itself, or from the ``config.json`` beside a checkpoint
    written before checkpoints carried their config.
    """
    path = Path(path)
    state = load_checkpoint(path, required=_REQUIRED)
    experiment = build_experiment(_run_config(path, state).replace(device=str(device)))
    _fill(experiment.learner, state, path)
    return experiment.learner


def load_rule(path: str | Path, rule_class: type[torch.nn.Module] = torch.nn.Module) -> torch.nn.Module:
    """The update rule a learned-optimizer run trained, from its checkpoint alone, on the CPU: no data is read.

    A learned optimizer's rule does not depend on the problems it was trained on, so the run's
    algorithm is built from its config without an example problem, and the checkpoint's weights
    are loaded into it. The global random generators are left as they were.

    Args:
        path: ``best.pt`` or ``last.pt`` of the run.
        rule_class: the class the rule must be of.

    Raises:
        CheckpointError: the checkpoint is missing or corrupt, of a few-shot run, or its rule is
            not a ``rule_class`` (naming it).
        ConfigError: the run was trained from Python objects (see :func:`load_run`).
    """
    path = Path(path)
    state = load_checkpoint(path, required=_REQUIRED)
    algorithm = _run_config(path, state).algorithm
    if algorithm.entry.problems != "optimizees":
        raise CheckpointError(f"checkpoint {path} is of a {algorithm.name!r} run, a few-shot learner, not a learned "
                              "optimizer; load it with metaopt.load_run")
    with torch.random.fork_rng(devices=[]):  # the weights are overwritten
        built = algorithm.entry.build(algorithm.options, BuildContext(None, None))
    learner = built[0] if isinstance(built, tuple) else built
    if not isinstance(learner.rule, rule_class):
        raise CheckpointError(f"checkpoint {path} holds a {type(learner.rule).__name__} rule, not an "
                              f"{rule_class.__name__}")
    _fill(learner, state, path)
    return learner.rule
