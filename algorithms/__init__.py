"""Meta-learning algorithms, one file each, built on the :mod:`metaopt` engine.

Importing this package registers a builder per algorithm in :mod:`metaopt.registry`, so that a
config names its algorithm (``"algorithm": "maml"``).
"""

from __future__ import annotations

from torch import nn

from metaopt.algorithms.maml import MAML
from metaopt.algorithms.mamlpp import MAMLPlusPlus
from metaopt.algorithms.metasgd import MetaSGD
from metaopt.config import ExperimentConfig
from metaopt.registry import register_algorithm

__all__ = ["MAML", "MAMLPlusPlus", "MetaSGD", "build_maml", "build_mamlpp", "build_metasgd"]


def _engine_options(config: ExperimentConfig) -> dict:
    """The :class:`metaopt.meta_learner.MetaLearner` options every algorithm takes from ``config``."""
    return {"eval_inner_steps": config.eval_inner_steps, "strategy": config.strategy, "bn_policy": config.bn_policy,
            "checkpoint_steps": config.checkpoint_steps, "msl_epochs": config.msl_epochs,
            "second_order_from_epoch": config.second_order_from_epoch}


def _maml_options(config: ExperimentConfig) -> dict:
    return {"inner_lr": config.inner_lr, "inner_steps": config.inner_steps, "first_order": config.first_order,
            "adapt": config.adapt_spec(), "per_step_lr": config.per_step_lr,
            "per_step_bn_stats": config.per_step_bn_stats, "per_step_bn_weights": config.per_step_bn_weights,
            **_engine_options(config)}


@register_algorithm("maml")
def build_maml(model: nn.Module, config: ExperimentConfig) -> MAML:
    """MAML (first-order with ``first_order``, ANIL with ``adapt="head"``, any MAML++ switch) as ``config`` says."""
    return MAML(model, **_maml_options(config))


@register_algorithm("mamlpp")
def build_mamlpp(model: nn.Module, config: ExperimentConfig) -> MAMLPlusPlus:
    """MAML++ with the techniques the config switches on (the ``mamlpp-*`` presets switch on all of them)."""
    return MAMLPlusPlus(model, **_maml_options(config))


@register_algorithm("metasgd")
def build_metasgd(model: nn.Module, config: ExperimentConfig) -> MetaSGD:
    """Meta-SGD; ``metasgd_init`` "uniform" draws α in [0.005, 0.1], "constant" starts it at ``inner_lr``."""
    init = (0.005, 0.1) if config.metasgd_init == "uniform" else config.inner_lr
    return MetaSGD(model, init=init, inner_steps=config.inner_steps, first_order=config.first_order,
                   adapt=config.adapt_spec(), **_engine_options(config))
