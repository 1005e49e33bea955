"""Tests of metaopt/cli.py and scripts/: options built from the chosen parts, presets, run directories,
evaluation, learned-optimizer runs, and resuming a run killed with SIGKILL."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metaopt.cli import main
from metaopt.problems.sampling import split_seed
from metaopt.registry import entry, load_plugins, names
from metaopt.training.checkpoint import load_checkpoint
from metaopt.training.config import RunConfig, TrainerConfig, load_preset
from metaopt.training.experiment import build_experiment, default_run_dir
from metaopt.training.logging import read_metrics

load_plugins()
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = ["--iterations", "6", "--hidden", "8", "--meta-batch", "4", "--shots", "5", "--eval-every", "3",
        "--eval-episodes", "20", "--log-every", "3", "--checkpoint-every", "3"]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    return run


# ------------------------------------------------------------------------------ options


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--inner_lr", "0.02"], "unknown option --inner_lr (did you mean --inner-lr?)"),
    (["train", "--inner-lr=0.1", "--meta_batch=4"], "unknown option --meta_batch (did you mean --meta-batch?)"),
    (["train", "--inner", "0.1"], "unknown option --inner "),  # no abbreviations
    (["train", "--resum", "runs/x"], "did you mean --resume?"),
    (["eval", "--run", "runs/x", "--episode", "5"], "unknown option --episode (did you mean --episodes?)"),
    (["train", "--iterations", "ten"], "argument --iterations: invalid int value: 'ten'"),
    (["train", "--preset", "a", "--config", "b.json"], "not allowed with argument"),
    (["eval"], "the following arguments are required: --run"),
])
def test_bad_command_lines_exit_with_a_hint(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_the_parts_by_name_and_the_trainer_options(capsys):
    text = _help(capsys)
    for kind in ("algorithm", "dataset", "model"):
        for name in names(kind):
            assert f"  {name} " in text and entry(kind, name).summary[:30] in text
    for name in TrainerConfig.field_names():
        assert "--" + name.replace("_", "-") in text
    assert "maml-sinusoid-10shot" in text and "--algorithm NAME --help" in text
    assert "--inner-lr" not in text  # the parts' options are listed when a part is named


@pytest.mark.parametrize("algorithm", names("algorithm"))
def test_algorithm_help_lists_every_option_of_the_algorithm(capsys, algorithm):
    text = _help(capsys, "--algorithm", algorithm)
    assert f"options of algorithm {algorithm!r}" in text
    for name in entry("algorithm", algorithm).options.field_names():
        if name != "transfer":
            assert "--" + name.replace("_", "-") in text, name


def test_preset_help_lists_the_options_of_its_parts(capsys):
    text = _help(capsys, "--preset", "maml-omniglot-5w1s")
    assert "options of algorithm 'maml'" in text and "options of dataset 'omniglot'" in text
    assert "options of model 'conv4'" in text and "--no-first-order" in text and "--ways" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "metalstm-omniglot-5w1s", "--inner-lr", "0.1"],
     "--inner-lr is not an option of algorithm 'metalstm'; its options are --adapt, --inner-steps"),
    (["--preset", "mtnet-omniglot-5w1s", "--adapt", "head"], "--adapt is not an option of algorithm 'mtnet'"),
    (["--ways", "5"], "--ways is not an option of dataset 'sinusoid'; its options are --shots, --query"),
    (["--preset", "l2l-quadratics", "--filters", "8"], "--filters is an option of model conv4, but this run has no"),
    (["--preset", "maml-omniglot-5w1s", "--no-strided", "--lstm-units", "4"],
     "--lstm-units is not an option of algorithm 'maml'"),
])
def test_an_option_the_chosen_part_does_not_take_is_an_error_naming_what_it_takes(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_optbench_points_to_the_train_and_eval_commands(capsys):
    assert main(["optbench", "--preset", "l2l-quadratics"]) == 2
    assert "metaopt train --preset l2l-quadratics" in capsys.readouterr().err


def test_options_that_do_nothing_for_the_algorithm_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--algorithm", "metasgd", "--init-lr", "0.1", "--run-dir", str(run)]) == 2
    assert "option 'init_lr' is the starting step size of init='constant'" in capsys.readouterr().err
    assert main(["train", "--first-order", "--checkpoint-steps", "--run-dir", str(run)]) == 2
    assert "it does nothing with first_order=True" in capsys.readouterr().err
    assert not run.exists()


def test_a_part_can_be_swapped_for_another(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--algorithm", "metasgd", "--init", "constant", "--init-lr", "0.01",
                 "--run-dir", str(run)]) == 0
    config = RunConfig.from_json(run / "config.json")
    assert (config.algorithm.name, config.algorithm.options.init_lr, config.data.name) == ("metasgd", 0.01, "sinusoid")


def test_bad_values_and_presets_are_reported_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--meta-lr", "-1", "--run-dir", str(run)]) == 2
    assert "option 'meta_lr' must be > 0, got -1.0" in capsys.readouterr().err
    assert main(["train", "--preset", "maml-sinusoid-10shots", "--run-dir", str(run)]) == 2
    assert "unknown preset 'maml-sinusoid-10shots' (did you mean 'maml-sinusoid-10shot'?)" in capsys.readouterr().err
    assert main(["train", *TINY, "--dataset", "sinusiod", "--run-dir", str(run)]) == 2
    assert "unknown dataset 'sinusiod' (did you mean 'sinusoid'?)" in capsys.readouterr().err
    assert main(["train", "--algorithm", "maml", "--dataset", "quadratics", "--run-dir", str(run)]) == 2
    assert "algorithm 'maml' meta-learns from episodes, but dataset 'quadratics' gives optimizees" in \
        capsys.readouterr().err
    assert not run.exists()


# ------------------------------------------------------------------------------ train / eval


def test_preset_with_overrides_writes_a_full_run(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "maml-sinusoid-5shot", *TINY, "--inner-lr", "0.02", "--first-order",
            "--eval-inner-steps", "none", "--grad-clip", "10", "--run-dir", str(run)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    algorithm, trainer = config["algorithm"], config["trainer"]
    assert algorithm["inner_lr"] == 0.02 and algorithm["first_order"] is True and algorithm["eval_inner_steps"] is None
    assert config["model"]["hidden"] == [8] and trainer["grad_clip"] == 10.0 and trainer["iterations"] == 6
    assert trainer["meta_lr"] == 0.001 and algorithm["bn_policy"] == "batch"  # from the preset / recorded
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "final.json"} <= {p.name for p in run.iterdir()}
    final = json.loads((run / "final.json").read_text())
    assert final["split"] == "test" and final["checkpoint"] == "best.pt"
    assert final["result"]["protocol"] == {"shots": 5, "query": 10, "inner_steps": 1, "episodes": 20,
                                           "bn_policy": "batch"}
    assert final["summary"] in out and "mse" in final["summary"] and "95% CI" in final["summary"]
    assert f"run directory: {run}" in out


def test_config_file_as_the_starting_point(tmp_path):
    path = tmp_path / "my.json"
    path.write_text(load_preset("maml-sinusoid-10shot").replace(algorithm={"inner_lr": 0.03}, seed=4).to_json())
    run = tmp_path / "run"
    assert main(["train", "--config", str(path), *TINY, "--run-dir", str(run)]) == 0
    config = RunConfig.from_json(run / "config.json")
    assert (config.algorithm.options.inner_lr, config.seed, config.trainer.iterations) == (0.03, 4, 6)


def test_default_run_dir_is_readable_and_fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "--first-order"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("fomaml-sinusoid-5shot-")
    assert (run / "final.json").exists()
    again = default_run_dir(load_preset("fomaml-sinusoid-10shot").replace(data={"shots": 5}))
    assert again != run.relative_to(tmp_path) and again.parent == Path("runs")
    assert default_run_dir(load_preset("maml-omniglot-5w1s"), root="r").name.startswith("maml-omniglot-5w1s-")
    assert default_run_dir(load_preset("l2l-quadratics")).name.startswith("l2l-quadratics-")


def test_eval_prints_and_writes_the_result(finished_run, capsys):
    assert main(["eval", "--run", str(finished_run), "--checkpoint", "last", "--episodes", "10", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "test problems, checkpoint last.pt (iteration 6)" in out
    record = json.loads((finished_run / "eval.json").read_text())
    assert record["summary"] in out
    assert "inner_steps=2, episodes=10" in record["summary"]
    assert record["checkpoint"] == "last.pt" and record["checkpoint_iteration"] == 6
    assert record["result"]["episodes"] == 10


def test_eval_of_the_best_checkpoint_reproduces_the_final_result(finished_run, capsys):
    assert main(["eval", "--run", str(finished_run)]) == 0
    final = json.loads((finished_run / "final.json").read_text())
    assert json.loads((finished_run / "eval.json").read_text())["result"] == final["result"]
    assert final["summary"] in capsys.readouterr().out


def test_eval_without_the_checkpoint_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    (run / "best.pt").unlink()
    assert main(["eval", "--run", str(run)]) == 1
    assert f"checkpoint {run / 'best.pt'} does not exist" in capsys.readouterr().err


def test_a_run_that_diverges_stops_with_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--inner-lr", "1e30", "--max-nonfinite", "2", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite for 2 meta-updates in a row (iterations 1..2)" in err
    assert f"{run / 'last.pt'} (iteration 0), is intact" in err


def test_a_run_stopped_by_nonfinite_losses_resumes_with_the_fixes_its_message_suggests(tmp_path, capsys):
    run = tmp_path / "run"
    meta = ["--meta-lr", "1e30", "--max-nonfinite", "2"]  # the first update is finite, then the meta-parameters blow up
    assert main(["train", *TINY, *meta, "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite for 2 meta-updates in a row (iterations 2..3)" in err and "Lower meta_lr" in err
    good = load_checkpoint(run / "last.pt")
    assert good["iteration"] == 0  # iteration 3 was due for a checkpoint, but within the streak: none written
    assert main(["train", "--resume", str(run), "--meta-lr", "1e-3", "--max-nonfinite", "5", "--grad-clip", "1"]) == 0
    config = json.loads((run / "config.json").read_text())["trainer"]
    assert (config["meta_lr"], config["max_nonfinite"], config["grad_clip"]) == (1e-3, 5, 1.0)
    assert read_metrics(run / "metrics.jsonl")[-1]["iteration"] == 6


def test_resuming_a_finished_run_says_so_and_leaves_its_result(finished_run, capsys):
    written = (finished_run / "final.json").read_text()
    assert main(["train", "--resume", str(finished_run)]) == 0
    assert f"{finished_run} is complete (iteration 6 of 6); final.json is left as it was" in capsys.readouterr().out
    assert (finished_run / "final.json").read_text() == written


def test_threads_are_an_option_recorded_with_the_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--threads", "1", "--run-dir", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["threads"] == 1
    assert main(["eval", "--run", str(run), "--threads", "1", "--episodes", "4"]) == 0


def test_redirected_output_gets_plain_progress_lines_and_the_log_file_too(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "metaopt.cli", "train", *TINY, "--run-dir", str(run)], env=ENV,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("iteration ")]
    assert lines[0].startswith("iteration 1/6 (16.7%), loss ") and "tasks/s, training time 0:00:" in lines[0]
    assert lines[-1].startswith("iteration 6/6 (100.0%)") and "left 0:00:00" in lines[-1]
    log = (run / "train.log").read_text()
    assert lines[-1] in log and "iteration 3: evaluating on 20 validation problems" in log


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--device", "cuda"], "device 'cuda' asked for, but torch sees no CUDA device here; use --device cpu"),
    (["train", "--bn-policy", "running", "--strategy", "vmap"],
     "algorithm 'maml': strategy='vmap' is not available: batch-norm policy 'running' writes statistics shared"),
    (["train", "--preset", "maml-omniglot-5w1s", "--data-root", "/nonexistent"], "/nonexistent/omniglot"),
])
def test_user_errors_end_in_one_error_line_and_exit_code_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, also where one is
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err


def test_a_run_directory_that_is_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("")
    assert main(["train", *TINY, "--run-dir", str(file)]) == 2
    assert f"run directory {file} is a file" in capsys.readouterr().err


def test_resume_keeps_the_config_but_may_extend_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(run), "--inner-lr", "0.5"])
    assert "a resumed run keeps its config.json; --inner-lr cannot change" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(run), "--run-dir", str(tmp_path / "other")])
    assert "drop --run-dir" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--iterations", "9"]) == 0
    assert json.loads((run / "final.json").read_text())["train"]["iteration"] == 9
    assert read_metrics(run / "metrics.jsonl")[-1]["iteration"] == 9
    assert json.loads((run / "config.json").read_text())["trainer"]["iterations"] == 9
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(run), "--algorithm", "metasgd"])
    assert "--algorithm cannot change" in capsys.readouterr().err


def test_a_time_budget_stops_the_run_early_and_still_scores_it(tmp_path):
    run = tmp_path / "run"
    long = ["--iterations", "100000", "--eval-every", "100000", "--checkpoint-every", "100000", "--log-every", "100"]
    assert main(["train", *TINY, *long, "--time-budget", "0.002", "--run-dir", str(run)]) == 0
    final = json.loads((run / "final.json").read_text())
    summary = final["train"]
    assert summary["stopped_by"] == "time_budget" and 1 <= summary["iteration"] < 100000
    assert 0.12 <= summary["time"]["train_s"] < summary["time"]["total_s"]
    assert (final["split"], final["checkpoint"], final["checkpoint_iteration"]) == ("test", "best.pt",
                                                                                    summary["iteration"])
    last = read_metrics(run / "metrics.jsonl")[-1]
    assert last["iteration"] == summary["iteration"] and "val/mse" in last
    assert main(["train", "--resume", str(run), "--time-budget", "0.004"]) == 0  # the budget may grow on resume
    resumed = json.loads((run / "final.json").read_text())["train"]
    assert resumed["iteration"] > summary["iteration"] and resumed["time"]["train_s"] >= 0.24


def test_existing_run_is_not_overwritten(finished_run, capsys):
    assert main(["train", *TINY, "--run-dir", str(finished_run)]) == 1
    assert "already holds a run" in capsys.readouterr().err


def test_scripts_call_the_cli(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    for script, args in (("train.py", [*TINY, "--run-dir", str(run)]), ("evaluate.py", ["--run", str(run)])):
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(SCRIPTS / script), run_name="__main__")
        assert exit_.value.code == 0
    assert (run / "final.json").exists() and (run / "eval.json").exists()
    assert "95% CI" in capsys.readouterr().out


def test_splits_have_distinct_seeds():
    config = load_preset("maml-sinusoid-10shot").replace(seed=5, model={"hidden": [8]}, data={"meta_batch": 2})
    experiment = build_experiment(config)
    seeds = [experiment.problems(split).seed for split in ("train", "val", "test")]
    assert seeds == [15, 16, 17] == [split_seed(5, s) for s in ("train", "val", "test")]
    assert not torch.equal(experiment.problems("train").batch(0).query_y, experiment.problems("test").batch(0).query_y)


def test_a_learned_optimizer_run_is_scored_against_tuned_baselines(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--iterations", "10", "--eval-every", "5", "--eval-episodes", "1", "--test-episodes", "3",
            "--horizon", "10", "--truncation", "5", "--batch", "8"]
    assert main(["train", "--preset", "l2l-quadratics", *tiny, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    final = json.loads((run / "final.json").read_text())
    assert final["summary"].startswith("loss ") and "episodes=3" in final["summary"]
    assert final["baselines"]["table"] in out and "| learned optimizer | - |" in out and "| Adam |" in out
    assert (run / "baselines.png").stat().st_size > 0
    assert [r["iteration"] for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r] == [5, 10]
    assert main(["eval", "--run", str(run), "--episodes", "2"]) == 0
    assert "2 test problems, 10-step horizon" in capsys.readouterr().out


# ------------------------------------------------------------------------------ SIGKILL and resume


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PROCESS_ARGS = ["--iterations", "400", "--hidden", "8", "--meta-batch", "2", "--shots", "5", "--log-every", "10",
                "--checkpoint-every", "20", "--eval-every", "150", "--eval-episodes", "20"]


def _train_process(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "metaopt.cli", "train", *(extra or (*PROCESS_ARGS, "--run-dir", str(run)))]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The 400-iteration run, uninterrupted, in its own process (as the interrupted ones are)."""
    ref = tmp_path_factory.mktemp("reference") / "ref"
    done = subprocess.run(_train_process(ref), env=ENV, cwd=ref.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return ref


def _start_and_wait(run: Path, iteration: int = 50, **popen: object) -> subprocess.Popen:
    """A training process for ``run``, returned once it has logged ``iteration``."""
    process = subprocess.Popen(_train_process(run), env=ENV, cwd=run.parent, **popen)
    deadline = time.monotonic() + 90
    while not (records := read_metrics(run / "metrics.jsonl")) or records[-1]["iteration"] < iteration:
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)
    return process


