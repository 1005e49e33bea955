"""Fashion-MNIST loader and the 8x8 MLP optimizees: small generated IDX files, and the real ones when present."""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from metaopt.datasets import fashion_mnist, mnist
from metaopt.datasets.fashion_mnist import (
    MAX_LOSS,
    FashionMNIST8MLP,
    FashionMNIST8MLPOptions,
    build_fashion_mnist8_mlp,
    download_fashion_mnist,
    downsample,
    load_fashion_mnist,
    normalize_loss,
)
from metaopt.evaluation.tuned_baselines import run_optimizer
from metaopt.problems.optimizees import Optimizee, OptimizeeFamily, OptimizeeStream
from metaopt.registry import entry
from metaopt.training.config import Section
from tests.datasets.test_mnist import _fake_split, _idx_bytes, _serve, _write, _write_mnist

DATA = os.environ.get("METAOPT_DATA")
FASHION = Path(DATA, "fashion-mnist") if DATA else None
MNIST_DIR = Path(DATA, "mnist") if DATA else None
needs_fashion = pytest.mark.skipif(FASHION is None or not FASHION.is_dir(),
                                   reason="set METAOPT_DATA to the folder holding fashion-mnist/ (the four IDX files)")
needs_mnist = pytest.mark.skipif(MNIST_DIR is None or not MNIST_DIR.is_dir(),
                                 reason="set METAOPT_DATA to the folder holding mnist/ (the four IDX files)")


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    _write_mnist(tmp_path / "fashion-mnist")  # same layout; 300 + 60 generated images
    return tmp_path / "fashion-mnist"


# --- the loader ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fake_files_load(tmp_path: Path, gz: bool) -> None:
    data = _write_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(tmp_path, split=split)
        want_images, want_labels = data[split]
        assert torch.equal(images, torch.from_numpy(want_images.reshape(-1, 784)).float() / 255)
        assert torch.equal(labels, torch.from_numpy(want_labels).long())


def test_missing_file_names_files_and_folder(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fake / "t10k-labels-idx1-ubyte.gz").unlink()
    message = (f"Fashion-MNIST test files not found in {fake}: missing t10k-labels-idx1-ubyte.gz; put "
               "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
               f"t10k-labels-idx1-ubyte.gz from {fashion_mnist.SOURCE} (github.com/zalandoresearch/fashion-mnist) "
               f"into {fake} (the fashion-mnist/ folder under $METAOPT_DATA, or under --data-root / data_root when "
               "given); from Python, metaopt.datasets.fashion_mnist.download_fashion_mnist(root) fetches them when "
               "online")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        load_fashion_mnist(fake, split="test")
    monkeypatch.setenv("METAOPT_DATA", str(fake.parent))
    assert load_fashion_mnist(split="train")[0].shape == (300, 784), "default root: $METAOPT_DATA/fashion-mnist"


def test_corrupt_files_name_the_file(fake: Path) -> None:
    path = fake / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[:-200])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is not a complete gzip file"):
        load_fashion_mnist(fake)
    path.write_bytes(gzip.compress(gzip.decompress(raw)[:-784]))
    with pytest.raises(ValueError, match=r"is truncated: .* for 300 items"):
        load_fashion_mnist(fake)
    _write(path, _idx_bytes(mnist.LABEL_MAGIC, _fake_split(10, 0)[0]))
    with pytest.raises(ValueError, match=f"has magic number 2049, not 2051 .*\\(see {re.escape(fashion_mnist.SOURCE)}"):
        load_fashion_mnist(fake)
    with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist(fake, split="val")


def test_full_split_with_unbalanced_classes_is_refused(tmp_path: Path) -> None:
    _, labels = _fake_split(10000, 1)  # random classes: unbalanced, as MNIST's
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(mnist.LABEL_MAGIC, labels))
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(mnist.IMAGE_MAGIC, np.zeros((10000, 28, 28))))
    with pytest.raises(ValueError, match=r"labels per class, as MNIST has \(Fashion-MNIST has exactly 1000 of every "
                                         r"class\): .* holds MNIST, not Fashion-MNIST"):
        load_fashion_mnist(tmp_path, split="test")


@needs_mnist
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_files_in_the_fashion_folder_are_refused(tmp_path: Path, gz: bool) -> None:
    for name in (n for pair in mnist.FILES.values() for n in pair):
        if gz:
            (tmp_path / name).symlink_to(MNIST_DIR / name)
        else:
            (tmp_path / name.removesuffix(".gz")).write_bytes(gzip.decompress((MNIST_DIR / name).read_bytes()))
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    assert md5 in mnist.MNIST_MD5
    message = f"{path} is MNIST's {path.name} (MD5 {md5}): {tmp_path} holds MNIST, not Fashion-MNIST"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        load_fashion_mnist(tmp_path)


