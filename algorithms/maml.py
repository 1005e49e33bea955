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

from metaopt.batchnorm import PerStepBatchNorm, per_step_batchnorm
from metaopt.functional import named_params, select
from metaopt.meta_learner import MetaLearner, adapted_parameter_names
from metaopt.rules import UpdateRule, per_step_sgd, sgd

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
        per_step_lr: MAML++'s LSLR: one learned α per parameter tensor and inner step, starting
            at ``inner_lr`` (:func:`metaopt.rules.per_step_sgd`).
        per_step_bn_stats: MAML++'s BNRS: batch-norm running statistics per inner step.
        per_step_bn_weights: MAML++'s BNWB: batch-norm weights and biases per inner step, learned
            in the outer loop only (the inner loop leaves them alone, as the official configs do).
            With either per-step switch the model's batch-norm layers are replaced in place by
            :class:`metaopt.batchnorm.PerStepBatchNorm` (same function until trained apart).
        **kwargs: engine options of :class:`metaopt.meta_learner.MetaLearner` (``eval_inner_steps``,
            ``strategy``, ``bn_policy``, ``loss_fn``, ``step_weights``, ``driver``, and MAML++'s
            ``msl_epochs`` and ``second_order_from_epoch``); with ``driver="higher"`` the inner SGD
            runs as ``torch.optim.SGD`` through ``higher``.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, first_order: bool = False,
                 anil: bool = False, learn_inner_lr: bool = False, adapt: str | Sequence[str] = "all",
                 per_step_lr: bool = False, per_step_bn_stats: bool = False, per_step_bn_weights: bool = False,
                 **kwargs: object) -> None:
        if anil and adapt != "all":
            raise ValueError("pass either anil=True or adapt=..., not both")
        if learn_inner_lr and per_step_lr:
            raise ValueError("learn_inner_lr (one learned α) and per_step_lr (one per tensor and step) exclude each "
                             "other; pass one of them")
        if per_step_bn_stats or per_step_bn_weights:
            per_step_batchnorm(model, inner_steps, per_step_bn_stats, per_step_bn_weights)
        adapted = adapted_parameter_names(model, "head" if anil else adapt)
        if per_step_bn_weights:
            adapted = _without_per_step_norm(model, adapted)
        rule: UpdateRule = sgd(inner_lr, learnable=learn_inner_lr)
        if per_step_lr:
            params = named_params(model)
            rule = per_step_sgd(params if adapted is None else select(params, adapted), inner_steps, inner_lr)
        super().__init__(model, rule, inner_steps=inner_steps, first_order=first_order,
                         adapt="all" if adapted is None else adapted, **kwargs)


def _without_per_step_norm(model: nn.Module, adapted: list[str] | None) -> list[str]:
    """``adapted`` (``None``: all) without the per-step batch-norm weights, which only the outer loop learns."""
    per_step = {f"{prefix}.{name}" if prefix else name
                for prefix, module in model.named_modules() if isinstance(module, PerStepBatchNorm)
                for name, _ in module.named_parameters(recurse=False)}
    names = [n for n, _ in model.named_parameters()] if adapted is None else adapted
    return [n for n in names if n not in per_step]
