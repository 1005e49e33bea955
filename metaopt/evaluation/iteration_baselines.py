"""A learned optimizer against tuned classical optimizers counted in iterations: GD, momentum, CG, L-BFGS.

Li & Malik (2016, §4) compare their learned optimizer with gradient descent, momentum, conjugate
gradient and L-BFGS on held-out problems of the families it was trained on, by the objective
reached after each *iteration*. This module runs that comparison:

* the baselines (:data:`BASELINES`): ``torch.optim.SGD`` (gradient descent), ``SGD`` with
  momentum 0.9, :class:`metaopt.evaluation.conjugate_gradient.ConjugateGradient` (Polak–Ribière+,
  backtracking Armijo line search), ``torch.optim.LBFGS`` with ``line_search_fn="strong_wolfe"``
  and ``max_iter=1``, so that one ``step`` is one iteration, and Adam, which is not in the paper's
  comparison but is the strongest first-order baseline of the engine's own evaluation
  (:mod:`metaopt.evaluation.tuned_baselines`) on these problems;
* L-BFGS gets ``max_eval=25`` (the default that goes with the default ``max_iter=20``): its
  default ``max_eval`` is ``max_iter · 5 // 4``, which is 1 for ``max_iter=1`` and leaves the
  strong-Wolfe search no evaluation, so it keeps the first trial step, or the step 0 when that
  trial is worse, after which L-BFGS never moves again (measured: 4 of 20 logistic-regression
  runs stuck from the first iterations);
* every optimizer runs through ``step(closure)`` (:func:`run_iterations`) and is counted in
  iterations, **not function evaluations**: CG's and L-BFGS's line searches evaluate the objective
  (and its gradient) several times per iteration, GD and momentum once; the evaluations per
  iteration are recorded beside each result;
* each baseline's learning rate is tuned over a log grid (:data:`metaopt.evaluation.tuned_baselines.GRID`) on
  validation problems, by the mean objective at the horizon (:func:`tune`): the step size of GD and
  momentum, the first trial step of CG's line search and L-BFGS's ``lr`` (the scale of its
  first trial step; both matter little once their line searches run, but are tuned alike);
* the learned rule runs through the engine's inner loop (:meth:`OptimizerLearner.losses`), one
  rule step per iteration, one evaluation each.

Example:
    >>> import torch
    >>> from metaopt.datasets.li_malik_problems import LiMalikProblems
    >>> problems = [LiMalikProblems("logistic").sample(seed) for seed in range(3)]
    >>> losses, evals = run_iterations(BASELINES["L-BFGS"], problems[0], steps=5, lr=1.0)
    >>> losses.shape, bool(losses[-1] < losses[0]), evals >= 5      # f(θ_0), ..., f(θ_5)
    (torch.Size([6]), True, True)
    >>> tune(BASELINES["gradient descent"], problems, steps=5, grid=(1.0, 0.1))
    1.0
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.evaluation.conjugate_gradient import ConjugateGradient
from metaopt.evaluation.evaluate import confidence_interval
from metaopt.evaluation.tuned_baselines import GRID, LEARNED, baseline_table
from metaopt.problems.optimizees import Optimizee

__all__ = ["BASELINES", "compare_in_iterations", "plot_curves", "run_iterations", "tables", "tune"]

#: The optimizers of Li & Malik's comparison, and Adam (not in theirs), each built as ``factory(params, lr=lr)``.
BASELINES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "gradient descent": torch.optim.SGD,
    "momentum 0.9": functools.partial(torch.optim.SGD, momentum=0.9),
    "conjugate gradient": ConjugateGradient,
    "L-BFGS": functools.partial(torch.optim.LBFGS, line_search_fn="strong_wolfe", max_iter=1, max_eval=25),
    "Adam": torch.optim.Adam,
}


def run_iterations(factory: Callable[..., torch.optim.Optimizer], problem: Optimizee, steps: int,
                   lr: float) -> tuple[torch.Tensor, int]:
    """``f(θ_0), ..., f(θ_steps)`` of ``steps`` iterations ``opt.step(closure)`` of ``factory(params, lr=lr)``.

    Returns the objectives (``[steps + 1]``) and the evaluations of the objective and its gradient
    the optimizer asked for. A run whose objective stops being finite keeps that value to the end.
    """
    params = {name: p.detach().clone().requires_grad_() for name, p in problem.init_params().items()}
    opt = factory(list(params.values()), lr=lr)
    calls, t = 0, 0

    def closure() -> torch.Tensor:
        nonlocal calls
        calls += 1
        opt.zero_grad()
        loss = problem.loss(params, t)
        loss.backward()
        return loss

    losses = []
    for t in range(steps + 1):
        with torch.no_grad():
            losses.append(problem.loss(params, t).detach())
        if t == steps or not torch.isfinite(losses[-1]):
            break
        opt.step(closure)
    return torch.stack(losses + [losses[-1]] * (steps + 1 - len(losses))), calls


def tune(factory: Callable[..., torch.optim.Optimizer], problems: Sequence[Optimizee], steps: int,
         grid: Sequence[float] = GRID) -> float:
    """The learning rate of ``grid`` with the lowest mean objective at step ``steps`` over ``problems``.

    A rate that is not finite on some problem counts as the worst; ties go to the first in ``grid``.

    Raises:
        ValueError: no problems, or no rate of ``grid`` gives a finite mean.
    """
    if not problems:
        raise ValueError("tune needs at least one problem")
    scores = {lr: torch.stack([run_iterations(factory, p, steps, lr)[0][-1] for p in problems]).mean().item()
              for lr in grid}
    finite = {lr: score for lr, score in scores.items() if math.isfinite(score)}
    if not finite:
        raise ValueError(f"no learning rate of {tuple(grid)} gives a finite objective after {steps} iterations; "
                         "extend the grid to smaller rates")
    return min(finite, key=finite.__getitem__)


def _figures(curves: torch.Tensor, horizon: int) -> dict[str, float]:
    figures = {}
    for t in (horizon, 2 * horizon):
        figures.update({f"mean_f{t}": float(curves[:, t].mean()), f"ci95_f{t}": confidence_interval(curves[:, t]),
                        f"median_f{t}": float(curves[:, t].median())})
    return figures


def compare_in_iterations(learner: OptimizerLearner, problems: Sequence[Optimizee],
                          tune_problems: Sequence[Optimizee], horizon: int,
                          grid: Sequence[float] = GRID) -> dict[str, Any]:
    """The learned rule and the tuned :data:`BASELINES` on ``problems``, for ``2 · horizon`` iterations each.

    Returns ``{"results": {optimizer: {"lr", "evals_per_iteration", "mean_f{T}", "ci95_f{T}",
    "median_f{T}", ... at T and 2T}}, "mean_curves": {optimizer: [2T + 1 means]}}``, the shape
    :func:`metaopt.evaluation.tuned_baselines.baseline_table` reads.
    """
    steps = 2 * horizon
    curves = {LEARNED: torch.stack([learner.losses(p, steps).cpu() for p in problems])}
    results = {LEARNED: {"lr": None, "evals_per_iteration": 1.0, **_figures(curves[LEARNED], horizon)}}
    for name, factory in BASELINES.items():
        lr = tune(factory, tune_problems, horizon, grid)
        runs = [run_iterations(factory, p, steps, lr) for p in problems]
        curves[name] = torch.stack([losses for losses, _ in runs])
        results[name] = {"lr": lr, "evals_per_iteration": sum(calls for _, calls in runs) / (steps * len(runs)),
                         **_figures(curves[name], horizon)}
    return {"results": results, "mean_curves": {name: c.mean(0).tolist() for name, c in curves.items()}}


def tables(scored: Mapping[str, Mapping[str, Any]], horizon: int) -> str:
    """One Markdown table per family (mean ± 95% CI and median at T and 2T), then evaluations per iteration."""
    parts = [baseline_table(title, result, horizon) for title, result in scored.items()]
    names = list(next(iter(scored.values()))["results"])
    lines = ["**objective and gradient evaluations per iteration**", "",
             "| family | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for title, result in scored.items():
        lines.append(f"| {title} | " + " | ".join(f"{result['results'][n]['evals_per_iteration']:.2f}"
                                                  for n in names) + " |")
    return "\n\n".join([*parts, "\n".join(lines)]) + "\n"


def plot_curves(scored: Mapping[str, Mapping[str, Any]], out: str | Path, horizon: int) -> None:
    """One panel per family: the mean objective over the test problems against the iteration, log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * len(scored), 4), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (title, result) in zip(figure.subplots(1, len(scored), squeeze=False)[0], scored.items()):
        for name, curve in result["mean_curves"].items():
            axes.plot(curve, label=name, linewidth=2.5 if name == LEARNED else 1.2)
        axes.axvline(horizon, color="grey", linestyle=":", linewidth=1)
        axes.set_yscale("log")
        axes.set(title=title, xlabel="iteration", ylabel="mean objective over the test problems")
        axes.legend(fontsize=7)
    figure.savefig(out, dpi=100)
