"""Problem sources, one file each: few-shot class datasets, regression task families, optimizee families.

Each module registers its datasets in :mod:`metaopt.registry` with the options they take
(:func:`metaopt.registry.load_plugins` imports them all), so that a config names its dataset
(``"data": {"name": "omniglot", ...}``). Few-shot meta-training tasks use the options' ``query``,
validation and test tasks their ``eval_query`` (15 per class in the few-shot presets).
"""

from __future__ import annotations

from metaopt.datasets.miniimagenet import MiniImageNet, MiniImageNetSplit, miniimagenet_split
from metaopt.datasets.mnist import MNISTOptimizees
from metaopt.datasets.omniglot import Omniglot
from metaopt.datasets.quadratics import Quadratics
from metaopt.datasets.sinusoid import Sinusoid

__all__ = [
    "MNISTOptimizees",
    "MiniImageNet",
    "MiniImageNetSplit",
    "Omniglot",
    "Quadratics",
    "Sinusoid",
    "miniimagenet_split",
]
