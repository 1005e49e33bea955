"""Recomputed inner steps: same results and meta-gradients, recomputed once more, the model seen as in the forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.batchnorm import batchnorm_policy
from metaopt.engine.functional import named_params
from metaopt.engine.inner import InnerLoop
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.recompute import recomputed
from metaopt.engine.rules import sgd
from tests.engine.common import bn_with_stats, inputs, run_tasks
from tests.helpers import assert_close_dicts, tiny_convnet, tiny_mlp, toy_classification_batch


class CountingLoss:
    """Cross-entropy that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.cross_entropy(prediction, target)


@pytest.mark.parametrize("bn_policy", ["batch", "frozen"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_checkpointed_steps_are_recomputed_with_the_same_results(first_order: bool, bn_policy: str) -> None:
    """Each second-order step is recomputed in the meta-backward, after the batch-norm policy has been exited.

    The recomputation must see the model as the forward pass did (batch statistics, or running
    statistics in eval mode, although the model is in training mode with running statistics),
    repeat it exactly and leave the model's buffers alone.
    """
    model, batch, steps, weights = tiny_convnet(), toy_classification_batch(), 3, [0.2, 0.3, 0.5]
    rule = sgd(0.3, learnable=True).double()
    params = named_params(model)
    with batchnorm_policy(bn_policy).meta_batch(model, training=False):
        stored = run_tasks(InnerLoop(rule, first_order=first_order), model, F.cross_entropy, batch, params, steps,
                           weights, track=True)
    expected = dict(zip([*params, "rule.lr"], torch.autograd.grad(stored.losses.mean(), [*params.values(), rule.lr])))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    loss = CountingLoss()
    loop = InnerLoop(rule, first_order=first_order, checkpoint_steps=True, model=model)
    with batchnorm_policy(bn_policy).meta_batch(model, training=False):
        out = run_tasks(loop, model, loss, batch, params, steps, weights, track=True)
    calls = loss.calls
    gradients = torch.autograd.grad(out.losses.mean(), [*params.values(), rule.lr])
    assert loss.calls - calls == (0 if first_order else len(batch) * steps)  # every inner loss, once more
    torch.testing.assert_close(out.losses, stored.losses)
    torch.testing.assert_close(out.step_losses, stored.step_losses)
    assert_close_dicts(dict(zip([*params, "rule.lr"], gradients)), expected)
    assert_close_dicts(model.state_dict(), buffers, rtol=0, atol=0)
    with torch.no_grad(), batchnorm_policy(bn_policy).meta_batch(model, training=False):  # nothing to recompute
        out = run_tasks(loop, model, loss, batch, params, steps, weights)
    torch.testing.assert_close(out.losses, stored.losses.detach())


def test_checkpointed_steps_need_the_model_and_the_loop_strategy() -> None:
    with pytest.raises(ValueError, match="checkpoint_steps needs the model"):
        InnerLoop(sgd(0.1), checkpoint_steps=True)
    with pytest.raises(ValueError, match="strategy='vmap' is not available: checkpoint_steps relies on saved-tensor "
                                         "hooks"):
        MetaLearner(tiny_mlp(), sgd(0.1), checkpoint_steps=True, strategy="vmap")
    assert MetaLearner(tiny_mlp(), sgd(0.1), checkpoint_steps=True).inner.checkpoint_steps  # "auto" is the loop


def test_recomputed_step_gives_the_same_gradients_and_runs_again_in_the_backward() -> None:
    model = nn.Linear(3, 2).double()
    x = inputs(5).requires_grad_()
    calls = []

    def step(x: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return torch.tanh(model(x)).pow(2).sum()

    expected = torch.autograd.grad(step(x), [x, *model.parameters()])
    calls.clear()
    out = recomputed(model, step, x)
    assert len(calls) == 1
    torch.testing.assert_close(out, step(x).detach())
    calls.clear()
    for a, b in zip(torch.autograd.grad(out, [x, *model.parameters()]), expected):
        torch.testing.assert_close(a, b)
    assert calls == [True]  # recomputed once, in the backward pass


def test_the_recomputation_sees_the_model_as_the_forward_pass_did() -> None:
    bn = bn_with_stats().eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    seen = []

    def step(x: torch.Tensor) -> torch.Tensor:
        seen.append((bn.training, bn.running_mean))
        return bn(x).pow(3).sum()

    x = inputs().requires_grad_()
    (expected,) = torch.autograd.grad(step(x), x)
    seen.clear()
    out = recomputed(bn, step, x)
    mean = bn.running_mean
    bn.train()  # changed between the forward and the meta-backward, as a batch-norm policy's exit does
    bn.running_mean = None
    (gradient,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(gradient, expected)
    assert [(training, stat is mean) for training, stat in seen] == [(False, True)] * 2  # both times as forward
    assert bn.training and bn.running_mean is None  # and put back as it was before the backward
    bn.running_mean = mean
    assert_close_dicts(bn.state_dict(), before, rtol=0, atol=0)
