"""Tests of metaopt/training/progress.py: what a running meta-training shows, where, and the time it has left."""

from __future__ import annotations

import io

import pytest

from metaopt.training.progress import Progress, duration


def test_durations_read_as_hours_minutes_seconds():
    assert [duration(s) for s in (0, 59.4, 61, 3600 * 2 + 5)] == ["0:00:00", "0:00:59", "0:01:01", "2:00:05"]


def test_time_left_is_the_iterations_left_at_this_sessions_speed():
    progress = Progress(total=100, start=20, train_s=50.0, stream=io.StringIO(), bar=False)
    assert progress.left_s() is None  # nothing measured yet in this session
    progress.update(30, train_s=60.0, figures={})  # 10 iterations in 10 s
    assert progress.left_s() == pytest.approx(70.0)


def test_with_a_time_budget_the_time_left_is_the_budget_left_when_that_is_sooner():
    progress = Progress(total=1000, budget_s=120.0, stream=io.StringIO(), bar=False)
    progress.update(10, train_s=100.0, figures={})  # the iterations would need 9900 s more
    assert progress.left_s() == pytest.approx(20.0)


def test_plain_lines_come_at_the_interval_and_at_the_end(tmp_path):
    out = io.StringIO()
    with Progress(total=10, tasks=4, log=tmp_path / "train.log", interval=3600.0, stream=out, bar=False) as progress:
        for i in range(1, 6):
            progress.update(i, train_s=float(i), figures={"loss": 1.0 / i})
        progress.message("iteration 5: evaluating on 2 validation problems")
    lines = out.getvalue().splitlines()
    assert lines[0] == "iteration 1/10 (10.0%), loss 1, 4 tasks/s, training time 0:00:01, left 0:00:09"
    assert lines[1] == "iteration 5: evaluating on 2 validation problems"
    assert lines[2] == "iteration 5/10 (50.0%), loss 0.2, 4 tasks/s, training time 0:00:05, left 0:00:05"
    assert len(lines) == 3 and (tmp_path / "train.log").read_text().splitlines() == lines


def test_the_budget_is_named_in_the_plain_lines():
    out = io.StringIO()
    with Progress(total=10, budget_s=60.0, stream=out, bar=False) as progress:
        progress.update(1, train_s=1.0, figures={})
    assert out.getvalue().rstrip().endswith("left 0:00:09 (time budget)")