@needs_fashion
def test_real_files() -> None:
    images, labels = load_fashion_mnist(split="train")
    assert images.shape == (60000, 784) and torch.bincount(labels).tolist() == [6000] * 10
    assert images.mean(dtype=torch.float64).item() * 255 == pytest.approx(72.94, abs=0.01)
    assert torch.bincount(load_fashion_mnist(split="test")[1]).tolist() == [1000] * 10
    assert {hashlib.md5((FASHION / n).read_bytes()).hexdigest() for n in fashion_mnist.KNOWN_MD5} == set(
        fashion_mnist.KNOWN_MD5.values())


# --- download (no network: urlopen serves generated files) ------------------------------------------------------


def test_download_fetches_the_missing_files_and_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    _write_mnist(source)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    monkeypatch.setattr(fashion_mnist, "KNOWN_MD5", {name: hashlib.md5(raw).hexdigest() for name, raw in files.items()})
    monkeypatch.setenv("METAOPT_DATA", str(tmp_path / "data"))
    target = tmp_path / "data" / "fashion-mnist"
    target.mkdir(parents=True)
    (target / "train-labels-idx1-ubyte.gz").write_bytes(files["train-labels-idx1-ubyte.gz"])
    asked = _serve(monkeypatch, files, down=(fashion_mnist.SOURCE,))
    assert download_fashion_mnist() == target
    assert len(asked) == 6 and not any("train-labels" in a for a in asked), "present files are not fetched"
    assert all(a.startswith(fashion_mnist.MIRRORS[1]) for a in asked[1::2]), "the second mirror after the first"
    assert sorted(p.name for p in target.iterdir()) == sorted(files), "no temporary files are left"
    assert load_fashion_mnist(split="test")[0].shape == (60, 784)


def test_download_refuses_a_wrong_checksum_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch, {"train-images-idx3-ubyte.gz": gzip.compress(b"not the published file")})
    md5 = fashion_mnist.KNOWN_MD5["train-images-idx3-ubyte.gz"]
    with pytest.raises(FileNotFoundError, match=f"MD5 .*, not the original's {md5}.*Offline\\? put "):
        download_fashion_mnist(tmp_path, mirrors=("http://mirror/",))
    assert list(tmp_path.iterdir()) == []


def test_download_offline_says_where_the_files_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch, {}, down=("http",))
    with pytest.raises(FileNotFoundError) as error:
        download_fashion_mnist(tmp_path / "fashion-mnist")
    message = str(error.value)
    assert message.startswith(f"could not download train-images-idx3-ubyte.gz ({fashion_mnist.SOURCE}"
                              "train-images-idx3-ubyte.gz: <urlopen error [Errno -3] Temporary failure")
    assert message.endswith(f"Offline? {fashion_mnist._PUT} into {tmp_path / 'fashion-mnist'} (the fashion-mnist/ "
                            "folder under $METAOPT_DATA, or under --data-root / data_root when given)")
    assert list((tmp_path / "fashion-mnist").iterdir()) == []


# --- 8x8 images, the family --------------------------------------------------------------------------------------


def test_downsampling_matches_a_hand_computed_bilinear_resize() -> None:
    image = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.float64)
    want = np.empty((8, 8))
    for i in range(8):
        for j in range(8):  # tf.image.resize: sample at (k + 0.5) · 28/8 − 0.5 = 3.5 k + 1.25
            r, c = 3.5 * i + 1.25, 3.5 * j + 1.25
            r0, c0, fr, fc = int(r), int(c), r % 1, c % 1
            want[i, j] = ((1 - fr) * ((1 - fc) * image[r0, c0] + fc * image[r0, c0 + 1])
                          + fr * ((1 - fc) * image[r0 + 1, c0] + fc * image[r0 + 1, c0 + 1])) / 255
    got = downsample(torch.from_numpy(image).to(torch.uint8).reshape(1, 784))
    assert got.dtype == torch.float32 and got.shape == (1, 64)
    np.testing.assert_allclose(got.reshape(8, 8).numpy(), want, atol=1e-6)
    assert got[0, 0].item() == pytest.approx((0.5625 * image[1, 1] + 0.1875 * (image[1, 2] + image[2, 1])
                                              + 0.0625 * image[2, 2]) / 255, abs=1e-6)


