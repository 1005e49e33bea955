"""A learned optimizer against tuned baselines on held-out problems (Andrychowicz et al. 2016, §3).

The baselines are SGD, SGD with momentum 0.9, NAG, RMSprop and Adam (torch's other defaults).
Each tunes its learning rate over a grid reaching 3 on validation problems (the final loss at the
horizon), never on the test problems; then every optimizer runs on the test problems for twice
the training horizon, and the table reports the mean (with a 95% confidence interval over the
problems) and the median loss at the horizon and at twice it. This is the evaluation of every
learned-optimizer run (``metaopt train --preset l2l-quadratics``, ``metaopt eval --run DIR``).

Example:
    >>> import functools, torch
    >>> from metaopt.datasets import Quadratics
    >>> problems = [Quadratics(batch=1).sample(seed) for seed in range(3)]
    >>> lr = tune_learning_rate(torch.optim.SGD, problems, steps=10, grid=(0.1, 0.01))
    >>> run_optimizer(functools.partial(torch.optim.SGD, lr=lr), problems[0], steps=10).shape  # f(θ_0..θ_10)
    torch.Size([11])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from metaopt.engine.functional import Params
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.evaluation.evaluate import confidence_interval
from metaopt.problems.optimizees import TUNING_OFFSET, Optimizee
from metaopt.training.logging import note

__all__ = ["BASELINES", "CRITERIA", "GRID", "LEARNED", "baseline_table", "compare_with_baselines", "run_optimizer",
           "tune_learning_rate"]

BASELINES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": torch.optim.SGD,
    "SGD momentum 0.9": functools.partial(torch.optim.SGD, momentum=0.9),
    "NAG": functools.partial(torch.optim.SGD, momentum=0.9, nesterov=True),
    "RMSprop": torch.optim.RMSprop,
    "Adam": torch.optim.Adam,
}
LEARNED = "learned optimizer"  # the row of the trained rule
#: The learning rates every baseline is tuned over (quadratics need rates of 1 and more).
GRID = (3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
CRITERIA = ("final", "sum")


def run_optimizer(factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer], problem: Optimizee,
                  steps: int, checkpoints: Sequence[int] = ()) -> torch.Tensor | tuple[torch.Tensor, list[Params]]:
    """The losses ``f(θ_0, 0), ..., f(θ_steps, steps)`` (``[steps + 1]``) of a ``torch.optim`` optimizer on ``problem``.

    Args:
        factory: builds the optimizer, e.g. ``functools.partial(torch.optim.Adam, lr=0.1)``; it runs
            the plain ``zero_grad / backward / step`` loop on leaf copies of ``problem.init_params()``.
        problem: the optimizee.
        steps: optimizer steps.
        checkpoints: steps ``t`` whose parameters θ_t to return too (detached copies), e.g. to score
            them on held-out data; then the result is ``(losses, [θ_t for t in checkpoints])``.
    """
    if any(not 0 <= t <= steps for t in checkpoints):
        raise ValueError(f"checkpoints must be steps in [0, {steps}], got {tuple(checkpoints)}")
    kept: dict[int, Params] = {}
    losses = []
    with torch.enable_grad():
        params = {name: p.detach().clone().requires_grad_() for name, p in problem.init_params().items()}
        opt = factory(list(params.values()))
        for t in range(steps):
            if t in checkpoints:
                kept[t] = {name: p.detach().clone() for name, p in params.items()}
            opt.zero_grad()
            loss = problem.loss(params, t)
            losses.append(loss.detach())
            loss.backward()
            opt.step()
    with torch.no_grad():
        losses.append(problem.loss(params, steps))
    if not checkpoints:
        return torch.stack(losses)
    kept[steps] = {name: p.detach().clone() for name, p in params.items()}
    return torch.stack(losses), [kept[t] for t in checkpoints]


def tune_learning_rate(factory: Callable[..., torch.optim.Optimizer], problems: Sequence[Optimizee], steps: int,
                       grid: Sequence[float], criterion: str = "final") -> float:
    """The learning rate of ``grid`` with which ``factory`` does best on ``problems``.

    The paper tunes every baseline's learning rate per problem family (Andrychowicz et al. 2016,
    §3); tune on validation problems, never on the test problems. A learning rate whose score is
    not finite on some problem counts as the worst; ties go to the first in ``grid``.

    Args:
        factory: builds the optimizer as ``factory(params, lr=lr)``, e.g. ``torch.optim.Adam``.
        problems: the problems to tune on.
        steps: optimizer steps per problem.
        grid: candidate learning rates.
        criterion: ``"final"``: mean over the problems of ``f(θ_steps)``; ``"sum"``: mean of
            ``f(θ_1) + ... + f(θ_steps)`` (the meta-training objective).

    Raises:
        ValueError: an unknown criterion, no problems, or no learning rate of ``grid`` gives a finite score.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {CRITERIA}")
    if not problems:
        raise ValueError("tune_learning_rate needs at least one problem")
    best_lr, best_score = None, math.inf
    for lr in grid:
        runs = torch.stack([run_optimizer(functools.partial(factory, lr=lr), problem, steps) for problem in problems])
        score = (runs[:, -1] if criterion == "final" else runs[:, 1:].sum(dim=1)).mean().item()
        if math.isfinite(score) and score < best_score:
            best_lr, best_score = lr, score
    if best_lr is None:
        raise ValueError(f"no learning rate of {tuple(grid)} gives a finite {criterion!r} score over {steps} steps; "
                         "extend the grid to smaller rates")
    return best_lr


