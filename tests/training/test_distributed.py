"""Distributed meta-training (gloo over loopback, 2 processes, CPU) against one process on the same tasks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from metaopt.estimators import Backprop, Estimator, TruncatedBackprop
from metaopt.training.checkpoint import load_checkpoint
from metaopt.training.config import TrainerConfig
from metaopt.training.distributed import SINGLE, DistributedError, World
from metaopt.training.logging import read_metrics
from metaopt.training.trainer import MetaTrainer
from tests.training import distributed_workers
from tests.training.distributed_workers import CASES, run_case


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case run on 2 gloo processes (one spawn for all of them)."""
    out = tmp_path_factory.mktemp("distributed") / "results.pt"
    mp.start_processes(distributed_workers.worker, args=(2, free_port(), str(out), list(CASES)), nprocs=2,
                       start_method="spawn")
    return torch.load(out, weights_only=False)


# Tolerances: the 2 ranks sum their halves of the meta-gradient, one process sums all tasks at once; the
# float sums run in another order, so float32 cases agree to ~1e-7 relative per operation, and 3 SGD
# steps of lr 0.1 keep the parameters within 1e-6. Float64 cases (Meta-SGD) agree to ~1e-15. ES, PES and
# PPO compute every particle and child exactly as one process does, then the same estimate: equal bit for bit.
TOLERANCE = {"maml-second-order-batchnorm": (1e-5, 1e-6), "maml-running-batchnorm": (1e-5, 1e-6),
             "metasgd": (1e-10, 1e-12),
             "truncated-backprop-lstm": (1e-5, 1e-6), "es": (0.0, 0.0), "pes": (0.0, 0.0), "ppo": (0.0, 0.0)}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_meta_gradient_and_parameters_of_one(name: str, two_processes: dict) -> None:
    ours, alone = two_processes[name], run_case(name, SINGLE)
    rtol, atol = TOLERANCE[name]
    assert ours["loss"] == pytest.approx(alone["loss"], rel=max(rtol, 1e-12))
    assert sorted(ours["grads"]) == sorted(alone["grads"]) and alone["grads"]
    # running statistics: each rank accumulates its tasks', the ranks then average them (one process compounds
    # the tasks' updates one after another), so they and the parameters trained after them are not compared
    parts = ("grads",) if name == "maml-running-batchnorm" else ("grads", "params", "buffers")
    for part in parts:
        for key, value in alone[part].items():
            torch.testing.assert_close(ours[part][key], value, rtol=rtol, atol=atol, msg=f"{name} {part} {key}")
    moved = sum((alone["params"][k] - v).abs().sum() for k, v in run_case(name, SINGLE)["params"].items())
    assert moved == 0  # one process is deterministic: the comparison is not between two noisy runs


def test_running_statistics_are_averaged_over_the_ranks_and_stay_close_to_one_process(two_processes: dict) -> None:
    ours, alone = two_processes["maml-running-batchnorm"], run_case("maml-running-batchnorm", SINGLE)
    means = [k for k in alone["buffers"] if k.endswith("running_mean")]
    assert means and all(not torch.equal(alone["buffers"][k], torch.zeros_like(alone["buffers"][k])) for k in means)
    for key in means:
        torch.testing.assert_close(ours["buffers"][key], alone["buffers"][key], rtol=0.2, atol=0.05)
    tracked = [k for k in alone["buffers"] if k.endswith("num_batches_tracked")]
    assert all(int(ours["buffers"][k]) == int(alone["buffers"][k]) > 0 for k in tracked)  # every rank's passes


def test_ranks_whose_parameters_differ_are_named_with_the_tensor(two_processes: dict) -> None:
    assert two_processes["diverged"].startswith("a test: 2.bias differs between rank 0 and rank 1")


def test_a_signal_handled_as_the_stop_agreement_returns_waits_for_the_next_one_on_every_rank(
        two_processes: dict) -> None:
    # rank 0 alone learns of the signal after iteration 2's agreement: both ranks evaluate iteration 2 (had rank 0
    # skipped it, rank 1 would wait for its result forever: CI caught that hang) and stop together after iteration 3
    assert two_processes["signalled"] == [{"rank": rank, "evaluated": [2], "stopped": 3} for rank in (0, 1)]


def test_a_share_of_the_items_is_contiguous_and_the_shares_cover_them_once() -> None:
    for size in (1, 2, 3, 5):
        shares = [World(rank, size).share(7) for rank in range(size)]
        assert [i for share in shares for i in share] == list(range(7))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert list(World(3, 5).share(2)) == []


def test_work_that_cannot_be_shared_is_refused_with_the_fix() -> None:
    with pytest.raises(DistributedError, match="give it at least tasks=2"):
        TruncatedBackprop(truncation=2).distribute(World(0, 2))
    estimator = Backprop()
    estimator.distribute(World(3, 4))
    with pytest.raises(DistributedError, match="a batch of 3 tasks cannot be shared over 4 processes"):
        estimator._share(distributed_workers.toy_regression_batch(tasks=3))


def test_an_estimator_that_cannot_share_its_work_is_refused_when_the_trainer_is_built() -> None:
    class Alone(Estimator):
        def estimate(self, learner, problems, iteration, track_steps=False):  # noqa: ANN001, ANN201
            raise AssertionError("never called")

    learner, problems, _ = CASES["metasgd"]()
    with pytest.raises(DistributedError, match="Alone cannot share its estimates over processes; run it on one"):
        MetaTrainer(learner, problems, TrainerConfig(iterations=1), estimator=Alone(), world=World(0, 2))


