"""Fashion-MNIST (Xiao et al. 2017) and learned_optimization's ``ImageMLP_FashionMnist8_Relu32`` optimizees.

:func:`load_fashion_mnist` reads the four original IDX files from ``root`` (default
``$METAOPT_DATA/fashion-mnist``). They have MNIST's names, magic numbers and 28x28 layout, so the
reader is MNIST's (:mod:`metaopt.datasets.mnist`) told to expect Fashion-MNIST: the same checks
of structure and counts, and MNIST's files (known by their MD5, or by MNIST's unbalanced classes
in a full split) refused here, as Fashion-MNIST's are refused in the MNIST folder.

:func:`download_fashion_mnist` fetches missing files from the publisher (or GitHub) and checks
their MD5 against the published originals, with MNIST's downloader (:func:`metaopt.datasets.mnist.download_idx`).

:class:`FashionMNIST8MLP` is the task family of Metz et al.'s tutorial and baselines
(google/learned_optimization ``tasks/fixed/image_mlp.py``, ``ImageMLP_FashionMnist8_Relu32``):

- images resized to 8x8 as ``tf.image.resize`` does by default (bilinear with half-pixel
  centres, no antialiasing) on the raw 0-255 pixels, then divided by 255 (:func:`downsample`);
- an MLP 64-32-10 with ReLU (haiku's ``hk.nets.MLP([32, 10])``), initialised as haiku's
  ``Linear``: weights from a normal of std 1/√fan_in truncated at ±2 std, biases zero;
- minibatches of 128 from the first 80% of the training images (the reference's
  ``train[0:80%]``), reshuffled every epoch, the last incomplete batch dropped;
- the gradient is that of the mean cross-entropy (:meth:`FashionMNIST8Optimizee.loss`); the
  meta-objective is the reference's ``normalizer``: that loss clipped to [0, 1.5·ln 10] with NaN
  and ±inf mapped to the maximum (:meth:`FashionMNIST8Optimizee.outer_loss`, :func:`normalize_loss`).

Each ``sample(seed)`` is a pure function of ``seed`` (initialisation and batch order).

Deviations from the reference: TFDS stores Fashion-MNIST in an order of its own (examples are
shuffled by key when the dataset is built), so its ``train[0:80%]`` is another 48,000 images
than the first 48,000 of the IDX file used here; the reference draws its batch order from
NumPy's global generator, not from the task's seed.

References:
    Xiao, Rasul and Vollgraf, 2017. Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
    Learning Algorithms. https://arxiv.org/abs/1708.07747
    Metz et al., 2020. Tasks, stability, architecture, and compute: training more effective learned
    optimizers, and using them to train themselves. https://arxiv.org/abs/2009.11243

Example:
    >>> pixels = torch.arange(784, dtype=torch.float32).reshape(1, 784) % 256
    >>> downsample(pixels).shape
    torch.Size([1, 64])
    >>> round(normalize_loss(torch.tensor(float("nan"))).item(), 4), round(MAX_LOSS, 4)
    (3.4539, 3.4539)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from metaopt.datasets._common import put_into
from metaopt.datasets.mnist import (
    CLASSES,
    FASHION_MD5,
    FILES,
    MNIST_MD5,
    SIDE,
    IDXSpec,
    MLPOptimizees,
    MNISTOptimizee,
    download_idx,
    mlp_shapes,
    read_split,
    seeded_generator,
)
from metaopt.options import Options
from metaopt.problems.optimizees import OptimizeeStream, optimizee_stream
from metaopt.registry import register_dataset

__all__ = [
    "ACTIVATIONS",
    "FASHION_MNIST",
    "KNOWN_MD5",
    "MAX_LOSS",
    "MIRRORS",
    "PARTS",
    "SOURCE",
    "FashionMNIST8MLP",
    "FashionMNIST8MLPOptions",
    "FashionMNIST8Optimizee",
    "build_fashion_mnist8_mlp",
    "download_fashion_mnist",
    "downsample",
    "haiku_init",
    "load_fashion_mnist",
    "normalize_loss",
    "part_rows",
]

#: where the original files are published (the data home and its download address)
SOURCE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: MD5 of the original gzipped files, as published in zalandoresearch/fashion-mnist's README
KNOWN_MD5 = {name: md5 for md5, name in FASHION_MD5.items() if name.endswith(".gz")}
#: where :func:`download_fashion_mnist` looks, in order: the publisher's address, then the files in its repository
MIRRORS = (SOURCE, "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")
#: the reference's clip of the loss: 1.5 · ln(number of classes)
MAX_LOSS = 1.5 * math.log(CLASSES)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "tanh": torch.tanh,
                                                                   "sigmoid": torch.sigmoid}
#: the reference's four subsets: fractions of the training file (train[0:80%], [80%:90%], [90%:]) and the test file
PARTS = {"train": ("train", 0.0, 0.8), "inner-valid": ("train", 0.8, 0.9), "outer-valid": ("train", 0.9, 1.0),
         "test": ("test", 0.0, 1.0)}
_PUT = (f"put {', '.join(n for pair in FILES.values() for n in pair)} from {SOURCE} "
        "(github.com/zalandoresearch/fashion-mnist)")


def _not_mnist(folder: Path, found: str) -> ValueError:
    """The error for MNIST files (``found`` says how they were recognised) in the Fashion-MNIST folder."""
    return ValueError(f"{found}: {folder} holds MNIST, not Fashion-MNIST (same file names and layout). "
                      f"P{_PUT[1:]} {put_into('fashion-mnist', folder)}, and keep MNIST in a folder of its own (e.g. "
                      "$METAOPT_DATA/mnist)")


#: what the Fashion-MNIST folder must hold
FASHION_MNIST = IDXSpec("Fashion-MNIST", "fashion-mnist", _PUT, SOURCE, "metaopt.datasets.fashion_mnist."
                        "download_fashion_mnist(root) fetches them when online", MNIST_MD5, "MNIST", _not_mnist,
                        balanced=True)


def load_fashion_mnist(root: str | os.PathLike | None = None,
                       split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 ``[N, 784]`` in [0, 1] (row by row) and labels as int64 ``[N]`` of ``split``.

    Args:
        root: folder with the IDX files (gzipped or not); default ``$METAOPT_DATA/fashion-mnist``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
    """
    images, labels = read_split(root, split, FASHION_MNIST)
    return torch.from_numpy(images.astype(np.float32) / 255), torch.from_numpy(labels.astype(np.int64))


