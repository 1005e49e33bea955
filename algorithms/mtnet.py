"""MT-net and T-net: meta-learn a transformation T after every layer and a mask on which weights adapt.

    layer output = T · (W x + b)        (T: learned C×C, identity at the start; outer loop only)
    W ← W - α · M ⊙ ∇_W L_support      (M: a binary mask per output unit, drawn per task)

Every convolution is followed by a 1×1 convolution with a C×C matrix T (before batch norm, ReLU
and pooling) and every linear layer by an ``out × out`` matrix, all initialised to the identity.
The inner loop adapts the weights and biases of the convolutions and linear layers only; T, the
mask logits and batch norm are learned by the outer loop alone.

The mask (MT-net): one logit per output unit of each layer (``mask="unit"``, the paper's
``share_M``; a logit per weight entry with ``mask="weight"``), initialised to 0 (p = 0.5). For each
task a hard Bernoulli mask is drawn through a two-way Gumbel-softmax between the logit and 0
(temperature 1) with the straight-through estimator, so the sample is 0/1 and the gradient
reaches the logit; it is drawn once per task, reused by every inner step of that task, and
independent across the tasks of a batch (under vmap too: ``randomness="different"``). T-net
(``mask=None``) keeps T and uses plain SGD.

References:
    Lee, Choi, 2018. Gradient-Based Meta-Learning with Learned Layerwise Metric and Subspace.
    ICML. https://arxiv.org/abs/1801.05558 (§3; verified against yoonholee/MT-net ``maml.py``).

Results (paper vs ours; commands and protocol in the README):

    ==================  ==============  ==========================================
    benchmark           paper           metaopt
    ==================  ==============  ==========================================
    Omniglot 5w1s       99.5 ± 0.3      see README (CPU time budget)
    Omniglot 20w1s      96.2 ± 0.4      see README (CPU time budget)
    ==================  ==============  ==========================================

Example:
    >>> import torch
    >>> from metaopt import Episode
    >>> from metaopt.models import Conv4
    >>> learner = MTNet(Conv4(1, 5, hidden=8), inner_lr=0.4)
    >>> x, y = torch.randn(10, 1, 28, 28), torch.arange(5).repeat(2)
    >>> loss, _ = learner.meta_loss(Episode.stack([Episode(x[:5], y[:5], x[5:], y[5:])] * 2))
    >>> loss.backward()
    >>> learner.model[0][0][1].weight.grad is not None, tuple(learner.rule.logits["0-0-0"].shape)
    (True, (8,))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.functional import Params, named_params, select
from metaopt.engine.learner_options import InnerLoopOptions, SecondOrderOptions
from metaopt.engine.meta_learner import MetaLearner, check_model
from metaopt.engine.rules import StepInfo, UpdateRule, check_lr, sgd
from metaopt.registry import BuildContext, register_algorithm

__all__ = ["MASKS", "MTNet", "MTNetOptions", "MaskedSGD", "TNetOptions", "Transform", "build_mtnet", "build_tnet",
           "insert_transforms"]

MASKS = ("unit", "weight")


class Transform(nn.Module):
    """T: a learned square matrix over channels (a 1×1 convolution for feature maps) or features, identity at first."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return F.conv2d(x, self.weight[:, :, None, None])
        return F.linear(x, self.weight)


def insert_transforms(model: nn.Module) -> nn.Module:
    """Follow every ``Conv2d`` and ``Linear`` of ``model`` by a :class:`Transform`, in place; returns ``model``.

    Each layer ``L`` becomes ``nn.Sequential(L, Transform(out))``, so its parameter names gain a
    ``.0`` and T's are ``<layer>.1.weight``.
    """
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(model, name, nn.Sequential(child, Transform(child.out_channels).to(child.weight)))
        elif isinstance(child, nn.Linear):
            setattr(model, name, nn.Sequential(child, Transform(child.out_features).to(child.weight)))
        elif not isinstance(child, Transform):
            insert_transforms(child)
    return model


