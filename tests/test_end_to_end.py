"""End to end: ``metaopt train --preset`` of a classification experiment, ``metaopt eval`` and ``metaopt compare``.

The data are generated Omniglot archives in the real format: ``images_background.zip`` and
``images_evaluation.zip`` holding every character the shipped split files name
(``<set>/<alphabet>/<character>/<id>_<drawing>.png``: 30 + 20 alphabets, 964 + 659 characters, 20
drawings each), as 8x8 PNGs. The presets find them through ``METAOPT_DATA`` as they find the real
ones, and the real loader reads them (its checks of the structure, its cache in a private
``METAOPT_CACHE``, the split files, the rotations). Only its decoding of the 32 460 PNGs, about
10 s, is sped up: the archives hold 61 distinct drawings, which the loader's own decoder decodes
(from the first characters, which hold all of them) and which are then placed where each
member's name says; a test checks the result against the loader's decoding of other characters.
Each preset trains for two meta-updates of two tasks with a Conv4 of 8 filters.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from metaopt.cli import main
from metaopt.datasets import omniglot as om
from metaopt.evaluation.compare import markdown_table, plot_runs, read_runs
from metaopt.models import Conv4
from metaopt.training.config import load_preset
from metaopt.training.experiment import build_experiment, load_run
from metaopt.training.legacy import read_run_config

#: preset -> (learner class, inner steps of its evaluation)
PRESETS = {"maml-omniglot-5w1s": ("MAML", 3), "metasgd-omniglot-5w1s": ("MetaSGD", 1)}
TINY = {"iterations": 2, "eval_every": 1, "eval_episodes": 5, "log_every": 1, "checkpoint_every": 1,
        "meta_batch": 2, "filters": 8, "threads": 1, "device": "cpu"}
EPISODES, QUERIES = 5, 5 * 15  # test tasks of a run (eval_episodes), query examples of each
DISTINCT = 61  # distinct drawings in the archives: drawing d of character number n is drawing (7 n + d) % 61
SAMPLE = 9  # characters 0..8 hold every distinct drawing (7 * 8 + 19 >= 60)


def _distinct(number: int, drawing: int) -> int:
    return (7 * number + drawing) % DISTINCT


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(bool)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_omniglot(folder: Path) -> None:
    """The two Omniglot archives with every character of the shipped splits, 20 drawings of 8x8 pixels each.

    Character number ``n`` (its place among all 1623 names, sorted) has the id ``n + 1``, as in
    ``0001_01.png``; its drawing ``d`` is distinct drawing :func:`_distinct` ``(n, d)``.
    """
    characters = sorted({name for split in om._split_table("vinyals").values() for name in split})
    rng = np.random.default_rng(0)
    drawings = [_png(rng.integers(0, 2, (8, 8))) for _ in range(DISTINCT)]
    folder.mkdir(parents=True)
    for source in om.EXPECTED:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for number, character in enumerate(characters):
                if character.startswith(f"{source}/"):
                    for drawing in range(om.DRAWINGS):
                        member = zipfile.ZipInfo(f"{character}/{number + 1:04d}_{drawing + 1:02d}.png",
                                                 (2015, 12, 1, 0, 0, 0))
                        archive.writestr(member, drawings[_distinct(number, drawing)])
        (folder / f"{source}.zip").write_bytes(buffer.getvalue())


def _place(member: str) -> int:
    """The distinct drawing that ``<set>/<alphabet>/<character>/<id>_<drawing>.png`` of :func:`write_omniglot` is."""
    number, drawing = (int(part) - 1 for part in member.rsplit("/", 1)[1].removesuffix(".png").split("_"))
    return _distinct(number, drawing)


def _decoding_once(decode: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The loader's ``_decode`` for the archives of :func:`write_omniglot`: ``decode`` of the distinct drawings only."""

    def decode_once(source: object, characters: dict[str, list[str]], size: int) -> torch.Tensor:
        first = dict(list(characters.items())[:SAMPLE])
        decoded = decode(source, first, size)  # [characters, drawings, size, size]
        table = {_place(member): decoded[i, j] for i, files in enumerate(first.values()) for j, member in
                 enumerate(files)}
        assert sorted(table) == list(range(DISTINCT)), "the first characters hold every distinct drawing"
        distinct = torch.stack([table[k] for k in range(DISTINCT)])
        return distinct[torch.tensor([[_place(member) for member in files] for files in characters.values()])]

    return decode_once


