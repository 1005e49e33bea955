"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

from metaopt import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write a run directory
    registry.load_plugins()
    monkeypatch.setattr(registry, "_TABLES", {kind: dict(table) for kind, table in registry._TABLES.items()})
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "the README lost its Python examples"
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    assert namespace["logits"].shape == (75, 5)
    assert namespace["loss"].requires_grad and set(namespace["metrics"]) == {"loss", "accuracy"}
    assert namespace["summary"]["iteration"] == 2 and (tmp_path / "runs" / "quickstart" / "last.pt").exists()
    assert type(namespace["mine"]).__name__ == "MetaLearner" and namespace["mine"].rule.lr == 0.01
    assert (tmp_path / "runs" / "l2l-quickstart" / "best.pt").exists()
    assert namespace["fake_batch"].support_x.shape == (4, 5, 1, 28, 28)
    assert type(namespace["trained"]).__name__ == "MAML" and not namespace["trained"].training
    assert namespace["curve"].shape == (100, 1)
    assert namespace["lopt"].steps == 6  # 5 training steps and a validation batch of the hierarchical optimizer
    losses = namespace["fit_losses"]  # the shipped optimizer fits the toy regression (it once went 6.5 -> 1142)
    assert losses[-1] < 0.01 * losses[0] and namespace["optimizer"].param_groups[0]["lr"] == 0.25
    assert namespace["searched"].param_groups[0]["rule"] == "mul(sign_g, sign_m); mul(exp(o1), g)"
