"""scripts/gpu_check.sh: on the CPU (--device cpu --quick) it times loop, vmap and compiled, and the strategies'
meta-gradients agree; without CUDA, --device cuda is a clear error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_a_quick_cpu_run_times_every_strategy_with_agreeing_meta_gradients(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    done = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--quick", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(r["configuration"], r["strategy"]) for r in report["rows"]] == [
        (c, s) for c in ("Omniglot 5-way 1-shot", "Omniglot 20-way 1-shot") for s in ("loop", "vmap", "compiled")]
    for row in report["rows"]:
        assert row["tasks_per_s"] > 0 and row["peak_mib"] > 0 and row["first_s"] > 0 and row["fallback"] is None
        assert row["max_abs_diff"] < 1e-4  # float32: the same meta-gradient by another batching
    assert "| Omniglot 20-way 1-shot | compiled | " in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_without_cuda_the_default_device_is_a_clear_error() -> None:
    done = subprocess.run(["bash", str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "sees no CUDA device here" in done.stderr and "--device cpu" in done.stderr