LOADER_DECODE = om._decode  # the loader's own, before the module's fixture replaces it


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``METAOPT_DATA`` holding generated Omniglot archives, and a private ``METAOPT_CACHE``, for the whole module."""
    root = tmp_path_factory.mktemp("data")
    write_omniglot(root / "omniglot")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METAOPT_DATA", str(root))
        patch.setenv("METAOPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setattr(om, "_decode", _decoding_once(LOADER_DECODE))
        yield root / "omniglot"


def _flags(options: dict[str, object]) -> list[str]:
    return [part for name, value in options.items() for part in (f"--{name.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def runs(omniglot: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Each preset trained by ``metaopt train`` on the generated Omniglot: its run directory and what it printed."""
    made = {}
    for preset in PRESETS:
        run_dir = tmp_path_factory.mktemp("runs") / preset
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = main(["train", "--preset", preset, *_flags(TINY), "--run-dir", str(run_dir)])
        assert status == 0, printed.getvalue()
        made[preset] = run_dir, printed.getvalue()
    return made


def _protocol(inner_steps: int, episodes: int = EPISODES) -> dict[str, object]:
    return {"ways": 5, "shots": 1, "query": 15, "inner_steps": inner_steps, "episodes": episodes, "bn_policy": "batch"}


def _check_accuracy(result: dict[str, object], episodes: int) -> None:
    """An accuracy in [0, 1]: the mean over ``episodes`` tasks of correct answers among 75 queries each."""
    mean, ci95 = result["mean"], result["ci95"]
    assert result["metric"] == "accuracy" and isinstance(mean, float) and isinstance(ci95, float)
    assert 0.0 <= mean <= 1.0 and math.isfinite(ci95) and ci95 >= 0.0
    correct = mean * episodes * QUERIES
    assert correct == pytest.approx(round(correct), abs=1e-3), "a whole number of correct queries"


def test_the_data_are_what_the_loader_decodes(omniglot, runs):
    images, names, checksums = om._load_images(omniglot, 28)  # the cache, written when the first run started
    assert images.shape == (1623, om.DRAWINGS, 28, 28) and images.dtype == torch.uint8
    assert checksums == {om.BACKGROUND: "unknown", om.EVALUATION: "unknown"}
    assert names == sorted({name for split in om._split_table("vinyals").values() for name in split})
    assert len({name.split("/")[1] for name in names}) == 50
    others = [100, 963, 964, 1622]  # past the sample, both sets, the last character
    chosen = {names[n]: [f"{names[n]}/{n + 1:04d}_{d + 1:02d}.png" for d in range(om.DRAWINGS)] for n in others}
    assert torch.equal(LOADER_DECODE(om._Source(omniglot), chosen, 28), images[others])
    assert len({bytes(image.numpy()) for image in images.flatten(0, 1)}) == DISTINCT


@pytest.mark.parametrize("preset", PRESETS)
def test_the_run_records_the_presets_config_with_the_overrides(runs, preset):
    run_dir, _ = runs[preset]
    expected = load_preset(preset).replace(
        threads=1, device="cpu", model={"filters": 8}, data={"meta_batch": 2},
        trainer={name: TINY[name] for name in ("iterations", "eval_every", "eval_episodes", "log_every",
                                               "checkpoint_every")})
    recorded = read_run_config(run_dir / "config.json")
    assert recorded.to_dict() == expected.to_dict()
    assert json.loads((run_dir / "config.json").read_text())["model"] == {"name": "conv4", "filters": 8,
                                                                         "strided": True}
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events.")) == [
        "best.pt", "config.json", "final.json", "last.pt", "metrics.jsonl", "train.log"]


