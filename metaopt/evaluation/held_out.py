"""A learned optimizer against Adam tuned per task on held-out tasks: fraction won, speed-up, validation loss.

The protocol of Metz et al. 2020 (§5: a learned optimizer against learning-rate-tuned Adam on
held-out tasks) with the speed-up of VeLO (Metz et al. 2022, §5.1): on every task the learned rule
runs for ``4T`` steps (``T`` the training horizon), and Adam runs with each of 14 log-spaced
learning rates (1e-4 to 1, :data:`ADAM_GRID`) for ``4T`` steps. At each horizon ``H`` in ``(T, 4T)``:

* the *train loss at H* is the mean minibatch loss over steps ``H - window + 1 .. H`` (minibatch
  losses are noisy; ``window = 10``);
* tuned Adam is the learning rate with the lowest train loss at ``H`` *on that task*;
* the learned optimizer **wins** a task when its train loss at ``H`` is below tuned Adam's;
* the **speed-up** is ``s / H``, ``s`` the first step at which tuned Adam's (trailing-mean) train
  loss reaches the learned optimizer's at ``H`` — ``> 4T / H`` when Adam never does within its ``4T`` steps;
* the **validation loss** of both at ``H`` is the mean of ``problem.validation_loss(θ_H, k)`` over
  ``validation_batches`` held-out minibatches (the regularisation claim of §5.3).

The learned rule runs through the engine's inner loop (:meth:`metaopt.engine.inner.InnerLoop.unroll`,
as in meta-training, validation losses included when the rule reads them), Adam through
:func:`metaopt.evaluation.tuned_baselines.run_optimizer`.

Example:
    >>> import torch
    >>> from metaopt.datasets import Quadratics
    >>> from metaopt.engine.rules import sgd
    >>> tasks = [Quadratics(batch=1).sample(seed) for seed in range(2)]
    >>> report = compare_with_tuned_adam(sgd(0.01), tasks, horizon=8, grid=(0.1, 0.01), window=2)
    >>> sorted(report["horizons"]), len(report["tasks"])
    (['32', '8'], 2)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from metaopt.engine.functional import Params
from metaopt.engine.inner import InnerLoop
from metaopt.engine.rules import UpdateRule
from metaopt.evaluation.evaluate import confidence_interval
from metaopt.evaluation.tuned_baselines import run_optimizer
from metaopt.problems.optimizees import Optimizee

__all__ = ["ADAM_GRID", "compare_with_tuned_adam", "trailing_mean"]

#: The 14 log-spaced learning rates Adam is tuned over on every task.
ADAM_GRID = tuple(float(lr) for lr in np.logspace(-4, 0, 14))


def trailing_mean(losses: torch.Tensor, window: int) -> torch.Tensor:
    """``losses[t]`` replaced by the mean of ``losses[max(0, t - window + 1) .. t]`` (non-finite values stay so)."""
    cumulative = torch.cumsum(torch.nan_to_num(losses.double(), nan=math.inf), dim=0)
    shifted = torch.cat([cumulative.new_zeros(window), cumulative])[: len(losses)]
    counts = torch.arange(1, len(losses) + 1, dtype=torch.float64).clamp(max=window)
    return (cumulative - shifted) / counts


def _validation(problem: Optimizee, params: Params, batches: int) -> float:
    with torch.no_grad():
        losses = [problem.validation_loss(params, k) for k in range(batches)]
    return math.nan if any(loss is None for loss in losses) else float(torch.stack(losses).mean())


def _learned_run(rule: UpdateRule, problem: Optimizee, steps: int) -> tuple[torch.Tensor, list[Params]]:
    """The learned rule's minibatch losses ``f(θ_t, t)`` for ``t = 0..steps`` and all its parameters."""
    loop = InnerLoop(rule, first_order=True)
    with torch.no_grad():
        trajectory = loop.unroll(problem, problem.init_params(), steps)
        losses = torch.stack([problem.loss(theta, t) for t, theta in enumerate(trajectory.params)])
    return losses, trajectory.params


def _first_reach(curve: torch.Tensor, target: float) -> int | None:
    reached = torch.nonzero(curve <= target).flatten()
    return int(reached[0]) if len(reached) else None


def compare_with_tuned_adam(rule: UpdateRule, tasks: Sequence[Optimizee], horizon: int,
                            grid: Sequence[float] = ADAM_GRID, window: int = 10, multiple: int = 4,
                            validation_batches: int = 4) -> dict[str, Any]:
    """The learned ``rule`` against per-task tuned Adam on ``tasks`` at ``horizon`` and ``multiple x horizon``.

    Returns a JSON-ready report: ``tasks`` (per task and horizon: the learned and tuned-Adam train
    and validation losses, Adam's learning rate, win, speed-up) and ``horizons`` (per horizon: the
    fraction won, the median speed-up, the mean losses with 95% intervals). See the module docs.

    Raises:
        ValueError: no tasks, a horizon or window below 1.
    """
    if not tasks:
        raise ValueError("compare_with_tuned_adam needs at least one task")
    if horizon < 1 or window < 1 or multiple < 1:
        raise ValueError(f"horizon, window and multiple must be >= 1, got {horizon}, {window}, {multiple}")
    horizons = sorted({horizon, multiple * horizon})
    steps = horizons[-1]
    rows = []
    for index, problem in enumerate(tasks):
        learned, path = _learned_run(rule, problem, steps)
        learned_mean = trailing_mean(learned, window)
        adam = [run_optimizer(functools.partial(torch.optim.Adam, lr=lr), problem, steps, checkpoints=horizons)
                for lr in grid]
        adam_means = torch.stack([trailing_mean(losses, window) for losses, _ in adam])
        describe = getattr(problem, "describe", None)
        row: dict[str, Any] = {"task": index, "description": describe() if callable(describe) else {}}
        for h in horizons:
            best = int(torch.argmin(torch.nan_to_num(adam_means[:, h], nan=math.inf)))
            target = float(learned_mean[h])
            reach = _first_reach(adam_means[best], target)
            row[str(h)] = {
                "learned_train": target, "adam_train": float(adam_means[best, h]), "adam_lr": grid[best],
                "won": target < float(adam_means[best, h]),
                "speedup": None if reach is None else reach / h, "speedup_bound": steps / h,
                "learned_valid": _validation(problem, path[h], validation_batches),
                "adam_valid": _validation(problem, adam[best][1][horizons.index(h)], validation_batches)}
        rows.append(row)
    return {"horizons": {str(h): _summary([row[str(h)] for row in rows]) for h in horizons}, "tasks": rows,
            "protocol": {"tasks": len(tasks), "horizon": horizon, "multiple": multiple, "window": window,
                         "grid": list(grid), "validation_batches": validation_batches}}


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Fraction won, median speed-up (unreached counted at their bound, as a lower bound) and mean losses."""
    def mean_ci(key: str) -> list[float]:
        values = torch.tensor([r[key] for r in results if math.isfinite(r[key])], dtype=torch.float64)
        return [float(values.mean()), confidence_interval(values)] if len(values) else [math.nan, math.nan]

    speedups = [r["speedup"] if r["speedup"] is not None else r["speedup_bound"] for r in results]
    return {"won": sum(r["won"] for r in results) / len(results),
            "median_speedup": float(np.median(speedups)),
            "unreached": sum(r["speedup"] is None for r in results),
            **{key: mean_ci(key) for key in ("learned_train", "adam_train", "learned_valid", "adam_valid")}}
