"""Every algorithm names a bad inner learning rate and a model without trainable parameters when it is built."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from torch import nn

from metaopt.algorithms import ARML, MAML, MAMLPlusPlus, MetaLSTM, MetaSGD, MTNet
from metaopt.algorithms.maml import MAMLOptions
from metaopt.models import MLP
from metaopt.registry import BuildContext, entry
from tests.helpers import toy_classification_batch

#: Builders of every algorithm that takes an inner learning rate, from a model and that rate.
WITH_INNER_LR: dict[str, Callable[[nn.Module, object], object]] = {
    "maml": lambda model, lr: MAML(model, inner_lr=lr),
    "maml learned lr": lambda model, lr: MAML(model, inner_lr=lr, learn_inner_lr=True),
    "maml higher": lambda model, lr: MAML(model, inner_lr=lr, driver="higher"),
    "mamlpp": lambda model, lr: MAMLPlusPlus(model, inner_lr=lr),
    "mamlpp one lr": lambda model, lr: MAMLPlusPlus(model, inner_lr=lr, per_step_lr=False),
    "mtnet": lambda model, lr: MTNet(model, inner_lr=lr),
    "tnet": lambda model, lr: MTNet(model, inner_lr=lr, mask=None),
    "arml": lambda model, lr: ARML(model, ways=3, input_shape=(4,), inner_lr=lr),
    "metasgd init": lambda model, lr: MetaSGD(model, init=lr),
}
BAD_LR = {
    "string": ("0.1", "{name} must be a number, got the string '0.1'; pass {name}=0.1 (a float, not a str)"),
    "nan": (float("nan"), "inner learning rate must be > 0, got nan; pass a finite positive step size as {name}, "
                          "e.g. {name}=0.01"),
    "inf": (float("inf"), "inner learning rate must be finite, got inf; pass a finite positive step size as {name}, "
                          "e.g. {name}=0.01"),
    "negative": (-0.5, "inner learning rate must be > 0, got -0.5; pass a finite positive step size as {name}, "
                       "e.g. {name}=0.01"),
}


@pytest.mark.parametrize("lr, message", BAD_LR.values(), ids=BAD_LR.keys())
@pytest.mark.parametrize("build", WITH_INNER_LR.values(), ids=WITH_INNER_LR.keys())
def test_a_bad_inner_learning_rate_is_named(build: Callable[[nn.Module, object], object], lr: object,
                                            message: str) -> None:
    name = "init" if build is WITH_INNER_LR["metasgd init"] else "inner_lr"
    with pytest.raises(ValueError, match=f"^{re.escape(message.format(name=name))}$"):
        build(MLP(4, 3, hidden=(8,)), lr)


def test_a_config_with_an_infinite_inner_lr_fails_when_built() -> None:
    """The option set takes any number > 0; the rule refuses inf with the same message as the Python API."""
    context = BuildContext(MLP(4, 3, hidden=(8,)), toy_classification_batch())
    with pytest.raises(ValueError, match=re.escape("inner learning rate must be finite, got inf")):
        entry("algorithm", "maml").build(MAMLOptions(inner_lr=float("inf")), context)


ALL = {**{name: lambda model, build=build: build(model, 0.1) for name, build in WITH_INNER_LR.items()},
       "metalstm": lambda model: MetaLSTM(model)}


@pytest.mark.parametrize("build", ALL.values(), ids=ALL.keys())
def test_a_model_without_trainable_parameters_is_named(build: Callable[[nn.Module], object]) -> None:
    with pytest.raises(ValueError, match=r"^the model \(Flatten\) has no trainable parameters; "):
        build(nn.Flatten())
    frozen = MLP(4, 3, hidden=(8,)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"^the model \(MLP\) has no trainable parameters \(its 4 parameters all have "
                                         r"requires_grad=False\); .* or unfreeze them: model.requires_grad_\(True\)$"):
        build(frozen)
