"""Tests of metaopt/evaluation/compare.py and ``metaopt compare``: the table, the chart, and incomplete run
directories."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from metaopt.cli import main
from metaopt.evaluation.compare import RESULT_FILES, RunDirError, load_run, markdown_table, plot_runs
from metaopt.training.config import RunConfig, load_preset
from metaopt.training.experiment import default_run_dir, train
from metaopt.training.logging import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two tiny sinusoid runs, MAML 5-shot and first-order MAML 10-shot, named as `metaopt train` names them."""
    root = tmp_path_factory.mktemp("runs")
    tiny = load_preset("maml-sinusoid-5shot").replace(
        trainer={"iterations": 6, "eval_every": 3, "eval_episodes": 20, "log_every": 2, "checkpoint_every": 3},
        model={"hidden": [8]}, data={"meta_batch": 4, "shots": 5})
    made = []
    for config in (tiny, tiny.replace(algorithm={"first_order": True}, data={"shots": 10})):
        made.append(default_run_dir(config, root))
        train(config, made[-1])
    return made


def _rows(table: str) -> list[list[str]]:
    return [line.strip("| ").split(" | ") for line in table.splitlines()]


def test_table_has_one_row_per_run_with_config_result_time_and_throughput(runs):
    header, separator, *rows = _rows(markdown_table([load_run(run) for run in runs]))
    assert header == ["run", "algorithm", "dataset", "ways", "shots", "result (95% CI; protocol)", "evaluated",
                      "train time", "tasks/s", "iterations"]
    assert separator == ["---"] * 3 + ["---:"] * 2 + ["---"] * 2 + ["---:"] * 3  # numbers right-aligned
    assert len(rows) == 2
    for row, run, algorithm, shots in zip(rows, runs, ("maml", "maml, first-order"), ("5", "10")):
        final = json.loads((run / "final.json").read_text())
        records = read_metrics(run / "metrics.jsonl")
        rates = [r["time/tasks_per_s"] for r in records if "time/tasks_per_s" in r]
        assert len(rates) == 3  # logged at iterations 2, 4, 6
        assert row == [run.name, algorithm, "sinusoid", "-", shots, final["summary"],
                       f"final.json: test, best.pt (iteration {final['checkpoint_iteration']})",
                       f"0:00:{final['train']['time']['train_s']:04.1f}", f"{sum(rates) / 3:.0f}", "6"]
        assert f"shots={shots}, query=10, inner_steps=1, episodes=20" in row[5] and "mse" in row[5]
    assert rows[0][0].startswith("maml-sinusoid-5shot-") and rows[1][0].startswith("fomaml-sinusoid-10shot-")
    assert isinstance(load_run(runs[1]).config, RunConfig) and load_run(runs[1]).config.algorithm.options.first_order


def test_chart_is_a_png_of_every_run_curves(runs, tmp_path):
    loaded = [load_run(run) for run in runs]
    out = tmp_path / "charts" / "compare.png"
    figure = plot_runs(loaded, out)
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 20_000
    assert struct.unpack(">II", data[16:24]) == (1500, 450)  # 15 x 4.5 inches at 100 dpi
    by_iteration, by_time, by_loss = figure.axes
    assert by_iteration.get_ylabel() == "val/mse" and by_time.get_xlabel() == "training time (min)"
    assert [t.get_text() for t in by_iteration.get_legend().get_texts()] == [run.name for run in runs]
    for i, run in enumerate(loaded):
        val = [r for r in run.records if "val/mse" in r]
        assert list(by_iteration.lines[i].get_xdata()) == [3, 6]
        assert list(by_iteration.lines[i].get_ydata()) == [r["val/mse"] for r in val]
        assert list(by_time.lines[i].get_xdata()) == [r["time/train_s"] / 60 for r in val]
        assert list(by_loss.lines[i].get_xdata()) == [2, 4, 6]


def test_the_time_axis_can_be_cpu_time(runs, tmp_path):
    loaded = [load_run(run) for run in runs]
    _, by_time, _ = plot_runs(loaded, tmp_path / "cpu.png", clock="cpu").axes
    assert by_time.get_xlabel() == "training CPU time (min)"
    for i, run in enumerate(loaded):
        val = [r for r in run.records if "val/mse" in r]
        assert list(by_time.lines[i].get_xdata()) == [r["time/train_cpu_s"] / 60 for r in val]
    with pytest.raises(ValueError, match="clock must be 'wall' or 'cpu'"):
        plot_runs(loaded, tmp_path / "x.png", clock="gpu")


