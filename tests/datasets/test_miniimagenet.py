"""miniImageNet loader: the shipped split table, and tiny generated data in both on-disk layouts."""

from __future__ import annotations

import builtins
import codecs
import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaopt import EpisodeSampler
from metaopt.datasets import miniimagenet as mi
from metaopt.datasets.miniimagenet import MiniImageNet, MiniImageNetOptions, build_miniimagenet, miniimagenet_split
from metaopt.options import ConfigError
from metaopt.problems.sampling import SPLITS
from metaopt.registry import entry
from metaopt.training.config import Section

DATA = os.environ.get("METAOPT_DATA")
TEST = miniimagenet_split("test")
CLASSES = list(TEST.classes[3:8])  # a reduced split: 5 classes of 16 images, enough for 5-way 1-shot 15-query
COUNT = 16


def _colour(cls: int, image: int) -> tuple[int, int, int]:
    """The flat colour of fake JPEG ``image`` of class ``cls``: distinct, and exact after JPEG and resizing."""
    return 40 * cls + 20, 12 * image + 5, 230 - 35 * cls


def _write_images(root: Path) -> list[Path]:
    """Ravi's layout for the reduced split; odd-numbered images are 100x90 so that they get resized."""
    folder = root / "images"
    folder.mkdir(parents=True)
    paths = []
    for c, wnid in enumerate(CLASSES):
        for j, name in enumerate(TEST.filenames[TEST.classes.index(wnid)][:COUNT]):
            size = (100, 90) if j % 2 else (84, 84)
            Image.new("RGB", size, _colour(c, j)).save(folder / name, quality=95)
            paths.append(folder / name)
    return paths


def _write_pickle(root: Path, classes: list[str] = CLASSES, count: int = COUNT, protocol: int = 4) -> torch.Tensor:
    """The pickle-cache layout for ``classes`` with rows in shuffled order; returns the expected images."""
    rng = np.random.default_rng(0)
    image_data = rng.integers(0, 256, size=(len(classes) * count, 84, 84, 3), dtype=np.uint8)
    rows = rng.permutation(len(image_data)).reshape(len(classes), count)
    class_dict = {wnid: rows[c].tolist() for c, wnid in enumerate(classes)}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": image_data, "class_dict": class_dict}, f, protocol=protocol)
    return torch.from_numpy(image_data[rows]).permute(0, 1, 4, 2, 3)


