"""Meta-learning algorithms, one file each, built on the :mod:`metaopt` engine.

Importing this package registers a builder per algorithm in :mod:`metaopt.registry`, so that a
config names its algorithm (``"algorithm": "maml"``).
"""

from __future__ import annotations

from torch import nn

from metaopt.algorithms.arml import ARML
from metaopt.algorithms.maml import MAML
from metaopt.algorithms.mamlpp import MAMLPlusPlus
from metaopt.algorithms.metalstm import MetaLSTM
from metaopt.algorithms.metasgd import MetaSGD
from metaopt.algorithms.mtnet import MTNet
from metaopt.config import ConfigError, ExperimentConfig
from metaopt.registry import register_algorithm

__all__ = ["ARML", "MAML", "MAMLPlusPlus", "MTNet", "MetaLSTM", "MetaSGD", "build_arml", "build_maml", "build_mamlpp",
           "build_metalstm", "build_metasgd", "build_mtnet", "build_tnet"]


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


@register_algorithm("mtnet")
def build_mtnet(model: nn.Module, config: ExperimentConfig) -> MTNet:
    """MT-net: T after every layer and per-task masks (``mtnet_mask`` "unit" or "weight")."""
    return MTNet(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, mask=config.mtnet_mask,
                 first_order=config.first_order, **_engine_options(config))


@register_algorithm("tnet")
def build_tnet(model: nn.Module, config: ExperimentConfig) -> MTNet:
    """T-net: MT-net's transformations T without the masks."""
    return MTNet(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps, mask=None,
                 first_order=config.first_order, **_engine_options(config))


def _input_shape(model: nn.Module) -> tuple[int, ...]:
    """The example shape ARML's default embedding needs: ``(channels, 0, 0)`` for a convnet (its pooling is
    adaptive, so the image side does not matter), ``(features,)`` for an MLP."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, 0, 0)
        if isinstance(module, nn.Linear):
            return (module.in_features,)
    raise ConfigError("ARML's embedding needs a model that starts with a Conv2d or a Linear layer")


@register_algorithm("arml")
def build_arml(model: nn.Module, config: ExperimentConfig) -> ARML:
    """ARML with ``arml_vertices`` knowledge vertices, bandwidth ``arml_sigma`` and loss weight ``arml_loss_weight``."""
    if config.ways is None:
        raise ConfigError("ARML builds class prototypes: it needs a classification dataset with ways set")
    return ARML(model, ways=config.ways, input_shape=_input_shape(model), inner_lr=config.inner_lr,
                inner_steps=config.inner_steps, vertices=config.arml_vertices, sigma=config.arml_sigma,
                loss_weight=config.arml_loss_weight, first_order=config.first_order, adapt=config.adapt_spec(),
                **_engine_options(config))


@register_algorithm("metalstm")
def build_metalstm(model: nn.Module, config: ExperimentConfig) -> MetaLSTM:
    """Ravi & Larochelle's meta-learner LSTM; batch-norm policy ``"support"`` and momentum ``metalstm_bn_momentum``."""
    return MetaLSTM(model, inner_steps=config.inner_steps, bn_momentum=config.metalstm_bn_momentum,
                    eval_inner_steps=config.eval_inner_steps, strategy=config.strategy, bn_policy=config.bn_policy,
                    adapt=config.adapt_spec())