def _layer_parameter_names(model: nn.Module) -> list[str]:
    """Names of the weights and biases of the model's convolutions and linear layers (what MT-net adapts)."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))
            for name, _ in module.named_parameters(recurse=False)]


class MaskedSGD(UpdateRule):
    """``θ ← θ - α · M ⊙ ∇L`` with a binary mask ``M`` drawn per task from learned logits (MT-net's update).

    Args:
        params: the adapted parameters by name (weights ``<layer>.weight`` and biases ``<layer>.bias``).
        lr: the inner step size α (fixed, shared by all layers as in the paper).
        mask: ``"unit"``: one logit per output unit of a layer, shared by its weights and bias,
            initialised to 0; ``"weight"``: one logit per entry, initialised from N(0, 0.01²).
    """

    def __init__(self, params: Params, lr: float, mask: str = "unit") -> None:
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
        self.lr = check_lr(lr)
        self.mask = mask
        self.keys = {name: self._key(name) for name in params}
        logits = {}
        for name, p in params.items():
            key = self.keys[name]
            if mask == "unit":
                logits.setdefault(key, torch.zeros(p.shape[0], dtype=p.dtype, device=p.device))
            else:
                logits[key] = 0.01 * torch.randn(p.shape, dtype=p.dtype, device=p.device)
        self.logits = nn.ParameterDict({k: nn.Parameter(v) for k, v in logits.items()})

    def _key(self, name: str) -> str:
        owner = name.rsplit(".", 1)[0] if self.mask == "unit" else name
        return owner.replace(".", "-")

    def init(self, params: Params) -> Params:
        """Draw this task's masks: hard 0/1 samples with straight-through gradients to the logits.

        One sample per logit, so with ``mask="unit"`` a unit's weights and bias share it.
        """
        samples = {}
        for key in dict.fromkeys(self.keys[name] for name in params):
            logit = self.logits[key]
            u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            soft = torch.sigmoid(logit + torch.log(u) - torch.log1p(-u))  # 2-way Gumbel-softmax, temperature 1
            hard = (soft > 0.5).to(soft.dtype)
            samples[key] = hard + soft - soft.detach()
        masks = {}
        for name, p in params.items():
            sample = samples[self.keys[name]]
            masks[name] = sample.reshape(sample.shape + (1,) * (p.dim() - sample.dim()))
        return masks

    def step(self, params: Params, grads: Params, state: Any, info: StepInfo) -> tuple[Params, Any]:
        del info
        return {name: p - self.lr * state[name] * grads[name] for name, p in params.items()}, state

    def logged(self) -> dict[str, float]:
        return {"lr/inner": self.lr}

    def extra_repr(self) -> str:
        return f"lr={self.lr:g}, mask={self.mask!r}"


class MTNet(MetaLearner):
    """MT-net (Lee & Choi 2018): T after every layer plus per-task masks; T-net with ``mask=None``.

    Args:
        model: the network; every ``Conv2d`` and ``Linear`` is followed by a :class:`Transform`
            (in place).
        inner_lr: the inner step size α.
        inner_steps: inner steps during meta-training.
        mask: ``"unit"`` (MT-net), ``"weight"`` (a logit per weight entry) or ``None`` (T-net).
        **kwargs: engine options of :class:`metaopt.meta_learner.MetaLearner` (``eval_inner_steps``,
            ``strategy``, ``bn_policy``...). The ``higher`` driver applies to T-net only.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.4, inner_steps: int = 1, mask: str | None = "unit",
                 **kwargs: Any) -> None:
        insert_transforms(check_model(model))
        adapted = _layer_parameter_names(model)
        rule = sgd(inner_lr) if mask is None else MaskedSGD(select(named_params(model), adapted), inner_lr, mask)
        super().__init__(model, rule, inner_steps=inner_steps, adapt=adapted, **kwargs)


@dataclass(frozen=True)
class TNetOptions(InnerLoopOptions, SecondOrderOptions):
    """T-net's options (Lee & Choi 2018): MAML's inner loop on the layers' weights, T learned outside.

    Args:
        inner_lr: the inner step size α.
    """

    positive = ("inner_lr", *InnerLoopOptions.positive)
    inner_lr: float = 0.4


@dataclass(frozen=True)
class MTNetOptions(TNetOptions):
    """MT-net's options (Lee & Choi 2018).

    Args:
        mask: the mask logits: "unit" (one per output unit, the paper's) or "weight" (one per weight entry).
    """

    mask: Literal["unit", "weight"] = "unit"


@register_algorithm("mtnet", MTNetOptions)
def build_mtnet(options: MTNetOptions, context: BuildContext) -> MTNet:
    """MT-net (Lee & Choi 2018): a learned transformation T after every layer and per-task masks."""
    return MTNet(context.model, **options.to_dict())


@register_algorithm("tnet", TNetOptions)
def build_tnet(options: TNetOptions, context: BuildContext) -> MTNet:
    """T-net (Lee & Choi 2018): MT-net's transformations T without the masks."""
    return MTNet(context.model, mask=None, **options.to_dict())