def _summary(runs: torch.Tensor, horizon: int) -> dict[str, float]:
    """Mean (with its 95% interval), median over problems of the loss after ``horizon`` and ``2 · horizon`` steps."""
    summary = {}
    for t in (horizon, 2 * horizon):
        final = runs[:, t]
        summary.update({f"mean_f{t}": float(final.mean()), f"ci95_f{t}": confidence_interval(final),
                        f"median_f{t}": float(final.median())})
    return summary


def _score(learner: OptimizerLearner, problems: Sequence[Optimizee], tune_problems: Sequence[Optimizee],
           horizon: int, grid: Sequence[float]) -> dict[str, Any]:
    """Tune the baselines on ``tune_problems``, then run everything on ``problems`` for twice the horizon."""
    curves = {LEARNED: torch.stack([learner.losses(p, 2 * horizon).cpu() for p in problems])}
    results: dict[str, Any] = {LEARNED: {"lr": None, **_summary(curves[LEARNED], horizon)}}
    for name, factory in BASELINES.items():
        lr = tune_learning_rate(factory, tune_problems, horizon, grid)
        curves[name] = torch.stack([run_optimizer(functools.partial(factory, lr=lr), p, 2 * horizon).cpu()
                                    for p in problems])
        results[name] = {"lr": lr, **_summary(curves[name], horizon)}
    return {"results": results, "mean_curves": {k: v.mean(0).tolist() for k, v in curves.items()}}


def baseline_table(title: str, scored: Mapping[str, Any], horizon: int) -> str:
    """The Markdown table of one scored family: tuned lr, mean ± 95% CI and median at the horizon and twice it."""
    late = 2 * horizon
    lines = [f"**{title}**", "", f"| optimizer | tuned lr | mean f{horizon} (95% CI) | median f{horizon} | "
             f"mean f{late} (95% CI) | median f{late} |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in scored["results"].items():
        cells = [f"{r[f'mean_f{t}']:.4g} ± {r[f'ci95_f{t}']:.2g} | {r[f'median_f{t}']:.4g}" for t in (horizon, late)]
        lines.append(f"| {name} | {r['lr'] if r['lr'] is not None else '-'} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _plot(scored: Mapping[str, Mapping[str, Any]], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(scored), 4))
    FigureCanvasAgg(figure)
    for i, (title, result) in enumerate(scored.items()):
        axes = figure.add_subplot(1, len(scored), i + 1)
        for name, curve in result["mean_curves"].items():
            axes.plot(curve, label=name, linewidth=2.5 if name == LEARNED else 1.2)
        axes.set_yscale("log")
        axes.set(title=title, xlabel="optimizer step", ylabel="mean loss over test problems")
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out)


def compare_with_baselines(learner: OptimizerLearner, families: Mapping[str, tuple[Any, Any]], problems: int,
                           steps: int | None, chart: str | Path | None = None, tune_problems: int = 4,
                           grid: Sequence[float] = GRID) -> dict[str, Any]:
    """Score ``learner``'s rule against the tuned baselines on each family.

    Args:
        learner: the trained learned optimizer.
        families: by title, the test problem source and the validation source (baselines tune on its
            problems from index :data:`metaopt.problems.optimizees.TUNING_OFFSET`, apart from the
            validation problems).
        problems: test problems per family (the first of the test stream).
        steps: the horizon (default: the learner's); runs last twice as long.
        chart: PNG to draw the mean loss curves to (``None``: none).
        tune_problems: validation problems each baseline is tuned on.
        grid: learning rates each baseline tries.

    Returns:
        ``{"scored": {title: {"results": {optimizer: figures}, "mean_curves": ...}}, "table": markdown}``.
    """
    horizon = learner.horizon if steps is None else steps
    device = learner.device
    scored = {}
    for title, (test, val) in families.items():
        note(f"{title}: tuning {len(BASELINES)} baselines over {len(grid)} learning rates on {tune_problems} "
             f"validation problems, then {len(BASELINES) + 1} optimizers on {problems} test problems of "
             f"{2 * horizon} steps")
        scored[title] = _score(learner, [test.batch(i).to(device) for i in range(problems)],
                               [val.batch(TUNING_OFFSET + i).to(device) for i in range(tune_problems)], horizon, grid)
    header = (f"{problems} test problems, {horizon}-step horizon; baselines' learning rates tuned over {tuple(grid)} "
              f"on {tune_problems} validation problems (final loss at step {horizon}).")
    table = header + "\n\n" + "\n\n".join(baseline_table(title, result, horizon) for title, result in scored.items())
    if chart is not None:
        _plot(scored, Path(chart))
    return {"scored": scored, "table": table + "\n"}