@pytest.mark.parametrize("preset", PRESETS)
def test_final_json_holds_the_test_accuracy_with_the_protocol(runs, preset):
    run_dir, printed = runs[preset]
    final = json.loads((run_dir / "final.json").read_text())
    steps = PRESETS[preset][1]
    assert final["result"]["protocol"] == _protocol(steps) and final["result"]["episodes"] == EPISODES
    _check_accuracy(final["result"], EPISODES)
    mean, ci95 = final["result"]["mean"], final["result"]["ci95"]
    assert final["summary"] == (f"accuracy {100 * mean:.2f}% ± {100 * ci95:.2f}% (95% CI; ways=5, shots=1, "
                                f"query=15, inner_steps={steps}, episodes={EPISODES}, bn_policy=batch)")
    assert (final["split"], final["checkpoint"]) == ("test", "best.pt")
    assert final["checkpoint_iteration"] == final["train"]["best"]["iteration"] in (1, 2)
    assert final["train"]["iteration"] == 2 and final["train"]["stopped_by"] == "iterations"
    assert printed.endswith(f"test problems, checkpoint best.pt (iteration {final['checkpoint_iteration']})\n"
                            f"{final['summary']}\nwritten to {run_dir / 'final.json'}\n")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    for record in records:  # validation on eval_episodes tasks after every meta-update
        _check_accuracy({"metric": "accuracy", "mean": record["val/accuracy"], "ci95": record["val/accuracy_ci95"]},
                        EPISODES)


@pytest.mark.parametrize("preset", PRESETS)
def test_the_trained_model_is_the_strided_conv4_of_the_preset(runs, preset):
    run_dir, _ = runs[preset]
    learner = load_run(run_dir, "best")
    assert type(learner).__name__ == PRESETS[preset][0]
    model = learner.model
    assert isinstance(model, Conv4)
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in convolutions] == [(1, 8, (2, 2))] + [(8, 8, (2, 2))] * 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules()) == 1
    head = model[-1]
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (8, 5)
    # the oracle: MAML's Omniglot network built by hand computes what the trained one computes
    reference = Conv4(1, 5, hidden=8, image_size=28, strided=True)
    reference.load_state_dict(model.state_dict())
    images = torch.rand(6, 1, 28, 28)
    for training in (True, False):  # batch statistics, then the running ones
        model.train(training)
        reference.train(training)
        with torch.no_grad():
            assert torch.equal(model(images), reference(images))
    initial = build_experiment(read_run_config(run_dir / "config.json")).learner.model
    assert not torch.equal(initial[0][0].weight, model[0][0].weight), "the checkpoint holds trained weights"


@pytest.mark.parametrize("preset", PRESETS)
def test_metaopt_eval_repeats_the_final_result_and_takes_other_settings(runs, preset, tmp_path, capsys):
    run_dir = Path(shutil.copytree(runs[preset][0], tmp_path / preset))
    final = json.loads((run_dir / "final.json").read_text())
    assert main(["eval", "--run", str(run_dir)]) == 0
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["result"] == final["result"], "the same checkpoint on the same test tasks"
    assert (record["summary"], record["split"], record["checkpoint"]) == (final["summary"], "test", "best.pt")
    assert capsys.readouterr().out == (f"test problems, checkpoint best.pt (iteration {final['checkpoint_iteration']})"
                                       f"\n{final['summary']}\nwritten to {run_dir / 'eval.json'}\n")
    assert main(["eval", "--run", str(run_dir), "--checkpoint", "last", "--split", "val", "--episodes", "3",
                 "--steps", "2"]) == 0
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["result"]["protocol"] == _protocol(2, episodes=3)
    assert (record["split"], record["checkpoint"], record["checkpoint_iteration"]) == ("val", "last.pt", 2)
    _check_accuracy(record["result"], 3)


def test_metaopt_compare_tabulates_both_runs(runs, tmp_path):
    loaded = read_runs([run_dir for run_dir, _ in runs.values()])
    rows = [line.strip("| ").split(" | ") for line in markdown_table(loaded).splitlines()[2:]]
    for row, run, preset in zip(rows, loaded, PRESETS):
        final = json.loads((run.path / "final.json").read_text())
        assert row[:6] == [preset, preset.split("-")[0], "omniglot", "5", "1", final["summary"]]
        assert (run.tasks_per_update, run.tasks) == (2, 4) and row[8:] == [f"{4 / run.train_s:.0f}", "2"]
    figure = plot_runs(loaded, tmp_path / "compare.png")
    assert figure.axes[0].get_ylabel() == "val/accuracy"
    assert [list(line.get_xdata()) for line in figure.axes[0].lines] == [[1, 2], [1, 2]]
