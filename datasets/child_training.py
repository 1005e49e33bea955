"""Child trainings: how a searched update rule is scored (Bello et al. 2017, §4's reward), on a budget a CPU affords.

Neural Optimizer Search scores a sampled rule by training a small *child* network with it for a
fixed budget, the step size λ swept over a small log grid, and takes the best **validation**
accuracy as the reward; a rule whose update is not finite gets the minimum reward (0 here). The
paper's child is a 2-layer ConvNet (3x3 filters, 32 channels, ReLU, batch norm) trained for 5
epochs on CIFAR-10. CIFAR-10 is not on the machines this library is developed on, and 5 epochs
is minutes per rule on a CPU; the default here keeps the network and shrinks data and budget:

* data: Fashion-MNIST, 2x2-average-pooled to 14x14 (``dataset="fashion-mnist"``; ``"mnist"``, or
  ``"cifar10"`` where its files are present, drop in by name: :data:`DATASETS`); training
  minibatches from the first 50,000 training images, validation accuracy on ``val_images`` of
  the last 10,000 (the training file's last sixth; never the test file), test accuracy on the
  test file (reports only);
* network ``"convnet"``: conv 3x3 (32, stride 2) → BN → ReLU → conv 3x3 (32, stride 2) → BN →
  ReLU → global mean → linear 10 (:class:`ChildConvNet`; the strides keep it at ≈3 ms a step of
  64 images on one core); ``"mlp"``: one hidden layer of 64 ReLU units (a second, different task);
* budget: ``steps`` = 100 minibatches of 64 (0.13 epoch), λ over {1e-3, 1e-2, 1e-1, 1}:
  about 0.4 s a training and 1.6 s a rule on one core, so a search of 1000 rules is about half an
  hour of one core (Fashion-MNIST is easy: 100 steps separate good rules, ≈80% validation
  accuracy for tuned Adam, from bad ones, 10–60%).

A training is a pure function of (rule or optimizer, λ, seed): the seed fixes the initialisation
and the minibatch order. :meth:`ChildTask.reward` scores with the task's own seed, so a rule's
reward is a number that a cache by canonical string may keep.

Reference:
    Bello, Zoph, Vasudevan, Le, 2017. Neural Optimizer Search with Reinforcement Learning. ICML.
    https://arxiv.org/abs/1709.07417 (§4: the child network and the reward).

Example:
    >>> task = ChildTask(steps=3, lrs=(0.1,), val_images=64, data=fake_data(256))
    >>> score = task.score(lambda params, lr: torch.optim.SGD(params, lr=lr), seed=0)
    >>> 0.0 <= score.accuracy <= 1.0, score.lr
    (True, 0.1)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.algorithms.rule_dsl import InvalidUpdateError, Rule
from metaopt.datasets.fashion_mnist import load_fashion_mnist
from metaopt.datasets.mnist import load_mnist, minibatch_rows
from metaopt.options import ConfigError, Options
from metaopt.registry import register_dataset

__all__ = ["DATASETS", "LRS", "ChildConvNet", "ChildData", "ChildMLP", "ChildScore", "ChildTask",
           "ChildTrainingOptions", "RuleRewards", "RuleSeeds", "build_child_training", "fake_data", "load_child_data"]

LRS = (1e-3, 1e-2, 1e-1, 1.0)
#: The offsets of the child seeds of the splits (the reward's seed is the run's seed).
SPLIT_SEEDS = {"train": 0, "val": 10**9, "test": 2 * 10**9}
MakeOptimizer = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


@dataclass(frozen=True)
class ChildData:
    """Images ``[N, C, H, W]`` in [0, 1] and labels of the training, validation and test parts."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])


def _pooled(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images.reshape(-1, 1, 28, 28), 2)


