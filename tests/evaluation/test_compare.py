"""Tests of metaopt/evaluation/compare.py and ``metaopt compare``: the table, the chart, the throughput, and
incomplete or unfinished run directories."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from metaopt.cli import main
from metaopt.evaluation.compare import (
    RESULT_FILES,
    RunDirError,
    UnfinishedRunError,
    UnfinishedRunWarning,
    markdown_table,
    plot_runs,
    read_run,
    read_runs,
    tasks_per_update,
)
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
    header, separator, *rows = _rows(markdown_table([read_run(run) for run in runs]))
    assert header == ["run", "algorithm", "dataset", "ways", "shots", "result (95% CI; protocol)", "evaluated",
                      "train time", "tasks/s", "iterations"]
    assert separator == ["---"] * 3 + ["---:"] * 2 + ["---"] * 2 + ["---:"] * 3  # numbers right-aligned
    assert len(rows) == 2
    for row, run, algorithm, shots in zip(rows, runs, ("maml", "maml, first-order"), ("5", "10")):
        final = json.loads((run / "final.json").read_text())
        records = read_metrics(run / "metrics.jsonl")
        rates = [r["time/tasks_per_s"] for r in records if "time/tasks_per_s" in r]
        assert len(rates) == 3  # logged at iterations 2, 4, 6
        train_s = final["train"]["time"]["train_s"]
        assert row == [run.name, algorithm, "sinusoid", "-", shots, final["summary"],
                       f"final.json: test, best.pt (iteration {final['checkpoint_iteration']})",
                       f"0:00:{train_s:04.1f}", f"{4 * 6 / train_s:.0f}", "6"]  # meta_batch 4 x 6 meta-updates
        assert f"shots={shots}, query=10, inner_steps=1, episodes=20" in row[5] and "mse" in row[5]
    assert rows[0][0].startswith("maml-sinusoid-5shot-") and rows[1][0].startswith("fomaml-sinusoid-10shot-")
    assert isinstance(read_run(runs[1]).config, RunConfig) and read_run(runs[1]).config.algorithm.options.first_order


def test_chart_is_a_png_of_every_run_curves(runs, tmp_path):
    loaded = [read_run(run) for run in runs]
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
    loaded = [read_run(run) for run in runs]
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
    assert printed == markdown_table([read_run(run) for run in runs]) + f"\nchart written to {out}\n"
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_the_result_falls_back_to_eval_json(runs, tmp_path):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    (run / "final.json").unlink()
    assert main(["eval", "--run", str(run), "--checkpoint", "last", "--split", "val", "--episodes", "10"]) == 0
    loaded = read_run(run)
    assert loaded.evaluation_file == "eval.json"
    row = _rows(markdown_table([loaded]))[2]
    assert row[5] == json.loads((run / "eval.json").read_text())["summary"] and "episodes=10" in row[5]
    assert row[6] == "eval.json: val, last.pt (iteration 6)"


def test_a_later_evaluation_replaces_the_final_result(runs, tmp_path):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    assert read_run(run).evaluation_file == "final.json"
    assert main(["eval", "--run", str(run), "--episodes", "12"]) == 0
    loaded = read_run(run)
    assert loaded.evaluation_file == "eval.json" and "episodes=12" in loaded.evaluation["summary"]
    os.utime(run / "eval.json", ns=(1, 1))  # an evaluation older than the final result loses
    assert read_run(run).evaluation_file == "final.json"


@pytest.mark.parametrize(("removed", "message"), [
    (["config.json"], "config.json is missing"),
    (["final.json"], "neither final.json nor eval.json exists .*metaopt train --resume .*metaopt eval --run"),
    (["metrics.jsonl"], "metrics.jsonl is missing"),
])
def test_a_missing_file_names_the_run_and_the_file(runs, tmp_path, capsys, removed, message):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    for name in removed:
        (run / name).unlink()
    with pytest.raises(RunDirError, match=f"^run {run}: {message}") as raised:
        read_run(run)
    unfinished = removed == ["final.json"]
    assert isinstance(raised.value, UnfinishedRunError) == unfinished
    if unfinished:  # no error for `metaopt compare` when another run is left: see the tests of unfinished runs
        return
    assert main(["compare", str(runs[1]), str(run), "--out", str(tmp_path / "c.png")]) == 1
    assert f"metaopt compare: error: run {run}: " in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_incomplete_files_name_the_run_the_file_and_the_entry(runs, tmp_path):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "algorithm"}))
    with pytest.raises(RunDirError, match=f"^run {run}: .*config.json: the config has no 'algorithm' section"):
        read_run(run)
    (run / "config.json").write_text(json.dumps({**config, "algorithm": {**config["algorithm"], "inner_lrr": 1}}))
    with pytest.raises(RunDirError, match=f"^run {run}: .*config.json: 'inner_lrr' .*is not an option of algorithm"):
        read_run(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match=f"^run {run}: cannot read config file .*config.json"):
        read_run(run)
    (run / "config.json").write_text(json.dumps(config))
    (run / "final.json").write_text("[1]")
    with pytest.raises(RunDirError, match=f"^run {run}: final.json must hold a JSON object, got list"):
        read_run(run)
    (run / "final.json").write_text('{"summary": "mse 1"}')
    with pytest.raises(RunDirError, match=f"^run {run}: final.json lacks \\['split', 'checkpoint', "
                                          "'checkpoint_iteration'\\]"):
        read_run(run)
    (run / "final.json").write_text("{torn")
    with pytest.raises(RunDirError, match=f"^run {run}: final.json is not valid JSON"):
        read_run(run)
    assert RESULT_FILES == ("final.json", "eval.json")
    with pytest.raises(RunDirError, match="run .*elsewhere: no such directory"):
        read_run(tmp_path / "elsewhere")


def test_a_metric_that_a_run_did_not_log_is_refused(runs, tmp_path):
    out = tmp_path / "compare.png"
    with pytest.raises(RunDirError, match="holds no 'val/accuracy' \\(its validation figures: \\['val/mse'\\]\\)"):
        plot_runs([read_run(run) for run in runs], out, metric="val/accuracy")
    assert not out.exists()


# ---- throughput: total tasks over total training time ----------------------------------------------


def test_the_tasks_per_meta_update_are_read_off_the_log(runs):
    for path in runs:
        records = read_metrics(path / "metrics.jsonl")
        windows = [r for r in records if "time/tasks_per_s" in r]
        assert [r["iteration"] for r in windows] == [2, 4, 6]
        assert [r["iteration"] for r in records if "time/tasks_per_s" not in r] == [3]  # validation alone
        starts = [{"iteration": 0, "time/train_s": 0.0}, *windows[:-1]]
        for start, end in zip(starts, windows):  # what the trainer logs: the tasks of the window over its time
            seconds = end["time/train_s"] - start["time/train_s"]
            assert end["time/tasks_per_s"] * seconds / (end["iteration"] - start["iteration"]) == pytest.approx(4)
        run = read_run(path)
        train_s = json.loads((path / "final.json").read_text())["train"]["time"]["train_s"]
        assert (run.tasks_per_update, run.tasks, run.iterations) == (4, 24, 6)  # meta_batch 4
        assert run.train_s == train_s and run.tasks_per_s == 24 / train_s


def _records(*windows: tuple[int, float, float | None]) -> list[dict[str, float]]:
    """metrics.jsonl records from (iteration, time/train_s, time/tasks_per_s or None for validation alone)."""
    return [{"iteration": i, "time/train_s": t, **({"val/loss": 1.0} if rate is None else {"time/tasks_per_s": rate})}
            for i, t, rate in windows]


def test_a_slow_first_window_weighs_by_its_time_not_as_one_rate_of_several(runs, tmp_path):
    """A learned optimizer's run: one problem per meta-update, although its config's ``batch`` is 128.

    50 meta-updates in 25 s (2 tasks/s: the slow start), then 52 in 1.04 s (50 tasks/s): 102 tasks in 26.04 s
    are 3.9 tasks/s, where the mean of the three logged rates would be 34.
    """
    run = Path(shutil.copytree(runs[0], tmp_path / "l2l-quadratics-run"))
    config = load_preset("l2l-quadratics")
    assert config.data.options.batch == 128
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    records = _records((50, 25.0, 2.0), (100, 26.0, 50.0), (101, 26.02, None), (102, 26.04, 50.0))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = read_run(run)
    assert (loaded.tasks_per_update, loaded.tasks, loaded.train_s) == (1, 102, 26.04)
    assert loaded.tasks_per_s == 102 / 26.04
    row = _rows(markdown_table([loaded]))[2]
    assert row[1:5] == ["l2l", "quadratics", "-", "-"] and row[7:] == ["0:00:26.0", "4", "102"]


def test_the_tasks_per_meta_update_of_most_meta_updates_win():
    # 4 tasks per meta-update; the window from 20 to 25 crosses a resume whose rate counts 25 - 22 only
    across_a_resume = _records((10, 10.0, 4.0), (20, 15.0, 8.0), (25, 30.0, 8.0), (30, 32.5, 8.0))
    assert [round(r["time/tasks_per_s"] * (r["time/train_s"] - s["time/train_s"]) / 5) for s, r in
            zip(across_a_resume[1:], across_a_resume[2:])] == [24, 4]
    assert tasks_per_update(across_a_resume, "runs/x") == 4
    assert tasks_per_update(_records((2, 2.0, 3.0), (4, 4.0, 5.0)), "runs/x") == 3, "a tie: the earliest window's"
    assert tasks_per_update(_records((3, 1.0, 0.0), (4, 1.5, 2.0)), "runs/x") == 1, "windows without a rate are skipped"
    message = ("run runs/x: the records of metrics.jsonl give no tasks per meta-update (no window of meta-updates "
               "with training time and a positive 'time/tasks_per_s'); compare reads run directories written by "
               "`metaopt train`")
    with pytest.raises(RunDirError, match=f"^{re.escape(message)}$"):
        tasks_per_update(_records((2, 1.0, 0.0), (3, 1.0, None)), "runs/x")


def test_a_log_without_throughput_is_refused_when_read(runs, tmp_path):
    run = Path(shutil.copytree(runs[0], tmp_path / runs[0].name))
    records = [{**r, "time/tasks_per_s": 0.0} if "time/tasks_per_s" in r else r
               for r in read_metrics(run / "metrics.jsonl")]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(RunDirError, match=f"^run {re.escape(str(run))}: the records of metrics.jsonl give no tasks "
                                          "per meta-update"):
        read_run(run)


# ---- unfinished runs: left out with a warning ------------------------------------------------------


def _unfinished(run: Path, tmp_path: Path, name: str, started_only: bool = False) -> Path:
    """A copy of ``run`` without a result: stopped before its end, or (``started_only``) with its config alone."""
    copy = Path(shutil.copytree(run, tmp_path / name))
    for file in copy.iterdir():
        if file.name == "final.json" or (started_only and file.name != "config.json"):
            file.unlink()
    return copy


def _left_out(run: Path) -> str:
    return (f"run {run}: neither final.json nor eval.json exists (the run has no result yet); finish it with "
            f"`metaopt train --resume {run}` or evaluate a checkpoint with `metaopt eval --run {run}`; left out of "
            "the comparison")


NO_RUN_LEFT = ("no run to compare: none of the 2 run directories given has a result yet (final.json or eval.json); "
               "finish a run with `metaopt train --resume RUN_DIR` or evaluate a checkpoint with "
               "`metaopt eval --run RUN_DIR`")


def test_unfinished_runs_are_left_out_with_a_warning_naming_each(runs, tmp_path):
    stopped, started = _unfinished(runs[0], tmp_path, "stopped"), _unfinished(runs[0], tmp_path, "started", True)
    assert sorted(p.name for p in started.iterdir()) == ["config.json"]
    with pytest.warns(UnfinishedRunWarning) as caught:
        loaded = read_runs([runs[0], stopped, runs[1], started])
    assert [run.path for run in loaded] == runs
    assert [str(w.message) for w in caught] == [_left_out(stopped), _left_out(started)]
    assert all(w.filename == __file__ for w in caught), "the warning points at the caller of read_runs"
    assert [run.path for run in read_runs(iter(runs))] == runs  # nothing left out: no warning (filterwarnings=error)


def test_no_run_left_is_an_error(runs, tmp_path):
    unfinished = [_unfinished(runs[0], tmp_path, "a"), _unfinished(runs[1], tmp_path, "b", True)]
    with pytest.raises(RunDirError, match=f"^{re.escape(NO_RUN_LEFT)}$"), pytest.warns(UnfinishedRunWarning) as caught:
        read_runs(unfinished)
    assert [str(w.message) for w in caught] == [_left_out(run) for run in unfinished]
    with pytest.raises(ValueError, match="^no runs to compare; pass at least one run directory$"):
        read_runs([])


def test_a_damaged_run_is_still_an_error_beside_finished_ones(runs, tmp_path):
    damaged = Path(shutil.copytree(runs[0], tmp_path / "damaged"))
    (damaged / "metrics.jsonl").unlink()
    with pytest.raises(RunDirError, match=f"^run {re.escape(str(damaged))}: metrics.jsonl is missing"):
        read_runs([runs[1], damaged])
    with pytest.raises(RunDirError, match=f"^run {re.escape(str(tmp_path / 'absent'))}: no such directory"):
        read_runs([runs[1], tmp_path / "absent"])


def test_cli_leaves_out_unfinished_runs_and_fails_when_none_is_left(runs, tmp_path, capsys):
    stopped = _unfinished(runs[0], tmp_path, "stopped")
    out = tmp_path / "compare.png"
    assert main(["compare", str(runs[0]), str(stopped), str(runs[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out == markdown_table([read_run(run) for run in runs]) + f"\nchart written to {out}\n"
    assert printed.err == f"metaopt compare: warning: {_left_out(stopped)}\n"
    assert out.read_bytes()[:8] == PNG_SIGNATURE

    started = _unfinished(runs[1], tmp_path, "started", True)
    assert main(["compare", str(stopped), str(started), "--out", str(tmp_path / "none.png")]) == 1
    assert capsys.readouterr().err == (f"metaopt compare: warning: {_left_out(stopped)}\n"
                                       f"metaopt compare: warning: {_left_out(started)}\n"
                                       f"metaopt compare: error: {NO_RUN_LEFT}\n")
    assert not (tmp_path / "none.png").exists()
