"""Pretrained learned optimizers: export of a trained l2l run, the file format, loading by name or path, the errors."""

from __future__ import annotations

import importlib.metadata
import json
import re
import runpy
from pathlib import Path

import pytest
import torch

from metaopt import cli
from metaopt.algorithms import pretrained_optimizers
from metaopt.algorithms.lstm_optimizer import LearnedOptimizer, LSTMOptimizerRule, export_pretrained
from metaopt.algorithms.pretrained_optimizers import (
    FORMAT,
    VERSION,
    available_pretrained,
    read_pretrained,
    write_pretrained,
)
from metaopt.training.checkpoint import CheckpointError, load_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "export_pretrained.py"
#: A metaopt 0.1 LearnedOptimizerTrainer run (see tests/fixtures/legacy/README.md).
LEGACY_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "legacy" / "l2l-quadratics"
EXPORT = "python scripts/export_pretrained.py RUN_DIR NAME"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny l2l run on the quadratics, trained for 4 meta-updates (validated at 2 and 4)."""
    folder = tmp_path_factory.mktemp("l2l") / "run"
    code = cli.main(["train", "--preset", "l2l-quadratics", "--iterations", "4", "--eval-every", "2",
                     "--eval-episodes", "1", "--test-episodes", "1", "--horizon", "10", "--truncation", "5",
                     "--batch", "4", "--run-dir", str(folder)])
    assert code == 0 and (folder / "best.pt").is_file()
    return folder


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty pretrained folder in place of the package's."""
    monkeypatch.setattr(pretrained_optimizers, "FOLDER", tmp_path / "pretrained")
    return tmp_path / "pretrained"


def export_script(*args: str) -> int:
    return runpy.run_path(str(SCRIPT))["main"](list(args))


def rules_equal(a: LSTMOptimizerRule, b: LSTMOptimizerRule) -> bool:
    return a.settings() == b.settings() and a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_script_exports_a_run_that_loads_by_name_offline(run_dir: Path, folder: Path, capsys) -> None:
    assert available_pretrained() == []
    assert export_script(str(run_dir), "l2l-tiny", "--dir", str(folder)) == 0
    assert f"wrote {folder / 'l2l-tiny.pt'}" in capsys.readouterr().out
    assert available_pretrained() == ["l2l-tiny"]

    checkpoint = load_checkpoint(run_dir / "best.pt")
    found = read_pretrained("l2l-tiny")
    assert found.path == folder / "l2l-tiny.pt" and found.rule == "LSTMOptimizerRule"
    assert found.settings == {"preprocessing": False, "p": 10.0, "output_scale": 1.0, "hidden": 20, "layers": 2}
    best = checkpoint["best"]
    expected = {"preset": "l2l-quadratics", "iterations": checkpoint["iteration"], "best_val_loss": best["value"],
                "best": best, "metaopt_version": importlib.metadata.version("metaopt"),
                "torch_version": torch.__version__, "checkpoint": "run/best.pt", "config": checkpoint["config"]}
    assert json.dumps(found.provenance, sort_keys=True) == json.dumps(expected, sort_keys=True)  # NaN ci95s alike
    assert best["metric"] == "loss" and best["iteration"] == checkpoint["iteration"] in (2, 4)
    assert checkpoint["config"]["algorithm"]["horizon"] == 10

    trained = LSTMOptimizerRule.from_checkpoint(run_dir / "best.pt")
    assert rules_equal(LSTMOptimizerRule.pretrained("l2l-tiny"), trained)
    assert rules_equal(LSTMOptimizerRule.pretrained(folder / "l2l-tiny.pt"), trained)

    def steps(**source: object) -> torch.Tensor:
        torch.manual_seed(0)
        model, data = torch.nn.Linear(3, 1), torch.randn(3, 8, 3)
        opt = LearnedOptimizer(model.parameters(), **source)
        for x in data:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return model.weight.detach()

    torch.manual_seed(5)
    LSTMOptimizerRule.pretrained("l2l-tiny")
    assert torch.equal(torch.random.get_rng_state(), torch.random.manual_seed(5).get_state())  # no draws

    assert torch.equal(steps(pretrained="l2l-tiny"), steps(checkpoint=run_dir / "best.pt"))
    assert torch.equal(steps(pretrained=str(folder / "l2l-tiny.pt")), steps(rule=trained))
    assert not torch.equal(steps(pretrained="l2l-tiny"), steps(rule=LSTMOptimizerRule()))

    wide = torch.zeros(4, dtype=torch.float64, requires_grad=True)  # the rule takes the parameters' dtype
    opt = LearnedOptimizer([wide], pretrained="l2l-tiny")
    wide.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    assert next(opt.rule.parameters()).dtype == torch.float64 and wide.abs().sum() > 0


