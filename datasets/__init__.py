"""Task sources: few-shot class datasets and regression task families.

Importing this package registers a builder per task family in :mod:`metaopt.registry`, so that
a config names its dataset (``"dataset": "omniglot"``). Meta-training tasks use the config's
``query``; validation and test tasks its ``eval_query`` (15 per class in the few-shot presets).
"""

from __future__ import annotations

from pathlib import Path

from metaopt.config import ConfigError, ExperimentConfig
from metaopt.datasets.miniimagenet import MiniImageNet, MiniImageNetSplit, miniimagenet_split
from metaopt.datasets.omniglot import Omniglot
from metaopt.datasets.sinusoid import Sinusoid
from metaopt.registry import register_dataset
from metaopt.sampling import ClassDataset, EpisodeSampler

__all__ = [
    "MiniImageNet",
    "MiniImageNetSplit",
    "Omniglot",
    "Sinusoid",
    "build_miniimagenet",
    "build_omniglot",
    "build_sinusoid",
    "miniimagenet_split",
]


def _query(config: ExperimentConfig, split: str) -> int:
    return config.query if split == "train" or config.eval_query is None else config.eval_query


@register_dataset("sinusoid")
def build_sinusoid(config: ExperimentConfig, split: str, seed: int) -> Sinusoid:
    """Sinusoid tasks; every split draws from the same task family, told apart by ``seed``."""
    if config.ways is not None:
        raise ConfigError(f"sinusoid tasks are regression tasks without classes; leave 'ways' unset "
                          f"(got ways={config.ways})")
    return Sinusoid(shots=config.shots, query=_query(config, split), batch_size=config.meta_batch, seed=seed)


def _episodes(config: ExperimentConfig, split: str, seed: int, data: ClassDataset) -> EpisodeSampler:
    if config.ways is None:
        raise ConfigError(f"dataset {config.dataset!r} is a classification benchmark; set 'ways' (e.g. 5)")
    return EpisodeSampler(data, ways=config.ways, shots=config.shots, query=_query(config, split),
                          batch_size=config.meta_batch, seed=seed)


def _root(config: ExperimentConfig, name: str) -> Path | None:
    return None if config.data_root is None else Path(config.data_root) / name


@register_dataset("omniglot")
def build_omniglot(config: ExperimentConfig, split: str, seed: int) -> EpisodeSampler:
    """Omniglot episodes of ``config.protocol``'s split (rotations as classes for meta-training)."""
    return _episodes(config, split, seed, Omniglot(_root(config, "omniglot"), split=split, protocol=config.protocol))


@register_dataset("miniimagenet")
def build_miniimagenet(config: ExperimentConfig, split: str, seed: int) -> EpisodeSampler:
    """miniImageNet episodes of the Ravi & Larochelle split."""
    if config.protocol not in ("maml", "ravi"):
        raise ConfigError(f"miniImageNet has one class split, 'ravi' (Ravi & Larochelle 2017), not {config.protocol!r}")
    return _episodes(config, split, seed, MiniImageNet(_root(config, "miniimagenet"), split=split))