def _split(images: torch.Tensor, labels: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> ChildData:
    """The first 5/6 of a training file for minibatches (50,000 of 60,000), the rest for validation."""
    cut = len(labels) * 5 // 6
    return ChildData((images[:cut], labels[:cut]), (images[cut:], labels[cut:]), test)


def _idx_data(load: Callable[..., tuple[torch.Tensor, torch.Tensor]], folder: Path | None) -> ChildData:
    images, labels = load(folder, "train")
    test_images, test_labels = load(folder, "test")
    return _split(_pooled(images), labels, (_pooled(test_images), test_labels))


def _cifar10(folder: Path | None) -> ChildData:
    if folder is None or not (folder / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(f"CIFAR-10 is not in {folder or '$METAOPT_DATA/cifar10 (METAOPT_DATA is not set)'}: "
                                "put the python version's folder cifar-10-batches-py there "
                                "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpacked), or use "
                                "dataset='fashion-mnist'")
    from torchvision.datasets import CIFAR10  # only this dataset needs torchvision

    def tensors(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        data = CIFAR10(str(folder), train=train, download=False)
        return torch.from_numpy(data.data).permute(0, 3, 1, 2).float() / 255, torch.tensor(data.targets)

    return _split(*tensors(True), tensors(False))


#: The child datasets: name -> (folder under the data root, loader of that folder; None: the loader's default).
DATASETS: dict[str, tuple[str, Callable[[Path | None], ChildData]]] = {
    "fashion-mnist": ("fashion-mnist", lambda folder: _idx_data(load_fashion_mnist, folder)),
    "mnist": ("mnist", lambda folder: _idx_data(load_mnist, folder)),
    "cifar10": ("cifar10", _cifar10),
}
_LOADED: dict[tuple[str, str], ChildData] = {}


def load_child_data(dataset: str, data_root: str | os.PathLike | None = None) -> ChildData:
    """The images of ``dataset`` (:data:`DATASETS`) under ``data_root`` (default ``$METAOPT_DATA``), read once."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown child dataset {dataset!r}; choose one of {tuple(DATASETS)}")
    root = data_root if data_root is not None else os.environ.get("METAOPT_DATA")
    folder = None if root is None else Path(root) / DATASETS[dataset][0]
    key = (dataset, str(folder))
    if key not in _LOADED:
        _LOADED[key] = DATASETS[dataset][1](folder)
    return _LOADED[key]


def fake_data(n: int, shape: tuple[int, ...] = (1, 14, 14), seed: int = 0) -> ChildData:
    """A learnable stand-in (class k: brightness k/10 plus noise) for tests and examples without data files."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (3 * n,), generator=gen)
    images = labels.view(-1, *(1,) * len(shape)) / 10 + 0.05 * torch.rand(3 * n, *shape, generator=gen)
    return ChildData((images[:n], labels[:n]), (images[n:2 * n], labels[n:2 * n]), (images[2 * n:], labels[2 * n:]))


class ChildConvNet(nn.Module):
    """The paper's 2-layer ConvNet: two (conv 3x3, 32 channels, stride 2) → BN → ReLU, global mean, linear."""

    def __init__(self, in_channels: int = 1, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class ChildMLP(nn.Module):
    """One hidden layer of ``hidden`` ReLU units on the flattened image (the transfer task)."""

    def __init__(self, in_features: int, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


NETWORKS: dict[str, Callable[[tuple[int, ...]], nn.Module]] = {
    "convnet": lambda shape: ChildConvNet(shape[0]),
    "mlp": lambda shape: ChildMLP(math.prod(shape)),
}


@dataclass(frozen=True)
class ChildScore:
    """The score of an optimizer: best validation accuracy over the λ grid, the λ that gave it, every λ's scores.

    Attributes:
        accuracy: the best validation accuracy (0 when every λ was invalid).
        lr: the λ of ``accuracy`` (None when every λ was invalid).
        accuracies: validation accuracy per λ (0 for an invalid one).
        test_accuracies: test accuracy per λ (None unless asked for).
        seconds: wall time of the trainings.
    """

    accuracy: float
    lr: float | None
    accuracies: dict[float, float]
    test_accuracies: dict[float, float] | None
    seconds: float

    @property
    def test_accuracy(self) -> float | None:
        """The test accuracy at the chosen λ (0 when every λ was invalid; None unless asked for)."""
        if self.test_accuracies is None:
            return None
        return 0.0 if self.lr is None else self.test_accuracies[self.lr]


class ChildTask:
    """Train a child network with an optimizer for a fixed budget; score it by validation accuracy (module docs).

    Args:
        dataset: a name of :data:`DATASETS`.
        network: ``"convnet"`` (:class:`ChildConvNet`) or ``"mlp"`` (:class:`ChildMLP`).
        steps: minibatches of the budget.
        batch: images per minibatch.
        lrs: the λ grid.
        val_images: validation images scored (the first ones of the validation part).
        seed: the seed of :meth:`reward`'s trainings.
        data_root: folder holding the dataset's folder (default ``$METAOPT_DATA``).
        data: the images themselves (instead of reading ``dataset``; tests, other data).
    """

    def __init__(self, dataset: str = "fashion-mnist", network: str = "convnet", steps: int = 100, batch: int = 64,
                 lrs: tuple[float, ...] = LRS, val_images: int = 2000, seed: int = 0,
                 data_root: str | os.PathLike | None = None, data: ChildData | None = None) -> None:
        if network not in NETWORKS:
            raise ConfigError(f"unknown child network {network!r}; choose one of {tuple(NETWORKS)}")
        if not lrs or min(lrs) <= 0:
            raise ConfigError(f"the λ grid must hold step sizes > 0, got {list(lrs)}")
        if dataset not in DATASETS:
            raise ConfigError(f"unknown child dataset {dataset!r}; choose one of {tuple(DATASETS)}")
        self.dataset, self.network, self.steps, self.batch = dataset, network, steps, batch
        self.lrs, self.seed, self.data_root = tuple(lrs), seed, data_root
        self._data, self._val_images = data, val_images

    @property
    def data(self) -> ChildData:
        """The images, read on first use (building a search reads nothing)."""
        if self._data is None:
            self._data = load_child_data(self.dataset, self.data_root)
        if self.batch > len(self._data.train[1]):
            raise ConfigError(f"batch {self.batch} is larger than the {len(self._data.train[1])} training images")
        return self._data

    @property
    def val_images(self) -> int:
        """Validation images scored: the first ``val_images`` of the validation part (all if it has fewer)."""
        return min(self._val_images, len(self.data.val[1]))

    def protocol(self) -> dict[str, Any]:
        return {"child": self.network, "dataset": self.dataset, "steps": self.steps, "batch": self.batch,
                "lrs": list(self.lrs), "val_images": self._val_images, "batch_norm": "train-mode batches, "
                "eval-mode running statistics for validation and test"}

    def train(self, make_optimizer: MakeOptimizer, lr: float, seed: int,
              test: bool = False) -> tuple[float, float | None]:
        """Validation (and test) accuracy after ``steps`` updates of a fresh child; 0 if the training broke down.

        A breakdown is an :class:`~metaopt.algorithms.rule_dsl.InvalidUpdateError` of the optimizer or a
        non-finite training loss. Gradients are on even where the caller turned them off (an evaluation).
        """
        with torch.enable_grad():
            return self._train(make_optimizer, lr, seed, test)

    def _train(self, make_optimizer: MakeOptimizer, lr: float, seed: int, test: bool) -> tuple[float, float | None]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = NETWORKS[self.network](self.data.shape)
        optimizer = make_optimizer(model.parameters(), lr)
        images, labels = self.data.train
        model.train()
        for step in range(self.steps):
            rows = minibatch_rows(len(labels), self.batch, step, seed, 7)
            loss = F.cross_entropy(model(images[rows]), labels[rows])
            if not torch.isfinite(loss):
                return 0.0, 0.0 if test else None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            try:
                optimizer.step()
            except InvalidUpdateError:
                return 0.0, 0.0 if test else None
        val = self.accuracy(model, *(t[:self.val_images] for t in self.data.val))
        return val, self.accuracy(model, *self.data.test) if test else None

    @staticmethod
    @torch.no_grad()
    def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        model.eval()
        correct = sum(int((model(images[i:i + 2000]).argmax(1) == labels[i:i + 2000]).sum())
                      for i in range(0, len(labels), 2000))
        return correct / len(labels)

    def score(self, make_optimizer: MakeOptimizer, seed: int, lrs: tuple[float, ...] | None = None,
              test: bool = False) -> ChildScore:
        """Train with every λ of ``lrs`` (default: the task's grid) from seed ``seed``; the best validation accuracy."""
        start = time.perf_counter()
        results = {lr: self.train(make_optimizer, lr, seed, test) for lr in (lrs or self.lrs)}
        accuracies = {lr: val for lr, (val, _) in results.items()}
        best = max(accuracies, key=lambda lr: accuracies[lr])
        return ChildScore(accuracies[best], best if accuracies[best] > 0 else None, accuracies,
                          {lr: t for lr, (_, t) in results.items()} if test else None, time.perf_counter() - start)

    def rule_score(self, rule: Rule, seed: int, test: bool = False) -> ChildScore:
        """The score of a rule of the language (its decay operands span the budget)."""
        decay_steps = self.steps if rule.uses_decay else None
        return self.score(lambda params, lr: rule.optimizer(params, lr, decay_steps=decay_steps, seed=seed), seed,
                          test=test)

    def reward(self, rule: Rule) -> float:
        """The reward of a rule: its best validation accuracy from the task's seed (0: invalid everywhere)."""
        return self.rule_score(rule, self.seed).accuracy


@dataclass(frozen=True)
class RuleSeeds:
    """A batch of child seeds on which a rule is scored (an evaluation problem of a rule search).

    Attributes:
        task: the child training.
        seeds: one child training (λ swept) per seed.
        test: score by test accuracy at the λ of the best validation accuracy (else: that validation accuracy).
    """

    task: ChildTask
    seeds: tuple[int, ...]
    test: bool = False

    def to(self, device: Any) -> RuleSeeds:
        del device  # child trainings run on the CPU
        return self

    def scores(self, rule: Rule) -> torch.Tensor:
        """The score of ``rule`` from each seed (see ``test``)."""
        scores = [self.task.rule_score(rule, seed, test=self.test) for seed in self.seeds]
        return torch.tensor([s.test_accuracy if self.test else s.accuracy for s in scores])


class RuleRewards:
    """The problem source of a rule search: rewards of rules (training) or batches of child seeds (evaluation).

    Attributes:
        task: the child training.
        batch_size: rules per batch (training) or seeds per evaluation batch.
        seed: the run's seed.
        start: the first batch of an evaluation.
    """

    def __init__(self, task: ChildTask, batch_size: int, split: str, seed: int) -> None:
        self.task, self.batch_size, self.split, self.seed, self.start = task, batch_size, split, seed, 0

    def reward(self, rule: Rule) -> float:
        return self.task.reward(rule)

    def batch(self, index: int) -> RuleSeeds:
        first = SPLIT_SEEDS[self.split] + self.seed * 10**6 + index * self.batch_size
        return RuleSeeds(self.task, tuple(range(first, first + self.batch_size)), test=self.split == "test")

    def protocol(self) -> dict[str, Any]:
        return {**self.task.protocol(), "split": self.split}


@dataclass(frozen=True)
class ChildTrainingOptions(Options):
    """The child training that scores searched rules (module docs; defaults: the ~0.4 s budget).

    Args:
        images: the child's dataset: "fashion-mnist", "mnist" or "cifar10" (where its files are).
        network: "convnet" (the paper's 2-layer ConvNet) or "mlp".
        steps: minibatches per child training.
        batch: images per minibatch.
        lrs: the λ grid of every rule.
        val_images: validation images per score.
        rules_per_batch: rules sampled per batch of the search.
        eval_seeds: child seeds per evaluation batch (the best rule so far is re-scored on them).
        data_root: folder holding the dataset's folder (default: $METAOPT_DATA).
    """

    positive = ("steps", "batch", "val_images", "rules_per_batch", "eval_seeds")
    images: Literal["fashion-mnist", "mnist", "cifar10"] = "fashion-mnist"
    network: Literal["convnet", "mlp"] = "convnet"
    steps: int = 100
    batch: int = 64
    lrs: tuple[float, ...] = LRS
    val_images: int = 2000
    rules_per_batch: int = 16
    eval_seeds: int = 2
    data_root: str | None = None


@register_dataset("child-training", ChildTrainingOptions, problems="rules")
def build_child_training(options: ChildTrainingOptions, split: str, seed: int) -> RuleRewards:
    """Rewards of searched update rules: a child ConvNet trained on Fashion-MNIST (Bello et al. 2017)."""
    task = ChildTask(options.images, options.network, options.steps, options.batch, options.lrs, options.val_images,
                     seed, options.data_root)
    return RuleRewards(task, options.rules_per_batch if split == "train" else options.eval_seeds, split, seed)
