"""A learned optimizer against tuned torch.optim baselines (metaopt/evaluation/tuned_baselines.py): running and
tuning the baselines, the comparison itself, and the evaluation of a tiny l2l-quadratics run end to end (and its
CLI)."""

from __future__ import annotations

import functools
import json
import statistics

import pytest
import torch

from metaopt.cli import main
from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates
from metaopt.evaluation.evaluate import confidence_interval
from metaopt.evaluation.tuned_baselines import (
    BASELINES,
    GRID,
    LEARNED,
    _summary,
    baseline_table,
    compare_with_baselines,
    run_optimizer,
    tune_learning_rate,
)
from metaopt.options import ConfigError
from metaopt.problems.optimizees import TUNING_OFFSET, Optimizee, optimizee_stream
from metaopt.training.config import load_preset
from metaopt.training.experiment import RunCompleteError, evaluate_run, train

KEYS = {"lr", "mean_f10", "ci95_f10", "median_f10", "mean_f20", "ci95_f20", "median_f20"}


class Parabola(Optimizee):
    """``f(θ) = θ²`` from θ_0 = 1: gradient descent with rate lr multiplies θ by ``1 - 2 lr`` per step."""

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"theta": torch.ones(1)}

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        del step
        return params["theta"].square().sum()


def test_run_optimizer_records_the_loss_before_every_step_and_after_the_last() -> None:
    losses = run_optimizer(functools.partial(torch.optim.SGD, lr=0.1), Parabola(), steps=3)
    torch.testing.assert_close(losses, torch.tensor([0.8**(2 * t) for t in range(4)]))  # θ_t = 0.8^t
    problem = Parabola()
    run_optimizer(functools.partial(torch.optim.Adam, lr=0.1), problem, steps=2)
    assert torch.equal(problem.init_params()["theta"], torch.ones(1))  # the run works on copies


def test_tune_learning_rate_picks_the_best_rate_and_ranks_divergence_last() -> None:
    # |1 - 2 lr| per step: 0.4 at lr 0.3 (best of the grid), 1 at lr 1, 5 at lr 3 (overflows to inf/NaN in 60 steps)
    assert run_optimizer(functools.partial(torch.optim.SGD, lr=3.0), Parabola(), 60)[-1].isnan()
    assert tune_learning_rate(torch.optim.SGD, [Parabola()], steps=60, grid=GRID) == 0.3
    assert tune_learning_rate(torch.optim.SGD, [Parabola()], steps=60, grid=(3.0, 0.01)) == 0.01
    assert tune_learning_rate(torch.optim.SGD, [Parabola()], steps=60, grid=(1.0, 0.1), criterion="sum") == 0.1
    with pytest.raises(ValueError, match="no learning rate of"):
        tune_learning_rate(torch.optim.SGD, [Parabola()], steps=60, grid=(3.0,))
    with pytest.raises(ValueError, match="unknown criterion"):
        tune_learning_rate(torch.optim.SGD, [Parabola()], steps=60, grid=GRID, criterion="best")
    with pytest.raises(ValueError, match="needs at least one problem"):
        tune_learning_rate(torch.optim.SGD, [], steps=60, grid=GRID)


def test_summary_reports_mean_interval_and_median_at_the_horizon_and_twice_it() -> None:
    finals = [0.5, 1.0, 2.0, 4.0]
    runs = torch.zeros(4, 5)
    runs[:, 2] = torch.tensor(finals)
    runs[:, 4] = torch.tensor(finals) / 2
    summary = _summary(runs, horizon=2)
    assert summary["mean_f2"] == pytest.approx(statistics.mean(finals))
    assert summary["ci95_f2"] == pytest.approx(1.96 * statistics.stdev(finals) / 2)
    assert summary["median_f2"] == 1.0  # torch's median: the lower of the two middle values
    assert summary["mean_f4"] == pytest.approx(statistics.mean(finals) / 2)


def test_the_baselines_tune_on_validation_problems_and_run_twice_the_horizon(tmp_path) -> None:
    learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.02)}, per_step=False), horizon=5)
    family, other = Quadratics(dim=3, batch=2), Quadratics(dim=3, batch=2, convention="uniform")
    families = {title: (optimizee_stream(f, "test", 0), optimizee_stream(f, "val", 0))
                for title, f in (("gaussian", family), ("uniform", other))}
    grid = (0.3, 0.1, 0.03)
    chart = tmp_path / "baselines.png"
    compared = compare_with_baselines(learner, families, problems=2, steps=None, chart=chart, tune_problems=2,
                                      grid=grid)
    assert list(compared["scored"]) == ["gaussian", "uniform"] and chart.stat().st_size > 0
    for title, (test, val) in families.items():
        scored = compared["scored"][title]
        assert list(scored["results"]) == [LEARNED, *BASELINES]
        problems = [test.batch(i) for i in range(2)]
        learned = torch.stack([learner.losses(p, 10) for p in problems])
        assert scored["results"][LEARNED] == pytest.approx({"lr": None, **_summary(learned, 5)})
        assert scored["mean_curves"][LEARNED] == pytest.approx(learned.mean(0).tolist())
        tune = [val.batch(TUNING_OFFSET + i) for i in range(2)]  # apart from the validation problems
        for name, factory in BASELINES.items():
            lr = tune_learning_rate(factory, tune, 5, grid)
            runs = torch.stack([run_optimizer(functools.partial(factory, lr=lr), p, 10) for p in problems])
            assert scored["results"][name] == pytest.approx({"lr": lr, **_summary(runs, 5)}), name
            assert scored["mean_curves"][name] == pytest.approx(runs.mean(0).tolist())
        assert baseline_table(title, scored, 5) in compared["table"]
    assert compared["table"].startswith("2 test problems, 5-step horizon; baselines' learning rates tuned over "
                                        "(0.3, 0.1, 0.03) on 2 validation problems (final loss at step 5).")
    assert compared["table"].count("\n| ") == 2 * (3 + len(BASELINES))