def _load(root: Path) -> MiniImageNet:
    return MiniImageNet(root, "test", classes=CLASSES, images_per_class=COUNT)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("METAOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _csv_text(split: mi.MiniImageNetSplit) -> str:
    rows = [f"{name},{wnid}\n" for wnid, names in zip(split.classes, split.filenames) for name in names]
    return "filename,label\n" + "".join(rows)


# ---- the shipped split table --------------------------------------------------------------------

def test_split_table_has_the_ravi_sizes() -> None:
    splits = {name: miniimagenet_split(name) for name in ("train", "val", "test")}
    assert {name: len(s.classes) for name, s in splits.items()} == {"train": 64, "val": 16, "test": 20}
    wnids = [w for s in splits.values() for w in s.classes]
    assert len(set(wnids)) == 100
    names = [n for s in splits.values() for files in s.filenames for n in files]
    assert len(set(names)) == len(names) == 60_000
    for s in splits.values():
        for wnid, files in zip(s.classes, s.filenames):
            assert len(files) == 600
            assert all(re.fullmatch(rf"{wnid}\d{{8}}\.jpg", f) for f in files)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_table_rebuilds_the_recorded_csvs(split: str) -> None:
    table = miniimagenet_split(split)
    text = _csv_text(table).encode()
    assert hashlib.sha256(text).hexdigest() == table.csv_sha256
    assert hashlib.md5(text).hexdigest() == table.csv_md5


@pytest.mark.skipif(not DATA, reason="set METAOPT_DATA to the folder holding miniimagenet/{train,val,test}.csv")
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_table_matches_the_csvs(split: str) -> None:
    raw = (Path(DATA) / "miniimagenet" / f"{split}.csv").read_bytes()
    table = miniimagenet_split(split)
    assert hashlib.sha256(raw).hexdigest() == table.csv_sha256
    assert hashlib.md5(raw).hexdigest() == table.csv_md5
    assert raw.decode() == _csv_text(table)


def test_edited_split_file_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edited = tmp_path / "miniimagenet-ravi-v1.json"
    edited.write_text(mi._SPLIT_FILE.read_text().replace('"n01930112"', '"n01930113"'))
    monkeypatch.setattr(mi, "_SPLIT_FILE", edited)
    with pytest.raises(RuntimeError, match="SHA-256"):
        miniimagenet_split("test")


# ---- the two layouts ----------------------------------------------------------------------------

def test_jpeg_folder_loads(tmp_path: Path) -> None:
    _write_images(tmp_path)
    data = _load(tmp_path)
    assert data.source == "images" and data.root == tmp_path and data.split == "test"
    assert data.class_names == CLASSES
    assert data.num_classes == 5 and [data.class_size(c) for c in range(5)] == [COUNT] * 5
    x = data.examples(2, [0, 1, 7])
    assert x.shape == (3, 3, 84, 84) and x.dtype == torch.float32
    expected = torch.tensor([_colour(2, j) for j in (0, 1, 7)], dtype=torch.float32)[:, :, None, None] / 255
    torch.testing.assert_close(x, expected.expand_as(x), atol=3 / 255, rtol=0)


def test_pickle_cache_loads_pixel_exact(tmp_path: Path) -> None:
    expected = _write_pickle(tmp_path)
    data = _load(tmp_path)
    assert data.source == "pickle" and data.class_names == CLASSES
    for c in range(5):
        torch.testing.assert_close(data.examples(c, range(COUNT)), expected[c].float() / 255, atol=0, rtol=0)


def test_pickle_is_preferred_and_root_defaults_to_metaopt_data(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _write_images(tmp_path / "miniimagenet")
    _write_pickle(tmp_path / "miniimagenet")
    monkeypatch.setenv("METAOPT_DATA", str(tmp_path))
    data = MiniImageNet(split="test", classes=CLASSES, images_per_class=COUNT)
    assert data.root == tmp_path / "miniimagenet" and data.source == "pickle"


@pytest.mark.parametrize("write", [_write_images, _write_pickle], ids=["images", "pickle"])
def test_episode_sampler_runs_on_both_layouts(tmp_path: Path, write: Callable[[Path], object]) -> None:
    write(tmp_path)
    batch = next(iter(EpisodeSampler(_load(tmp_path), ways=5, shots=1, query=15, batch_size=4, seed=0)))
    assert batch.support_x.shape == (4, 5, 3, 84, 84) and batch.query_x.shape == (4, 75, 3, 84, 84)
    assert batch.query_x.min() >= 0 and batch.query_x.max() <= 1


# ---- the decoded-image cache --------------------------------------------------------------------

def test_second_load_does_not_decode_jpegs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           _private_cache: Path) -> None:
    _write_images(tmp_path)
    first = _load(tmp_path)
    assert list(_private_cache.rglob("*.pt"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a JPEG was opened although the cache is valid")

    monkeypatch.setattr(Image, "open", refuse)
    assert torch.equal(_load(tmp_path).images, first.images)


def test_second_load_does_not_unpickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_pickle(tmp_path)
    first = _load(tmp_path)

    def refuse(self: object) -> None:
        raise AssertionError("the pickle was read although the cache is valid")

    monkeypatch.setattr(mi._RestrictedUnpickler, "load", refuse)
    assert torch.equal(_load(tmp_path).images, first.images)


def test_cache_is_rebuilt_when_a_source_changes(tmp_path: Path) -> None:
    paths = _write_images(tmp_path)
    _load(tmp_path)
    Image.new("RGB", (84, 84), (255, 0, 0)).save(paths[0], quality=95)
    os.utime(paths[0], ns=(1, 1))  # a different modification time even on coarse file systems
    first = _load(tmp_path).examples(0, [0])[0, :, 0, 0]
    torch.testing.assert_close(first, torch.tensor([1.0, 0.0, 0.0]), atol=3 / 255, rtol=0)


# ---- missing data -------------------------------------------------------------------------------

def test_missing_data_names_root_and_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        MiniImageNet(tmp_path, "test")
    message = str(error.value)
    assert str(tmp_path) in message
    assert str(tmp_path / "images" / "n0193011200000001.jpg") in message and "12000 files" in message
    assert str(tmp_path / "mini-imagenet-cache-test.pkl") in message


def test_missing_root_names_metaopt_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METAOPT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="METAOPT_DATA"):
        MiniImageNet(split="test")


def test_incomplete_images_folder_names_a_missing_file(tmp_path: Path) -> None:
    paths = _write_images(tmp_path)
    paths[17].unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of 80 images are missing \(e\.g\. {paths[17].name}\)"):
        _load(tmp_path)


# ---- the restricted unpickler -------------------------------------------------------------------

class _Exploit:
    """Unpickles to ``function(*args)``: what a tampered cache would use to run code."""

    def __init__(self, function: Callable[..., object], *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.function, self.args


@pytest.mark.parametrize("function", [os.system, builtins.exec], ids=["os.system", "exec"])
def test_malicious_pickle_is_refused(tmp_path: Path, function: Callable[..., object]) -> None:
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
    with open(tmp_path / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": _Exploit(function, command), "class_dict": {}}, f)
    refused = f"refusing to load global {function.__module__}.{function.__name__}"
    with pytest.raises(pickle.UnpicklingError, match=re.escape(refused)):
        _load(tmp_path)
    assert not marker.exists()


def test_codecs_encode_is_limited_to_latin1() -> None:
    payload = pickle.dumps(_Exploit(codecs.encode, "text", "rot13"), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        mi._RestrictedUnpickler(io.BytesIO(payload)).load()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("numpy_names", ["numpy._core", "numpy.core"])
def test_unpickler_accepts_numpy_caches(protocol: int, numpy_names: str) -> None:
    original = {"image_data": np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3),
                "class_dict": {"n01930112": [np.int64(1), 0]}, "mean": np.array([0.5, 0.25], dtype=np.float32)}
    payload = pickle.dumps(original, protocol=protocol)
    # numpy 1.x writes numpy.core; rename the numpy 2.x module names to check that both load
    payload = payload.replace(b"numpy._core.", numpy_names.encode() + b".") if protocol <= 3 else payload
    loaded = mi._RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    np.testing.assert_array_equal(loaded["image_data"], original["image_data"])
    np.testing.assert_array_equal(loaded["mean"], original["mean"])
    assert loaded["class_dict"] == {"n01930112": [1, 0]}


# ---- wrong pickle contents and arguments --------------------------------------------------------

def _dump(root: Path, content: object) -> None:
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump(content, f)


@pytest.mark.parametrize(("write", "message"), [
    (lambda root: _dump(root, [1, 2]), "not a miniImageNet cache"),
    (lambda root: _dump(root, {"image_data": None, "class_dict": [CLASSES]}), r"'class_dict': 'list'"),
    (lambda root: _dump(root, {"image_data": np.zeros((1, 84, 84, 3)), "class_dict": {}}), "uint8 array"),
    (lambda root: _write_pickle(root, classes=[*CLASSES, miniimagenet_split("val").classes[0]]), "1 unexpected"),
    (lambda root: _write_pickle(root, classes=CLASSES[:4]), "1 missing"),
    (lambda root: _write_pickle(root, count=COUNT - 1), f"needs {COUNT} row indices"),
], ids=["not-a-dict", "class-dict-not-a-dict", "float-images", "foreign-class", "missing-class", "too-few-rows"])
def test_wrong_pickle_contents_are_rejected(tmp_path: Path, write: Callable[[Path], object], message: str) -> None:
    write(tmp_path)
    with pytest.raises(ValueError, match=message):
        _load(tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "training"}, "unknown miniImageNet split"),
    ({"classes": ["n01532829"]}, "WordNet ids of the test split"),
    ({"classes": [CLASSES[0], CLASSES[0]]}, "1 repeated"),
    ({"classes": []}, "distinct WordNet ids"),
    ({"images_per_class": 0}, "images_per_class"),
    ({"images_per_class": 601}, "images_per_class"),
])
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MiniImageNet(tmp_path, **{"split": "test", **kwargs})


# ---- the registered dataset ---------------------------------------------------------------------

def test_registered_builder_gives_each_split_its_sampler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registered = entry("dataset", "miniimagenet")
    assert registered.options is MiniImageNetOptions and registered.build is build_miniimagenet
    assert registered.problems == "episodes"
    loaded: list[tuple[object, str]] = []

    def fake_miniimagenet(root: Path | None, split: str) -> dict[int, torch.Tensor]:
        loaded.append((root, split))
        return {c: torch.full((COUNT, 3, 4, 4), c / 10) for c in range(6)}

    monkeypatch.setattr(mi, "MiniImageNet", fake_miniimagenet)
    section = Section.from_dict("dataset", {"name": "miniimagenet", "ways": 5, "shots": 1, "query": 3,
                                            "eval_query": 10, "meta_batch": 2, "data_root": str(tmp_path)})
    for offset, split in enumerate(SPLITS):
        sampler = section.entry.build(section.options, split, 2)
        assert loaded[-1] == (tmp_path / "miniimagenet", split)
        assert isinstance(sampler, EpisodeSampler) and sampler.seed == 3 * 2 + offset, split
        query = 3 if split == "train" else 10
        assert sampler.protocol() == {"ways": 5, "shots": 1, "query": query} and sampler.batch_size == 2
        batch = sampler.batch(0)
        assert batch.support_x.shape == (2, 5, 3, 4, 4) and batch.query_x.shape == (2, 5 * query, 3, 4, 4)
        same = EpisodeSampler(fake_miniimagenet(None, split), ways=5, shots=1, query=query, batch_size=2,
                              seed=6 + offset).batch(0)
        assert torch.equal(batch.query_x, same.query_x) and torch.equal(batch.support_x, same.support_x)
    defaults = Section.from_dict("dataset", {"name": "miniimagenet"}).options
    assert (defaults.ways, defaults.shots, defaults.query, defaults.data_root) == (5, 1, 15, None)
    assert [build_miniimagenet(defaults, split, 0).query for split in SPLITS] == [15, 15, 15], "no eval_query: query"
    assert loaded[-1] == (None, "test"), "no data_root: $METAOPT_DATA"


def test_an_option_it_does_not_take_is_refused() -> None:
    with pytest.raises(ConfigError, match="^'protocol' is not an option of dataset 'miniimagenet'; its options are "
                                          "shots, query, eval_query, meta_batch, ways, data_root$"):
        Section.from_dict("dataset", {"name": "miniimagenet", "protocol": "ravi"})


# ---- damaged files, status line, missing data ---------------------------------------------------

def _where(root: Path) -> str:
    return f"into {root} (the miniimagenet/ folder under $METAOPT_DATA, or under --data-root / data_root when given)"


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_truncated_pickle_names_the_file_and_the_fix(tmp_path: Path, keep: float) -> None:
    _write_pickle(tmp_path)
    path = tmp_path / "mini-imagenet-cache-test.pkl"
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    error = "UnpicklingError: pickle data was truncated" if keep else "EOFError: Ran out of input"
    message = (f"{path} is truncated or corrupt ({error}); it cannot be unpickled: replace it with a complete "
               f"mini-imagenet-cache-test.pkl and put it {_where(tmp_path)}, or use Ravi's images/ folder of JPEGs "
               "instead")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        _load(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_jpeg_names_the_file(tmp_path: Path, damage: str) -> None:
    paths = _write_images(tmp_path)
    raw = paths[9].read_bytes()
    paths[9].write_bytes(b"not a jpeg" if damage == "garbage" else raw[: len(raw) // 3])
    with pytest.raises(ValueError, match=f"^{re.escape(str(paths[9]))} is not a readable image \\(.*\\); it is "
                                         "truncated or corrupt: replace it with the original file"):
        _load(tmp_path)


@pytest.mark.parametrize("write", [_write_images, _write_pickle], ids=["images", "pickle"])
def test_first_decoding_prints_one_status_line(tmp_path: Path, write: Callable[[Path], object], _private_cache: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path)
    capsys.readouterr()
    _load(tmp_path)
    [cache] = _private_cache.rglob("*.pt")
    what = "mini-imagenet-cache-test.pkl" if write is _write_pickle else f"80 JPEGs of {tmp_path / 'images'}"
    assert capsys.readouterr().err == f"decoding miniImageNet test: {what} (first time; cached in {cache})\n"
    _load(tmp_path)
    assert capsys.readouterr().err == "", "a cached load says nothing"


def test_missing_data_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        MiniImageNet(tmp_path, "test")
    assert str(error.value).endswith(
        f"; put either {_where(tmp_path)} (no images ship with metaopt and it cannot download them: they come from "
        "ILSVRC-2012)")
    assert "download=True" not in str(error.value)


def test_options_the_split_cannot_serve_name_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mi, "MiniImageNet", lambda root, split: {c: torch.zeros(COUNT, 3, 4, 4) for c in range(6)})
    section = Section.from_dict("dataset", {"name": "miniimagenet", "shots": 5, "query": 3, "eval_query": 15})
    with pytest.raises(ConfigError, match=re.escape("eval_query=15 plus shots=5 exceeds 16, the most examples a "
                                                    "class of the dataset val split has")):
        section.entry.build(section.options, "val", 0)
    section = Section.from_dict("dataset", {"name": "miniimagenet", "ways": 7})
    with pytest.raises(ConfigError, match=re.escape("ways=7 exceeds the 6 classes of the dataset train split; lower "
                                                    "--ways to at most 6")):
        section.entry.build(section.options, "train", 0)
