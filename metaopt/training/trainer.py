"""The outer loop: meta-batches, meta-optimizer, evaluation, checkpoints and exact resume.

Each iteration takes meta-batch ``i = trainer.iteration`` from the task sampler (a pure
function of its seed and ``i``, so the sampler's position is the iteration count), computes
the algorithm's meta-loss, and takes one step of the meta-optimizer φ ← opt(φ, ∇_φ meta-loss)
after optional clipping. A non-finite meta-loss or meta-gradient skips the step; too many in a
row stop the run with :class:`NonFiniteError`. Every ``eval_every`` iterations the learner is
evaluated on held-out tasks (mean ± 95% interval, :func:`metaopt.evaluation.evaluate`) and the
best one is kept in ``best.pt``.

The run ends after ``config.iterations`` meta-updates, or with ``config.time_budget`` after the
meta-update during which the budget runs out; either way the last iteration is evaluated and
checkpointed. The budget counts *training time*, the wall time of the meta-updates alone
(sampling the meta-batch, meta-loss, meta-gradient, step): periodic validation, checkpoints and
logging are left out, so runs that evaluate more or less often get the same training. Training
time and total wall time are logged (``time/train_s``, ``time/elapsed_s``), kept in the
checkpoints, and carried on by a resumed run.

A run directory holds ``config.json``, ``metrics.jsonl``, TensorBoard events, ``last.pt``
and ``best.pt``. ``fit(resume=True)`` restores ``last.pt`` (parameters, optimizer and
schedule, counters, random states) and continues exactly as an uninterrupted run would.

Example:
    >>> import tempfile
    >>> from metaopt.algorithms import MAML
    >>> from metaopt.config import TrainerConfig
    >>> from metaopt.datasets import Sinusoid
    >>> from metaopt.models import MLP
    >>> config = TrainerConfig(iterations=4, eval_every=2, eval_episodes=4, log_every=2)
    >>> trainer = MetaTrainer(MAML(MLP(1, 1, hidden=(8,)), inner_lr=0.01), Sinusoid(batch_size=2, seed=0),
    ...                       config, val_tasks=Sinusoid(batch_size=4, seed=1), run_dir=tempfile.mkdtemp())
    >>> summary = trainer.fit()
    >>> summary["iteration"], summary["best"]["metric"], sorted(p.name for p in trainer.run_dir.glob("*.pt"))
    (4, 'mse', ['best.pt', 'last.pt'])
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from metaopt.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_module_state,
    restore_rng_state,
    save_checkpoint,
    write_json,
)
from metaopt.config import TrainerConfig
from metaopt.evaluation import EvalResult, evaluate
from metaopt.logging import RunLogger
from metaopt.meta_learner import MetaLearner
from metaopt.sampling import TaskSampler
from metaopt.schedules import cosine_meta_lr

__all__ = ["RESUMABLE_CHANGES", "MetaTrainer", "NonFiniteError"]

HIGHER_IS_BETTER = ("accuracy",)
RESUMABLE_CHANGES = ("iterations", "time_budget", "device")  # config fields a resumed run may change
_STATE_KEYS = ("algorithm", "meta_optimizer", "iteration", "model", "optimizer", "scheduler", "best", "nonfinite",
               "time", "rng")


class NonFiniteError(RuntimeError):
    """Too many consecutive meta-batches had a non-finite meta-loss or meta-gradient."""


class _Clock:
    """Training time (meta-updates only, wall and CPU) and total wall time of a run, and its throughput.

    Args:
        train_s: training wall time already spent (a resumed run).
        total_s: total wall time already spent (a resumed run).
        train_cpu_s: CPU time of this process (all its threads) spent in meta-updates (a resumed run).
    """

    def __init__(self, train_s: float = 0.0, total_s: float = 0.0, train_cpu_s: float = 0.0) -> None:
        self.train_s = train_s
        self.train_cpu_s = train_cpu_s
        self._started = time.perf_counter() - total_s
        self._seconds = 0.0  # meta-update time and tasks since the last throughput reading
        self._tasks = 0

    @property
    def total_s(self) -> float:
        return time.perf_counter() - self._started

    @contextlib.contextmanager
    def measure(self, tasks: int) -> Iterator[None]:
        """Count the time of the block, a meta-update on ``tasks`` tasks, as training time."""
        tic, cpu_tic = time.perf_counter(), time.process_time()
        yield
        seconds = time.perf_counter() - tic
        self.train_s += seconds
        self.train_cpu_s += time.process_time() - cpu_tic
        self._seconds += seconds
        self._tasks += tasks

    def throughput(self) -> dict[str, float]:
        """Tasks per second of the meta-updates since the last call."""
        figures = {"time/tasks_per_s": self._tasks / self._seconds}
        self._seconds, self._tasks = 0.0, 0
        return figures

    def read(self) -> dict[str, float]:
        """Training wall time, training CPU time and total wall time so far, in seconds."""
        return {"train_s": self.train_s, "total_s": self.total_s, "train_cpu_s": self.train_cpu_s}


class MetaTrainer:
    """Meta-train ``algorithm`` on ``train_tasks``; evaluate, log and checkpoint as ``config`` says.

    Args:
        algorithm: the meta-learner; its ``parameters()`` are the meta-parameters φ.
        train_tasks: task sampler; iteration ``i`` trains on ``train_tasks.batch(i)``.
        config: outer-loop settings (:class:`metaopt.config.TrainerConfig` or an
            :class:`metaopt.config.ExperimentConfig`, which is written whole to ``config.json``).
        val_tasks: held-out tasks for periodic evaluation and best-checkpoint selection
            (``None``: no evaluation, no ``best.pt``).
        run_dir: folder for config, metrics, TensorBoard events and checkpoints (``None``: keep
            nothing on disk; resume is then impossible).
        device: where to train (default: where the algorithm's parameters are).
    """

    def __init__(self, algorithm: MetaLearner, train_tasks: TaskSampler, config: TrainerConfig,
                 val_tasks: TaskSampler | None = None, run_dir: str | Path | None = None,
                 device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else next(algorithm.parameters()).device
        self.algorithm = algorithm.to(self.device)
        self.train_tasks = train_tasks
        self.val_tasks = val_tasks
        self.config = config
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._params = [p for p in algorithm.parameters() if p.requires_grad]
        if config.meta_optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self._params, lr=config.meta_lr)
        else:
            self.optimizer = torch.optim.SGD(self._params, lr=config.meta_lr)
        self.scheduler = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._cosine_factor)
                          if config.lr_schedule == "cosine" else None)
        self.iteration = 0
        self.best: dict[str, Any] | None = None
        self.nonfinite = {"total": 0, "in_a_row": 0}
        self._clock = _Clock()
        self._saved_iteration: int | None = None

    def epoch(self, iteration: int) -> int:
        """The epoch of meta-iteration ``iteration`` (``config.epoch_length`` iterations each)."""
        return iteration // self.config.epoch_length

    def _cosine_factor(self, iteration: int) -> float:
        """Meta learning rate at ``iteration`` relative to ``meta_lr``: cosine annealing per epoch (MAML++ CA)."""
        config = self.config
        epochs = max(1, math.ceil(config.iterations / config.epoch_length))
        return cosine_meta_lr(1.0, config.min_meta_lr / config.meta_lr, self.epoch(iteration), epochs)

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: meta-parameters, optimizer, schedule, counters, times, random states."""
        return {
            "algorithm": type(self.algorithm).__name__,
            "meta_optimizer": self.config.meta_optimizer,
            "iteration": self.iteration,
            "model": self.algorithm.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "best": self.best,
            "nonfinite": dict(self.nonfinite),
            "time": self._clock.read(),
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], path: str | Path) -> None:
        """Restore :meth:`state_dict` output read from ``path`` (named in every error)."""
        ours = type(self.algorithm).__name__
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
        load_module_state(self.algorithm, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path}: the meta-optimizer state does not fit ({err})") from err
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        self.best = state["best"]
        self.nonfinite = dict(state["nonfinite"])
        self._clock = _Clock(**state["time"])
        restore_rng_state(state["rng"])
        self._saved_iteration = self.iteration

    def _save(self, name: str) -> None:
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / name, self.state_dict())
            self._saved_iteration = self.iteration

    # ------------------------------------------------------------------------------------- run

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``config.iterations`` or ``config.time_budget``; ``resume`` continues ``run_dir/last.pt``.

        Returns:
            Final figures: ``iteration``, ``stopped_by`` (``"iterations"`` or ``"time_budget"``),
            ``time`` (``train_s``: training time, ``total_s``: total wall time, both in seconds
            and over all the sessions of a resumed run), ``train_loss`` (last iteration), ``val``
            (last evaluation: metric, mean, ci95), ``best`` (metric, value, iteration) and
            ``nonfinite_skipped``.

        Raises:
            NonFiniteError: ``max_nonfinite`` consecutive non-finite meta-batches; the last
                checkpoint written before them is left as it was.
            CheckpointError: ``resume`` without a usable ``run_dir/last.pt``.
        """
        if resume:
            self._resume()
        else:
            self._clock = _Clock()  # the run starts now, not when the trainer was built
            self._start()
        summary: dict[str, Any] = {"train_loss": None, "val": None}
        with RunLogger(self.run_dir, total=self.config.iterations, start=self.iteration) as log:
            while self.iteration < self.config.iterations and not self._out_of_time():
                summary["train_loss"], val = self._iterate(log)
                summary["val"] = val or summary["val"]
            stopped_by = "iterations" if self.iteration >= self.config.iterations else "time_budget"
            summary.update(iteration=self.iteration, stopped_by=stopped_by, best=self.best,
                           nonfinite_skipped=self.nonfinite["total"])
            figures = {"train_loss": summary["train_loss"], "best_val": self.best["value"] if self.best else None}
            log.log_hparams(self.config.to_dict(), {k: v for k, v in figures.items() if v is not None})
        summary["time"] = self._clock.read()
        return summary

    def _out_of_time(self) -> bool:
        budget = self.config.time_budget
        spent = self._clock.train_cpu_s if self.config.budget_clock == "cpu" else self._clock.train_s
        return budget is not None and spent >= 60 * budget

    def _iterate(self, log: RunLogger) -> tuple[float, dict[str, Any] | None]:
        """One meta-update, then logging, evaluation and checkpoints when due; the loss and the evaluation.

        Whether the time budget runs out is known after the meta-update only, so the per-step
        query losses (``track_steps``) of that last iteration are logged only if it was due to log.
        """
        config = self.config
        done = self.iteration + 1
        tracking = done % config.log_every == 0 or done == config.iterations
        with self._clock.measure(tasks=self.train_tasks.batch_size):
            metrics = self._train_step(track_steps=tracking)
        last = done == config.iterations or self._out_of_time()
        record = {**metrics, **self._learning_rates(), **self._clock.throughput()} if tracking or last else {}
        val, new_best = None, False
        if self.val_tasks is not None and (done % config.eval_every == 0 or last):
            result = evaluate(self.algorithm, self.val_tasks, config.eval_episodes, device=self.device)
            record.update({f"val/{result.metric}": result.mean, f"val/{result.metric}_ci95": result.ci95})
            val = {"metric": result.metric, "mean": result.mean, "ci95": result.ci95}
            new_best = self._update_best(result)
        if record:
            times = self._clock.read()
            log.log(done, {**record, "time/train_s": times["train_s"], "time/train_cpu_s": times["train_cpu_s"],
                           "time/elapsed_s": times["total_s"]})
        if new_best:
            self._save("best.pt")
        if new_best or done % config.checkpoint_every == 0 or last:
            self._save("last.pt")  # also on a new best, so that last.pt is never older than best.pt
        log.advance({"loss": metrics["train/loss"], **({"best": self.best["value"]} if self.best else {})})
        return metrics["train/loss"], val

    def _start(self) -> None:
        if self.run_dir is None:
            return
        if (self.run_dir / "last.pt").exists():
            raise CheckpointError(f"{self.run_dir} already holds a run (last.pt); continue it with resume=True "
                                  "(metaopt train --resume) or choose another run directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", self.config.to_dict())
        self._save("last.pt")  # iteration 0: a killed run can always be resumed

    def _resume(self) -> None:
        if self.run_dir is None:
            raise CheckpointError("resume=True needs the run_dir of the run to continue")
        path = self.run_dir / "last.pt"
        config_path = self.run_dir / "config.json"
        if config_path.exists():
            # through the config class, so fields added since the run started compare at their defaults
            stored = type(self.config).from_dict(json.loads(config_path.read_text())).to_dict()
            ours = self.config.to_dict()
            changed = sorted(k for k in set(stored) | set(ours)
                             if stored.get(k) != ours.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                raise CheckpointError(f"{config_path} differs from this trainer's config in {changed}; a resumed run "
                                      f"must keep its config (only {list(RESUMABLE_CHANGES)} may change)")
        self.load_state_dict(load_checkpoint(path, required=_STATE_KEYS), path)
        write_json(config_path, self.config.to_dict())

    def _train_step(self, track_steps: bool) -> dict[str, float]:
        """One meta-update on the next meta-batch; non-finite ones are skipped and counted."""
        batch = self.train_tasks.batch(self.iteration).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.algorithm.set_epoch(self.epoch(self.iteration))
        loss, metrics = self.algorithm.meta_loss(batch, track_steps=track_steps)
        grad_norm = float("nan")
        if math.isfinite(metrics["loss"]):
            loss.backward()
            grad_norm = self._clip_gradients()
        if math.isfinite(grad_norm):
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
        return {**{f"train/{k}": v for k, v in metrics.items()}, "train/grad_norm": grad_norm,
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
        raise NonFiniteError(f"the meta-loss or meta-gradient was NaN or infinite for {n} meta-batches in a row "
                             f"(iterations {self.iteration - n + 1}..{self.iteration}); training stopped and {kept}. "
                             "Lower meta_lr or inner_lr, set grad_clip, or raise max_nonfinite")

    def _learning_rates(self) -> dict[str, float]:
        rates = {"lr/meta": float(self.optimizer.param_groups[0]["lr"])}
        inner = getattr(self.algorithm.rule, "lr", None)
        if isinstance(inner, torch.Tensor) and inner.numel() == 1:
            rates["lr/inner"] = inner.item()
        return rates

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
