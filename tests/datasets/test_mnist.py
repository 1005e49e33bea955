"""MNIST loader and optimizees: the real IDX files (when METAOPT_DATA is set) and small generated ones."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import re
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from metaopt.datasets import mnist
from metaopt.datasets.mnist import (
    MNISTMLPOptions,
    MNISTOptimizees,
    build_mnist_mlp,
    download_mnist,
    load_mnist,
    meta_split_indices,
    mlp_shapes,
)
from metaopt.options import ConfigError
from metaopt.problems.optimizees import Optimizee, OptimizeeFamily, OptimizeeStream
from metaopt.problems.sampling import SPLITS
from metaopt.registry import entry
from metaopt.training.config import Section

DATA = os.environ.get("METAOPT_DATA")
needs_data = pytest.mark.skipif(not DATA or not Path(DATA, "mnist").is_dir(),
                                reason="set METAOPT_DATA to the folder holding mnist/ (the four IDX .gz files)")
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    return struct.pack(f">{array.ndim + 1}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write(path: Path, raw: bytes) -> None:
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake digits: class ``k`` lights rows ``2k`` to ``2k + 2`` over faint noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, 2 * k : 2 * k + 3] = rng.integers(180, 256, (3, 28))
    return images, labels


def _write_mnist(root: Path, gz: bool = True, n_train: int = 300, n_test: int = 60) -> dict[str, tuple]:
    root.mkdir(parents=True, exist_ok=True)
    data = {"train": _fake_split(n_train, 0), "test": _fake_split(n_test, 1)}
    for split, (image_file, label_file) in mnist.FILES.items():
        images, labels = data[split]
        for name, magic, array in ((image_file, mnist.IMAGE_MAGIC, images), (label_file, mnist.LABEL_MAGIC, labels)):
            _write(root / (name if gz else name.removesuffix(".gz")), _idx_bytes(magic, array))
    return data


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    _write_mnist(tmp_path / "mnist")
    return tmp_path / "mnist"


def _sgd(problem: Optimizee, steps: int = 20, lr: float = 1.0) -> dict[str, torch.Tensor]:
    params = problem.init_params()
    for step in range(steps):
        params = {k: v.requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(problem.loss(params, step), list(params.values()))
        params = {k: (v - lr * g).detach() for (k, v), g in zip(params.items(), grads)}
    return params


def _port_halves(n: int) -> tuple[set[int], set[int]]:
    """The split of the PyTorch port: ``list(range(n))`` shuffled by ``RandomState(10)``, halved."""
    order = list(range(n))
    np.random.RandomState(10).shuffle(order)
    return set(order[: n // 2]), set(order[n // 2 :])


# --- the real files ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_train() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist(Path(DATA, "mnist"), split="train")


@needs_data
def test_real_train_split(real_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = real_train
    assert images.shape == (60000, 784) and images.dtype == torch.float32
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert torch.bincount(labels, minlength=10).tolist() == TRAIN_COUNTS
    assert images.mean(dtype=torch.float64).item() == pytest.approx(0.130660, abs=1e-5)


@needs_data
def test_real_test_split() -> None:
    images, labels = load_mnist(split="test")  # through $METAOPT_DATA/mnist
    assert images.shape == (10000, 784) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert torch.bincount(labels, minlength=10).tolist() == TEST_COUNTS


@needs_data
def test_real_optimizees_meta_halves_and_sgd(real_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = MNISTOptimizees(part="meta-train"), MNISTOptimizees(part="meta-test")
    assert len(train.indices) == len(test.indices) == 30000
    assert (set(train.indices.tolist()), set(test.indices.tolist())) == _port_halves(60000)
    images, labels = real_train
    assert torch.equal(train.images[:5].float() / 255, images[train.indices[:5]])
    assert torch.equal(test.labels, labels[test.indices])
    problem = train.sample(0)
    before = problem.loss(problem.init_params(), 0).item()
    assert before == pytest.approx(math.log(10), abs=0.15)
    assert problem.loss(_sgd(problem), 0).item() < before - 0.3


# --- generated files --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_fake_files_load(tmp_path: Path, gz: bool) -> None:
    data = _write_mnist(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = load_mnist(tmp_path, split=split)
        want_images, want_labels = data[split]
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(images, torch.from_numpy(want_images.reshape(len(want_images), 784)).float() / 255)
        assert torch.equal(labels, torch.from_numpy(want_labels).long())


def test_metaopt_data_is_the_default_root(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAOPT_DATA", str(fake.parent))
    assert load_mnist(split="test")[0].shape == (60, 784)
    monkeypatch.delenv("METAOPT_DATA")
    with pytest.raises(FileNotFoundError, match="METAOPT_DATA"):
        load_mnist()


def test_missing_file_names_files_folder_and_source(fake: Path) -> None:
    (fake / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_mnist(fake, split="test")
    message = str(error.value)
    assert "missing t10k-labels-idx1-ubyte.gz" in message and str(fake) in message
    assert "http://yann.lecun.com/exdb/mnist/" in message and "download_mnist" in message
    assert load_mnist(fake, split="train")[0].shape == (300, 784), "the other split is unaffected"


def test_wrong_magic_number_names_the_file(fake: Path) -> None:
    images, _ = _fake_split(10, 0)
    _write(fake / "t10k-images-idx3-ubyte.gz", _idx_bytes(mnist.LABEL_MAGIC, images))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz has magic number 2049, not 2051"):
        load_mnist(fake, split="test")


def test_swapped_files_are_rejected(fake: Path) -> None:
    images, labels = fake / "train-images-idx3-ubyte.gz", fake / "train-labels-idx1-ubyte.gz"
    images.write_bytes(labels.read_bytes())
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz has magic number 2049"):
        load_mnist(fake)


def test_truncated_gzip_names_the_file(fake: Path) -> None:
    path = fake / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is not a complete gzip file"):
        load_mnist(fake)


def test_truncated_idx_names_the_file(fake: Path) -> None:
    path = fake / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-784]))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is truncated: .* for 300 items"):
        load_mnist(fake)
    path.write_bytes(gzip.compress(b"\x00\x00\x08"))
    with pytest.raises(ValueError, match="truncated: 3 bytes, shorter than the IDX header"):
        load_mnist(fake)


def test_inconsistent_files_are_rejected(fake: Path) -> None:
    _, labels = _fake_split(61, 1)
    _write(fake / "t10k-labels-idx1-ubyte.gz", _idx_bytes(mnist.LABEL_MAGIC, labels))
    with pytest.raises(ValueError, match="60 images but .* has 61 labels"):
        load_mnist(fake, split="test")
    labels[:60] = 10
    _write(fake / "t10k-labels-idx1-ubyte.gz", _idx_bytes(mnist.LABEL_MAGIC, labels[:60]))
    with pytest.raises(ValueError, match="holds label 10, outside 0-9"):
        load_mnist(fake, split="test")
    _write(fake / "t10k-images-idx3-ubyte.gz", _idx_bytes(mnist.IMAGE_MAGIC, np.zeros((60, 14, 14))))
    with pytest.raises(ValueError, match=r"items of shape \(14, 14\), expected \(28, 28\)"):
        load_mnist(fake, split="test")
    with pytest.raises(ValueError, match="unknown MNIST split"):
        load_mnist(fake, split="val")


# --- download (no network: urlopen is replaced) ---------------------------------------------------------------


def _serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], down: tuple[str, ...] = ()) -> list[str]:
    """Replace urlopen: addresses starting with one of ``down`` fail; the others serve ``files`` by name."""
    asked: list[str] = []

    def urlopen(address: str, timeout: float) -> io.BytesIO:
        asked.append(address)
        if address.startswith(down):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return io.BytesIO(files[address.rsplit("/", 1)[1]])

    monkeypatch.setattr(mnist.urllib.request, "urlopen", urlopen)
    return asked


def test_download_tries_mirrors_and_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    _write_mnist(source)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    monkeypatch.setattr(mnist, "KNOWN_MD5", {name: hashlib.md5(raw).hexdigest() for name, raw in files.items()})
    target = tmp_path / "data" / "mnist"
    target.mkdir(parents=True)
    (target / "t10k-labels-idx1-ubyte.gz").write_bytes(files["t10k-labels-idx1-ubyte.gz"])
    asked = _serve(monkeypatch, files, down=("http://down/",))
    assert download_mnist(target, mirrors=("http://down/", "http://up/")) == target
    assert len(asked) == 6 and not any("t10k-labels" in a for a in asked), "present files are not fetched"
    assert sorted(p.name for p in target.iterdir()) == sorted(files), "no temporary files are left"
    assert load_mnist(target, split="test")[0].shape == (60, 784)


def test_download_rejects_a_wrong_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch, {"train-images-idx3-ubyte.gz": b"<html>not found</html>"})
    with pytest.raises(FileNotFoundError, match="MD5 .*, not the original's f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        download_mnist(tmp_path, mirrors=("http://mirror/",))
    assert list(tmp_path.iterdir()) == []


def test_download_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METAOPT_DATA", str(tmp_path))
    _serve(monkeypatch, {}, down=("http",))
    with pytest.raises(FileNotFoundError) as error:
        download_mnist()
    message = str(error.value)
    assert "could not download train-images-idx3-ubyte.gz" in message and "Offline?" in message
    assert "name resolution" in message and str(tmp_path / "mnist") in message
    assert list((tmp_path / "mnist").iterdir()) == []


# --- the optimizee family ---------------------------------------------------------------------------------------


def test_family_follows_the_protocol(fake: Path) -> None:
    family = MNISTOptimizees(fake)
    assert isinstance(family, OptimizeeFamily) and isinstance(family.sample(0), Optimizee)
    loss = family.sample(0).loss(family.sample(0).init_params(), step=0)
    assert loss.shape == () and loss.dtype == torch.float32


def test_sample_is_a_pure_function_of_the_seed(fake: Path) -> None:
    a, b, c = MNISTOptimizees(fake).sample(7), MNISTOptimizees(fake).sample(7), MNISTOptimizees(fake).sample(8)
    pa, pb, pc = a.init_params(), b.init_params(), c.init_params()
    assert all(torch.equal(pa[k], pb[k]) for k in pa) and all(torch.equal(pa[k], a.init_params()[k]) for k in pa)
    assert not any(torch.equal(pa[k], pc[k]) for k in pa)
    assert [a.loss(pa, s).item() for s in range(5)] == [b.loss(pb, s).item() for s in range(5)]
    assert not torch.equal(a.batch_rows(0), c.batch_rows(0))
    assert not torch.equal(a.batch_rows(0), a.batch_rows(1))
    assert a.loss(pa, 0).item() != a.loss(pa, 1).item()


def test_minibatches_cover_each_epoch_without_replacement(fake: Path) -> None:
    family = MNISTOptimizees(fake, batch=50, part="all")  # 300 images: six batches per epoch
    problem = family.sample(3)
    epoch = torch.cat([problem.batch_rows(s) for s in range(6)])
    assert sorted(epoch.tolist()) == list(range(300))
    assert not torch.equal(problem.batch_rows(0), problem.batch_rows(6)), "each epoch is reshuffled"
    x, y = problem.batch(4)
    assert x.shape == (50, 784) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.equal(y, family.labels[problem.batch_rows(4)])
    with pytest.raises(ValueError, match="step must be >= 0"):
        problem.batch_rows(-1)


@pytest.mark.parametrize(("hidden", "shapes"), [
    ((20,), [(20, 784), (20,), (10, 20), (10,)]),
    ((40,), [(40, 784), (40,), (10, 40), (10,)]),
    ((20, 20), [(20, 784), (20,), (20, 20), (20,), (10, 20), (10,)]),
])
def test_variants_have_the_papers_shapes(fake: Path, hidden: tuple[int, ...], shapes: list[tuple[int, ...]]) -> None:
    params = MNISTOptimizees(fake, hidden=hidden).sample(0).init_params()
    assert [tuple(p.shape) for p in params.values()] == shapes == list(mlp_shapes(hidden).values())
    for name, p in params.items():
        bound = mlp_shapes(hidden)[name.replace("bias", "weight")][1] ** -0.5
        assert p.abs().max() <= bound, "PyTorch's default nn.Linear init: uniform in ±1/√fan_in"
        if name.endswith("weight"):
            assert p.abs().max() > 0.95 * bound and p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


@pytest.mark.parametrize("hidden", [(20,), (40,), (20, 20)])
def test_sigmoid_loss_at_init_is_near_log10(fake: Path, hidden: tuple[int, ...]) -> None:
    family = MNISTOptimizees(fake, hidden=hidden)
    for seed in range(3):
        problem = family.sample(seed)
        assert problem.loss(problem.init_params(), 0).item() == pytest.approx(math.log(10), abs=0.2)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_sgd_lowers_the_loss(fake: Path, activation: str) -> None:
    problem = MNISTOptimizees(fake, activation=activation, part="all").sample(1)

    def mean_loss(params: dict[str, torch.Tensor]) -> float:
        return sum(problem.loss(params, s).item() for s in range(2)) / 2  # one epoch: 256 of the 300 images

    before, after = mean_loss(problem.init_params()), mean_loss(_sgd(problem))
    assert after < before - 0.5, (before, after)


def test_meta_train_and_meta_test_are_disjoint(fake: Path) -> None:
    train, test = MNISTOptimizees(fake, batch=16), MNISTOptimizees(fake, batch=16, part="meta-test")
    assert (set(train.indices.tolist()), set(test.indices.tolist())) == _port_halves(300)
    assert len(train.labels) == len(test.labels) == 150
    images, labels = load_mnist(fake)
    assert torch.equal(test.images.float() / 255, images[test.indices])
    assert torch.equal(train.labels, labels[train.indices])
    assert sorted(meta_split_indices(301, "meta-train").tolist() + meta_split_indices(301, "meta-test").tolist()) \
        == list(range(301))
    held_out = MNISTOptimizees(fake, batch=60, split="test", part="all")
    assert held_out.indices.tolist() == list(range(60)) and held_out.images.dtype == torch.uint8


def test_float64_params_give_a_float64_loss(fake: Path) -> None:
    problem = MNISTOptimizees(fake, dtype=torch.float64).sample(0)
    params = problem.init_params()
    assert all(p.dtype == torch.float64 for p in params.values())
    assert problem.loss(params, 0).dtype == torch.float64


def test_bad_family_arguments(fake: Path) -> None:
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        MNISTOptimizees(fake, activation="tanh")
    with pytest.raises(ValueError, match="unknown part 'half'"):
        MNISTOptimizees(fake, part="half")
    with pytest.raises(ValueError, match="hidden sizes must be positive"):
        MNISTOptimizees(fake, hidden=(0,))
    with pytest.raises(ValueError, match="batch must be between 1 and the 150 images of train/meta-train"):
        MNISTOptimizees(fake, batch=151)
    with pytest.raises(ValueError, match="seed must be a non-negative"):
        MNISTOptimizees(fake, batch=16).sample(-1)


# --- the registered dataset -------------------------------------------------------------------------------------


def test_registered_builder_gives_each_split_its_problems(fake: Path) -> None:
    registered = entry("dataset", "mnist-mlp")
    assert registered.options is MNISTMLPOptions and registered.build is build_mnist_mlp
    assert registered.problems == "optimizees"
    section = Section.from_dict("dataset", {"name": "mnist-mlp", "hidden": [20, 20], "activation": "relu",
                                            "batch_size": 16, "data_root": str(fake.parent)})
    firsts = {"train": 3 * 10**6, "val": 10**9, "test": 2 * 10**9}  # seed 3: problems 3·10⁶ + i, 10⁹ + i, 2·10⁹ + i
    for split in SPLITS:
        stream = section.entry.build(section.options, split, 3)
        assert isinstance(stream, OptimizeeStream) and stream.first == firsts[split], split
        family = stream.family
        part = "meta-test" if split == "test" else "meta-train"
        assert (family.split, family.part) == ("train", part), "test problems train on the other half of the images"
        assert (family.hidden, family.activation, family.batch) == ((20, 20), "relu", 16)
        assert stream.protocol() == {"hidden": [20, 20], "activation": "relu"}
        problem, reference = stream.batch(5), MNISTOptimizees(fake, (20, 20), "relu", 16, part=part).sample(
            firsts[split] + 5)
        params, expected = problem.init_params(), reference.init_params()
        assert all(torch.equal(params[k], expected[k]) for k in expected)
        assert torch.equal(problem.batch_rows(3), reference.batch_rows(3))
        assert problem.loss(params, 3).item() == reference.loss(expected, 3).item()
    defaults = Section.from_dict("dataset", {"name": "mnist-mlp"}).options
    assert (defaults.hidden, defaults.activation, defaults.batch_size, defaults.data_root) == ((20,), "sigmoid", 128,
                                                                                              None)
    with pytest.raises(ConfigError, match=r"optimizee runs take a seed in \[0, 1000\)"):
        build_mnist_mlp(section.options, "train", 1000)


def test_an_option_it_does_not_take_is_refused() -> None:
    with pytest.raises(ConfigError, match="^'query' is not an option of dataset 'mnist-mlp'; its options are "
                                          "hidden, activation, batch_size, data_root$"):
        Section.from_dict("dataset", {"name": "mnist-mlp", "query": 15})
    with pytest.raises(ConfigError, match=r"option 'activation' must be one of \('sigmoid', 'relu'\), got 'tanh'"):
        Section.from_dict("dataset", {"name": "mnist-mlp", "activation": "tanh"})


# --- Fashion-MNIST in the MNIST folder, and where missing files go ------------------------------------------------

FASHION = Path(DATA, "fashion-mnist") if DATA else None
needs_fashion = pytest.mark.skipif(FASHION is None or not FASHION.is_dir(),
                                   reason="set METAOPT_DATA to the folder holding fashion-mnist/ (the four IDX files)")


def _fashion_fix(folder: Path) -> str:
    return (f"{folder} holds Fashion-MNIST, not MNIST (same file names and layout). Put train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz from "
            "http://yann.lecun.com/exdb/mnist/ (or the mirror https://ossci-datasets.s3.amazonaws.com/mnist/) into "
            f"{folder} (the mnist/ folder under $METAOPT_DATA, or under --data-root / data_root when given), and keep "
            "Fashion-MNIST in a folder of its own (e.g. $METAOPT_DATA/fashion-mnist)")


def test_fashion_md5s_are_the_published_ones() -> None:
    gz = {name: md5 for md5, name in mnist.FASHION_MD5.items() if name.endswith(".gz")}
    assert gz == {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                  "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                  "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                  "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
    assert not set(mnist.FASHION_MD5) & set(mnist.KNOWN_MD5.values())


@needs_fashion
@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion_mnist_files_in_the_mnist_folder_are_recognised(tmp_path: Path, split: str) -> None:
    for name in (n for pair in mnist.FILES.values() for n in pair):
        (tmp_path / name).symlink_to(FASHION / name)
        assert hashlib.md5((FASHION / name).read_bytes()).hexdigest() in mnist.FASHION_MD5, "the shared files"
    name = mnist.FILES[split][0]
    md5 = hashlib.md5((FASHION / name).read_bytes()).hexdigest()
    message = f"{tmp_path / name} is Fashion-MNIST's {name} (MD5 {md5}): {_fashion_fix(tmp_path)}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_mnist(tmp_path, split=split)


@needs_fashion
def test_decompressed_fashion_mnist_files_are_recognised(tmp_path: Path) -> None:
    raw = gzip.decompress((FASHION / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").symlink_to(FASHION / "t10k-labels-idx1-ubyte.gz")
    message = (f"{tmp_path / 't10k-images-idx3-ubyte'} is Fashion-MNIST's t10k-images-idx3-ubyte (MD5 "
               f"8181f5470baa50b63fa0f6fddb340f0a): {_fashion_fix(tmp_path)}")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_mnist(tmp_path, split="test")


@needs_fashion
def test_recompressed_fashion_mnist_is_recognised_by_its_balanced_classes(tmp_path: Path) -> None:
    labels = gzip.decompress((FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels, mtime=0))  # another gzip header
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(mnist.IMAGE_MAGIC, np.zeros((10000, 28, 28))))
    message = (f"{tmp_path / 't10k-labels-idx1-ubyte.gz'} has exactly 1000 labels of every class, as Fashion-MNIST "
               f"has (MNIST's classes are unbalanced): {_fashion_fix(tmp_path)}")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_mnist(tmp_path, split="test")


def test_missing_files_message_says_where_they_go(fake: Path) -> None:
    (fake / "train-images-idx3-ubyte.gz").unlink()
    message = (f"MNIST train files not found in {fake}: missing train-images-idx3-ubyte.gz; put "
               "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
               "t10k-labels-idx1-ubyte.gz from http://yann.lecun.com/exdb/mnist/ (or the mirror "
               f"https://ossci-datasets.s3.amazonaws.com/mnist/) into {fake} (the mnist/ folder under $METAOPT_DATA, "
               "or under --data-root / data_root when given); from Python, metaopt.datasets.mnist.download_mnist(root) "
               "fetches them when online")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        load_mnist(fake)


def test_no_data_folder_names_metaopt_data_and_data_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METAOPT_DATA", raising=False)
    message = ("no data folder given for mnist: set METAOPT_DATA to the folder that holds mnist/ (e.g. export "
               "METAOPT_DATA=../shared/data), or name that folder with --data-root on the command line "
               "(root=<folder>/mnist in Python)")
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        load_mnist()
