"""The learned-optimizer benchmark end to end on a tiny quadratics run, and its CLI."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from metaopt.cli import main
from metaopt.learned_training import GRID
from metaopt.optimizer_benchmark import BASELINES, OPTIMIZER_PRESETS, _summary, run_optimizer_benchmark


@pytest.fixture
def tiny_quadratics(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = OPTIMIZER_PRESETS["l2l-quadratics"]
    monkeypatch.setitem(OPTIMIZER_PRESETS, "l2l-quadratics", {
        **spec, "train": {**spec["train"], "steps": 10, "unroll": 5, "eval_every": 1, "val_problems": 1},
        "tune_problems": 1})


def test_benchmark_writes_its_table_curves_and_results(tmp_path, tiny_quadratics) -> None:
    markdown = run_optimizer_benchmark("l2l-quadratics", tmp_path, epochs=2, test_problems=3)
    results = json.loads((tmp_path / "results.json").read_text())
    scored = results["scored"]["l2l-quadratics"]["results"]
    assert list(scored) == ["LSTM (learned)", *BASELINES]
    assert all(scored[name]["lr"] in GRID for name in BASELINES)
    keys = {"lr", "mean_f10", "ci95_f10", "median_f10", "mean_f20", "ci95_f20", "median_f20"}
    assert all(set(r) == keys for r in scored.values())
    assert all(0 < r["ci95_f10"] < float("inf") for r in scored.values())
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "train" / "best.pt").exists()
    assert markdown.count("\n| ") == 3 + len(BASELINES)  # header, rule, the LSTM and the baselines
    again = run_optimizer_benchmark("l2l-quadratics", tmp_path, epochs=2, test_problems=3)  # resumes, same result
    assert again == markdown


def test_cli_runs_the_benchmark(tmp_path, tiny_quadratics, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["optbench", "--preset", "l2l-quadratics", "--out", str(tmp_path), "--epochs", "1",
                 "--test-problems", "2"]) == 0
    assert "| Adam |" in capsys.readouterr().out


def test_unknown_preset_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown optimizer preset 'l2l-cifar'"):
        run_optimizer_benchmark("l2l-cifar", tmp_path)


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
