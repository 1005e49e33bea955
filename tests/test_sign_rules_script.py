"""scripts/sign_rules_vs_baselines.py: a --quick run on generated data writes the JSON, markdown and chart with every
optimizer, and a second run resumes from the JSON without training again."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

from metaopt.datasets.child_training import fake_data

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sign_rules_vs_baselines.py"
NAMES = ["SGD", "Momentum", "Adam", "Momentum-cos", "Adam-cos", "PowerSign", "PowerSign-ld", "PowerSign-cd",
         "PowerSign-rd", "AddSign", "AddSign-ld", "AddSign-cd", "AddSign-rd"]


def test_quick_run_writes_every_optimizer_and_resumes(tmp_path: Path, capsys) -> None:
    script = runpy.run_path(str(SCRIPT))
    out = tmp_path / "results" / "sign-rules"
    assert script["main"](["--quick", "--out", str(out)], data=fake_data(256)) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["complete"] and list(report["tasks"]) == ["A: Fashion-MNIST ConvNet", "B (transfer): MNIST MLP"]
    for task in report["tasks"].values():
        assert list(task["results"]) == NAMES == list(task["curves"])
        for name, row in task["results"].items():
            assert row["lr"] in task["protocol"]["lrs"] and len(row["test"]["values"]) == 2
            assert 0 <= row["test"]["mean"] <= 1 and ("vs_momentum" in row) == (name != "Momentum")
    text = out.with_suffix(".md").read_text()
    assert all(f"| {name} " in text for name in NAMES)
    assert sum(line.startswith("| Momentum ") for line in text.splitlines()) == 4  # two tables a task
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trainings = report["trainings"]

    assert script["main"](["--quick", "--out", str(out)], data=fake_data(256)) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["reused_trainings"] == sum(len(v) for v in trainings.values()) and again["trainings"] == trainings
    assert "wrote" in capsys.readouterr().out
