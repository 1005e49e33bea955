"""The benchmark report: Markdown tables, and the sections of run_benchmark on faked measurements."""

from __future__ import annotations

import pytest
import torch

from metaopt.bench import report
from metaopt.bench.measure import Measurement
from metaopt.bench.report import markdown_table, run_benchmark
from metaopt.bench.workloads import Workload

MIB = 2**20
SECONDS = {"plain": 1.0, "loop": 0.5, "vmap": 0.25, "compiled": 0.2, "higher": 2.0, "learn2learn": 1.0,
           "checkpointed": 1.5}


def test_markdown_table_has_a_header_a_rule_and_one_line_per_row() -> None:
    assert markdown_table(["a", "b"], [[1, 2.5], ["x", None]]) == "| a | b |\n|---|---|\n| 1 | 2.5 |\n| x | None |"
    assert markdown_table(["only"], []) == "| only |\n|---|"


@pytest.fixture
def fake_measurements(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Workload]]:
    """Replace the measurements by fixed figures (time by method, memory by inner steps); returns the calls."""
    calls: list[tuple[str, Workload]] = []

    def measure_isolated(method: str, workload: Workload, repeats: int, threads: int | None,
                         ) -> tuple[Measurement, list[torch.Tensor]]:
        calls.append((method, workload))
        scale = 2 if method == "checkpointed" else 1
        found = Measurement(method, [SECONDS[method]] * repeats, peak_rss=4 * MIB // scale, rss_exact=True,
                            peak_tensors=workload.inner_steps * MIB // scale)
        return found, [torch.full((2,), 0.5 if method == "vmap" else 0.0)]

    monkeypatch.setattr(report, "measure_isolated", measure_isolated)
    monkeypatch.setattr(report, "iteration_op_count",
                        lambda method, workload: 100 * workload.tasks if method == "loop" else 100)
    return calls


@pytest.mark.parametrize("l2l_missing", ["ModuleNotFoundError: No module named 'learn2learn'", None],
                         ids=["without-learn2learn", "with-learn2learn"])
def test_run_benchmark_writes_the_three_sections(fake_measurements: list[tuple[str, Workload]],
                                                 monkeypatch: pytest.MonkeyPatch, l2l_missing: str | None) -> None:
    monkeypatch.setattr(report, "learn2learn_unavailable", lambda: l2l_missing)
    pieces: list[str] = []
    run_benchmark(tasks=8, repeats=5, quick=True, write=pieces.append)
    text = "\n".join(pieces)
    assert pieces[0].startswith(f"Environment: torch {torch.__version__}, Python ")
    assert "1 intra-op threads" in pieces[0], "quick runs on one thread unless told otherwise"
    assert text.index("## 1.") < text.index("## 2.") < text.index("## 3.") and pieces[-1].startswith("Load average")
    assert "(2 tasks per meta-batch, Conv4 with 8 filters, 28x28 images, 2 queries per class, 1 inner step; " \
           "median of 1 iterations)" in text, "quick: tiny sizes and one repeat"

    throughput = pieces[2].splitlines()
    assert throughput[0].startswith("| setting | order | method | tasks/s | vs plain | peak RSS (MiB) |")
    assert len(throughput) == 2 + 4 * 6, "5-way and 20-way, second and first order, six methods each"
    assert "| 5-way 1-shot | second | plain | 2.00 | 1.00x | 4.0 | 1.00x | 1.0 | 1.00x | 0.0e+00 |" in throughput
    assert "| 20-way 1-shot | first | vmap | 8.00 | 4.00x | 4.0 | 1.00x | 1.0 | 1.00x | 5.0e-01 |" in throughput
    l2l_rows = [row for row in throughput if "| learn2learn |" in row]
    assert len(l2l_rows) == 4
    if l2l_missing:
        assert all(f"| not available ({l2l_missing}) |" in row for row in l2l_rows)
    else:
        assert all("| 2.00 | 1.00x |" in row for row in l2l_rows)
    measured = {method for method, _ in fake_measurements}
    assert measured == {"plain", "loop", "vmap", "compiled", "higher", "checkpointed"} | (
        set() if l2l_missing else {"learn2learn"})
    assert sum(method == "plain" for method, _ in fake_measurements) == 4, "one plain reference per workload"

    operators = pieces[5].splitlines()
    assert operators[2:] == ["| 1 | 100 | 100 | 1.00x |", "| 2 | 200 | 100 | 2.00x |", "| 4 | 400 | 100 | 4.00x |"]

    steps = pieces[7].splitlines()
    assert "(5-way 1-shot, 2 tasks)" in pieces[6]
    assert steps[2:] == ["| 2 | 0.500 | 1.500 | 3.00x | 4.0 | 2.0 | 0.50x | 2.0 | 1.0 | 0.50x | 0.0e+00 |",
                         "| 8 | 0.500 | 1.500 | 3.00x | 4.0 | 2.0 | 0.50x | 8.0 | 4.0 | 0.50x | 0.0e+00 |"]
    swept = [workload for method, workload in fake_measurements if method == "checkpointed"]
    assert [(w.inner_steps, w.tasks, w.hidden) for w in swept] == [(2, 2, 8), (8, 2, 8)]


def test_a_lower_bound_of_the_rss_is_marked(fake_measurements: list[tuple[str, Workload]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def inexact(method: str, workload: Workload, repeats: int, threads: int | None,
                ) -> tuple[Measurement, list[torch.Tensor]]:
        return Measurement(method, [1.0], 3 * MIB, rss_exact=False, peak_tensors=0), [torch.zeros(1)]

    monkeypatch.setattr(report, "measure_isolated", inexact)
    monkeypatch.setattr(report, "learn2learn_unavailable", lambda: "ImportError: broken")
    pieces: list[str] = []
    run_benchmark(quick=True, write=pieces.append)
    assert "| 5-way 1-shot | second | loop | 2.00 | 1.00x | >= 3.0 | 1.00x | 0.0 | n/a | 0.0e+00 |" in pieces[2]
