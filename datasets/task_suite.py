"""A seeded suite of small training problems for learned optimizers: a mini-TaskSet (Metz et al. 2020).

Learned optimizers are meta-trained on a distribution of tasks and judged on tasks they never
saw (Metz et al. 2020, "Tasks, stability, architecture, and compute": meta-training on TaskSet's
tasks, evaluation on held-out ones). This suite keeps that protocol at a size one CPU core can
run: nine families, each a parameterised kind of problem; a problem is a pure function of its
seed, which picks its family (``seed % len(families)``, so consecutive seeds visit the families in
turn) and then its hyperparameters (generator ``(seed, 2)``), its initialisation (``(seed, 0)``)
and its minibatch order (``(seed, 1, epoch)``; validation minibatches ``(seed, 3, epoch)``).

====================  ========  ===================================================================
family                split     problem
====================  ========  ===================================================================
quadratic             train     ½(θ−θ*)ᵀA(θ−θ*), dim 4–32, condition number of A log-uniform in
                                [1, 10³], A scaled so that the loss at θ_0 is 1
fashion8-mlp-relu     train     MLP 64-w-10, ReLU, on 8x8 Fashion-MNIST
mnist8-mlp-relu       train     MLP 64-w-10, ReLU, on 8x8 MNIST
fashion8-logistic     train     logistic regression 64→10 on 8x8 Fashion-MNIST
mnist14-conv          train     convnet on 14x14 MNIST
fashion8-mlp-tanh     held-out  MLP 64-w-10, tanh, on 8x8 Fashion-MNIST
mnist8-mlp-tanh       held-out  MLP 64-w-10, tanh, on 8x8 MNIST
fashion14-conv        held-out  convnet on 14x14 Fashion-MNIST
mnist8-logistic       held-out  logistic regression 64→10 on 8x8 MNIST
====================  ========  ===================================================================

Hyperparameters drawn per problem: MLP width ``w`` log-uniform in 8–64 (one hidden layer),
minibatch size uniform over {16, 32, 64, 128} for every image family, and for the convnets 1 or 2
layers of 3x3 convolutions with 4–16 channels each (log-uniform), ReLU. The convolutions are
those of learned_optimization's ``_cross_entropy_pool_loss`` (``tasks/fixed/conv.py``): the first
has stride 2, later ones stride 1, all ``SAME``-padded. A linear layer on the flattened
activations gives the 10 logits, as in TaskSet's ``conv_fc`` family, not on their mean over the
pixels as in that reference: with at most 16 channels the mean leaves too few features (measured
on four MNIST 14x14 problems, Adam at 1e-2 and 3e-2 for 100 steps: cross-entropy 1.3–2.3 with the
mean, 0.2–0.4 flattened). Weights are initialised as haiku's ``Linear`` and ``Conv2D`` do
(:func:`metaopt.datasets.fashion_mnist.haiku_init`), so the conv problems hold rank-4 weights
``[out, in, 3, 3]``. Images are resized as
:func:`metaopt.datasets.fashion_mnist.downsample` does (``tf.image.resize``; 14x14 is an exact 2x2
average).

The training and held-out families are disjoint *as families*: a held-out problem differs from
every training problem by its activation (tanh MLPs) or its dataset (the Fashion-MNIST convnet,
MNIST logistic regression), never only by its seed; every kind of network and every tensor rank
of the held-out set (rank-4 convolution weights included) is met in training.

Losses: the inner loss (the gradient's) is the plain mean cross-entropy of the minibatch, the
outer loss (the meta-objective) learned_optimization's normalizer, that loss clipped to
[0, 1.5·ln 10] with NaN and ±inf mapped to the maximum
(:func:`metaopt.datasets.fashion_mnist.normalize_loss`), exactly as
:class:`~metaopt.datasets.fashion_mnist.FashionMNIST8Optimizee` does. Quadratics clip alike at
1.5 times their initial loss, :data:`QUADRATIC_MAX_LOSS` = 1.5 (1.5·ln 10 is 1.5 times the
cross-entropy of a uniform guess); they are deterministic (``step`` is ignored).

Data: the losses use the first 80% of each training file (Fashion-MNIST's ``PARTS["train"]``,
learned_optimization's ``train[0:80%]``); :meth:`ImageTask.validation_loss` (the clipped loss read
by update rules that see validation losses, such as Metz et al.'s hierarchical optimizer) uses the
next 10% (``PARTS["inner-valid"]``). MNIST's training file is cut the same way, not into the meta
halves of :mod:`metaopt.datasets.mnist`, so the suite's two datasets follow one rule; the last 10%
and the test files are not used. Images are read from ``data_root/fashion-mnist`` and
``data_root/mnist`` (default ``$METAOPT_DATA``) on the first loss that needs them, once per
process, and shared by every problem: sampling a problem reads nothing.

The registered dataset ``task-suite`` gives training and validation problems from the training
families and test problems from the held-out families (options ``families`` and
``test_families``), so a run's baselines, tuned on validation problems, are tuned on the training
families too; :func:`held_out_tasks` gives the test problems in Python (tune per held-out task on
``held_out_tasks(n, start=TUNING_OFFSET)``, other problems of the same families).

References:
    Metz, Maheswaranathan, Freeman, Poole and Sohl-Dickstein, 2020. Tasks, stability,
    architecture, and compute: training more effective learned optimizers, and using them to
    train themselves. https://arxiv.org/abs/2009.11243
    Metz, Maheswaranathan, Sun, Freeman, Poole and Sohl-Dickstein, 2020. Using a thousand
    optimization tasks to learn hyperparameter search strategies (TaskSet). https://arxiv.org/abs/2002.11887
    google/learned_optimization: ``tasks/fixed/image_mlp.py``, ``tasks/fixed/conv.py``.

Example:
    >>> resolve_families("held-out")
    ('fashion8-mlp-tanh', 'mnist8-mlp-tanh', 'fashion14-conv', 'mnist8-logistic')
    >>> problem = TaskSuite(families=["quadratic"]).sample(seed=3)
    >>> problem.describe()
    {'family': 'quadratic', 'seed': 3, 'dim': 22, 'condition': 14.0}
    >>> round(problem.loss(problem.init_params(), step=0).item(), 4)
    1.0
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from metaopt.datasets._common import dataset_root
from metaopt.datasets.fashion_mnist import (
    ACTIVATIONS,
    FASHION_MNIST,
    downsample,
    haiku_init,
    normalize_loss,
    part_rows,
)
from metaopt.datasets.mnist import (
    CLASSES,
    MNIST,
    IDXSpec,
    minibatch_rows,
    mlp_forward,
    mlp_shapes,
    read_split,
    seeded_generator,
)
from metaopt.options import ConfigError, Options, closest
from metaopt.problems.optimizees import Optimizee, OptimizeeStream, optimizee_stream
from metaopt.registry import register_dataset

__all__ = [
    "BATCH_SIZES",
    "CHANNELS",
    "CONDITION",
    "CONV_LAYERS",
    "DIMS",
    "FAMILIES",
    "HELD_OUT_FAMILIES",
    "QUADRATIC_MAX_LOSS",
    "STREAMS",
    "TRAIN_FAMILIES",
    "WIDTHS",
    "ConvTask",
    "Family",
    "ImageTask",
    "MLPTask",
    "QuadraticTask",
    "TaskSuite",
    "TaskSuiteOptions",
    "build_task_suite",
    "held_out_tasks",
    "resolve_families",
]


@dataclass(frozen=True)
class Family:
    """One family of the suite: the kind of problem and, for images, its dataset, activation and image side."""

    kind: Literal["quadratic", "mlp", "logistic", "conv"]
    dataset: Literal["fashion-mnist", "mnist"] | None = None
    activation: str | None = None
    size: int = 8


#: the families by name (the module docs give their split)
FAMILIES: dict[str, Family] = {
    "quadratic": Family("quadratic"),
    "fashion8-mlp-relu": Family("mlp", "fashion-mnist", "relu"),
    "mnist8-mlp-relu": Family("mlp", "mnist", "relu"),
    "fashion8-logistic": Family("logistic", "fashion-mnist"),
    "mnist14-conv": Family("conv", "mnist", "relu", size=14),
    "fashion8-mlp-tanh": Family("mlp", "fashion-mnist", "tanh"),
    "mnist8-mlp-tanh": Family("mlp", "mnist", "tanh"),
    "fashion14-conv": Family("conv", "fashion-mnist", "relu", size=14),
    "mnist8-logistic": Family("logistic", "mnist"),
}
#: families of the training (and validation) problems
TRAIN_FAMILIES = ("quadratic", "fashion8-mlp-relu", "mnist8-mlp-relu", "fashion8-logistic", "mnist14-conv")
#: families of the test problems, none of them a training family
HELD_OUT_FAMILIES = ("fashion8-mlp-tanh", "mnist8-mlp-tanh", "fashion14-conv", "mnist8-logistic")
_GROUPS = {"train": TRAIN_FAMILIES, "held-out": HELD_OUT_FAMILIES}

#: ranges of the drawn hyperparameters (inclusive): quadratic dimensions, condition numbers, MLP widths,
#: conv channels and layers; the minibatch sizes of the image families
DIMS, CONDITION, WIDTHS, CHANNELS, CONV_LAYERS = (4, 32), (1.0, 1e3), (8, 64), (4, 16), (1, 2)
BATCH_SIZES = (16, 32, 64, 128)
#: the quadratics' outer-loss clip: 1.5 times their initial loss (1), as 1.5·ln 10 is for 10 classes
QUADRATIC_MAX_LOSS = 1.5
_SPECS: dict[str, IDXSpec] = {"fashion-mnist": FASHION_MNIST, "mnist": MNIST}
#: the parts of the training files the losses read (of Fashion-MNIST's ``PARTS``), each with the generator stream
#: of its minibatch order: the loss's, and the validation loss's
STREAMS = {"train": 1, "inner-valid": 3}


def resolve_families(families: str | Sequence[str], option: str = "families") -> tuple[str, ...]:
    """The family names ``families`` stands for: ``"train"``, ``"held-out"``, family names, or a mix.

    A string may list several, separated by commas (``"quadratic,fashion14-conv"``); repeats are
    dropped. ``option`` names the option in errors.

    Raises:
        ConfigError: an unknown name (naming ``option`` and the closest valid name), or no family.

    Example:
        >>> resolve_families("quadratic, mnist8-logistic")
        ('quadratic', 'mnist8-logistic')
    """
    items = families.split(",") if isinstance(families, str) else list(families)
    names: list[str] = []
    for item in (str(i).strip() for i in items):
        if item not in _GROUPS and item not in FAMILIES:
            valid = [*_GROUPS, *FAMILIES]
            raise ConfigError(f"option {option!r}: unknown family {item!r}{closest(item, valid)}; give 'train', "
                              f"'held-out' or family names separated by commas, from {', '.join(FAMILIES)}")
        names.extend(n for n in _GROUPS.get(item, (item,)) if n not in names)
    if not names:
        raise ConfigError(f"option {option!r} names no family; give 'train', 'held-out' or family names")
    return tuple(names)


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer uniform in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (), generator=g))


def _log_uniform(g: torch.Generator, low: float, high: float) -> float:
    """A number log-uniform in ``[low, high]``."""
    return math.exp(math.log(low) + float(torch.rand((), generator=g, dtype=torch.float64)) * math.log(high / low))


class QuadraticTask(Optimizee):
    """A quadratic ``½(θ−θ*)ᵀA(θ−θ*)`` of drawn dimension and condition number, scaled to loss 1 at θ_0.

    ``A = Q diag(λ) Qᵀ`` with ``Q`` a uniformly random rotation and ``λ = κ^u``, ``u_0 = 0``,
    ``u_1 = 1`` and the others uniform in [0, 1], so ``κ`` is exactly its condition number; θ* and
    θ_0 are N(0, I). Deterministic: ``step`` is ignored. Made by :meth:`draw`.

    Attributes:
        a, target, theta0: ``A`` ``[dim, dim]``, θ* and θ_0 ``[dim]``.
        dim, condition: the drawn dimension and condition number.
    """

    outer_is_inner = False
    family = "quadratic"

    def __init__(self, seed: int, a: torch.Tensor, target: torch.Tensor, theta0: torch.Tensor,
                 condition: float) -> None:
        self.seed, self.a, self.target, self.theta0, self.condition = seed, a, target, theta0, condition
        self.dim = len(theta0)

    @classmethod
    def draw(cls, seed: int, dtype: torch.dtype = torch.float32) -> QuadraticTask:
        """Problem ``seed``: dimension in :data:`DIMS`, condition number log-uniform in :data:`CONDITION`."""
        g = seeded_generator(seed, 2)
        dim, condition = _randint(g, *DIMS), _log_uniform(g, *CONDITION)
        u = torch.rand(dim, generator=g, dtype=torch.float64)
        u[:2] = torch.tensor([0.0, 1.0])
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r))  # Haar-distributed (Mezzadri 2007)
        a = (q * condition**u) @ q.T
        target, theta0 = torch.randn(2, dim, generator=g, dtype=torch.float64)
        delta = theta0 - target
        a = a / (0.5 * delta @ a @ delta)
        return cls(seed, a.to(dtype), target.to(dtype), theta0.to(dtype), condition)

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"theta": self.theta0.clone()}

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        del step
        delta = params["theta"] - self.target
        return 0.5 * delta @ (self.a @ delta)

    def outer_loss(self, params: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, None]:
        """The loss clipped to [0, :data:`QUADRATIC_MAX_LOSS`], NaN and ±inf mapped to the maximum."""
        return normalize_loss(self.loss(params, step), QUADRATIC_MAX_LOSS), None

    def to(self, device: torch.device | str) -> QuadraticTask:
        return QuadraticTask(self.seed, self.a.to(device), self.target.to(device), self.theta0.to(device),
                             self.condition)

    def describe(self) -> dict[str, Any]:
        """Family, seed and hyperparameters, for reports."""
        return {"family": self.family, "seed": self.seed, "dim": self.dim, "condition": round(self.condition, 1)}


@functools.cache
def _training_file(folder: Path, dataset: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images of ``dataset`` in ``folder`` resized to ``size``, and int64 labels, read once per process."""
    images, labels = read_split(folder, "train", _SPECS[dataset])
    return downsample(torch.from_numpy(images.copy()), size), torch.from_numpy(labels.astype(np.int64))


