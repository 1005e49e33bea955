"""Meta-SGD: learn the initialisation and a step size for every parameter entry.

    θ'_i = θ - α ∘ ∇_θ L_support_i(θ)        meta-loss = mean_i L_query_i(θ'_i),  learned: θ and α

``α`` has exactly the shape of ``θ``; its entries are free in sign, so the outer loop learns an
update direction as well as a step size. One inner step at meta-training and meta-test.

References:
    Li, Zhou, Chen, Li, 2017. Meta-SGD: Learning to Learn Quickly for Few-Shot Learning.
    https://arxiv.org/abs/1707.09835 (§3).

Results (paper vs ours; commands and protocol in the README):

    ==================  ==============  ==========================================
    benchmark           paper           metaopt
    ==================  ==============  ==========================================
    Omniglot 5w1s       99.53 ± 0.26    see README (CPU time-budget ablation)
    Omniglot 20w1s      95.93 ± 0.38    see README (CPU time budget)
    ==================  ==============  ==========================================

The paper draws α uniformly from [0.005, 0.1] (``init=(0.005, 0.1)``, the default; option
``init="uniform"``); learn2learn starts every entry at one constant (``init=0.01``; options
``init="constant", init_lr=0.01``). Results state which.

Example:
    >>> import torch
    >>> from metaopt import Episode
    >>> from metaopt.models import MLP
    >>> learner = MetaSGD(MLP(1, 1, hidden=(8,)), init=0.01)
    >>> x = torch.rand(10, 1)
    >>> loss, _ = learner.meta_loss(Episode.stack([Episode(x[:5], x[:5] ** 2, x[5:], x[5:] ** 2)]))
    >>> loss.backward()
    >>> learner.rule.rates["0-weight"].shape == learner.model[0].weight.shape
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from metaopt.engine.functional import named_params, select
from metaopt.engine.learner_options import AdaptOptions, InnerLoopOptions, SecondOrderOptions
from metaopt.engine.meta_learner import MetaLearner, adapted_parameter_names, check_model
from metaopt.engine.rules import meta_sgd
from metaopt.options import ConfigError
from metaopt.registry import BuildContext, register_algorithm

__all__ = ["MetaSGD", "MetaSGDOptions", "build_metasgd"]

UNIFORM = (0.005, 0.1)  # the paper's range of the initial step sizes


@dataclass(frozen=True)
class MetaSGDOptions(InnerLoopOptions, SecondOrderOptions, AdaptOptions):
    """Meta-SGD's options (Li et al. 2017).

    Args:
        init: initial step sizes: "uniform" in [0.005, 0.1] (the paper) or "constant" (every entry
            init_lr, as learn2learn).
        init_lr: the constant of init="constant".
    """

    positive = ("init_lr", *InnerLoopOptions.positive)
    init: Literal["uniform", "constant"] = "uniform"
    init_lr: float | None = None

    def check(self) -> None:
        super().check()
        if (self.init == "constant") != (self.init_lr is not None):
            raise ConfigError("option 'init_lr' is the starting step size of init='constant' and is required there; "
                              f"with init='uniform' the step sizes are drawn from U{list(UNIFORM)}: got "
                              f"init={self.init!r}, init_lr={self.init_lr}")


class MetaSGD(MetaLearner):
    """Meta-SGD (Li et al. 2017): MAML whose inner step size is a learned tensor per parameter.

    Args:
        model: network to adapt; run functionally, never mutated by adaptation.
        init: initial α: ``(low, high)`` for a uniform draw (the paper's ``(0.005, 0.1)``) or a constant.
        inner_steps: inner steps at meta-training (the paper: 1).
        first_order: drop second-order terms of the meta-gradient.
        adapt: which parameters the inner loop updates (and get a learned α).
        generator: random generator for the uniform draw (default: torch's global one, so the
            run's seed fixes it).
        **kwargs: engine options of :class:`metaopt.engine.meta_learner.MetaLearner` (``eval_inner_steps``,
            ``strategy``, ``bn_policy``, ``loss_fn``...). The ``higher`` driver does not apply: no
            ``torch.optim`` optimizer has a step size per entry.
    """

    def __init__(self, model: nn.Module, init: float | tuple[float, float] = UNIFORM, inner_steps: int = 1,
                 first_order: bool = False, adapt: str | Sequence[str] = "all",
                 generator: torch.Generator | None = None, **kwargs: Any) -> None:
        adapted = adapted_parameter_names(check_model(model), adapt)
        params = named_params(model)
        rule = meta_sgd(params if adapted is None else select(params, adapted), init, generator)
        super().__init__(model, rule, inner_steps=inner_steps, first_order=first_order, adapt=adapt, **kwargs)


@register_algorithm("metasgd", MetaSGDOptions)
def build_metasgd(options: MetaSGDOptions, context: BuildContext) -> MetaSGD:
    """Meta-SGD (Li et al. 2017): MAML with a learned step size for every parameter entry."""
    settings = options.to_dict()
    init = UNIFORM if settings.pop("init") == "uniform" else settings["init_lr"]
    del settings["init_lr"]
    return MetaSGD(context.model, init=init, **settings)