def _assert_same_run(run: Path, ref: Path) -> None:
    ours, theirs = (load_checkpoint(d / "last.pt") for d in (run, ref))
    assert ours["iteration"] == theirs["iteration"] == 400
    assert ours["model"].keys() == theirs["model"].keys()
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    for name in ("exp_avg", "exp_avg_sq"):
        assert all(torch.equal(ours["optimizer"]["state"][i][name], s[name])
                   for i, s in theirs["optimizer"]["state"].items())
    assert without_timing(read_metrics(run / "metrics.jsonl")) == without_timing(read_metrics(ref / "metrics.jsonl"))
    final_ours, final_theirs = (json.loads((d / "final.json").read_text()) for d in (run, ref))
    assert final_ours["result"] == final_theirs["result"]
    untimed = [{k: v for k, v in final["train"].items() if k != "time"} for final in (final_ours, final_theirs)]
    assert untimed[0] == untimed[1]


def _resume(run: Path) -> subprocess.CompletedProcess:
    resumed = subprocess.run(_train_process(run, "--resume", str(run)), env=ENV, cwd=run.parent, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    return resumed


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path, reference_run):
    run = tmp_path / "run"
    victim = _start_and_wait(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = read_metrics(run / "metrics.jsonl")[-1]["iteration"]
    checkpoint_at = load_checkpoint(run / "last.pt")["iteration"]
    assert victim.returncode == -signal.SIGKILL and 0 < checkpoint_at < killed_at < 400
    (run / f".last.pt.{victim.pid}.tmp").write_bytes(b"torn")  # what a write killed half way leaves
    _resume(run)
    assert not list(run.glob(".*.tmp"))  # cleaned up when the run starts again
    _assert_same_run(run, reference_run)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_checkpoints_the_iteration_reached_and_resumes_to_the_uninterrupted_result(
        tmp_path, reference_run, signum, code):
    run = tmp_path / "run"
    process = _start_and_wait(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted at iteration")]
    stopped = int(line.split()[3].rstrip(";"))
    assert line == f"interrupted at iteration {stopped}; resume with: metaopt train --resume {run}"
    assert "Traceback" not in err and 50 <= stopped < 400
    assert load_checkpoint(run / "last.pt")["iteration"] == stopped  # not the periodic checkpoint before it
    assert f"stopped after iteration {stopped}" in (run / "train.log").read_text()
    resumed = _resume(run)
    assert f"resuming {run} from iteration {stopped}" in resumed.stderr
    _assert_same_run(run, reference_run)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run = tmp_path / "run"
    slow = [*PROCESS_ARGS, "--eval-every", "60", "--eval-episodes", "100000", "--run-dir", str(run)]
    process = subprocess.Popen(_train_process(run, *slow), env=ENV, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while "evaluating on 100000" not in (run / "train.log").read_text() if (run / "train.log").exists() else True:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # during a long validation: the run would stop after it...
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # ...but a second Ctrl-C stops it now
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "metaopt train: interrupted" in err and "Traceback" not in err


def test_a_run_from_before_a_new_config_field_still_resumes(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    stored = json.loads((run / "config.json").read_text())
    del stored["algorithm"]["checkpoint_steps"]  # as written by a version without that option
    (run / "config.json").write_text(json.dumps(stored))
    assert main(["train", "--resume", str(run), "--iterations", "8"]) == 0
    assert read_metrics(run / "metrics.jsonl")[-1]["iteration"] == 8


def test_bench_passes_its_options_to_the_benchmark(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("metaopt.bench.report.run_benchmark",
                        lambda **kwargs: calls.append(kwargs) or kwargs["write"]("| t |"))
    assert main(["bench", "--tasks", "4", "--repeats", "2", "--threads", "1", "--quick"]) == 0
    assert {k: v for k, v in calls[0].items() if k != "write"} == {"tasks": 4, "repeats": 2, "threads": 1,
                                                                  "quick": True, "sweep_tasks": 4}
    assert "| t |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "--tasks", "0"])
    assert "--tasks: must be an integer >= 1, got 0" in capsys.readouterr().err
