"""scripts/strategy_probe_report.py: a preset probed as ``metaopt train --strategy auto`` would, its row written."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from metaopt.bench.workloads import Workload

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "strategy_probe_report.py"


def test_a_short_budget_probes_the_eager_strategies_and_writes_the_row(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    runpy.run_path(str(SCRIPT))["main"](["--presets", "maml-sinusoid-5shot", "--threads", "1", "--time-budget", "0.5",
                                         "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    (row,) = report["rows"]
    assert row["preset"] == "maml-sinusoid-5shot" and row["strategy"] in ("loop", "vmap")
    assert set(row["seconds"]) == {"loop", "vmap"} and "too short" in row["skipped"]["compiled"]
    assert report["time_budget_min"] == 0.5
    assert f"| maml-sinusoid-5shot | {1000 * row['seconds']['loop']:.1f} |" in out.with_suffix(".md").read_text()


def test_a_bench_configuration_is_probed_for_a_run_of_the_time_budget() -> None:
    script = runpy.run_path(str(SCRIPT))
    row = script["probe_bench"](Workload(tasks=2, query=2, hidden=8), time_budget=0.1)
    assert row["preset"] == "bench 5-way 1-shot, second order" and row["strategy"] in ("loop", "vmap")
    assert "the run is expected to last 6 s" in row["skipped"]["compiled"]
    with pytest.raises(SystemExit):
        script["main"](["--bench", "--presets"])  # the benchmark has no run length without a time budget
