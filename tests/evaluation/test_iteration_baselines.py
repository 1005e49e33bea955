"""Classical optimizers counted in iterations (metaopt/evaluation/iteration_baselines.py): runs, evaluations, the
L-BFGS line-search budget, tuning, and the comparison's tables and chart."""

from __future__ import annotations

import functools

import torch

from metaopt.algorithms.li_malik import LiMalikRule
from metaopt.datasets.li_malik_problems import LiMalikProblems
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.evaluation.iteration_baselines import BASELINES, compare_in_iterations, plot_curves, run_iterations, tables
from metaopt.evaluation.iteration_baselines import tune as tune_lr
from metaopt.evaluation.tuned_baselines import LEARNED


def test_a_run_records_every_iterate_and_counts_evaluations() -> None:
    problem = LiMalikProblems("logistic").sample(0)
    losses, calls = run_iterations(BASELINES["gradient descent"], problem, steps=6, lr=0.5)
    assert losses.shape == (7,) and losses[0] == problem.loss(problem.init_params(), 0) and calls == 6
    params = {k: v.clone().requires_grad_() for k, v in problem.init_params().items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.5)
    for _ in range(6):
        opt.zero_grad()
        problem.loss(params, 0).backward()
        opt.step()
    assert losses[-1] == problem.loss(params, 0)  # the plain torch loop's result
    _, calls = run_iterations(BASELINES["conjugate gradient"], problem, steps=6, lr=0.5)
    assert calls > 6  # its line search evaluates more than once per iteration


def test_lbfgs_gets_a_line_search_budget_without_which_it_stalls() -> None:
    """With max_iter=1, torch's default max_eval (1) leaves the strong-Wolfe search nothing: on this problem the
    first step is refused and L-BFGS never moves again; with max_eval=25 it converges."""
    problem = LiMalikProblems("logistic").sample(2 * 10**9 + 14)
    stalled = functools.partial(torch.optim.LBFGS, line_search_fn="strong_wolfe", max_iter=1)
    losses, _ = run_iterations(stalled, problem, steps=30, lr=0.3)
    assert torch.equal(losses[2], losses[-1]) and losses[-1] > 3
    losses, calls = run_iterations(BASELINES["L-BFGS"], problem, steps=30, lr=0.3)
    assert losses[-1] < 0.1 * losses[0] and calls > 30


def test_tuning_picks_the_best_finite_rate() -> None:
    problems = [LiMalikProblems("two-layer-net").sample(seed) for seed in range(3)]
    diverging, _ = run_iterations(BASELINES["gradient descent"], problems[0], steps=20, lr=1e4)
    assert not torch.isfinite(diverging[-1]) or diverging[-1] > diverging[0]
    scores = {lr: torch.stack([run_iterations(BASELINES["momentum 0.9"], p, 10, lr)[0][-1] for p in problems]).mean()
              for lr in (1e4, 0.1, 0.01)}
    assert tune_lr(BASELINES["momentum 0.9"], problems, steps=10, grid=(1e4, 0.1, 0.01)) == min(
        (lr for lr in scores if torch.isfinite(scores[lr])), key=lambda lr: scores[lr])


def test_the_comparison_runs_everything_twice_the_horizon_and_reports_it(tmp_path) -> None:
    learner = OptimizerLearner(LiMalikRule(), horizon=3)
    family = LiMalikProblems("robust-linear")
    scored = compare_in_iterations(learner, [family.sample(i) for i in range(2)], [family.sample(10 + i)
                                                                                    for i in range(2)],
                                   horizon=3, grid=(1.0, 0.1))
    assert list(scored["results"]) == [LEARNED, *BASELINES]
    assert all(len(curve) == 7 for curve in scored["mean_curves"].values())
    learned = scored["results"][LEARNED]
    assert learned["lr"] is None and learned["evals_per_iteration"] == 1.0
    assert set(learned) >= {"mean_f3", "median_f3", "ci95_f3", "mean_f6", "median_f6"}
    assert scored["results"]["L-BFGS"]["lr"] in (1.0, 0.1)
    text = tables({"robust-linear": scored}, horizon=3)
    assert "**robust-linear**" in text and "mean f6 (95% CI)" in text and "evaluations per iteration" in text
    plot_curves({"robust-linear": scored}, tmp_path / "curves.png", horizon=3)
    assert (tmp_path / "curves.png").stat().st_size > 0
