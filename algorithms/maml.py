"""MAML, first-order MAML and ANIL: meta-learn the initial parameters of plain gradient descent.

    θ'_i = θ - α ∇_θ L_support_i(θ)   (K steps)        meta-loss = mean_i L_query_i(θ'_i)

Only θ is meta-learned; the inner rule is :func:`metaopt.rules.sgd`. First-order MAML treats
the inner gradients as constants; ANIL (Raghu et al. 2020) adapts only the classifier head.

References:
    Finn, Abbeel, Levine, 2017. Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks. ICML. https://arxiv.org/abs/1703.03400 (Algorithm 2; first-order: §5.2).
    Raghu, Raghu, Bengio, Vinyals, 2020. Rapid Learning or Feature Reuse? Towards Understanding
    the Effectiveness of MAML. ICLR. https://arxiv.org/abs/1909.09157

Results (paper vs ours; commands and protocol in the README):

    =========================  ==============  ==============
    benchmark                  paper           metaopt
    =========================  ==============  ==============
    sinusoid K=10, 1 step MSE  ~0.2 (Fig. 2)   see README
    =========================  ==============  ==============

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

from torch import nn

from metaopt.meta_learner import MetaLearner
from metaopt.rules import sgd

__all__ = ["MAML"]


class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017).

    Args:
        model: network to adapt; run functionally, never mutated by adaptation.
        inner_lr: step size α of the inner gradient descent.
        inner_steps: inner steps during meta-training (default: 1).
        first_order: drop second-order terms (first-order MAML).
        anil: adapt only the classifier head (ANIL); equivalent to ``adapt="head"``.
        learn_inner_lr: meta-learn α as one scalar.
        adapt: which parameters the inner loop updates: ``"all"``, ``"head"`` or a list of names.
        **kwargs: engine options of :class:`metaopt.meta_learner.MetaLearner` (``eval_inner_steps``,
            ``strategy``, ``bn_policy``, ``loss_fn``, ``step_weights``, ``driver``); with
            ``driver="higher"`` the inner SGD runs as ``torch.optim.SGD`` through ``higher``.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, first_order: bool = False,
                 anil: bool = False, learn_inner_lr: bool = False, adapt: str | Sequence[str] = "all",
                 **kwargs: object) -> None:
        if anil and adapt != "all":
            raise ValueError("pass either anil=True or adapt=..., not both")
        super().__init__(model, sgd(inner_lr, learnable=learn_inner_lr), inner_steps=inner_steps,
                         first_order=first_order, adapt="head" if anil else adapt, **kwargs)
