"""scripts/learned_optimizer_step.py: every optimizer steps the 1M-parameter model, and the tables name them all."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "learned_optimizer_step.py"


def test_the_model_has_a_million_parameters_and_every_optimizer_moves_it() -> None:
    script = runpy.run_path(str(SCRIPT))
    model = script["model_of_one_million"]()
    numel = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= numel < 1_010_000
    for name, make in script["optimizers"]().items():
        params = [p.detach().clone()[:2].requires_grad_() for p in model.parameters()]  # a slice of each: fast
        before = [p.detach().clone() for p in params]
        optimizer = make(params)
        for p in params:
            p.grad = torch.full_like(p, 1e-2)
        optimizer.step(**({"loss": 1.0} if name.startswith("LiMalik") else {}))
        assert any(not (p == b).all() for p, b in zip(params, before)), name


def test_a_short_run_writes_the_table_against_adam(tmp_path: Path) -> None:
    out = tmp_path / "step"
    runpy.run_path(str(SCRIPT))["main"](["--steps", "1", "--only", "Adam", "PowerSign", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert [row["optimizer"] for row in report["rows"]] == ["Adam (foreach)", "Adam (for-loop)",
                                                           "PowerSign (DSLOptimizer, Bello et al.)",
                                                           "PowerSign (torch.optim class)"]
    assert report["rows"][0]["vs_adam"] == 1.0 and all(row["step_ms"] > 0 for row in report["rows"])
    assert "| PowerSign (DSLOptimizer, Bello et al.) |" in out.with_suffix(".md").read_text()
