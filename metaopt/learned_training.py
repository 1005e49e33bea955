"""Meta-training of learned update rules on optimizee families by truncated backpropagation, and baselines.

Andrychowicz et al. 2016 (§2, §3) train an optimizer ``m`` with meta-parameters φ on the loss
of the optimizee along its trajectory,

    L(φ) = Σ_{t=1..T} w_t f(θ_t),    θ_{t+1} = θ_t + g_t(∇f(θ_t), φ),    w_t = 1,

by backpropagation through the unrolled optimization, truncated: each run of ``steps`` optimizee
steps is cut into truncations of ``unroll`` steps; after each the sum of its losses
``f(θ_{s+1}) + ... + f(θ_{s+unroll})`` is backpropagated into φ and Adam takes a meta-step, and
θ and the rule's state are carried on as constants into the next truncation (the paper's
``T = 100`` steps, truncations of 20, meta learning rate 1e-3, as google-deepmind/learning-to-learn's
``train.py``). Epoch ``e`` trains on one problem, ``family.sample(seed · 10⁶ + e)``, so a run is a
pure function of its seed. Every ``eval_every`` epochs the frozen rule optimizes fixed validation
problems (seeds ``val_seed, val_seed + 1, ...``, by default from 10⁹ on, disjoint from every
training seed); the mean loss over their ``steps`` steps selects the best rule (early stopping on
meta-validation, as the reference code). Held-out test problems should use seeds of yet another
range (e.g. from 2·10⁹).

A run directory holds ``config.json``, ``metrics.jsonl``, TensorBoard events, ``best.pt`` (the
best rule so far) and ``last.pt``, written at every evaluation with everything an exact resume
needs (rule, meta-optimizer, epoch, best, random states): ``fit(resume=True)`` continues as if
never interrupted. Both files hold ``rule_class``, ``rule_hparams`` and ``rule`` (its
``state_dict``), which :class:`metaopt.algorithms.lstm_optimizer.LearnedOptimizer` loads.

The baselines (§3: SGD, RMSprop, Adam, NAG with tuned learning rates) run through
:func:`run_optimizer` and :func:`tune_learning_rate`.

Example:
    >>> import functools, torch
    >>> from metaopt.algorithms.lstm_optimizer import LSTMOptimizerRule
    >>> from metaopt.optimizees import Quadratics
    >>> family = Quadratics(batch=4)
    >>> trainer = LearnedOptimizerTrainer(LSTMOptimizerRule(), family, epochs=2, steps=10, unroll=5, eval_every=1,
    ...                                   val_problems=2)
    >>> summary = trainer.fit()
    >>> summary["epoch"], summary["best"]["epoch"] in (1, 2)
    (2, True)
    >>> problem = family.sample(seed=2 * 10**9)                   # a held-out problem
    >>> run_optimizer(trainer.rule, problem, steps=10).shape      # f(θ_0), ..., f(θ_10)
    torch.Size([11])
    >>> lr = tune_learning_rate(torch.optim.Adam, family, seeds=[10**9], steps=10, grid=(1.0, 0.1))
    >>> adam = run_optimizer(functools.partial(torch.optim.Adam, lr=lr), problem, steps=10)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
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
from metaopt.functional import Params
from metaopt.logging import RunLogger
from metaopt.optimizees import Optimizee, OptimizeeFamily
from metaopt.rules import OptimizerFactory, UpdateRule

__all__ = ["EPOCH_SEEDS", "VAL_SEED", "LearnedOptimizerTrainer", "run_optimizer", "truncated_unroll",
           "tune_learning_rate"]

#: Training seeds per run seed: epoch ``e`` of a run with seed ``s`` trains on ``family.sample(s · EPOCH_SEEDS + e)``.
EPOCH_SEEDS = 10**6
#: First seed of the default validation problems (above every training seed).
VAL_SEED = 10**9
GRID = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
CRITERIA = ("final", "sum")
RESUMABLE_CHANGES = ("epochs",)  # settings a resumed run may change
_STATE_KEYS = ("rule_class", "rule_hparams", "rule", "meta_optimizer", "epoch", "best", "nonfinite", "train_s", "rng")


def _detach(tree: Any) -> Any:
    """``tree`` (tensors in lists, tuples and dicts) with every tensor detached."""
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    return tree


def truncated_unroll(rule: UpdateRule, problem: Optimizee, params: Params, state: Any, start: int,
                     length: int) -> tuple[torch.Tensor, Params, Any, torch.Tensor]:
    """One truncation of meta-training (Andrychowicz et al. 2016, §2): ``length`` differentiable rule steps.

    θ and the rule's state enter as constants (the truncation boundary). Step ``t`` (from
    ``start``) takes the gradient of ``f(θ_t, t)`` and applies the rule. The gradient carries
    a graph for second derivatives unless the rule declares ``second_derivatives = False``
    (it then treats gradients as constants itself, so none is built).

    Returns:
        The meta-loss ``Σ_{t=start+1..start+length} f(θ_t, t)`` (differentiable in the rule's
        parameters), ``θ_{start+length}``, the rule's state, and the summed losses, detached, ``[length]``.
    """
    create_graph = getattr(rule, "second_derivatives", True)
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    state = _detach(state)
    loss = problem.loss(params, start)
    losses = []
    for t in range(start, start + length):
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, retain_graph=True)
        params, state = rule.step(params, dict(zip(params, grads)), state, t)
        loss = problem.loss(params, t + 1)
        losses.append(loss)
    stacked = torch.stack(losses)
    return stacked.sum(), params, state, stacked.detach()


def run_optimizer(optimizer: UpdateRule | OptimizerFactory, problem: Optimizee, steps: int) -> torch.Tensor:
    """The losses ``f(θ_0, 0), ..., f(θ_steps, steps)`` (``[steps + 1]``) of ``steps`` optimizer steps on ``problem``.

    Args:
        optimizer: a learned rule (run frozen: no graph into its parameters), or a factory
            ``params -> torch.optim.Optimizer`` (a baseline, e.g. ``functools.partial(torch.optim.Adam, lr=0.1)``),
            run in the plain ``zero_grad / backward / step`` loop on leaf copies of ``problem.init_params()``.
        problem: the optimizee.
        steps: optimizer steps.
    """
    losses = []
    with torch.enable_grad():
        if isinstance(optimizer, UpdateRule):
            params = problem.init_params()
            state = optimizer.init(params)
            for t in range(steps):
                params = {name: p.detach().requires_grad_() for name, p in params.items()}
                loss = problem.loss(params, t)
                losses.append(loss.detach())
                grads = torch.autograd.grad(loss, list(params.values()))
                with torch.no_grad():
                    params, state = optimizer.step(params, dict(zip(params, grads)), state, t)
        else:
            params = {name: p.detach().clone().requires_grad_() for name, p in problem.init_params().items()}
            opt = optimizer(list(params.values()))
            for t in range(steps):
                opt.zero_grad()
                loss = problem.loss(params, t)
                losses.append(loss.detach())
                loss.backward()
                opt.step()
    with torch.no_grad():
        losses.append(problem.loss(params, steps))
    return torch.stack(losses)


def tune_learning_rate(factory: Callable[..., torch.optim.Optimizer], family: OptimizeeFamily, seeds: Sequence[int],
                       steps: int, grid: Sequence[float] = GRID, criterion: str = "final") -> float:
    """The learning rate of ``grid`` with which ``factory`` does best on the problems ``family.sample(seed)``.

    The paper tunes every baseline's learning rate per problem family (Andrychowicz et al. 2016,
    §3); tune on validation seeds, never on the test problems. A learning rate whose score is
    not finite on some problem counts as the worst; ties go to the first in ``grid``.

    Args:
        factory: builds the optimizer as ``factory(params, lr=lr)``, e.g. ``torch.optim.Adam`` or
            ``functools.partial(torch.optim.SGD, momentum=0.9)``.
        family: the problem family.
        seeds: the problems to tune on.
        steps: optimizer steps per problem.
        grid: candidate learning rates (default: 3 down to 0.001; quadratics need rates of 1 and more).
        criterion: ``"final"``: mean over the problems of ``f(θ_steps)``; ``"sum"``: mean of
            ``f(θ_1) + ... + f(θ_steps)`` (the meta-training objective).

    Raises:
        ValueError: an unknown criterion, no seeds, or no learning rate of ``grid`` gives a finite score.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    if not seeds:
        raise ValueError("tune_learning_rate needs at least one problem seed")
    problems = [family.sample(seed) for seed in seeds]
    best_lr, best_score = None, math.inf
    for lr in grid:
        runs = torch.stack([run_optimizer(lambda params, lr=lr: factory(params, lr=lr), problem, steps)
                            for problem in problems])
        score = (runs[:, -1] if criterion == "final" else runs[:, 1:].sum(dim=1)).mean().item()
        if math.isfinite(score) and score < best_score:
            best_lr, best_score = lr, score
    if best_lr is None:
        raise ValueError(f"no learning rate of {tuple(grid)} gives a finite {criterion!r} score over {steps} steps; "
                         "extend the grid to smaller rates")
    return best_lr