def download_fashion_mnist(root: str | os.PathLike | None = None, mirrors: Sequence[str] = MIRRORS) -> Path:
    """Download the missing Fashion-MNIST files into ``root`` (default ``$METAOPT_DATA/fashion-mnist``), return it.

    MNIST's downloader (:func:`metaopt.datasets.mnist.download_idx`): each file is tried at each
    mirror, checked against the published MD5 (:data:`KNOWN_MD5`) and renamed into place only then.
    """
    return download_idx(FASHION_MNIST, KNOWN_MD5, root, mirrors)


def downsample(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """``[N, 784]`` (or ``[N, 28, 28]``) pixels in 0-255 resized to float32 ``[N, size²]`` in [0, 1].

    As the reference's ``tf.image.resize(image, (size, size))`` then ``/ 255``: bilinear with
    half-pixel centres and no antialiasing. For 28 → 8, output pixel ``i`` samples the input at
    ``3.5·i + 1.25``, between pixels ``⌊·⌋`` and ``⌊·⌋ + 1``.

    Example:
        >>> image = torch.zeros(1, 28, 28)
        >>> image[0, 1, 1] = 255.0
        >>> downsample(image)[0, 0].item()  # weight 0.75 · 0.75 on pixel (1, 1)
        0.5625
    """
    x = images.reshape(-1, 1, SIDE, SIDE).to(torch.float32)
    small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return small.reshape(len(x), size * size) / 255


def part_rows(part: str, n: int) -> slice:
    """The rows of :data:`PARTS` ``part`` among the ``n`` images of its file (``PARTS[part][0]``).

    Example:
        >>> part_rows("inner-valid", 60000)
        slice(48000, 54000, None)
    """
    _, start, stop = PARTS[part]
    return slice(round(start * n), round(stop * n))


def normalize_loss(loss: torch.Tensor, max_loss: float = MAX_LOSS) -> torch.Tensor:
    """The reference's normalizer: ``loss`` clipped to [0, ``max_loss``], NaN and ±inf mapped to ``max_loss``.

    ``max_loss`` is :data:`MAX_LOSS` (1.5 · ln 10) for 10-class cross-entropies, as in the reference.
    """
    return torch.nan_to_num(loss, nan=max_loss, posinf=max_loss, neginf=max_loss).clamp(0.0, max_loss)


def haiku_init(shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: torch.dtype = torch.float32,
               ) -> dict[str, torch.Tensor]:
    """haiku's default ``Linear`` / ``ConvND`` init of the parameters ``shapes``, generator ``(seed, 0)``.

    Weights (PyTorch layout, ``[out, in, ...]``) from N(0, 1/fan_in) truncated at ±2 std, ``fan_in``
    the product of all but the first dimension (haiku's ``TruncatedNormal(1 / sqrt(fan_in))``);
    biases (names ending in ``.bias``) zero. Drawn in the order of ``shapes``.

    Example:
        >>> params = haiku_init({"fc1.weight": (3, 4), "fc1.bias": (3,)}, seed=0)
        >>> bool(params["fc1.weight"].abs().max() <= 2 * 4 ** -0.5), params["fc1.bias"].tolist()
        (True, [0.0, 0.0, 0.0])
    """
    g = seeded_generator(seed, 0)
    params = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            params[name] = torch.zeros(shape, dtype=dtype)
            continue
        std = math.prod(shape[1:]) ** -0.5
        weight = torch.nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std, generator=g)
        params[name] = weight.to(dtype)
    return params


