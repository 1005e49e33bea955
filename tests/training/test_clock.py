"""Tests of metaopt/training/clock.py: training time counts the measured meta-updates only, CPU time does not count
waiting, a resumed clock carries the earlier sessions' times on, throughput is per reading."""

from __future__ import annotations

import time

import pytest

from metaopt.training.clock import Clock


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_only_the_measured_blocks_are_training_time():
    clock = Clock()
    time.sleep(0.03)  # outside a meta-update: total time only
    with clock.measure(tasks=4):
        time.sleep(0.02)
    with clock.measure(tasks=4):
        time.sleep(0.02)
    times = clock.read()
    assert sorted(times) == ["total_s", "train_cpu_s", "train_s"]
    assert 0.04 <= times["train_s"] < times["total_s"] and times["total_s"] >= 0.07
    assert times["train_cpu_s"] < 0.02  # sleeping spends no CPU time
    assert clock.train_s == times["train_s"] and clock.train_cpu_s == times["train_cpu_s"]


def test_cpu_time_counts_work():
    clock = Clock()
    with clock.measure(tasks=1):
        _busy(0.03)
    assert clock.train_cpu_s >= 0.03 and clock.train_s >= 0.02


def test_a_resumed_clock_continues_the_earlier_times():
    clock = Clock(train_s=10.0, total_s=25.0, train_cpu_s=7.0)
    assert clock.read()["train_s"] == 10.0 and clock.read()["train_cpu_s"] == 7.0
    assert 25.0 <= clock.total_s < 26.0
    with clock.measure(tasks=2):
        time.sleep(0.01)
    times = clock.read()
    assert 10.01 <= times["train_s"] < 11.0 and 7.0 <= times["train_cpu_s"] < 8.0 and times["total_s"] >= 25.01


def test_throughput_is_tasks_per_second_since_the_last_reading():
    clock = Clock()
    assert clock.throughput() == {"time/tasks_per_s": 0.0}  # nothing measured yet
    for _ in range(2):
        with clock.measure(tasks=5):
            time.sleep(0.01)
    rate = clock.throughput()["time/tasks_per_s"]
    assert 0 < rate <= 10 / 0.02
    assert rate == pytest.approx(10 / clock.train_s)
    assert clock.throughput() == {"time/tasks_per_s": 0.0}  # the reading reset the counts
    with clock.measure(tasks=3):
        time.sleep(0.01)
    assert 0 < clock.throughput()["time/tasks_per_s"] <= 3 / 0.01
    assert clock.train_s >= 0.03  # training time is never reset

