"""The only outer loop: estimator, meta-optimizer, evaluation, checkpoints and exact resume.

Each iteration asks the estimator (:mod:`metaopt.estimators`) for the meta-gradient of
meta-update ``i = trainer.iteration`` (problem batch ``i`` of a pure function of the seed, so the
stream's position is the iteration count; a truncated estimator carries its unroll on), and takes
one step of the meta-optimizer φ ← opt(φ, ∇_φ) after optional clipping. A non-finite meta-loss or
meta-gradient skips the step; too many in a row stop the run with :class:`NonFiniteError`. Every
``eval_every`` iterations the learner is evaluated on held-out problems (mean ± 95% interval,
:func:`metaopt.evaluation.evaluate`) and the best one is kept in ``best.pt``. Few-shot learners
and learned optimizers go through the same loop.

The run ends after ``iterations`` meta-updates, or with ``time_budget`` after the meta-update
during which the budget runs out; either way the last iteration is evaluated and checkpointed.
The budget counts training time (:mod:`metaopt.training.clock`): validation and test are not part
of it. SIGINT (Ctrl-C) and SIGTERM stop the run after the meta-update under way (after the next one
when the signal comes during a validation or a checkpoint: every rank of a distributed run must
stop at the same iteration): ``last.pt`` is written at that iteration and :class:`Interrupted` is
raised (a second Ctrl-C stops at once).
During a streak of non-finite meta-updates no checkpoint is written, so ``last.pt`` stays the
last good state. Progress shows on a terminal, as plain lines when the output is redirected, and
in ``train.log`` (:mod:`metaopt.training.progress`).

A meta-learner with ``strategy="auto"`` starts a new run with a timing probe that picks the
fastest task-batching strategy on this machine; the choice is stored in every checkpoint
(:mod:`metaopt.training.strategy_probe`).

A run directory holds ``config.json``, ``metrics.jsonl``, TensorBoard events, ``last.pt`` and
``best.pt``. ``fit(resume=True)`` restores ``last.pt`` (parameters, optimizer and schedule, the
estimator's state, counters, random states) and continues exactly as an uninterrupted run would.

Under ``torchrun`` (an initialised process group, or ``world``) every rank runs this loop: the
estimator shares each meta-update's work over the ranks, rank 0 alone writes files, shows progress
and evaluates, and the ranks agree on when to stop (:mod:`metaopt.training.distributed`).

Example:
    >>> import tempfile
    >>> from metaopt.algorithms import MAML
    >>> from metaopt.datasets import Sinusoid
    >>> from metaopt.models import MLP
    >>> config = TrainerConfig(iterations=4, eval_every=2, eval_episodes=4, log_every=2)
    >>> trainer = MetaTrainer(MAML(MLP(1, 1, hidden=(8,)), inner_lr=0.01), Sinusoid(batch_size=2, seed=0),
    ...                       config, val_problems=Sinusoid(batch_size=4, seed=1), run_dir=tempfile.mkdtemp())
    >>> summary = trainer.fit()  # doctest: +ELLIPSIS
    iteration 1/4 (25.0%), loss ...
    >>> summary["iteration"], summary["best"]["metric"], sorted(p.name for p in trainer.run_dir.glob("*.pt"))
    (4, 'mse', ['best.pt', 'last.pt'])
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from metaopt.engine.learner import Learner
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.rule_optimizer import RuleOptimizer
from metaopt.estimators import Backprop, Estimator
from metaopt.evaluation.evaluate import EvalResult, evaluate
from metaopt.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_module_state,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
    write_json,
)
from metaopt.training.clock import Clock
from metaopt.training.config import RunConfig, TrainerConfig
from metaopt.training.distributed import World, current_world
from metaopt.training.legacy import convert_state, read_run_config
from metaopt.training.logging import RunLogger, note
from metaopt.training.progress import LOG_FILE, Progress
from metaopt.training.schedules import cosine_meta_lr
from metaopt.training.strategy_probe import PROBE_WORTH_FROM, StrategyChoice, expected_run_s, probe_strategy

__all__ = ["RESUMABLE_CHANGES", "Interrupted", "MetaTrainer", "NonFiniteError"]

HIGHER_IS_BETTER = ("accuracy",)
#: Config entries a resumed run may change (dotted: section.option): its length, and the fixes a run stopped by
#: non-finite meta-updates needs.
RESUMABLE_CHANGES = ("trainer.iterations", "trainer.time_budget", "trainer.max_nonfinite", "trainer.grad_clip",
                     "trainer.grad_clip_value", "trainer.meta_lr", "device", "threads", "world_size")
_STATE_KEYS = ("algorithm", "meta_optimizer", "iteration", "model", "optimizer", "scheduler", "best", "nonfinite",
               "time", "rng")


class NonFiniteError(RuntimeError):
    """Too many consecutive meta-updates had a non-finite meta-loss or meta-gradient."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after a meta-update; ``last.pt`` holds that iteration (see ``saved``).

    Attributes:
        iteration: the meta-updates done.
        signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``); the command line exits with ``128 + signum``.
        saved: the iteration ``last.pt`` holds (older than ``iteration`` during a non-finite streak).
    """

    def __init__(self, iteration: int, signum: int, saved: int | None) -> None:
        super().__init__(f"interrupted at iteration {iteration}")
        self.iteration, self.signum, self.saved = iteration, signum, saved


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as one level of dotted keys (``trainer.iterations``)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("trainer", "data", "model", "algorithm", "baselines"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class MetaTrainer:
    """Meta-train ``learner`` on ``train_problems``; evaluate, log and checkpoint as ``config`` says.

    Args:
        learner: the meta-learner; its trainable ``parameters()`` are the meta-parameters φ.
        train_problems: the problem source (a task sampler, an optimizee stream); the estimator
            reads ``train_problems.batch(i)``.
        config: the trainer's options, or a whole :class:`metaopt.training.config.RunConfig`
            (then written whole to ``config.json`` and into every checkpoint).
        estimator: turns problems into meta-gradients (default: :class:`metaopt.estimators.Backprop`).
        val_problems: held-out problems for periodic evaluation and best-checkpoint selection
            (``None``: no evaluation, no ``best.pt``).
        run_dir: folder for config, metrics, TensorBoard events and checkpoints (``None``: keep
            nothing on disk; resume is then impossible).
        device: where to train (default: where the learner's parameters are).
        world: the processes sharing the run (default: those of the initialised process group, else this one).
    """

    def __init__(self, learner: Learner, train_problems: Any, config: TrainerConfig | RunConfig,
                 estimator: Estimator | None = None, val_problems: Any = None, run_dir: str | Path | None = None,
                 device: torch.device | str | None = None, world: World | None = None) -> None:
        self.device = torch.device(device) if device is not None else learner.device
        self.world = world if world is not None else current_world()
        if self.world.active:
            estimator = estimator if estimator is not None else Backprop()
            estimator.distribute(self.world)
        self.learner = learner.to(self.device)
        self.train_problems = train_problems
        self.val_problems = val_problems
        self.estimator = estimator if estimator is not None else Backprop()
        self.run_config = config if isinstance(config, RunConfig) else None
        self.config = config.trainer if isinstance(config, RunConfig) else config
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._params = [p for p in learner.parameters() if p.requires_grad]
        self.optimizer = self._meta_optimizer()
        self.scheduler = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._cosine_factor)
                          if self.config.lr_schedule == "cosine" else None)
        self.iteration = 0
        self.best: dict[str, Any] | None = None
        self.nonfinite = {"total": 0, "in_a_row": 0}
        self._clock = Clock()
        self._saved_iteration: int | None = None
        self._restored = False
        self._asked: int | None = None  # the signal this process received (set by the handler, at any moment)
        self._stop: int | None = None  # the run stops (agreed on by every rank after a meta-update): the signal
        self._time_up = False  # the time budget is spent (agreed on by every rank)
        #: what ``strategy="auto"``'s timing probe chose at the start of the run (``None``: no probe)
        self.strategy_choice: StrategyChoice | None = None

    def _meta_optimizer(self) -> torch.optim.Optimizer:
        """Adam, SGD, or the learned optimizer of a trained run (the rule's own ``torch.optim`` interface)."""
        config = self.config
        if config.meta_optimizer == "adam":
            return torch.optim.Adam(self._params, lr=config.meta_lr)
        if config.meta_optimizer == "sgd":
            return torch.optim.SGD(self._params, lr=config.meta_lr)
        from metaopt.training.experiment import load_rule  # experiment builds trainers: imported when needed

        return load_rule(config.meta_optimizer_checkpoint).optimizer(self._params, lr=config.meta_lr)

    def epoch(self, iteration: int) -> int:
        """The epoch of meta-iteration ``iteration`` (``config.epoch_length`` iterations each)."""
        return iteration // self.config.epoch_length

    def _cosine_factor(self, iteration: int) -> float:
        """Meta learning rate at ``iteration`` relative to ``meta_lr``: cosine annealing per epoch (MAML++ CA)."""
        config = self.config
        epochs = max(1, math.ceil(config.iterations / config.epoch_length))
        return cosine_meta_lr(1.0, config.min_meta_lr / config.meta_lr, self.epoch(iteration), epochs)

    def _recorded_config(self) -> dict[str, Any]:
        return (self.run_config or self.config).to_dict()

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: meta-parameters, optimizer, schedule, estimator, counters, times, RNG."""
        return {
            "algorithm": type(self.learner).__name__,
            "meta_optimizer": self.config.meta_optimizer,
            "iteration": self.iteration,
            "model": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "estimator": {"name": type(self.estimator).__name__, "settings": self.estimator.settings(),
                          "state": self.estimator.state_dict()},
            "best": self.best,
            "nonfinite": dict(self.nonfinite),
            "time": self._clock.read(),
            "rng": capture_rng_state(),
            "config": self._recorded_config(),
            "strategy": self._strategy_record(),
        }

    def load_state_dict(self, state: dict[str, Any], path: str | Path) -> None:
        """Restore :meth:`state_dict` output read from ``path`` (named in every error); old formats are converted."""
        state = convert_state(state, self.learner)
        ours = type(self.learner).__name__
        if state["algorithm"] != ours:
            raise CheckpointError(f"checkpoint {path} was written by a {state['algorithm']} run, but this trainer "
                                  f"trains {ours}; resume with the algorithm of that run")
        if state["meta_optimizer"] != self.config.meta_optimizer:
            raise CheckpointError(f"checkpoint {path} holds {state['meta_optimizer']!r} meta-optimizer state, but "
                                  f"this run uses {self.config.meta_optimizer!r}; resume with the run's config")
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise CheckpointError(f"checkpoint {path} was written {'without' if state['scheduler'] is None else 'with'}"
                                  f" a learning-rate schedule, this run has lr_schedule={self.config.lr_schedule!r};"
                                  " resume with the run's config")
        estimator, name = state["estimator"], type(self.estimator).__name__
        if (estimator["name"], estimator["settings"]) != (name, self.estimator.settings()):
            raise CheckpointError(f"checkpoint {path} holds the state of a {estimator['name']} estimator with settings "
                                  f"{estimator['settings']}, but this run estimates with {name} with "
                                  f"{self.estimator.settings()}; resume with the run's estimator")
        load_module_state(self.learner, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path}: the meta-optimizer state does not fit ({err})") from err
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._apply_meta_lr()
        self.estimator.load_state_dict(estimator["state"])
        self.iteration = int(state["iteration"])
        self.best = state["best"]
        self.nonfinite = dict(state["nonfinite"])
        self._clock = Clock(**state["time"])
        restore_rng_state(state["rng"], path)
        self._restore_strategy(state.get("strategy"), path)
        self._saved_iteration = self.iteration

    def _restore_strategy(self, stored: dict[str, Any] | None, path: str | Path) -> None:
        """The probe's choice of a resumed run (a run without one keeps the device rule it started with)."""
        if stored is None:
            self.strategy_choice = None
            return
        try:
            self.strategy_choice = StrategyChoice(**stored)
        except TypeError as err:
            raise CheckpointError(f"checkpoint {path}: the strategy chosen by the timing probe is malformed ({err}); "
                                  "the file is damaged: resume from another checkpoint or start the run again") from err
        self.learner.strategy = self.strategy_choice.strategy

    def _apply_meta_lr(self) -> None:
        """Set the meta learning rate to this config's after loading a state saved with another (a resumable change)."""
        if self.scheduler is not None:
            self.scheduler.base_lrs = [self.config.meta_lr for _ in self.optimizer.param_groups]
            factor = self._cosine_factor(self.scheduler.last_epoch)
        else:
            factor = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.meta_lr * factor

    def _save(self, name: str) -> None:
        if self.run_dir is not None:
            self.world.check_identical(self.learner, f"checkpoint {name} at iteration {self.iteration}")
            if self.world.leader:
                remove_stale_temporaries(self.run_dir)
                save_checkpoint(self.run_dir / name, self.state_dict())
            self._saved_iteration = self.iteration

    # ------------------------------------------------------------------------------------- run

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``config.iterations`` or ``config.time_budget``; ``resume`` continues ``run_dir/last.pt``.

        Returns:
            Final figures: ``iteration``, ``stopped_by`` (``"iterations"`` or ``"time_budget"``),
            ``time`` (``train_s``: training time, ``total_s``: total wall time, both in seconds
            and over all the sessions of a resumed run), ``train_loss`` (last iteration), ``val``
            (last evaluation: metric, mean, ci95), ``best`` (metric, value, iteration),
            ``nonfinite_skipped`` and ``strategy`` (what ``strategy="auto"``'s timing probe chose and
            measured, :class:`metaopt.training.strategy_probe.StrategyChoice` as a dict; ``None``: no probe).

        Raises:
            NonFiniteError: ``max_nonfinite`` consecutive non-finite meta-updates; the last
                checkpoint written before them is left as it was.
            Interrupted: SIGINT or SIGTERM; ``last.pt`` holds the iteration reached.
            CheckpointError: ``resume`` without a usable ``run_dir/last.pt``.
        """
        if resume and not self._restored:
            self.restore()
        elif not resume:
            self._clock = Clock()  # the run starts now, not when the trainer was built
            self.strategy_choice = self._probe_strategy()
            self._start()
        self.world.check_identical(self.learner, f"the start of training at iteration {self.iteration}")
        self._time_up = self.world.agree([self._out_of_time()])[0]
        summary: dict[str, Any] = {"train_loss": None, "val": None}
        budget = None if self.config.time_budget is None else 60 * self.config.time_budget
        writes = self.run_dir if self.world.leader else None
        progress = Progress(self.config.iterations, self.train_problems.batch_size, self.iteration, self._spent(),
                            budget, None if writes is None else writes / LOG_FILE, quiet=not self.world.leader)
        with RunLogger(writes, start=self.iteration) as log, progress, self._stopping_on_signals():
            if self.strategy_choice is not None:
                kept = "; kept from the start of the run" if resume else ""
                progress.message(self.strategy_choice.summary() + kept)
            while not self.finished:
                summary["train_loss"], val = self._iterate(log, progress)
                summary["val"] = val or summary["val"]
                if self._stop is not None:
                    self._interrupt(progress)
            summary.update(iteration=self.iteration, stopped_by="iterations" if self.iteration >= self.config.iterations
                           else "time_budget", best=self.best, nonfinite_skipped=self.nonfinite["total"],
                           strategy=self._strategy_record())
            figures = {"train_loss": summary["train_loss"], "best_val": self.best["value"] if self.best else None}
            log.log_hparams(_flat(self._recorded_config()), {k: v for k, v in figures.items() if v is not None})
        summary["time"] = self._clock.read()
        return summary

    @property
    def finished(self) -> bool:
        """Whether the run has done its iterations or spent its time budget."""
        return self.iteration >= self.config.iterations or self._time_up

    @contextlib.contextmanager
    def _stopping_on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM ask the loop to stop after the meta-update under way; a second SIGINT stops at once.

        Under ``torchrun`` a Ctrl-C reaches a rank twice, from the terminal and from the launcher that
        forwards it: a second SIGINT within 2 s of the first counts as the same one.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        asked = [-math.inf]

        def ask_to_stop(signum: int, frame: object) -> None:
            del frame
            repeated = self.world.active and time.monotonic() - asked[0] < 2.0
            if self._asked is not None and signum == signal.SIGINT and not repeated:
                raise KeyboardInterrupt
            self._asked, asked[0] = signum, time.monotonic()

        previous = {signum: signal.signal(signum, ask_to_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _interrupt(self, progress: Progress) -> None:
        if not self.nonfinite["in_a_row"]:
            self._save("last.pt")
        name = signal.Signals(self._stop).name
        where = f"; last.pt holds iteration {self._saved_iteration}" if self.run_dir is not None else ""
        progress.message(f"{name}: stopped after iteration {self.iteration}{where}")
        raise Interrupted(self.iteration, self._stop, self._saved_iteration)

    def _spent(self) -> float:
        """Training time spent, by the budget's clock."""
        return self._clock.train_cpu_s if self.config.budget_clock == "cpu" else self._clock.train_s

    def _out_of_time(self) -> bool:
        return self.config.time_budget is not None and self._spent() >= 60 * self.config.time_budget

    def _iterate(self, log: RunLogger, progress: Progress) -> tuple[float, dict[str, Any] | None]:
        """One meta-update, then logging, evaluation and checkpoints when due; the loss and the evaluation.

        Whether the time budget runs out is known after the meta-update only, so the per-step
        figures (``track_steps``) of that last iteration are logged only if it was due to log.
        """
        config = self.config
        done = self.iteration + 1
        tracking = done % config.log_every == 0 or done == config.iterations
        with self._clock.measure(tasks=self.train_problems.batch_size):
            metrics = self._train_step(track_steps=tracking)
        # a signal is acted on only once every rank knows of it: one that arrives after this agreement (often
        # right after it, when its all-reduce returns) waits for the next, or the ranks would part ways
        self._time_up, stop = self.world.agree([self._out_of_time(), self._asked is not None])
        if stop:
            self._stop = self._asked or signal.SIGTERM  # SIGTERM: another rank was asked to stop
        last = done == config.iterations or self._time_up
        record = {**metrics, **self._logged(), **self._clock.throughput()} if tracking or last else {}
        val, new_best = None, False
        if self.val_problems is not None and (done % config.eval_every == 0 or last) and self._stop is None:
            progress.message(f"iteration {done}: evaluating on {config.eval_episodes} validation problems")
            result = self.world.from_leader(lambda: evaluate(self.learner, self.val_problems, config.eval_episodes,
                                                             device=self.device, progress="validation"))
            record.update({f"val/{result.metric}": result.mean, f"val/{result.metric}_ci95": result.ci95})
            val = {"metric": result.metric, "mean": result.mean, "ci95": result.ci95}
            new_best = self._update_best(result)
        if record:
            times = self._clock.read()
            log.log(done, {**record, "time/train_s": times["train_s"], "time/train_cpu_s": times["train_cpu_s"],
                           "time/elapsed_s": times["total_s"]})
        if new_best:
            self._save("best.pt")
        due = new_best or done % config.checkpoint_every == 0 or last
        if due and not self.nonfinite["in_a_row"]:
            self._save("last.pt")  # also on a new best, so that last.pt is never older than best.pt
        progress.update(done, self._spent(), {"loss": metrics["train/loss"],
                                              **({"best": self.best["value"]} if self.best else {})})
        return metrics["train/loss"], val

    def _strategy_record(self) -> dict[str, Any] | None:
        """The probe's choice as checkpoints and the summary store it (``None``: no probe)."""
        return None if self.strategy_choice is None else self.strategy_choice.to_dict()

    def _probe_strategy(self) -> StrategyChoice | None:
        """Time the strategies of a ``strategy="auto"`` meta-learner and train with the fastest (:mod:`strategy_probe`).

        Not probed: other learners and strategies, learners that must loop, runs shorter than
        :data:`metaopt.training.strategy_probe.PROBE_WORTH_FROM` iterations.
        """
        learner, remaining = self.learner, self.config.iterations - self.iteration
        if (not isinstance(learner, MetaLearner) or learner.strategy != "auto" or learner.loop_only is not None
                or remaining < PROBE_WORTH_FROM):
            return None
        if self.world.leader:
            note("strategy auto: timing loop and vmap (and compiled, for a long run) on the first batch")
        learner.set_epoch(self.epoch(self.iteration))
        return probe_strategy(learner, self.estimator, self.train_problems, self.iteration,
                              expected_s=expected_run_s(remaining, self.config.time_budget),
                              agree=lambda value: self.world.from_leader(lambda: value))

    def _start(self) -> None:
        if self.run_dir is None:
            return
        self.world.from_leader(self._create_run_dir)
        self._save("last.pt")  # iteration 0: a killed run can always be resumed

    def _create_run_dir(self) -> None:
        if (self.run_dir / "last.pt").exists():
            raise CheckpointError(f"{self.run_dir} already holds a run (last.pt); continue it with resume=True "
                                  "(metaopt train --resume) or choose another run directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", self._recorded_config())

    def restore(self) -> None:
        """Load ``run_dir/last.pt`` to resume the run (:meth:`fit` with ``resume=True`` calls it), checking the config.

        Only :data:`RESUMABLE_CHANGES` may differ from the run's ``config.json``, which is then rewritten.
        Of a distributed run rank 0 reads the checkpoint and sends it to the other ranks.
        """
        if self.run_dir is None:
            raise CheckpointError("resume=True needs the run_dir of the run to continue")
        path = self.run_dir / "last.pt"
        self.load_state_dict(self.world.from_leader(lambda: self._read_last(path)), path)
        self._time_up = self._out_of_time()
        if self.world.leader:
            write_json(self.run_dir / "config.json", self._recorded_config())
        self._restored = True

    def _read_last(self, path: Path) -> dict[str, Any]:
        """``last.pt`` of the run, after checking that this trainer's config may continue it."""
        config_path = self.run_dir / "config.json"
        remove_stale_temporaries(self.run_dir)
        if config_path.exists():
            # through the config class, so fields added since the run started compare at their defaults
            stored = (read_run_config(config_path) if self.run_config is not None else
                      TrainerConfig.from_dict(json.loads(config_path.read_text()), owner=str(config_path)))
            ours, theirs = (_flat(config if self.run_config is not None else {"trainer": config})
                            for config in (self._recorded_config(), stored.to_dict()))
            changed = sorted(k for k in set(theirs) | set(ours)
                             if theirs.get(k) != ours.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                raise CheckpointError(f"{config_path} differs from this trainer's config in {changed}; a resumed run "
                                      f"must keep its config (only {list(RESUMABLE_CHANGES)} may change)")
        return load_checkpoint(path, required=_STATE_KEYS)

    def _train_step(self, track_steps: bool) -> dict[str, float]:
        """One meta-update from the estimator's meta-gradient; non-finite ones are skipped and counted."""
        self.optimizer.zero_grad(set_to_none=True)
        self.learner.set_epoch(self.epoch(self.iteration))
        before = {name: b.clone() for name, b in self.learner.named_buffers()} if self.world.active else {}
        estimate = self.estimator.estimate(self.learner, self.train_problems, self.iteration, track_steps=track_steps)
        self.world.sync_buffers(self.learner, before)
        grad_norm = self._clip_gradients() if math.isfinite(estimate.loss) else math.nan
        if math.isfinite(grad_norm):
            if isinstance(self.optimizer, RuleOptimizer):  # a learned meta-optimizer may read the meta-loss
                self.optimizer.step(loss=estimate.loss)
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.nonfinite["in_a_row"] = 0
        else:
            self.nonfinite["total"] += 1
            self.nonfinite["in_a_row"] += 1
        self.iteration += 1
        if self.nonfinite["in_a_row"] >= self.config.max_nonfinite:
            self._stop_nonfinite()
        return {**{f"train/{k}": v for k, v in estimate.metrics.items()}, "train/grad_norm": grad_norm,
                "train/nonfinite_skipped": float(self.nonfinite["total"])}

    def _clip_gradients(self) -> float:
        """Global L2 norm of the meta-gradient before clipping; clips by value, then by norm."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if math.isfinite(norm):
            if self.config.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(self._params, self.config.grad_clip_value)
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.config.grad_clip)
        return norm

    def _stop_nonfinite(self) -> None:
        n = self.nonfinite["in_a_row"]
        kept = (f"the last checkpoint, {self.run_dir / 'last.pt'} (iteration {self._saved_iteration}), is intact"
                if self.run_dir is not None else "no checkpoint was kept (run_dir=None)")
        raise NonFiniteError(f"the meta-loss or meta-gradient was NaN or infinite for {n} meta-updates in a row "
                             f"(iterations {self.iteration - n + 1}..{self.iteration}); training stopped and {kept}. "
                             "Lower meta_lr or inner_lr, set grad_clip, or raise max_nonfinite")

    def _logged(self) -> dict[str, float]:
        return {"lr/meta": float(self.optimizer.param_groups[0]["lr"]), **self.learner.logged()}

    def _update_best(self, result: EvalResult) -> bool:
        higher = result.metric in HIGHER_IS_BETTER
        if self.best is not None:
            previous = self.best["value"]
            if not (result.mean > previous if higher else result.mean < previous):
                return False
        elif not math.isfinite(result.mean):
            return False
        self.best = {"metric": result.metric, "value": result.mean, "ci95": result.ci95, "iteration": self.iteration}
        return True