def test_a_single_process_collective_is_the_identity(tmp_path: Path) -> None:
    assert SINGLE.gather(3) == [3] and SINGLE.from_leader(lambda: 4) == 4 and SINGLE.agree([True, False]) == [True,
                                                                                                               False]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 2.0)
    assert SINGLE.all_reduce_gradients([p], 0.5, {"loss": 1.0}) == {"loss": 1.0} and p.grad.tolist() == [2.0, 2.0]


# ------------------------------------------------------------------ the command line: --nproc, SIGKILL, resume

SINUSOID = ["--preset", "maml-sinusoid-5shot", "--iterations", "400", "--log-every", "10", "--checkpoint-every", "100",
            "--eval-every", "200", "--eval-episodes", "8", "--test-episodes", "8", "--threads", "1"]


def metaopt_train(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metaopt", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the process of ``rank`` that ``launcher`` (the ``metaopt train --nproc`` process) started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            ancestors, pid = [], int(entry.name)
            while pid > 1:
                pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                ancestors.append(pid)
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ) and \
                launcher in ancestors:
            return int(entry.name)
    return None


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt", required=["model"])["model"]


def test_sigkill_of_a_rank_stops_the_other_with_the_rank_named_and_resume_equals_an_uninterrupted_run(
        tmp_path: Path) -> None:
    whole = metaopt_train("--nproc", "2", *SINUSOID, "--run-dir", str(tmp_path / "whole"))
    killed = metaopt_train("--nproc", "2", *SINUSOID, "--run-dir", str(tmp_path / "killed"))
    try:
        metrics, deadline = tmp_path / "killed" / "metrics.jsonl", time.monotonic() + 120
        while time.monotonic() < deadline and (not metrics.exists() or
                                               len(read_metrics(metrics)) < 16 or rank_pid(killed.pid, 1) is None):
            time.sleep(0.05)  # past the checkpoint of iteration 100, before 400
        os.kill(rank_pid(killed.pid, 1), signal.SIGKILL)
        output = killed.communicate(timeout=90)[0]
        assert killed.returncode != 0
        # rank 0 learns of the death in whichever collective it was in (the meta-gradient's, the stop agreement's)
        # and names rank 1; or gloo aborts it in native code first, and torchrun's report names rank 1, SIGKILLed
        named = re.search(r"rank 0 of 2: .* failed \(.*\); rank 1 did not answer within 5 s", output)
        reported = re.search(r"Root Cause.*\n(.*\n){3}\s*rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", output)
        assert named or reported, output
        assert "the last checkpoint is intact: restart the whole run with metaopt train --nproc 2 --resume" in output
        saved = load_checkpoint(tmp_path / "killed" / "last.pt", required=["iteration"])["iteration"]
        assert 100 <= saved < 400
        assert whole.communicate(timeout=120)[0] and whole.returncode == 0
    finally:
        for process in (whole, killed):
            process.kill()
            process.communicate()
    resumed = metaopt_train("--nproc", "2", "--resume", str(tmp_path / "killed"))
    output = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, output
    for name, value in final_parameters(tmp_path / "whole").items():
        assert torch.equal(final_parameters(tmp_path / "killed")[name], value), name
    assert json.loads((tmp_path / "killed" / "config.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_of_the_launcher_stops_every_rank_quietly_with_the_resume_command(
        tmp_path: Path, signum: signal.Signals) -> None:
    run = tmp_path / "run"
    # started with SIGINT ignored, as a script's background job is: the launcher must set its own handler
    launcher = subprocess.Popen([sys.executable, "-m", "metaopt", "train", "--nproc", "2", *SINUSOID, "--iterations",
                                 "100000", "--run-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
        while time.monotonic() < deadline and (not metrics.exists() or len(read_metrics(metrics)) < 4):
            time.sleep(0.05)
        launcher.send_signal(signum)
        output = launcher.communicate(timeout=90)[0]
    finally:
        left = processes_of(run)
        for pid in [launcher.pid, *left]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.communicate()
    assert not left  # torchrun and both ranks have exited
    assert launcher.returncode == 128 + signum, output
    assert "Traceback" not in output and "error" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("interrupted at iteration")]
    stopped = int(line.split()[3].rstrip(";"))
    assert line == f"interrupted at iteration {stopped}; resume with: metaopt train --nproc 2 --resume {run}"
    assert load_checkpoint(run / "last.pt", required=["iteration"])["iteration"] == stopped


def processes_of(run: Path) -> list[int]:
    """The pids of the processes whose command line names ``run``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_run_of_two_processes_resumes_on_one(tmp_path: Path) -> None:
    two = metaopt_train("--nproc", "2", *SINUSOID, "--iterations", "100", "--run-dir", str(tmp_path / "run"))
    output = two.communicate(timeout=120)[0]
    assert two.returncode == 0 and "terminate called" not in output, output  # the ranks leave the group together
    one = metaopt_train("--resume", str(tmp_path / "run"), "--iterations", "120")
    output = one.communicate(timeout=120)[0]
    assert one.returncode == 0, output
    assert load_checkpoint(tmp_path / "run" / "last.pt", required=["iteration"])["iteration"] == 120
    assert "world_size" not in json.loads((tmp_path / "run" / "config.json").read_text())  # now 1, the default
