"""Omniglot loader: the real archives (when METAOPT_DATA is set) and small generated archives."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaopt import EpisodeSampler
from metaopt.datasets import omniglot as om
from metaopt.datasets.omniglot import (
    Omniglot,
    OmniglotOptions,
    build_omniglot,
    download_omniglot,
    safe_extract,
    split_names,
)
from metaopt.options import ConfigError
from metaopt.problems.sampling import SPLITS
from metaopt.registry import entry
from metaopt.training.config import Section

DATA = os.environ.get("METAOPT_DATA")
needs_data = pytest.mark.skipif(not DATA or not Path(DATA, "omniglot").is_dir(),
                                reason="set METAOPT_DATA to the folder holding omniglot/")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAOPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _write_fake(root: Path, drop: str | None = None) -> None:
    """Tiny archives in the real layout: the expected counts of alphabets and characters, 8x8 PNGs.

    ``drop``: a character folder (``<set>/<alphabet>/<character>/``) whose fifth drawing is left out.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    number = 1
    for name, (alphabets, characters) in om.EXPECTED.items():
        with zipfile.ZipFile(root / f"{name}.zip", "w") as z:
            per = [characters // alphabets + (i < characters % alphabets) for i in range(alphabets)]
            for a, count in enumerate(per):
                for c in range(count):
                    for d in range(om.DRAWINGS):
                        member = f"{name}/Alpha{a:02d}/character{c + 1:02d}/{number:04d}_{d + 1:02d}.png"
                        if drop and member.startswith(drop) and d == 4:
                            continue
                        image = Image.fromarray(rng.integers(0, 2, (8, 8), dtype=np.uint8).astype(bool))
                        buffer = io.BytesIO()
                        image.save(buffer, format="PNG")
                        z.writestr(member, buffer.getvalue())
                    number += 1


def test_shipped_split_files_are_disjoint_and_checksummed() -> None:
    assert split_names("maml") == {"train": 1200, "val": 100, "test": 423}
    assert split_names("vinyals") == {"train": 1028, "val": 172, "test": 423}
    for protocol in ("maml", "vinyals"):
        name, sha = om.SPLIT_FILES[protocol]
        raw = resources.files("metaopt.datasets").joinpath("splits", name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == sha
        splits = json.loads(raw)["splits"]
        assert not set(splits["train"]) & set(splits["test"])
        if protocol == "vinyals":
            assert not set(splits["val"]) & (set(splits["train"]) | set(splits["test"]))
            assert len(set(splits["train"]) | set(splits["val"]) | set(splits["test"])) == 1623
        else:
            assert set(splits["val"]) <= set(splits["train"])


def test_edited_split_file_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(om.SPLIT_FILES, "maml", (om.SPLIT_FILES["maml"][0], "0" * 64))
    with pytest.raises(RuntimeError, match="SHA-256"):
        split_names("maml")


@needs_data
def test_real_omniglot_maml_protocol() -> None:
    train = Omniglot(Path(DATA, "omniglot"), split="train", protocol="maml")
    test = Omniglot(Path(DATA, "omniglot"), split="test", protocol="maml")
    assert train.num_classes == 4800 and test.num_classes == 423
    assert set(train.checksums.values()) <= {"original", "rebuilt"}
    batch = next(iter(EpisodeSampler(train, ways=5, shots=1, query=15, batch_size=32, seed=0)))
    assert batch.support_x.shape == (32, 5, 1, 28, 28) and batch.query_x.shape == (32, 75, 1, 28, 28)
    image = test.examples(0, [0])[0, 0]
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert 0.02 < image.mean() < 0.3, "ink must be 1 on a 0 background"
    base = train.examples(4, [3])
    assert torch.equal(train.examples(5, [3]), torch.rot90(base, 1, dims=(-2, -1)))


@needs_data
def test_real_omniglot_vinyals_protocol() -> None:
    root = Path(DATA, "omniglot")
    sizes = [Omniglot(root, split=s, protocol="vinyals").num_classes for s in ("train", "val", "test")]
    assert sizes == [1028 * 4, 172, 423]


def test_fake_archives_load_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake(tmp_path / "omni")
    monkeypatch.setattr(om, "_split_table", lambda protocol: {"train": [], "test": []})
    images, names, checksums = om._load_images(tmp_path / "omni", 28)
    assert images.shape == (1623, 20, 28, 28) and images.dtype == torch.uint8
    assert checksums == {om.BACKGROUND: "unknown", om.EVALUATION: "unknown"}
    assert len(names) == 1623 and names == sorted(names)

    def fail(*args: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(om, "_decode", fail)
    again, _, _ = om._load_images(tmp_path / "omni", 28)
    assert torch.equal(images, again)


def test_missing_data_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images_background.zip.*images_evaluation.zip"):
        Omniglot(tmp_path, split="test")


def test_incomplete_archive_is_rejected(tmp_path: Path) -> None:
    _write_fake(tmp_path, drop="images_evaluation/Alpha03/character02/")
    with pytest.raises(FileNotFoundError, match="incomplete Omniglot set images_evaluation"):
        om._load_images(tmp_path, 28)


def test_bad_split_and_protocol() -> None:
    with pytest.raises(ValueError, match="unknown Omniglot protocol"):
        split_names("random")


def test_safe_extract_refuses_escaping_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok/file.txt", "fine")
        z.writestr("../escaped.txt", "bad")
    with pytest.raises(ValueError, match="unsafe member"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "ok").exists()
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("ok/file.txt", "fine")
    safe_extract(good, tmp_path / "out")
    assert (tmp_path / "out" / "ok" / "file.txt").read_text() == "fine"


def test_download_from_a_local_mirror(tmp_path: Path) -> None:
    _write_fake(tmp_path / "mirror")
    target = tmp_path / "data"
    download_omniglot(target, url=(tmp_path / "mirror").as_uri() + "/{name}.zip")
    for name in om.EXPECTED:
        assert (target / f"{name}.zip").read_bytes() == (tmp_path / "mirror" / f"{name}.zip").read_bytes()
    assert not list(target.glob("*.part"))


def test_download_offline_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="could not download"):
        download_omniglot(tmp_path, url=(tmp_path / "nowhere").as_uri() + "/{name}.zip")


def test_registered_builder_gives_each_split_its_sampler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered = entry("dataset", "omniglot")
    assert registered.options is OmniglotOptions and registered.build is build_omniglot
    assert registered.problems == "episodes"
    loaded: list[tuple[object, str, str]] = []

    def fake_omniglot(root: Path | None, split: str, protocol: str) -> dict[int, torch.Tensor]:
        loaded.append((root, split, protocol))
        return {c: torch.full((om.DRAWINGS, 1, 4, 4), float(c)) for c in range(8)}

    monkeypatch.setattr(om, "Omniglot", fake_omniglot)
    section = Section.from_dict("dataset", {"name": "omniglot", "ways": 3, "shots": 2, "query": 4, "eval_query": 15,
                                            "meta_batch": 5, "protocol": "vinyals", "data_root": str(tmp_path)})
    for offset, split in enumerate(SPLITS):
        sampler = section.entry.build(section.options, split, 7)
        assert loaded[-1] == (tmp_path / "omniglot", split, "vinyals")
        assert isinstance(sampler, EpisodeSampler) and sampler.seed == 3 * 7 + offset, split
        query = 4 if split == "train" else 15
        assert sampler.protocol() == {"ways": 3, "shots": 2, "query": query} and sampler.batch_size == 5
        batch = sampler.batch(0)
        assert batch.support_x.shape == (5, 6, 1, 4, 4) and batch.query_x.shape == (5, 3 * query, 1, 4, 4)
        same = EpisodeSampler(fake_omniglot(None, split, "vinyals"), ways=3, shots=2, query=query, batch_size=5,
                              seed=21 + offset).batch(0)
        assert torch.equal(batch.query_x, same.query_x) and torch.equal(batch.query_y, same.query_y)
    defaults = Section.from_dict("dataset", {"name": "omniglot"}).options
    assert (defaults.ways, defaults.shots, defaults.protocol, defaults.data_root) == (5, 1, "maml", None)
    assert [build_omniglot(defaults, split, 0).query for split in SPLITS] == [15, 15, 15], "no eval_query: query"
    assert loaded[-1] == (None, "test", "maml"), "no data_root: $METAOPT_DATA"


@needs_data
def test_registered_builder_reads_the_real_splits() -> None:
    options = OmniglotOptions(ways=5, shots=1, query=1, eval_query=15, meta_batch=2, data_root=DATA)
    samplers = {split: build_omniglot(options, split, 0) for split in SPLITS}
    assert {split: s.dataset.num_classes for split, s in samplers.items()} == {"train": 4800, "val": 100, "test": 423}
    assert samplers["train"].batch(0).query_x.shape == (2, 5, 1, 28, 28)
    assert samplers["test"].batch(0).query_x.shape == (2, 75, 1, 28, 28)


def test_an_option_it_does_not_take_is_refused() -> None:
    with pytest.raises(ConfigError, match="^'image_size' is not an option of dataset 'omniglot'; its options are "
                                          "shots, query, eval_query, meta_batch, ways, protocol, data_root$"):
        Section.from_dict("dataset", {"name": "omniglot", "image_size": 28})


# ---- damaged archives, status line, errors that name the option ---------------------------------

def _how_to_replace(name: str, root: Path) -> str:
    return (f"replace it with a complete {name}.zip from github.com/brendenlake/omniglot (python/ folder) and put it "
            f"into {root} (the omniglot/ folder under $METAOPT_DATA, or under --data-root / data_root when given); "
            "from Python, delete it and call Omniglot(..., download=True) to fetch it again")


@pytest.mark.parametrize("damage", ["truncated", "not a zip"])
def test_damaged_archive_names_the_file_and_the_fix(tmp_path: Path, damage: str) -> None:
    _write_fake(tmp_path)
    path = tmp_path / f"{om.EVALUATION}.zip"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncated" else b"<html>404</html>")
    message = (f"{path} is not a complete zip archive ({path.stat().st_size} bytes, no zip directory: truncated or "
               f"corrupt); {_how_to_replace(om.EVALUATION, tmp_path)}")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Omniglot(tmp_path, split="test")


def test_corrupt_member_names_the_archive_and_the_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAOPT_CACHE", str(tmp_path / "cache"))
    _write_fake(tmp_path)
    path = tmp_path / f"{om.BACKGROUND}.zip"
    with zipfile.ZipFile(path) as z:
        member = sorted(n for n in z.namelist() if n.endswith(".png"))[0]
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename.encode()) + 40] ^= 0xFF  # a byte of the member's data
    path.write_bytes(bytes(raw))
    fix = re.escape(_how_to_replace(om.BACKGROUND, tmp_path))
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path}: member {member} cannot be read (Bad CRC-32')}.*"
                                         f"the archive is corrupt: {fix}$"):
        om._load_images(tmp_path, 28)


