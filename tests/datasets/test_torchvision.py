"""Datasets of the ecosystem: a real torchvision FashionMNIST, built offline on the shared files, as episode source."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from metaopt.problems.sampling import EpisodeSampler, LabelledDataset
from tests.helpers import assert_episodes_equal

DATA = os.environ.get("METAOPT_DATA")
FASHION = Path(DATA, "fashion-mnist") if DATA else None
pytestmark = pytest.mark.skipif(FASHION is None or not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="set METAOPT_DATA to the folder holding fashion-mnist/ (the four IDX .gz files)")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision root whose ``FashionMNIST/raw/`` holds links to the shared gzipped files."""
    folder = tmp_path_factory.mktemp("torchvision")
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        (raw / name).symlink_to(FASHION / name)
    return folder


@pytest.fixture(scope="module")
def fashion(root: Path) -> tuple[object, object]:
    """The FashionMNIST test split twice: with ``transform=ToTensor()`` and without a transform (PIL images)."""
    import torchvision
    from torchvision.transforms import ToTensor

    def offline(*args: object, **kwargs: object) -> None:
        raise AssertionError("torchvision tried the network although the files are present")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(urllib.request, "urlopen", offline)
        patch.setattr(torchvision.datasets.utils, "_urlretrieve", offline)
        with pytest.raises(RuntimeError, match="Dataset not found"):  # it reads only the decompressed raw files
            torchvision.datasets.FashionMNIST(root, train=False, download=False)
        # download=True finds the .gz files, checks their MD5 against torchvision's list and extracts them
        tensors = torchvision.datasets.FashionMNIST(root, train=False, download=True, transform=ToTensor())
    return tensors, torchvision.datasets.FashionMNIST(root, train=False)


def test_fashion_mnist_gives_episodes(fashion: tuple[object, object]) -> None:
    tensors, _ = fashion
    batch = EpisodeSampler(tensors, ways=5, shots=1, query=15, batch_size=4, seed=0).batch(0)
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 75, 1, 28, 28)
    assert batch.support_x.dtype == torch.float32 and batch.query_x.min() >= 0 and batch.query_x.max() <= 1
    torch.testing.assert_close(batch.query_y, torch.arange(5).repeat_interleave(15).repeat(4, 1))


def test_episodes_equal_those_of_the_grouped_tensors(fashion: tuple[object, object]) -> None:
    tensors, pil = fashion
    images, targets = tensors.data, tensors.targets
    oracle = {c: images[targets == c].unsqueeze(1).float() / 255 for c in range(10)}  # ToTensor by hand
    expected = EpisodeSampler(oracle, ways=5, shots=1, query=15, batch_size=3, seed=7)
    for dataset in tensors, pil:  # ToTensor() in the dataset, or PIL images converted by the sampler
        tasks = EpisodeSampler(dataset, ways=5, shots=1, query=15, batch_size=3, seed=7)
        for index in range(2):
            assert_episodes_equal(tasks.batch(index), expected.batch(index))
    grouping = LabelledDataset(tensors)
    assert grouping.class_names == list(range(10)) and [grouping.class_size(c) for c in range(10)] == [1000] * 10


def test_grouping_reads_targets_not_items(fashion: tuple[object, object], monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision
    from torchvision.transforms import ToTensor

    reads = []
    original = torchvision.datasets.FashionMNIST.__getitem__
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "__getitem__",
                        lambda self, i: reads.append(i) or original(self, i))
    fresh = torchvision.datasets.FashionMNIST(fashion[0].root, train=False, transform=ToTensor())
    EpisodeSampler(fresh, ways=5, shots=1, query=15)
    assert len(reads) == 1, "grouped from .targets; one item read for the example shape"


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_with_defaults_reads_the_same_batches(fashion: tuple[object, object], workers: int) -> None:
    tasks = EpisodeSampler(fashion[0], ways=5, shots=1, query=15, batch_size=2, seed=1, num_batches=4)
    loaded = list(DataLoader(tasks, num_workers=workers))
    assert len(loaded) == 4
    for index, batch in enumerate(loaded):
        assert_episodes_equal(batch, tasks.batch(index))