class LearnedOptimizerTrainer:
    """Meta-train ``rule`` on problems of ``family`` by truncated backpropagation (Andrychowicz et al. 2016, §2, §3).

    Args:
        rule: the learned rule; its parameters are the meta-parameters φ (trained in place).
        family: training problems; epoch ``e`` optimizes ``family.sample(seed · EPOCH_SEEDS + e)``.
        epochs: training problems, one per epoch (the reference code: 10 000).
        steps: optimizee steps per problem, also at validation (100).
        unroll: optimizee steps per truncation, i.e. per meta-update (20).
        meta_lr: Adam's learning rate (1e-3; the PyTorch port: 3e-3 quadratics, 1e-2 MNIST).
        grad_clip: clip the meta-gradient's global L2 norm to this (``None``: no clipping).
        eval_every: validate (and write ``last.pt``) every this many epochs, and after the last.
        val_family: validation problems' family (default: ``family``).
        val_problems: how many validation problems.
        val_seed: seed of the first validation problem.
        seed: the run's seed (0 <= seed < 1000), which picks its training problems.
        log_every: log the training figures every this many epochs.
        run_dir: folder for config, metrics, TensorBoard events and checkpoints (``None``: nothing on disk).
    """

    def __init__(self, rule: UpdateRule, family: OptimizeeFamily, epochs: int, steps: int = 100, unroll: int = 20,
                 meta_lr: float = 1e-3, grad_clip: float | None = None, eval_every: int = 10,
                 val_family: OptimizeeFamily | None = None, val_problems: int = 20, val_seed: int = VAL_SEED,
                 seed: int = 0, log_every: int = 1, run_dir: str | Path | None = None) -> None:
        if not 0 <= epochs <= EPOCH_SEEDS:
            raise ValueError(f"epochs must be in [0, {EPOCH_SEEDS}], got {epochs}")
        if min(steps, unroll, eval_every, val_problems, log_every) < 1:
            raise ValueError(f"steps, unroll, eval_every, val_problems and log_every must be >= 1, got {steps}, "
                             f"{unroll}, {eval_every}, {val_problems}, {log_every}")
        if not 0 <= seed < VAL_SEED // EPOCH_SEEDS:
            raise ValueError(f"seed must be in [0, {VAL_SEED // EPOCH_SEEDS}) so that training problems stay apart "
                             f"from the validation ones, got {seed}")
        self.rule, self.family = rule, family
        self.epochs, self.steps, self.unroll, self.meta_lr, self.grad_clip = epochs, steps, unroll, meta_lr, grad_clip
        self.eval_every, self.log_every, self.seed = eval_every, log_every, seed
        self.val_family = family if val_family is None else val_family
        self.val_seed, self.val_problems = val_seed, val_problems
        self._val = [self.val_family.sample(val_seed + i) for i in range(val_problems)]
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._params = [p for p in rule.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self._params, lr=meta_lr)
        self.epoch = 0
        self.best: dict[str, Any] | None = None
        self.nonfinite = 0
        self.train_s = 0.0

    def train_seed(self, epoch: int) -> int:
        """The seed of the training problem of ``epoch``."""
        return self.seed * EPOCH_SEEDS + epoch

    def config(self) -> dict[str, Any]:
        """The run's settings, as written to ``config.json``."""
        return {"rule": type(self.rule).__name__, "rule_hparams": dict(getattr(self.rule, "hparams", {})),
                "family": type(self.family).__name__, "val_family": type(self.val_family).__name__,
                "epochs": self.epochs, "steps": self.steps, "unroll": self.unroll, "meta_lr": self.meta_lr,
                "grad_clip": self.grad_clip, "eval_every": self.eval_every, "val_problems": self.val_problems,
                "val_seed": self.val_seed, "seed": self.seed, "log_every": self.log_every}

    # ----------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The rule (class, hyper-parameters, weights) and everything an exact resume needs."""
        return {"rule_class": type(self.rule).__name__, "rule_hparams": dict(getattr(self.rule, "hparams", {})),
                "rule": self.rule.state_dict(), "meta_optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "best": self.best, "nonfinite": self.nonfinite, "train_s": self.train_s, "rng": capture_rng_state()}

    def load_state_dict(self, state: dict[str, Any], path: str | Path) -> None:
        """Restore :meth:`state_dict` output read from ``path`` (named in every error)."""
        if state["rule_class"] != type(self.rule).__name__:
            raise CheckpointError(f"checkpoint {path} holds a {state['rule_class']} rule, but this trainer trains a "
                                  f"{type(self.rule).__name__}; resume with the rule of that run")
        load_module_state(self.rule, state["rule"], path)
        try:
            self.optimizer.load_state_dict(state["meta_optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path}: the meta-optimizer state does not fit ({err})") from err
        self.epoch, self.best = int(state["epoch"]), state["best"]
        self.nonfinite, self.train_s = int(state["nonfinite"]), float(state["train_s"])
        restore_rng_state(state["rng"])

    def _save(self, name: str) -> None:
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / name, self.state_dict())

    # ------------------------------------------------------------------------------------- run

    def validate(self) -> float:
        """Mean loss of the frozen rule over the validation problems and their steps ``1..steps``."""
        return torch.stack([run_optimizer(self.rule, problem, self.steps)[1:].mean()
                            for problem in self._val]).mean().item()

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``epochs``; ``resume`` continues ``run_dir/last.pt``.

        Returns:
            ``epoch``, ``train_loss`` (mean loss of the last epoch's run), ``val`` (last validation
            loss), ``best`` (``value``, ``epoch``), ``nonfinite_skipped`` (truncations whose
            meta-loss or meta-gradient was not finite: their meta-step and the rest of their run
            were skipped) and ``train_s`` (training time in seconds, validation excluded).

        Raises:
            CheckpointError: ``resume`` without a usable ``run_dir/last.pt``, or a fresh run in a
                folder that already holds one.
        """
        if resume:
            self._resume()
        else:
            self._start()
        summary: dict[str, Any] = {"train_loss": None, "val": None}
        with RunLogger(self.run_dir, total=self.epochs, start=self.epoch) as log:
            while self.epoch < self.epochs:
                summary["train_loss"], val = self._iterate(log)
                summary["val"] = summary["val"] if val is None else val
            best = {"best_val": self.best["value"]} if self.best else {}
            log.log_hparams(self.config(), best)
        summary.update(epoch=self.epoch, best=self.best, nonfinite_skipped=self.nonfinite, train_s=self.train_s)
        return summary

    def _start(self) -> None:
        if self.run_dir is None:
            return
        if (self.run_dir / "last.pt").exists():
            raise CheckpointError(f"{self.run_dir} already holds a run (last.pt); continue it with resume=True or "
                                  "choose another run directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / "config.json", self.config())
        self._save("last.pt")  # epoch 0: a killed run can always be resumed

    def _resume(self) -> None:
        if self.run_dir is None:
            raise CheckpointError("resume=True needs the run_dir of the run to continue")
        config_path = self.run_dir / "config.json"
        if config_path.exists():
            stored, ours = json.loads(config_path.read_text()), json.loads(json.dumps(self.config()))
            changed = sorted(k for k in set(stored) | set(ours)
                             if stored.get(k) != ours.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                raise CheckpointError(f"{config_path} differs from this trainer's settings in {changed}; a resumed "
                                      f"run must keep them (only {list(RESUMABLE_CHANGES)} may change)")
        path = self.run_dir / "last.pt"
        self.load_state_dict(load_checkpoint(path, required=_STATE_KEYS), path)
        write_json(config_path, self.config())

    def _iterate(self, log: RunLogger) -> tuple[float, float | None]:
        """One epoch of training, then logging, validation and checkpoints when due; its loss and the validation."""
        tic = time.perf_counter()
        metrics = self._train_epoch()
        self.train_s += time.perf_counter() - tic
        self.epoch += 1
        last = self.epoch == self.epochs
        record = dict(metrics) if self.epoch % self.log_every == 0 or last else {}
        val, new_best = None, False
        if self.epoch % self.eval_every == 0 or last:
            val = self.validate()
            record["val/loss"] = val
            new_best = self._update_best(val)
        if record:
            log.log(self.epoch, {**record, "lr/meta": self.meta_lr, "time/train_s": self.train_s})
        if new_best:
            self._save("best.pt")
        if val is not None:
            self._save("last.pt")
        log.advance({"loss": metrics["train/loss"], **({"best": self.best["value"]} if self.best else {})})
        return metrics["train/loss"], val

    def _train_epoch(self) -> dict[str, float]:
        """Optimize this epoch's problem for ``steps`` steps, one meta-update per truncation of ``unroll`` steps."""
        problem = self.family.sample(self.train_seed(self.epoch))
        params = problem.init_params()
        state = self.rule.init(params)
        losses, norms = [], []
        for start in range(0, self.steps, self.unroll):
            meta_loss, params, state, step_losses = truncated_unroll(self.rule, problem, params, state, start,
                                                                     min(self.unroll, self.steps - start))
            losses.append(step_losses)
            norm = self._meta_step(meta_loss)
            if not math.isfinite(norm):
                self.nonfinite += 1
                break
            norms.append(norm)
        run = torch.cat(losses)
        return {"train/loss": run.mean().item(), "train/final_loss": run[-1].item(),
                "train/grad_norm": sum(norms) / len(norms) if norms else math.nan,
                "train/nonfinite_skipped": float(self.nonfinite)}

    def _meta_step(self, meta_loss: torch.Tensor) -> float:
        """Backpropagate ``meta_loss`` and take an Adam step; the meta-gradient's norm before clipping.

        A non-finite meta-loss or meta-gradient takes no step (the norm is then NaN or infinite).
        """
        if not torch.isfinite(meta_loss):
            return math.nan
        self.optimizer.zero_grad(set_to_none=True)
        meta_loss.backward()
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if math.isfinite(norm):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip)
            self.optimizer.step()
        return norm

    def _update_best(self, val: float) -> bool:
        if not math.isfinite(val) or (self.best is not None and val >= self.best["value"]):
            return False
        self.best = {"value": val, "epoch": self.epoch}
        return True