def test_the_table_reports_tuned_rates_means_intervals_and_medians() -> None:
    runs = torch.tensor([[4.0, 2.0, 1.0], [4.0, 1.0, 0.5]])
    scored = {"results": {LEARNED: {"lr": None, **_summary(runs, 1)}, "Adam": {"lr": 0.1, **_summary(runs * 2, 1)}}}
    lines = baseline_table("quadratics", scored, horizon=1).splitlines()
    assert lines[:4] == ["**quadratics**", "",
                         "| optimizer | tuned lr | mean f1 (95% CI) | median f1 | mean f2 (95% CI) | median f2 |",
                         "| --- | ---: | ---: | ---: | ---: | ---: |"]
    ci = confidence_interval(torch.tensor([2.0, 1.0]))
    assert lines[4] == f"| {LEARNED} | - | 1.5 ± {ci:.2g} | 1 | 0.75 ± {ci / 2:.2g} | 0.5 |"
    assert lines[5].startswith("| Adam | 0.1 | 3 ± ")


def tiny_quadratics():
    return load_preset("l2l-quadratics").replace(
        trainer={"iterations": 4, "eval_every": 2, "eval_episodes": 1, "test_episodes": 3, "checkpoint_every": 2,
                 "log_every": 1},
        algorithm={"horizon": 10, "truncation": 5, "lstm_units": 8}, data={"batch": 8}, baselines={"tune_problems": 1},
        device="cpu")


def test_a_run_is_scored_against_the_baselines_and_writes_its_table_curves_and_results(tmp_path) -> None:
    """Two training problems of 10 steps in truncations of 5; baselines tuned on one validation problem."""
    final = train(tiny_quadratics(), tmp_path)
    saved = json.loads((tmp_path / "final.json").read_text())
    assert saved["baselines"] == json.loads(json.dumps(final["baselines"]))
    scored = saved["baselines"]["scored"]["quadratics"]["results"]
    assert list(scored) == [LEARNED, *BASELINES]
    assert all(scored[name]["lr"] in GRID for name in BASELINES) and scored[LEARNED]["lr"] is None
    assert all(set(r) == KEYS for r in scored.values())
    assert all(0 < r["ci95_f10"] < float("inf") for r in scored.values())
    assert (tmp_path / "baselines.png").stat().st_size > 0 and (tmp_path / "best.pt").exists()
    markdown = final["baselines"]["table"]
    assert markdown.count("\n| ") == 3 + len(BASELINES)  # header, rule, the learned optimizer and the baselines
    assert markdown.startswith("3 test problems, 10-step horizon")
    assert final["summary"].startswith("loss ") and "episodes=3" in final["summary"]
    written = (tmp_path / "final.json").read_text()
    with pytest.raises(RunCompleteError, match="is complete \\(iteration 4 of 4\\); final.json is left as it was"):
        train(tiny_quadratics(), tmp_path, resume=True)  # nothing left to train
    assert (tmp_path / "final.json").read_text() == written
    record = evaluate_run(tmp_path, episodes=2)
    assert record["baselines"]["table"].startswith("2 test problems, 10-step horizon")
    assert json.loads((tmp_path / "eval.json").read_text())["baselines"]["table"] == record["baselines"]["table"]


def test_cli_train_prints_the_baseline_table(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    tiny = ["--iterations", "10", "--test-episodes", "3", "--eval-episodes", "1", "--eval-every", "5",
            "--horizon", "10", "--truncation", "5", "--batch", "8", "--lstm-units", "8", "--device", "cpu"]
    assert main(["train", "--preset", "l2l-quadratics", *tiny, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    final = json.loads((run / "final.json").read_text())
    assert "baselines" in final and final["baselines"]["table"] in out
    assert "| Adam |" in out and f"| {LEARNED} | - |" in out
    assert list(final["baselines"]["scored"]["quadratics"]["results"]) == [LEARNED, *BASELINES]


def test_unknown_preset_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'l2l-cifar'"):
        load_preset("l2l-cifar")
    assert main(["train", "--preset", "l2l-cifar"]) == 2
    assert "unknown preset 'l2l-cifar'" in capsys.readouterr().err
    assert main(["optbench", "--preset", "l2l-quadratics"]) == 2  # the old command points to the new ones
    assert "metaopt train --preset l2l-quadratics" in capsys.readouterr().err