def test_the_script_refuses_to_overwrite_and_names_bad_input(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert export_script(str(run_dir), "tiny", "--dir", str(tmp_path), "--checkpoint", "last") == 0
    capsys.readouterr()
    assert export_script(str(run_dir), "tiny", "--dir", str(tmp_path)) == 2
    assert capsys.readouterr().err == (f"export_pretrained.py: error: {tmp_path / 'tiny.pt'} exists; pass --force to "
                                       "overwrite it, or choose another name\n")
    assert export_script(str(run_dir), "tiny", "--dir", str(tmp_path), "--force", "--preset", "l2l-mnist") == 0
    assert read_pretrained(tmp_path / "tiny.pt").provenance["preset"] == "l2l-mnist"  # as the user says
    assert export_script(str(run_dir), "tiny", "--dir", str(tmp_path), "--force", "--preset", "l2l-cifar") == 2
    assert "error: unknown preset 'l2l-cifar'; the presets are " in capsys.readouterr().err
    assert export_script(str(run_dir), "sub/tiny", "--dir", str(tmp_path)) == 2
    assert ("error: a pretrained optimizer's name is letters, digits, '.', '_' and '-' (no folder, no .pt), got "
            "'sub/tiny'; e.g. 'l2l-mnist'") in capsys.readouterr().err
    assert export_script(str(tmp_path / "nowhere"), "tiny2", "--dir", str(tmp_path)) == 2
    assert f"error: checkpoint {tmp_path / 'nowhere' / 'best.pt'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "tiny2.pt").exists()


def test_a_run_of_metaopt_0_1_exports_without_config_or_preset(tmp_path: Path) -> None:
    """Its checkpoint has no config (and its config.json cannot be read today): what it has is recorded."""
    provenance = export_pretrained(LEGACY_RUN / "best.pt", tmp_path / "old.pt")
    assert provenance == {"preset": None, "iterations": None, "best_val_loss": pytest.approx(629.2440795898438),
                          "best": {"value": pytest.approx(629.2440795898438), "epoch": 20},
                          "metaopt_version": importlib.metadata.version("metaopt"),
                          "torch_version": torch.__version__, "checkpoint": "l2l-quadratics/best.pt", "config": None}
    assert rules_equal(LSTMOptimizerRule.pretrained(tmp_path / "old.pt"),
                       LSTMOptimizerRule.from_checkpoint(LEGACY_RUN / "best.pt"))


def test_an_unknown_name_lists_the_available_ones(folder: Path) -> None:
    message = (f"no pretrained optimizer named 'l2l-mnist'; available: none (no .pt file in {folder}). Pass one of "
               f"them, or the path of a file written by {EXPORT}")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LearnedOptimizer([torch.zeros(2)], pretrained="l2l-mnist")
    write_pretrained(folder / "a.pt", "LSTMOptimizerRule", {}, {}, {})
    write_pretrained(folder / "b.pt", "LSTMOptimizerRule", {}, {}, {})
    with pytest.raises(ValueError, match=re.escape("no pretrained optimizer named 'c'; available: 'a', 'b'. Pass")):
        LSTMOptimizerRule.pretrained("c")


def good_file(path: Path, **changes: object) -> Path:
    rule = LSTMOptimizerRule(hidden=4)
    payload = {"format": FORMAT, "version": VERSION, "rule": "LSTMOptimizerRule", "settings": rule.settings(),
               "weights": rule.state_dict(), "provenance": {}, **changes}
    torch.save({k: v for k, v in payload.items() if v is not None}, path)
    return path


def test_missing_corrupt_and_foreign_files_are_named(tmp_path: Path, run_dir: Path) -> None:
    assert LSTMOptimizerRule.pretrained(good_file(tmp_path / "good.pt")).settings()["hidden"] == 4
    cases = {
        tmp_path / "nope.pt": f"pretrained optimizer file {tmp_path / 'nope.pt'} does not exist; check the path, or "
                              "pass a shipped name (",
        tmp_path / "bad.pt": f"pretrained optimizer file {tmp_path / 'bad.pt'} cannot be read: it is corrupt, "
                             f"truncated or not a tensors-only torch file (",
        run_dir / "best.pt": f"{run_dir / 'best.pt'} is not a pretrained optimizer file (no 'format': "
                             "'metaopt-pretrained-optimizer' entry); a run's best.pt or last.pt loads with "
                             f"checkpoint= (LSTMOptimizerRule.from_checkpoint), or export it: {EXPORT}",
        good_file(tmp_path / "v2.pt", version=2): f"pretrained optimizer file {tmp_path / 'v2.pt'} has format version "
                                                  "2, this metaopt reads version 1; load it with the metaopt release "
                                                  "that wrote it",
        good_file(tmp_path / "part.pt", weights=None): f"pretrained optimizer file {tmp_path / 'part.pt'} lacks the "
                                                       f"entries ['weights']; export it again: {EXPORT}",
        good_file(tmp_path / "sgd.pt", rule="_SGD"): f"pretrained optimizer file {tmp_path / 'sgd.pt'} holds a _SGD "
                                                     "rule, not an LSTMOptimizerRule",
        good_file(tmp_path / "new.pt", settings={"hidden": 4, "momentum": 0.9}): "has settings {'hidden': 4, "
                                                                                 "'momentum': 0.9} that an "
                                                                                 "LSTMOptimizerRule does not take",
        good_file(tmp_path / "shape.pt", settings={"hidden": 5}): f"checkpoint {tmp_path / 'shape.pt'} does not fit "
                                                                  "this LSTMOptimizerRule: ",
    }
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=re.escape(message)):
            LearnedOptimizer([torch.zeros(2)], pretrained=path)


def test_every_shipped_file_loads_with_its_provenance() -> None:
    """The package's own files: the l2l-mnist optimizer of the README's MNIST run (algorithms/pretrained/)."""
    assert "l2l-mnist" in available_pretrained()
    assert read_pretrained("l2l-mnist").provenance["preset"] == "l2l-mnist"
    for name in available_pretrained():
        found = read_pretrained(name)
        assert {"preset", "iterations", "best_val_loss", "metaopt_version"} <= found.provenance.keys(), name
        assert LSTMOptimizerRule.pretrained(name).settings() == found.settings
