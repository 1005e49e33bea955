"""Meta-learning algorithms, one file each, built on the :mod:`metaopt` engine.

Importing this package registers a builder per algorithm in :mod:`metaopt.registry`, so that a
config names its algorithm (``"algorithm": "maml"``).
"""

from __future__ import annotations

from torch import nn

from metaopt.algorithms.maml import MAML
from metaopt.config import ExperimentConfig
from metaopt.registry import register_algorithm

__all__ = ["MAML", "build_maml"]


@register_algorithm("maml")
def build_maml(model: nn.Module, config: ExperimentConfig) -> MAML:
    """MAML (first-order with ``first_order``, ANIL with ``adapt="head"``) as ``config`` says."""
    return MAML(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, first_order=config.first_order,
                adapt=config.adapt_spec(), eval_inner_steps=config.eval_inner_steps, strategy=config.strategy,
                bn_policy=config.bn_policy, checkpoint_steps=config.checkpoint_steps)