def test_family_is_a_pure_function_of_the_seed(fake: Path) -> None:
    family = FashionMNIST8MLP(fake, batch=32)
    assert isinstance(family, OptimizeeFamily) and isinstance(family.sample(0), Optimizee)
    assert family.images.shape == (240, 64), "the first 80% of the 300 training images, 8x8"
    a, b, c = family.sample(7), FashionMNIST8MLP(fake, batch=32).sample(7), family.sample(8)
    pa, pb, pc = a.init_params(), b.init_params(), c.init_params()
    assert all(torch.equal(pa[k], pb[k]) for k in pa) and not torch.equal(pa["fc1.weight"], pc["fc1.weight"])
    assert [a.loss(pa, s).item() for s in range(8)] == [b.loss(pb, s).item() for s in range(8)]
    assert torch.equal(a.batch_rows(3), b.batch_rows(3)) and not torch.equal(a.batch_rows(3), c.batch_rows(3))
    assert len(set(torch.cat([a.batch_rows(s) for s in range(7)]).tolist())) == 224, "no repeats within an epoch"


def test_init_is_haikus_linear(fake: Path) -> None:
    params = FashionMNIST8MLP(fake, batch=16).sample(0).init_params()
    assert [tuple(p.shape) for p in params.values()] == [(32, 64), (32,), (10, 32), (10,)]
    for fan_in, name in ((64, "fc1"), (32, "fc2")):
        w, std = params[f"{name}.weight"], fan_in ** -0.5
        assert torch.count_nonzero(params[f"{name}.bias"]) == 0 and w.abs().max() <= 2 * std
        assert w.std().item() == pytest.approx(0.8796 * std, rel=0.15), "std of N(0, 1) truncated at ±2: 0.88"


def test_loss_is_clipped_in_the_outer_loss_only(fake: Path) -> None:
    problem = FashionMNIST8MLP(fake, batch=16).sample(0)
    params = problem.init_params()
    assert problem.loss(params, 0).item() == pytest.approx(math.log(10), abs=0.3)
    assert problem.outer_loss(params, 0)[0].item() == problem.loss(params, 0).item()
    big = {k: v * 1000 for k, v in params.items()}
    assert problem.loss(big, 0).item() > MAX_LOSS
    assert problem.outer_loss(big, 0)[0].item() == pytest.approx(1.5 * math.log(10))
    assert normalize_loss(torch.tensor([float("nan"), float("inf"), -1.0, 1.0])).tolist() == pytest.approx(
        [MAX_LOSS, MAX_LOSS, 0.0, 1.0])
    nan = {k: torch.full_like(v, float("nan")) for k, v in params.items()}
    assert problem.outer_loss(nan, 0)[0].item() == pytest.approx(MAX_LOSS)


def test_bad_arguments(fake: Path) -> None:
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        FashionMNIST8MLP(fake, activation="gelu")
    with pytest.raises(ValueError, match="unknown part 'val'"):
        FashionMNIST8MLP(fake, part="val")
    with pytest.raises(ValueError, match="batch must be between 1 and the 240 images of part 'train', got 241"):
        FashionMNIST8MLP(fake, batch=241)
    with pytest.raises(ValueError, match="seed must be a non-negative"):
        FashionMNIST8MLP(fake, batch=16).sample(-1)


def test_registered_builder(fake: Path) -> None:
    registered = entry("dataset", "fashion-mnist8-mlp")
    assert registered.options is FashionMNIST8MLPOptions and registered.build is build_fashion_mnist8_mlp
    section = Section.from_dict("dataset", {"name": "fashion-mnist8-mlp", "hidden": [8], "activation": "tanh",
                                            "batch_size": 16, "data_root": str(fake.parent)})
    stream = section.entry.build(section.options, "val", 0)
    assert isinstance(stream, OptimizeeStream) and stream.first == 10**9
    assert (stream.family.hidden, stream.family.activation, stream.family.batch) == ((8,), "tanh", 16)
    assert stream.protocol() == {"hidden": [8], "activation": "tanh", "image_size": 8}
    defaults = Section.from_dict("dataset", {"name": "fashion-mnist8-mlp"}).options
    assert (defaults.hidden, defaults.activation, defaults.batch_size) == ((32,), "relu", 128)


@needs_fashion
def test_real_data_adam_lowers_the_loss() -> None:
    family = FashionMNIST8MLP()
    assert family.images.shape == (48000, 64) and family.images.min() >= 0 and family.images.max() <= 1
    losses = run_optimizer(functools.partial(torch.optim.Adam, lr=1e-2), family.sample(0), steps=50)
    assert losses[0].item() == pytest.approx(math.log(10), abs=0.2)
    assert losses[-5:].mean().item() < losses[0].item() - 0.7, losses