class ImageTask(Optimizee):
    """A classifier of one image family trained on minibatches; subclasses give its parameters and logits.

    Made by :meth:`draw` (or directly, for chosen hyperparameters). The images are read on the
    first loss (see the module docs) and moved to the parameters' device minibatch by minibatch.

    Args:
        family: its name in :data:`FAMILIES`.
        seed: the seed of its initialisation and minibatch order.
        batch: images per minibatch.
        widths: hidden widths (MLPs; ``()`` for logistic regression) or channels per convolution.
        data_root: folder holding ``fashion-mnist/`` and ``mnist/``; None: ``$METAOPT_DATA``.
        dtype: floating type of the parameters and images.
    """

    outer_is_inner = False
    widths_name: ClassVar[str]

    def __init__(self, family: str, seed: int, batch: int, widths: Sequence[int],
                 data_root: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> None:
        spec = FAMILIES[family]
        self.family, self.seed, self.batch, self.widths = family, seed, batch, tuple(widths)
        self.dataset, self.activation, self.size = spec.dataset, spec.activation, spec.size
        self.data_root, self.dtype = data_root, dtype

    @classmethod
    def draw(cls, family: str, seed: int, data_root: str | os.PathLike | None = None,
             dtype: torch.dtype = torch.float32) -> ImageTask:
        """Problem ``seed`` of ``family``: its minibatch size from :data:`BATCH_SIZES`, then its widths."""
        g = seeded_generator(seed, 2)
        batch = BATCH_SIZES[_randint(g, 0, len(BATCH_SIZES) - 1)]
        return cls(family, seed, batch, cls.draw_widths(FAMILIES[family], g), data_root, dtype)

    @staticmethod
    def draw_widths(family: Family, g: torch.Generator) -> tuple[int, ...]:
        raise NotImplementedError

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes."""
        raise NotImplementedError

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The logits ``[batch, 10]`` of images ``x`` ``[batch, size²]``."""
        raise NotImplementedError

    def init_params(self) -> dict[str, torch.Tensor]:
        """haiku's ``Linear`` / ``Conv2D`` init under a generator seeded by ``seed``."""
        return haiku_init(self.shapes(), self.seed, self.dtype)

    def minibatch(self, step: int, part: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """Minibatch ``step`` of ``part`` (a key of :data:`STREAMS`): images ``[batch, size²]`` and int64 labels."""
        root = None if self.data_root is None else Path(self.data_root) / self.dataset
        folder = dataset_root(root, self.dataset)
        images, labels = _training_file(folder, self.dataset, self.size)
        part_images, part_labels = images[part_rows(part, len(labels))], labels[part_rows(part, len(labels))]
        if self.batch > len(part_labels):
            raise ValueError(f"problem {self.seed} ({self.family}) takes minibatches of {self.batch} images, more "
                             f"than the {len(part_labels)} of part {part!r} of {folder}: put the full dataset there")
        rows = minibatch_rows(len(part_labels), self.batch, step, self.seed, STREAMS[part])
        return part_images[rows].to(self.dtype), part_labels[rows]

    def cross_entropy(self, params: dict[str, torch.Tensor], step: int, part: str = "train") -> torch.Tensor:
        """Mean cross-entropy on minibatch ``step`` of ``part`` (the training images by default)."""
        x, y = self.minibatch(step, part)
        device = next(iter(params.values())).device
        return F.cross_entropy(self.logits(params, x.to(device)), y.to(device))

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The plain mean cross-entropy on minibatch ``step`` of the training images (the inner loss)."""
        return self.cross_entropy(params, step)

    def outer_loss(self, params: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, None]:
        """The loss through :func:`~metaopt.datasets.fashion_mnist.normalize_loss` (the meta-objective)."""
        return normalize_loss(self.loss(params, step)), None

    def validation_loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The clipped loss on minibatch ``step`` of the validation images (the training file's 80%-90%)."""
        return normalize_loss(self.cross_entropy(params, step, "inner-valid"))

    def describe(self) -> dict[str, Any]:
        """Family, seed and hyperparameters, for reports."""
        return {"family": self.family, "seed": self.seed, "dataset": self.dataset, "image_size": self.size,
                self.widths_name: list(self.widths), "activation": self.activation, "batch": self.batch}


class MLPTask(ImageTask):
    """An MLP ``size²-w-10`` (or, with no hidden layer, logistic regression) on downsampled images.

    Its parameters are named as :func:`metaopt.datasets.mnist.mlp_shapes` names them; with
    ``widths=(32,)`` on ``fashion8-mlp-relu`` and batch 128 it is
    :class:`~metaopt.datasets.fashion_mnist.FashionMNIST8MLP`'s problem of the same seed.
    """

    widths_name = "hidden"

    @staticmethod
    def draw_widths(family: Family, g: torch.Generator) -> tuple[int, ...]:
        """One hidden width log-uniform in :data:`WIDTHS`; none for logistic regression."""
        return () if family.kind == "logistic" else (round(_log_uniform(g, *WIDTHS)),)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return mlp_shapes(self.widths, self.size**2, CLASSES)

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        activation = ACTIVATIONS[self.activation or "relu"]  # logistic regression: no hidden layer, never applied
        return mlp_forward(params, x, len(self.widths) + 1, activation)


def _pad_same(x: torch.Tensor, stride: int, kernel: int = 3) -> torch.Tensor:
    """``x`` ``[batch, channels, n, n]`` padded as TensorFlow's ``SAME`` convolution pads it (extra pixel after)."""
    n = x.shape[-1]
    total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
    return F.pad(x, (total // 2, total - total // 2) * 2)


class ConvTask(ImageTask):
    """A convnet: 3x3 ``SAME`` convolutions (stride 2, then 1), then a linear layer on the flattened activations.

    Parameters ``conv{i}.weight`` ``[out, in, 3, 3]``, ``conv{i}.bias``, then ``fc1.weight``
    ``[10, channels · ⌈size/2⌉²]`` and ``fc1.bias`` of the linear layer.
    """

    widths_name = "channels"

    @staticmethod
    def draw_widths(family: Family, g: torch.Generator) -> tuple[int, ...]:
        """:data:`CONV_LAYERS` layers, each of channels log-uniform in :data:`CHANNELS`."""
        return tuple(round(_log_uniform(g, *CHANNELS)) for _ in range(_randint(g, *CONV_LAYERS)))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(zip((1, *self.widths), self.widths), start=1):
            shapes[f"conv{i}.weight"], shapes[f"conv{i}.bias"] = (fan_out, fan_in, 3, 3), (fan_out,)
        return shapes | mlp_shapes((), self.widths[-1] * (-(-self.size // 2)) ** 2, CLASSES)

    def logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        activation = ACTIVATIONS[self.activation]
        h = x.reshape(len(x), 1, self.size, self.size)
        for i in range(1, len(self.widths) + 1):
            stride = 2 if i == 1 else 1
            h = activation(F.conv2d(_pad_same(h, stride), params[f"conv{i}.weight"], params[f"conv{i}.bias"],
                                    stride=stride))
        return mlp_forward(params, h.flatten(1), 1, activation)


_KINDS: dict[str, type[ImageTask]] = {"mlp": MLPTask, "logistic": MLPTask, "conv": ConvTask}


class TaskSuite:
    """The suite's problems of ``families``, an optimizee family: ``sample(seed)`` is a pure function of ``seed``.

    Problem ``seed`` is of family ``families[seed % len(families)]``, with hyperparameters drawn
    from ``seed`` (module docs).

    Args:
        families: ``"train"``, ``"held-out"`` or family names (:func:`resolve_families`).
        data_root: folder holding ``fashion-mnist/`` and ``mnist/``; None: ``$METAOPT_DATA``.
        dtype: floating type of the problems.
    """

    def __init__(self, families: str | Sequence[str] = "train", data_root: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.families, self.data_root, self.dtype = resolve_families(families), data_root, dtype

    def sample(self, seed: int) -> QuadraticTask | ImageTask:
        """Problem ``seed`` (a non-negative integer)."""
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        family = self.families[seed % len(self.families)]
        kind = FAMILIES[family].kind
        if kind == "quadratic":
            return QuadraticTask.draw(seed, self.dtype)
        return _KINDS[kind].draw(family, seed, self.data_root, self.dtype)


def held_out_tasks(n: int, start: int = 0, data_root: str | os.PathLike | None = None,
                   dtype: torch.dtype = torch.float32) -> list[QuadraticTask | ImageTask]:
    """Problems ``start`` to ``start + n - 1`` of the held-out families' test stream (the ``task-suite`` test split).

    They go round the held-out families in turn, so 20 problems hold 5 of each. Tune baselines on
    other problems of the same stream, e.g. ``held_out_tasks(n, start=TUNING_OFFSET)``.
    """
    stream = optimizee_stream(TaskSuite("held-out", data_root, dtype), "test", seed=0)
    return [stream.batch(start + i) for i in range(n)]


@dataclass(frozen=True)
class TaskSuiteOptions(Options):
    """The task suite of a run: training and validation problems of one set of families, test problems of another.

    Args:
        families: families of the training and validation problems: "train" (the training families), "held-out",
            or family names separated by commas.
        test_families: families of the test problems: "held-out" (families no training problem comes from),
            "train", or family names separated by commas.
        data_root: folder holding the datasets, one sub-folder each (data_root/fashion-mnist, data_root/mnist);
            None: $METAOPT_DATA.
    """

    families: str = "train"
    test_families: str = "held-out"
    data_root: str | None = None

    def check(self) -> None:
        super().check()
        resolve_families(self.families, "families")
        resolve_families(self.test_families, "test_families")


@register_dataset("task-suite", TaskSuiteOptions, problems="optimizees")
def build_task_suite(options: TaskSuiteOptions, split: str, seed: int) -> OptimizeeStream:
    """A mini-TaskSet (Metz et al. 2020): quadratics, MLPs, convnets; test problems from held-out families."""
    suite = TaskSuite(options.test_families if split == "test" else options.families, options.data_root)
    return optimizee_stream(suite, split, seed, {"families": list(resolve_families(options.families)),
                                                 "test_families": list(resolve_families(options.test_families))})
