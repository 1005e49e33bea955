"""MAML, first-order MAML and ANIL: meta-learn the initial parameters of plain gradient descent.

    θ'_i = θ - α ∇_θ L_support_i(θ)   (K steps)        meta-loss = mean_i L_query_i(θ'_i)

Only θ (and, with ``learn_inner_lr``, α) is meta-learned; the inner rule is
:func:`metaopt.engine.rules.sgd`. First-order MAML treats the inner gradients as constants; ANIL
(Raghu et al. 2020) adapts only the classifier head (``adapt="head"``).

References:
    Finn, Abbeel, Levine, 2017. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks. ICML. https://arxiv.org/abs/1703.03400 (Algorithm 2; first-order: §5.2).
    Raghu, Raghu, Bengio, Vinyals, 2020. Rapid Learning or Feature Reuse? Towards Understanding
    the Effectiveness of MAML. ICLR. https://arxiv.org/abs/1909.09157

Results (paper vs ours; commands and protocol in the README):

    =========================  ==============  ====================================
    benchmark                  paper           metaopt
    =========================  ==============  ====================================
    sinusoid K=10, 1 step MSE  ~0.2 (Fig. 2)   0.347 ± 0.034 (10 steps: 0.113)
    Omniglot 5w1s              98.7 ± 0.4      96.66 ± 0.31 (2 CPU hours, 11k its)
    =========================  ==============  ====================================

Example:
    >>> import torch
    >>> from metaopt import Episode
    >>> from metaopt.models import MLP
    >>> maml = MAML(MLP(1, 1), inner_lr=0.01, inner_steps=1)
    >>> x = torch.rand(10, 1) * 10 - 5
    >>> task = Episode(x[:5], torch.sin(x[:5]), x[5:], torch.sin(x[5:]))
    >>> loss, metrics = maml.meta_loss(Episode.stack([task, task]))
    >>> loss.backward()
    >>> learner = maml.adapt(task, steps=3)
    >>> learner(x).shape
    torch.Size([10, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from metaopt.engine.higher_driver import HigherRule
from metaopt.engine.learner_options import AdaptOptions, InnerLoopOptions, SecondOrderOptions
from metaopt.engine.meta_learner import MetaLearner, check_model
from metaopt.engine.rules import sgd
from metaopt.registry import BuildContext, register_algorithm

__all__ = ["MAML", "MAMLOptions", "build_maml"]


@dataclass(frozen=True)
class MAMLOptions(InnerLoopOptions, SecondOrderOptions, AdaptOptions):
    """MAML's options (Finn et al. 2017).

    Args:
        inner_lr: step size α of the inner gradient descent.
        learn_inner_lr: meta-learn α as one scalar.
    """

    positive = ("inner_lr", *InnerLoopOptions.positive)
    inner_lr: float = 0.4
    learn_inner_lr: bool = False


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017).

    Args:
        model: network to adapt; run functionally, never mutated by adaptation.
        inner_lr: step size α of the inner gradient descent.
        inner_steps: inner steps during meta-training (default: 1).
        first_order: drop second-order terms (first-order MAML).
        learn_inner_lr: meta-learn α as one scalar.
        adapt: which parameters the inner loop updates: ``"all"``, ``"head"`` (ANIL) or names.
        driver: ``"func"`` (torch.func) or ``"higher"`` (the inner SGD as ``torch.optim.SGD``
            through ``higher``; same meta-gradients).
        **kwargs: engine options of :class:`metaopt.engine.meta_learner.MetaLearner`
            (``eval_inner_steps``, ``strategy``, ``bn_policy``, ``loss_fn``, ``step_weights``,
            ``checkpoint_steps``).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, first_order: bool = False,
                 learn_inner_lr: bool = False, adapt: str | Sequence[str] = "all",
                 driver: Literal["func", "higher"] = "func", **kwargs: Any) -> None:
        if driver not in ("func", "higher"):
            raise ValueError(f"driver must be 'func' or 'higher', got {driver!r}")
        rule = sgd(inner_lr, learnable=learn_inner_lr, dtype=next(check_model(model).parameters()).dtype)
        super().__init__(model, HigherRule(rule) if driver == "higher" else rule, inner_steps=inner_steps,
                         first_order=first_order, adapt=adapt, **kwargs)


@register_algorithm("maml", MAMLOptions)
def build_maml(options: MAMLOptions, context: BuildContext) -> MAML:
    """MAML (Finn et al. 2017); first-order with first_order, ANIL with adapt="head"."""
    return MAML(context.model, **options.to_dict())