class FashionMNIST8Optimizee(MNISTOptimizee):
    """One ``ImageMLP_FashionMnist8`` problem: an MLP initialised from ``seed`` and its minibatch losses.

    Created by :meth:`FashionMNIST8MLP.sample`; its minibatches are MNIST's (:meth:`batch_rows`).
    The inner loss is MNIST's, the plain cross-entropy, and the outer loss its clipped value, so it
    evaluates the outer loss itself (``outer_is_inner`` is false).
    """

    outer_is_inner = False

    def init_params(self) -> dict[str, torch.Tensor]:
        """haiku's ``Linear`` init, generator seeded by ``seed``: N(0, 1/fan_in) truncated at ±2 std, zero bias."""
        family = self.family
        return haiku_init(mlp_shapes(family.hidden, family.images.shape[1]), self.seed, family.dtype)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Minibatch ``step``: 8x8 images ``[batch, 64]`` in [0, 1] (of the family's dtype) and int64 labels."""
        rows = self.batch_rows(step)
        return self.family.images[rows].to(self.family.dtype), self.family.labels[rows]

    def outer_loss(self, params: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, None]:
        """The loss on minibatch ``step`` through :func:`normalize_loss` (the reference's meta-objective)."""
        return normalize_loss(self.loss(params, step)), None


class FashionMNIST8MLP(MLPOptimizees):
    """MLPs on 8x8 Fashion-MNIST (learned_optimization's ``ImageMLP_FashionMnist8_Relu32``), an optimizee family.

    The images of ``part`` are read and downsampled once, kept as one float32 tensor that every
    sampled problem shares.

    Args:
        root: folder with the IDX files; default ``$METAOPT_DATA/fashion-mnist``.
        hidden: hidden layer sizes (the reference: ``(32,)``).
        activation: ``"relu"`` (the reference), ``"tanh"`` or ``"sigmoid"``.
        batch: images per minibatch (128).
        part: ``"train"`` (the first 80% of the training file, as the reference's ``train[0:80%]``),
            ``"inner-valid"``, ``"outer-valid"`` (the next two tenths) or ``"test"`` (the test file).
        size: side of the downsampled images (8).
        dtype: floating type of the parameters and images.

    Attributes:
        images: float32 ``[N, size²]`` in [0, 1]; labels: int64 ``[N]``.

    Example (skipped when the data are absent)::

        family = FashionMNIST8MLP()
        problem = family.sample(seed=0)
        loss = problem.loss(problem.init_params(), step=0)   # ~2.3 at initialisation
    """

    def __init__(self, root: str | os.PathLike | None = None, hidden: Sequence[int] = (32,),
                 activation: str = "relu", batch: int = 128, part: str = "train", size: int = 8,
                 dtype: torch.dtype = torch.float32) -> None:
        self.check_network(activation, hidden)
        if part not in PARTS:
            raise ValueError(f"unknown part {part!r}; choose one of {tuple(PARTS)}")
        if not 1 <= size <= SIDE:
            raise ValueError(f"size must be between 1 and {SIDE}, got {size}")
        images, labels = read_split(root, PARTS[part][0], FASHION_MNIST)
        rows = part_rows(part, len(labels))
        self.keep(downsample(torch.from_numpy(images[rows].copy()), size),  # the IDX arrays are read-only
                  labels[rows], hidden, activation, batch, dtype, f"part {part!r}")
        self.part, self.size = part, size


FashionMNIST8MLP.problem, FashionMNIST8MLP.activations = FashionMNIST8Optimizee, ACTIVATIONS


@dataclass(frozen=True)
class FashionMNIST8MLPOptions(Options):
    """The 8x8 Fashion-MNIST MLP optimizees of a run (every split trains on the reference's train[0:80%]).

    Args:
        hidden: hidden layer sizes (the reference: 32).
        activation: "relu" (the reference), "tanh" or "sigmoid".
        batch_size: images per minibatch (128).
        data_root: folder holding the datasets, one sub-folder each (data_root/fashion-mnist); None: $METAOPT_DATA.
    """

    positive = ("batch_size",)
    hidden: tuple[int, ...] = (32,)
    activation: Literal["relu", "tanh", "sigmoid"] = "relu"
    batch_size: int = 128
    data_root: str | None = None


@register_dataset("fashion-mnist8-mlp", FashionMNIST8MLPOptions, problems="optimizees")
def build_fashion_mnist8_mlp(options: FashionMNIST8MLPOptions, split: str, seed: int) -> OptimizeeStream:
    """MLPs on 8x8 Fashion-MNIST (``ImageMLP_FashionMnist8_Relu32``); splits differ by their problems' seeds."""
    root = None if options.data_root is None else Path(options.data_root) / "fashion-mnist"
    family = FashionMNIST8MLP(root, hidden=options.hidden, activation=options.activation, batch=options.batch_size)
    return optimizee_stream(family, split, seed, {"hidden": list(options.hidden), "activation": options.activation,
                                                  "image_size": family.size})