def test_cli_prints_the_table_and_writes_the_chart(runs, tmp_path, capsys):
    out = tmp_path / "compare.png"
    assert main(["compare", *map(str, runs), "--out", str(out), "--metric", "val/mse"]) == 0
    printed = capsys.readouterr().out
    assert printed == markdown_table([load_run(run) for run in runs]) + f"\nchart written to {out}\n"
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_the_result_falls_back_to_eval_json(runs, tmp_path):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    (run / "final.json").unlink()
    assert main(["eval", "--run", str(run), "--checkpoint", "last", "--split", "val", "--episodes", "10"]) == 0
    loaded = load_run(run)
    assert loaded.evaluation_file == "eval.json"
    row = _rows(markdown_table([loaded]))[2]
    assert row[5] == json.loads((run / "eval.json").read_text())["summary"] and "episodes=10" in row[5]
    assert row[6] == "eval.json: val, last.pt (iteration 6)"


def test_a_later_evaluation_replaces_the_final_result(runs, tmp_path):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    assert load_run(run).evaluation_file == "final.json"
    assert main(["eval", "--run", str(run), "--episodes", "12"]) == 0
    loaded = load_run(run)
    assert loaded.evaluation_file == "eval.json" and "episodes=12" in loaded.evaluation["summary"]
    os.utime(run / "eval.json", ns=(1, 1))  # an evaluation older than the final result loses
    assert load_run(run).evaluation_file == "final.json"


@pytest.mark.parametrize(("removed", "message"), [
    (["config.json"], "config.json is missing"),
    (["final.json"], "neither final.json nor eval.json exists .*metaopt train --resume .*metaopt eval --run"),
    (["metrics.jsonl"], "metrics.jsonl is missing"),
])
def test_a_missing_file_names_the_run_and_the_file(runs, tmp_path, capsys, removed, message):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    for name in removed:
        (run / name).unlink()
    with pytest.raises(RunDirError, match=f"^run {run}: {message}"):
        load_run(run)
    assert main(["compare", str(runs[1]), str(run), "--out", str(tmp_path / "c.png")]) == 1
    assert f"metaopt compare: error: run {run}: " in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_incomplete_files_name_the_run_the_file_and_the_entry(runs, tmp_path):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "algorithm"}))
    with pytest.raises(RunDirError, match=f"^run {run}: .*config.json: the config has no 'algorithm' section"):
        load_run(run)
    (run / "config.json").write_text(json.dumps({**config, "algorithm": {**config["algorithm"], "inner_lrr": 1}}))
    with pytest.raises(RunDirError, match=f"^run {run}: .*config.json: 'inner_lrr' .*is not an option of algorithm"):
        load_run(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match=f"^run {run}: cannot read config file .*config.json"):
        load_run(run)
    (run / "config.json").write_text(json.dumps(config))
    (run / "final.json").write_text("[1]")
    with pytest.raises(RunDirError, match=f"^run {run}: final.json must hold a JSON object, got list"):
        load_run(run)
    (run / "final.json").write_text('{"summary": "mse 1"}')
    with pytest.raises(RunDirError, match=f"^run {run}: final.json lacks \\['split', 'checkpoint', "
                                          "'checkpoint_iteration'\\]"):
        load_run(run)
    (run / "final.json").write_text("{torn")
    with pytest.raises(RunDirError, match=f"^run {run}: final.json is not valid JSON"):
        load_run(run)
    assert RESULT_FILES == ("final.json", "eval.json")
    with pytest.raises(RunDirError, match="run .*elsewhere: no such directory"):
        load_run(tmp_path / "elsewhere")


def test_a_metric_that_a_run_did_not_log_is_refused(runs, tmp_path):
    out = tmp_path / "compare.png"
    with pytest.raises(RunDirError, match="holds no 'val/accuracy' \\(its validation figures: \\['val/mse'\\]\\)"):
        plot_runs([load_run(run) for run in runs], out, metric="val/accuracy")
    assert not out.exists()
