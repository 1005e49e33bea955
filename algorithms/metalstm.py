"""The Ravi & Larochelle meta-learner: an LSTM whose cell state is the learner's parameters.

    f_t = W_F · [h_t, c_{t-1}, f_{t-1}] + b_F        i_t = W_I · [h_t, c_{t-1}, i_{t-1}] + b_I
    c_t = σ(f_t) ⊙ c_{t-1} - σ(i_t) ⊙ ∇_t            (c_t = θ_t, c_0 = θ_0 meta-learned)

Coordinate-wise and shared by every parameter: layer 1 is a standard LSTM (20 units) over the
preprocessed loss and gradient (4 features, p = 10), layer 2 the cell above, whose input and
forget gates also see their previous values. Gradients enter as constants (no second order).
Initialisation as the paper and code: weights U(-0.01, 0.01), forget-gate bias U(4, 5) and
input-gate bias U(-5, -4), so that training starts near gradient descent with a small step.

Batch norm follows the paper (§3.3): statistics reset per task, batch statistics during the
updates, and the query evaluated with the statistics the support set accumulated: the
``"support"`` batch-norm policy of :mod:`metaopt.engine.batchnorm` (the learner's layers use eps 1e-3 and
momentum 0.9 in the paper's 1-shot setting, 0.95 in 5-shot; ``bn_momentum`` / ``bn_eps``).

Where this departs from the paper or code: the paper writes the gate inputs as (∇, L, θ, previous
gate) and the code feeds layer 1's hidden state in place of (∇, L), as we do; the previous gate
values start at 0.

References:
    Ravi, Larochelle, 2017. Optimization as a Model for Few-Shot Learning. ICLR.
    https://openreview.net/forum?id=rJY0-Kcll (§3.1-3.4; checked against
    twitter-research/meta-learning-lstm ``meta-learner-lstm.lua``, ``lstm-helper.lua``).

Results (paper vs ours; commands and protocol in the README):

    ==================  ==============  ==========================================
    benchmark           paper           metaopt
    ==================  ==============  ==========================================
    miniImageNet 5w1s   43.44 ± 0.77    no images here (presets only)
    miniImageNet 5w5s   60.60 ± 0.71    no images here (presets only)
    Omniglot 5w1s       not reported    63.08 ± 1.07 at 10 CPU minutes (MAML: 89.34)
    ==================  ==============  ==========================================

Example:
    >>> import torch
    >>> from metaopt import Episode
    >>> from metaopt.models import Conv4
    >>> learner = MetaLSTM(Conv4(1, 5, hidden=8), inner_steps=3)
    >>> x, y = torch.randn(10, 1, 28, 28), torch.arange(5).repeat(2)
    >>> loss, _ = learner.meta_loss(Episode.stack([Episode(x[:5], y[:5], x[5:], y[5:])] * 2))
    >>> loss.backward()
    >>> learner.rule.forget_bias.grad is not None, learner.bn_policy.name
    (True, 'support')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metaopt.engine.coordinatewise import CoordinateLSTM, LSTMState, flatten, preprocess, unflatten
from metaopt.engine.functional import Params
from metaopt.engine.learner_options import AdaptOptions, InnerLoopOptions
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.rules import StepInfo, UpdateRule
from metaopt.registry import BuildContext, register_algorithm

__all__ = ["MetaLSTM", "MetaLSTMOptions", "MetaLSTMRule", "build_metalstm"]

#: The rule's state: layer 1's LSTM state and the previous forget and input gate pre-activations.
MetaLSTMState = tuple[LSTMState, torch.Tensor, torch.Tensor]


class MetaLSTMRule(UpdateRule):
    """The meta-learner LSTM of Ravi & Larochelle (2017, §3.1-3.2) as an update rule (reads the loss).

    Args:
        hidden: units of the first, standard LSTM layer (20).
        p: preprocessing constant (10).
    """

    def __init__(self, hidden: int = 20, p: float = 10.0) -> None:
        super().__init__()
        self.p = p
        self.lstm = CoordinateLSTM(4, hidden=hidden, layers=1)
        self.forget_weight = nn.Parameter(torch.empty(hidden + 2))
        self.input_weight = nn.Parameter(torch.empty(hidden + 2))
        self.forget_bias = nn.Parameter(torch.empty(()))
        self.input_bias = nn.Parameter(torch.empty(()))
        with torch.no_grad():
            for weight in self.lstm.parameters():
                weight.uniform_(-0.01, 0.01)
            self.forget_weight.uniform_(-0.01, 0.01)
            self.input_weight.uniform_(-0.01, 0.01)
            self.forget_bias.uniform_(4.0, 5.0)
            self.input_bias.uniform_(-5.0, -4.0)

    def init(self, params: Params) -> MetaLSTMState:
        theta = flatten(params)
        zeros = torch.zeros_like(theta)
        return self.lstm.init_state(theta.numel(), theta.dtype, theta.device), zeros, zeros

    def step(self, params: Params, grads: Params, state: MetaLSTMState,
             info: StepInfo) -> tuple[Params, MetaLSTMState]:
        if info.loss is None:
            raise ValueError("MetaLSTMRule reads the inner loss; pass it as StepInfo(t, loss)")
        loss = info.loss
        lstm_state, forget, input_gate = state
        theta = flatten(params)
        gradient = flatten(grads).detach()  # gradients as constants (§3.2)
        loss_features = preprocess(loss.detach(), self.p).expand(gradient.numel(), 2)  # one loss, every coordinate
        features = torch.cat([loss_features, preprocess(gradient, self.p)], 1)
        h, lstm_state = self.lstm(features, lstm_state)
        forget = self._gate(self.forget_weight, self.forget_bias, h, theta, forget)
        input_gate = self._gate(self.input_weight, self.input_bias, h, theta, input_gate)
        theta = torch.sigmoid(forget) * theta - torch.sigmoid(input_gate) * gradient
        return unflatten(theta, params), (lstm_state, forget, input_gate)

    @staticmethod
    def _gate(weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor, theta: torch.Tensor,
              previous: torch.Tensor) -> torch.Tensor:
        """``W · [h, θ, previous gate] + b`` per coordinate, without materialising the concatenation."""
        hidden = h.shape[1]
        return torch.addmv(bias + weight[hidden] * theta + weight[hidden + 1] * previous, h, weight[:hidden])


class MetaLSTM(MetaLearner):
    """Ravi & Larochelle's few-shot learner: learned initial cell state θ_0 and LSTM update rule.

    Args:
        model: the learner network (the paper: Conv4, 32 filters, 84×84); its batch-norm layers
            get ``bn_eps`` and ``bn_momentum`` (in place).
        inner_steps: updates on the support set (paper: 12 for 1-shot, 8 for 5-shot), each on
            the whole support set.
        lstm_units: units of the first LSTM layer.
        bn_eps, bn_momentum: the learner's batch-norm settings (paper: 1e-3 and 0.9 / 0.95).
        bn_policy: the batch-norm policy (the paper's: ``"support"``).
        **kwargs: engine options of :class:`metaopt.engine.meta_learner.MetaLearner` (``eval_inner_steps``,
            ``adapt``...). The meta-gradient is first-order (the paper's gradients enter as constants).
    """

    def __init__(self, model: nn.Module, inner_steps: int = 12, lstm_units: int = 20, bn_eps: float = 1e-3,
                 bn_momentum: float = 0.9, bn_policy: str = "support", **kwargs: Any) -> None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eps, module.momentum = bn_eps, bn_momentum
        super().__init__(model, MetaLSTMRule(lstm_units), inner_steps=inner_steps, first_order=True,
                         bn_policy=bn_policy, **kwargs)


@dataclass(frozen=True)
class MetaLSTMOptions(InnerLoopOptions, AdaptOptions):
    """The meta-learner LSTM's options (Ravi & Larochelle 2017).

    Args:
        inner_steps: updates on the support set (the paper: 12 for 1-shot, 8 for 5-shot).
        bn_policy: batch-norm policy (the paper's: "support", per-task statistics).
        lstm_units: units of the first, standard LSTM layer.
        bn_momentum: the learner's batch-norm momentum (0.9 for 1-shot, 0.95 for 5-shot).
        bn_eps: the learner's batch-norm epsilon.
    """

    positive = ("lstm_units", "bn_eps", *InnerLoopOptions.positive)
    inner_steps: int = 12
    bn_policy: str = "support"
    lstm_units: int = 20
    bn_momentum: float = 0.9
    bn_eps: float = 1e-3


@register_algorithm("metalstm", MetaLSTMOptions)
def build_metalstm(options: MetaLSTMOptions, context: BuildContext) -> MetaLSTM:
    """Ravi & Larochelle's meta-learner LSTM (2017): an LSTM whose cell state is the learner's parameters."""
    return MetaLSTM(context.model, **options.to_dict())
