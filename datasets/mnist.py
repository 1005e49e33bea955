"""MNIST (LeCun et al. 1998) and the MNIST optimizees of Andrychowicz et al. 2016 (§3.2).

:func:`load_mnist` reads the four original IDX files from ``root`` (default
``$METAOPT_DATA/mnist``): ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (gzipped, or the same files
decompressed, without ``.gz``). Magic numbers (2051 for images, 2049 for labels), counts, the
28x28 shape and the label range are checked; the files are small enough (55 MB decoded) to be
read in well under a second, so nothing is cached. :func:`download_mnist` fetches missing files
from a mirror and checks their MD5 against the published originals.

:class:`MNISTOptimizees` is the MNIST problem of "Learning to learn by gradient descent by
gradient descent" (Andrychowicz et al. 2016, §3.2): an MLP 784-20-10 with sigmoid units trained
with cross-entropy on minibatches of 128 images. The paper's architecture-transfer variants are
arguments: ``hidden=(40,)``, ``hidden=(20, 20)`` and ``activation="relu"``. Each
``sample(seed)`` is one problem: weights initialised as PyTorch's default ``nn.Linear`` does
(weights and biases uniform in ±1/√fan_in) under a generator seeded by ``seed``, and minibatch
number ``step`` drawn deterministically from ``(seed, step)`` (a fresh permutation of the
images per epoch, without replacement within an epoch, the last incomplete batch dropped).

Meta-training and meta-testing use disjoint images: ``part="meta-train"`` and
``part="meta-test"`` are the two halves of the 60,000 training images split exactly as the
PyTorch port of the paper does (AdrienLE/learning_by_grad_by_grad_repro: the indices shuffled by
``np.random.RandomState(10)``, first half for meta-training, second for meta-testing), so that
numbers are comparable with it; ``split="test"`` with ``part="all"`` gives the 10,000 test
images, e.g. for the test error of a trained optimizee. Usage, once the data are in place::

    family = MNISTOptimizees(part="meta-train")             # 784-20-10 sigmoid, batch 128
    problem = family.sample(seed=0)
    params = problem.init_params()
    loss = problem.loss(params, step=0)                     # ~log(10) at initialisation
    relu = MNISTOptimizees(part="meta-test", activation="relu")

References:
    Andrychowicz et al., 2016. Learning to learn by gradient descent by gradient descent.
    https://arxiv.org/abs/1606.04474
    LeCun, Cortes and Burges. The MNIST database of handwritten digits. http://yann.lecun.com/exdb/mnist/

Example:
    >>> train, test = meta_split_indices(60000, "meta-train"), meta_split_indices(60000, "meta-test")
    >>> len(train), len(test), len(set(train.tolist()) & set(test.tolist()))
    (30000, 30000, 0)
    >>> list(mlp_shapes(hidden=(20, 20)).values())
    [(20, 784), (20,), (20, 20), (20,), (10, 20), (10,)]
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from metaopt.datasets._common import dataset_root, put_into
from metaopt.options import Options
from metaopt.problems.optimizees import Optimizee, OptimizeeStream, optimizee_stream
from metaopt.registry import register_dataset

__all__ = [
    "ACTIVATIONS",
    "FILES",
    "FASHION_MD5",
    "IDXSpec",
    "KNOWN_MD5",
    "MIRRORS",
    "MNIST",
    "MNIST_MD5",
    "PARTS",
    "MNISTMLPOptions",
    "MNISTOptimizee",
    "MNISTOptimizees",
    "build_mnist_mlp",
    "download_idx",
    "download_mnist",
    "load_mnist",
    "meta_split_indices",
    "minibatch_rows",
    "mlp_forward",
    "mlp_shapes",
    "read_split",
    "seeded_generator",
]

#: the image and label file of each split
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: MD5 of the original gzipped files (as published, and as listed by torchvision)
KNOWN_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
#: MD5 of Fashion-MNIST's files (Xiao et al. 2017), gzipped as published and decompressed: same names and layout
#: as MNIST's, so a Fashion-MNIST copy put in the MNIST folder would otherwise load as MNIST
FASHION_MD5 = {
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d": "train-images-idx3-ubyte.gz",
    "25c81989df183df01b3e8a0aad5dffbe": "train-labels-idx1-ubyte.gz",
    "bef4ecab320f06d8554ea6380940ec79": "t10k-images-idx3-ubyte.gz",
    "bb300cfdad3c16e7a12a480ee83cd310": "t10k-labels-idx1-ubyte.gz",
    "f4a8712d7a061bf5bd6d2ca38dc4d50a": "train-images-idx3-ubyte",
    "9018921c3c673c538a1fc5bad174d6f9": "train-labels-idx1-ubyte",
    "8181f5470baa50b63fa0f6fddb340f0a": "t10k-images-idx3-ubyte",
    "15d484375f8d13e6eb1aabb0c3f46965": "t10k-labels-idx1-ubyte",
}
#: MD5 of MNIST's files, gzipped as published and decompressed: refused in the Fashion-MNIST folder for the same reason
MNIST_MD5 = {
    **{md5: name for name, md5 in KNOWN_MD5.items()},
    "6bbc9ace898e44ae57da46a324031adb": "train-images-idx3-ubyte",
    "a25bea736e30d166cdddb491f175f624": "train-labels-idx1-ubyte",
    "2646ac647ad5339dbf082846283269ea": "t10k-images-idx3-ubyte",
    "27ae3e4e09519cfbb04c329615203637": "t10k-labels-idx1-ubyte",
}
#: where :func:`download_mnist` looks, in order (torchvision's mirror first: the original site often refuses)
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
SIDE, CLASSES = 28, 10
PARTS = ("meta-train", "meta-test", "all")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"sigmoid": torch.sigmoid, "relu": torch.relu}
#: seed of the port's split of the training images into meta-training and meta-test halves
_SPLIT_SEED = 10
_PUT = (f"put {', '.join(n for pair in FILES.values() for n in pair)} from {MIRRORS[1]} (or the mirror "
        f"{MIRRORS[0]})")


def _locate(folder: Path, name: str) -> Path | None:
    """``name`` in ``folder``, or its decompressed form (without ``.gz``); None if neither exists."""
    for path in (folder / name, folder / name.removesuffix(".gz")):
        if path.is_file():
            return path
    return None


def _not_fashion(folder: Path, found: str) -> ValueError:
    """The error for Fashion-MNIST files (``found`` says how they were recognised) in the MNIST folder."""
    return ValueError(f"{found}: {folder} holds Fashion-MNIST, not MNIST (same file names and layout). "
                      f"P{_PUT[1:]} {put_into('mnist', folder)}, and keep Fashion-MNIST in a folder of its own (e.g. "
                      "$METAOPT_DATA/fashion-mnist)")


@dataclass(frozen=True)
class IDXSpec:
    """Which IDX dataset a folder should hold: MNIST, or one with its file names and layout (Fashion-MNIST).

    The reader checks every file against it; the two datasets share names, magic numbers and
    shapes, so each refuses the other's files by their MD5 and by their class balance.

    Attributes:
        title: the dataset's name in messages (``"MNIST"``).
        folder: its sub-folder of ``$METAOPT_DATA`` (``"mnist"``).
        put: what to put where when files are missing (``"put <files> from <source>"``).
        source: where the original files are, for the message about a corrupt one.
        download: how to fetch the files from Python (``""``: no downloader).
        foreign_md5: MD5 → file name of the look-alike dataset's files, refused.
        foreign: the look-alike's title.
        refuse: the error for the look-alike's files, ``refuse(folder, how they were recognised)``.
        balanced: whether every class has exactly a tenth of the labels of a full split (60,000 or 10,000).
    """

    title: str
    folder: str
    put: str
    source: str
    download: str
    foreign_md5: Mapping[str, str]
    foreign: str
    refuse: Callable[[Path, str], ValueError]
    balanced: bool


#: what the MNIST folder must hold
MNIST = IDXSpec("MNIST", "mnist", _PUT, MIRRORS[1], "metaopt.datasets.mnist.download_mnist(root) fetches them when "
                "online", FASHION_MD5, "Fashion-MNIST", _not_fashion, balanced=False)


def _read_idx(path: Path, magic: int, shape_tail: tuple[int, ...], spec: IDXSpec = MNIST) -> np.ndarray:
    """The uint8 array of an IDX file of ``spec``'s dataset with ``magic`` whose items have shape ``shape_tail``."""
    header_size = 4 * (2 + len(shape_tail))
    fix = f"replace {path.name} with the original file (see {spec.source})"
    raw = path.read_bytes()
    md5 = hashlib.md5(raw).hexdigest()
    if md5 in spec.foreign_md5:
        raise spec.refuse(path.parent, f"{path} is {spec.foreign}'s {spec.foreign_md5[md5]} (MD5 {md5})")
    try:
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise ValueError(f"{path} is not a complete gzip file ({error}); it is truncated or corrupt: {fix}") from error
    header, payload = data[:header_size], data[header_size:]
    if len(header) < header_size:
        raise ValueError(f"{path} is truncated: {len(header)} bytes, shorter than the IDX header; {fix}")
    found, count, *tail = struct.unpack(f">{len(header) // 4}I", header)
    if found != magic:
        kind = "image" if magic == IMAGE_MAGIC else "label"
        raise ValueError(f"{path} has magic number {found}, not {magic} (an IDX {kind} file): it is not "
                         f"{spec.title}'s {kind} file or it is corrupt; {fix}")
    if tuple(tail) != shape_tail:
        raise ValueError(f"{path} holds items of shape {tuple(tail)}, expected {shape_tail}; {fix}")
    item = int(np.prod(shape_tail, dtype=np.int64))
    expected = count * item
    if len(payload) != expected:
        state = "truncated" if len(payload) < expected else "longer than its header says"
        raise ValueError(f"{path} is {state}: {len(payload)} bytes of data for {count} items "
                         f"({expected} bytes expected); {fix}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(count, item)


def read_split(root: str | os.PathLike | None, split: str, spec: IDXSpec = MNIST) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 784]`` and labels ``[N]`` of ``split`` of ``spec``'s dataset, both uint8 (read-only arrays)."""
    if split not in FILES:
        raise ValueError(f"unknown {spec.title} split {split!r}; choose 'train' or 'test'")
    folder = dataset_root(root, spec.folder)
    paths = {name: _locate(folder, name) for name in FILES[split]}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        download = f"; from Python, {spec.download}" if spec.download else ""
        raise FileNotFoundError(f"{spec.title} {split} files not found in {folder}: missing {', '.join(missing)}; "
                                f"{spec.put} {put_into(spec.folder, folder)}{download}")
    image_file, label_file = (paths[name] for name in FILES[split])
    images = _read_idx(image_file, IMAGE_MAGIC, (SIDE, SIDE), spec)
    labels = _read_idx(label_file, LABEL_MAGIC, (), spec).reshape(-1)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels; "
                         f"the two files do not belong together: replace them with the original pair")
    if len(labels) and labels.max() >= CLASSES:
        raise ValueError(f"{label_file} holds label {labels.max()}, outside 0-9; replace it with the original file")
    counts = np.bincount(labels, minlength=CLASSES)
    balanced = bool((counts == len(labels) // CLASSES).all())
    if len(labels) in (60000, 10000) and balanced != spec.balanced:
        found = (f"{label_file} has exactly {counts[0]} labels of every class, as {spec.foreign} has "
                 f"({spec.title}'s classes are unbalanced)" if balanced else
                 f"{label_file} has between {counts.min()} and {counts.max()} labels per class, as {spec.foreign} "
                 f"has ({spec.title} has exactly {len(labels) // CLASSES} of every class)")
        raise spec.refuse(folder, found)
    return images, labels


def load_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 ``[N, 784]`` in [0, 1] (row by row) and labels as int64 ``[N]`` of ``split``.

    Args:
        root: folder with the IDX files; default ``$METAOPT_DATA/mnist``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
    """
    images, labels = read_split(root, split)
    pixels = images.astype(np.float32)
    pixels /= 255
    return torch.from_numpy(pixels), torch.from_numpy(labels.astype(np.int64))


def _fetch(address: str, target: Path) -> str:
    """Stream ``address`` into ``target`` and return the MD5 of what was written."""
    digest = hashlib.md5()
    with urllib.request.urlopen(address, timeout=60) as response, open(target, "wb") as out:
        while block := response.read(1 << 20):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def download_idx(spec: IDXSpec, md5s: Mapping[str, str], root: str | os.PathLike | None,
                 mirrors: Sequence[str]) -> Path:
    """Download the missing files ``md5s`` names of ``spec``'s dataset into ``root`` and return that folder.

    ``root`` defaults to ``$METAOPT_DATA/<spec.folder>``. Each file is tried at each mirror in
    turn, streamed into a temporary file next to its target, checked against its MD5 in ``md5s``
    and only then renamed into place, so an interrupted or wrong download never leaves a file that
    looks complete. Files already there (gzipped or not) are not fetched.

    Raises:
        FileNotFoundError: a file no mirror served with the right MD5 (offline, or a changed
            mirror); the message lists each attempt and where to put the files by hand.
    """
    folder = dataset_root(root, spec.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, md5 in md5s.items():
        if _locate(folder, name) is not None:
            continue
        failures = []
        for mirror in mirrors:
            address = mirror + name
            tmp = folder / f".{name}.{os.getpid()}.part"
            try:
                found = _fetch(address, tmp)
                if found == md5:
                    os.replace(tmp, folder / name)
                    break
                failures.append(f"{address}: MD5 {found}, not the original's {md5}")
            except OSError as error:
                failures.append(f"{address}: {error}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise FileNotFoundError(f"could not download {name} ({'; '.join(failures)}). Offline? {spec.put} "
                                    f"{put_into(spec.folder, folder)}")
    return folder


def download_mnist(root: str | os.PathLike | None = None, mirrors: Sequence[str] = MIRRORS) -> Path:
    """Download the missing MNIST files into ``root`` (default ``$METAOPT_DATA/mnist``) and return it.

    The files are checked against the published MD5s (:data:`KNOWN_MD5`); see :func:`download_idx`.
    """
    return download_idx(MNIST, KNOWN_MD5, root, mirrors)


def meta_split_indices(n: int, part: str) -> torch.Tensor:
    """Sorted indices of ``part`` among ``n`` images: the port's halves, or all of them.

    ``"meta-train"`` is the first half and ``"meta-test"`` the second half (the larger one when
    ``n`` is odd) of ``range(n)`` shuffled by ``np.random.RandomState(10)``; ``"all"`` is ``range(n)``.
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")
    if part == "all":
        return torch.arange(n)
    order = np.random.RandomState(_SPLIT_SEED).permutation(n)
    half = order[: n // 2] if part == "meta-train" else order[n // 2 :]
    return torch.from_numpy(np.sort(half))


def mlp_shapes(hidden: Sequence[int] = (20,), in_features: int = SIDE * SIDE,
               classes: int = CLASSES) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the MLP ``in_features-*hidden-classes`` (weights ``[out, in]``)."""
    sizes = [in_features, *hidden, classes]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        shapes[f"fc{i}.weight"], shapes[f"fc{i}.bias"] = (fan_out, fan_in), (fan_out,)
    return shapes


def mlp_forward(params: Mapping[str, torch.Tensor], x: torch.Tensor, layers: int,
                activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The logits of the MLP ``params`` (named as :func:`mlp_shapes` names them) on inputs ``x`` ``[batch, in]``.

    ``layers`` linear layers, ``activation`` (e.g. ``torch.relu``) between them, none after the last.

    Example:
        >>> params = {"fc1.weight": torch.eye(2), "fc1.bias": torch.tensor([0.0, -2.0]),
        ...           "fc2.weight": torch.ones(1, 2), "fc2.bias": torch.zeros(1)}
        >>> mlp_forward(params, torch.tensor([[1.0, 1.0]]), layers=2, activation=torch.relu)
        tensor([[1.]])
    """
    h = x
    for i in range(1, layers + 1):
        h = F.linear(h, params[f"fc{i}.weight"], params[f"fc{i}.bias"])
        if i < layers:
            h = activation(h)
    return h


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative integers (independent streams per tuple)."""
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def minibatch_rows(n: int, batch: int, step: int, *entropy: int) -> torch.Tensor:
    """Rows of minibatch ``step`` among ``n`` examples: a slice of a fresh permutation per epoch.

    Epoch ``e``'s permutation is drawn by :func:`seeded_generator` ``(*entropy, e)``; the last
    incomplete batch of an epoch is dropped, so no example repeats within an epoch.

    Example:
        >>> first_epoch = torch.cat([minibatch_rows(10, 3, step, 0) for step in range(3)])
        >>> len(set(first_epoch.tolist())), minibatch_rows(10, 3, 3, 0).shape  # 9 distinct rows, then epoch 1
        (9, torch.Size([3]))
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    epoch, position = divmod(step, n // batch)
    order = torch.randperm(n, generator=seeded_generator(*entropy, epoch))
    return order[position * batch : (position + 1) * batch]


class MNISTOptimizee(Optimizee):
    """One MNIST problem: an MLP initialised from ``seed`` and its minibatch losses.

    Created by :meth:`MNISTOptimizees.sample`; shares the family's image tensor.
    """

    def __init__(self, family: MNISTOptimizees, seed: int) -> None:
        self.family, self.seed = family, seed

    def init_params(self) -> dict[str, torch.Tensor]:
        """PyTorch's default ``nn.Linear`` init (uniform in ±1/√fan_in) under a generator seeded by ``seed``."""
        g = seeded_generator(self.seed, 0)
        shapes = mlp_shapes(self.family.hidden)
        params = {}
        for name, shape in shapes.items():
            bound = shapes[name.replace(".bias", ".weight")][1] ** -0.5
            params[name] = ((torch.rand(shape, generator=g) * 2 - 1) * bound).to(self.family.dtype)
        return params

    def batch_rows(self, step: int) -> torch.Tensor:
        """Rows of the family's images in minibatch ``step``: a slice of a per-epoch permutation."""
        return minibatch_rows(len(self.family.labels), self.family.batch, step, self.seed, 1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Minibatch ``step``: images ``[batch, 784]`` in [0, 1] (of the family's dtype) and int64 labels."""
        rows = self.batch_rows(step)
        return self.family.images[rows].to(self.family.dtype).div_(255), self.family.labels[rows]

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Mean cross-entropy of the MLP with ``params`` on minibatch ``step``."""
        x, y = self.batch(step)
        device = params["fc1.weight"].device
        family = self.family
        logits = mlp_forward(params, x.to(device), len(family.hidden) + 1, family.activations[family.activation])
        return F.cross_entropy(logits, y.to(device))


class MLPOptimizees:
    """What the MLP optimizee families share: their checked settings and the problems they sample.

    A family calls :meth:`check_network` before it reads its data and :meth:`keep` after; its
    problems are of the class ``problem``.
    """

    problem: ClassVar[type[MNISTOptimizee]]
    activations: ClassVar[dict[str, Callable[[torch.Tensor], torch.Tensor]]] = ACTIVATIONS

    @classmethod
    def check_network(cls, activation: str, hidden: Sequence[int]) -> None:
        if activation not in cls.activations:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(cls.activations)}")
        if any(int(h) != h or h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must be positive integers, got {tuple(hidden)}")

    def keep(self, images: torch.Tensor, labels: np.ndarray, hidden: Sequence[int], activation: str, batch: int,
             dtype: torch.dtype, where: str) -> None:
        """Keep the family's images and labels and its settings; ``batch`` is checked against the ``where`` images."""
        if not 1 <= batch <= len(labels):
            raise ValueError(f"batch must be between 1 and the {len(labels)} images of {where}, got {batch}")
        self.images, self.labels = images, torch.from_numpy(labels.astype(np.int64))
        self.hidden, self.activation, self.batch, self.dtype = tuple(int(h) for h in hidden), activation, batch, dtype

    def sample(self, seed: int) -> MNISTOptimizee:
        """Problem ``seed`` (a non-negative integer): its initialisation and minibatches depend on it alone."""
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        return self.problem(self, seed)


class MNISTOptimizees(MLPOptimizees):
    """MLPs on MNIST minibatches (Andrychowicz et al. 2016, §3.2), an optimizee family.

    The images of ``split``/``part`` are read once and kept as one uint8 tensor; every sampled
    problem shares it.

    Args:
        root: folder with the IDX files; default ``$METAOPT_DATA/mnist``.
        hidden: hidden layer sizes: ``(20,)`` in the paper, ``(40,)`` and ``(20, 20)`` for transfer.
        activation: ``"sigmoid"`` (paper) or ``"relu"`` (the transfer experiment where it fails).
        batch: images per minibatch (128).
        split: ``"train"`` or ``"test"`` IDX files.
        part: ``"meta-train"`` or ``"meta-test"`` half of the split (see :func:`meta_split_indices`),
            or ``"all"`` of it.
        dtype: floating type of the parameters and images.

    Attributes:
        indices: indices in the split of the images used (sorted); disjoint between the halves.
        images: uint8 ``[len(indices), 784]``; row ``i`` is image ``indices[i]`` of the split.
        labels: int64 ``[len(indices)]``.
    """

    def __init__(self, root: str | os.PathLike | None = None, hidden: Sequence[int] = (20,),
                 activation: str = "sigmoid", batch: int = 128, split: str = "train", part: str = "meta-train",
                 dtype: torch.dtype = torch.float32) -> None:
        self.check_network(activation, hidden)
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; choose one of {PARTS}")
        images, labels = read_split(root, split)
        self.indices = meta_split_indices(len(labels), part)
        rows = self.indices.numpy()
        self.keep(torch.from_numpy(images[rows]), labels[rows], hidden, activation, batch, dtype, f"{split}/{part}")
        self.split, self.part = split, part


MNISTOptimizees.problem = MNISTOptimizee


@dataclass(frozen=True)
class MNISTMLPOptions(Options):
    """The MNIST MLP optimizees of a run (training and validation on the meta-train half, test on the other).

    Args:
        hidden: hidden layer sizes (the paper: 20; transfer: 40, or 20 and 20).
        activation: "sigmoid" (the paper) or "relu" (the transfer experiment where it fails).
        batch_size: images per minibatch (128).
        data_root: folder holding the datasets, one sub-folder each (data_root/mnist); None: $METAOPT_DATA.
    """

    positive = ("batch_size",)
    hidden: tuple[int, ...] = (20,)
    activation: Literal["sigmoid", "relu"] = "sigmoid"
    batch_size: int = 128
    data_root: str | None = None


@register_dataset("mnist-mlp", MNISTMLPOptions, problems="optimizees")
def build_mnist_mlp(options: MNISTMLPOptions, split: str, seed: int) -> OptimizeeStream:
    """MLPs on MNIST minibatches (Andrychowicz et al. 2016, §3.2), meta-train and meta-test halves of the images."""
    root = None if options.data_root is None else Path(options.data_root) / "mnist"
    family = MNISTOptimizees(root, hidden=options.hidden, activation=options.activation, batch=options.batch_size,
                             part="meta-test" if split == "test" else "meta-train")
    return optimizee_stream(family, split, seed, {"hidden": list(options.hidden), "activation": options.activation})
