"""metaopt's second-order MAML meta-gradient equals a hand-written ``torch.autograd.grad`` MAML in float64.

Learning rates follow the parameters' dtype, so a float64 model adapts with exactly 0.3 (a float32
rate would be 0.30000001192, and the meta-gradients would differ by ~4e-8 relative). The whole
meta-gradient vector must agree to 1e-12 relative, with and without batch norm, for both task
strategies and for a learned inner rate.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.algorithms import MAML
from tests.helpers import tiny_convnet, toy_classification_batch

LR, STEPS = 0.3, 2


def _without_batchnorm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def hand_written_maml(model: nn.Module, batch, lr: torch.Tensor | float) -> torch.Tensor:
    """MAML as written from Finn et al. 2017, Algorithm 2: the flat meta-gradient (and lr's, if it is a tensor)."""
    params = dict(model.named_parameters())
    losses = []
    for sx, sy, qx, qy in zip(*batch.tensors()):
        fast = params
        for _ in range(STEPS):
            inner = F.cross_entropy(torch.func.functional_call(model, fast, (sx,)), sy)
            grads = torch.autograd.grad(inner, list(fast.values()), create_graph=True)
            fast = {name: p - lr * g for (name, p), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(torch.func.functional_call(model, fast, (qx,)), qy))
    wrt = list(params.values()) + ([lr] if isinstance(lr, torch.Tensor) else [])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(torch.stack(losses).mean(), wrt)])


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("network", ["batch-norm", "no-batch-norm"])
def test_second_order_meta_gradient_equals_the_hand_written_one(network, strategy):
    model = tiny_convnet() if network == "batch-norm" else _without_batchnorm()
    batch = toy_classification_batch()
    maml = MAML(model, inner_lr=LR, inner_steps=STEPS, strategy=strategy)
    loss, _ = maml.meta_loss(batch)
    ours = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    theirs = hand_written_maml(model, batch, LR)
    assert relative_error(ours, theirs) < 1e-12


def test_a_learned_inner_rate_is_created_in_the_models_dtype():
    model = tiny_convnet()
    batch = toy_classification_batch()
    maml = MAML(model, inner_lr=LR, inner_steps=STEPS, learn_inner_lr=True)
    assert maml.rule.lr.dtype == torch.float64 and maml.rule.lr.item() == LR
    loss, _ = maml.meta_loss(batch)
    ours = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, [*model.parameters(), maml.rule.lr])])
    theirs = hand_written_maml(model, batch, torch.tensor(LR, dtype=torch.float64, requires_grad=True))
    assert relative_error(ours, theirs) < 1e-12