def test_first_decoding_prints_one_status_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("METAOPT_CACHE", str(tmp_path / "cache"))
    _write_fake(tmp_path / "omni")
    capsys.readouterr()
    om._load_images(tmp_path / "omni", 28)
    [cache] = (tmp_path / "cache").glob("omniglot-28px-*.pt")
    assert capsys.readouterr().err == (f"decoding Omniglot images_background.zip, images_evaluation.zip (first time, "
                                       f"about 15 s; cached in {cache})\n")
    om._load_images(tmp_path / "omni", 28)
    assert capsys.readouterr().err == "", "a cached load says nothing"


def test_missing_data_message_names_metaopt_data_and_the_python_download(tmp_path: Path) -> None:
    message = (f"Omniglot not found in {tmp_path}: missing images_background.zip (or folder images_background/), "
               "images_evaluation.zip (or folder images_evaluation/). Fetch images_background.zip and "
               "images_evaluation.zip from github.com/brendenlake/omniglot (python/ folder) and put them into "
               f"{tmp_path} (the omniglot/ folder under $METAOPT_DATA, or under --data-root / data_root when given); "
               "from Python, Omniglot(..., download=True) fetches them when online")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        Omniglot(tmp_path, split="test")


def test_safe_extract_refuses_symbolic_links(tmp_path: Path) -> None:
    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("ok/file.txt", "fine")
        link = zipfile.ZipInfo("ok/passwd")
        link.external_attr = (0o120777 << 16)  # a symbolic link, as `zip --symlinks` stores it
        z.writestr(link, "/etc/passwd")
    target = tmp_path / "out"
    message = (f"unsafe member 'ok/passwd' in {archive}: a symbolic link (to '/etc/passwd'), which could point outside "
               f"{target.resolve()}; nothing was extracted: remove the link from the archive")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        safe_extract(archive, target)
    assert not target.exists() or not any(target.iterdir())


def _twenty_drawings(root: Path | None, split: str, protocol: str) -> dict[int, torch.Tensor]:
    return {c: torch.zeros(om.DRAWINGS, 1, 4, 4) for c in range(30)}


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_query_too_large_for_the_drawings_names_eval_query(split: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(om, "Omniglot", _twenty_drawings)
    section = Section.from_dict("dataset", {"name": "omniglot", "shots": 10, "query": 1, "eval_query": 15})
    message = (f"eval_query=15 plus shots=10 exceeds 20, the most examples a class of the dataset {split} split has "
               "(validation and test tasks draw shots + eval_query examples per class); lower --eval-query or --shots")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        section.entry.build(section.options, split, 0)
    assert section.entry.build(section.options, "train", 0).query == 1, "training tasks use query=1: they fit"


@needs_data
def test_shots_10_with_the_presets_eval_query_on_real_omniglot() -> None:
    options = OmniglotOptions(ways=5, shots=10, query=1, eval_query=15, meta_batch=2, data_root=DATA)
    message = ("eval_query=15 plus shots=10 exceeds 20, the most examples a class of the Omniglot test split has "
               "(validation and test tasks draw shots + eval_query examples per class); lower --eval-query or --shots")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        build_omniglot(options, "test", 0)
