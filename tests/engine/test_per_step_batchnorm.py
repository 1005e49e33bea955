"""MAML++'s per-step batch norm: one row of statistics and affine weights per inner step, the original function."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.per_step_batchnorm import PerStepBatchNorm, per_step_batchnorm
from metaopt.engine.step_context import inner_step
from tests.engine.common import STEPS, images, per_step_bn, stats


@pytest.mark.parametrize(("t", "row"), [(0, 0), (1, 1), (2, 2), (3, 2), (7, 2)])
def test_training_updates_only_the_running_statistics_of_the_current_step(t: int, row: int) -> None:
    bn = per_step_bn().train()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    x = images()
    with inner_step(t):
        out = bn(x)
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = x.var(dim=(0, 2, 3), unbiased=True)  # torch accumulates the unbiased variance
    expected_mean, expected_var = mean.clone(), var.clone()
    expected_mean[row] = (1 - bn.momentum) * mean[row] + bn.momentum * batch_mean
    expected_var[row] = (1 - bn.momentum) * var[row] + bn.momentum * batch_var
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    others = [r for r in range(STEPS) if r != row]
    torch.testing.assert_close(bn.running_mean[others], mean[others], rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var[others], var[others], rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 1
    # normalised with the batch statistics and row `row`'s affine weights
    batch_var_biased = x.var(dim=(0, 2, 3), unbiased=False)
    normalised = (x - batch_mean.view(1, -1, 1, 1)) / torch.sqrt(batch_var_biased.view(1, -1, 1, 1) + bn.eps)
    weight, bias = bn.weight[row].detach().view(1, -1, 1, 1), bn.bias[row].detach().view(1, -1, 1, 1)
    torch.testing.assert_close(out, normalised * weight + bias)


@pytest.mark.parametrize(("t", "row"), [(0, 0), (1, 1), (3, 2)])
def test_gradients_reach_only_the_affine_row_of_the_current_step(t: int, row: int) -> None:
    bn = per_step_bn().train()
    with inner_step(t):
        loss = bn(images()).pow(2).sum()
    weight_grad, bias_grad = torch.autograd.grad(loss, (bn.weight, bn.bias))
    for grad in (weight_grad, bias_grad):
        assert grad[row].abs().sum() > 0
        assert torch.equal(grad[[r for r in range(STEPS) if r != row]], torch.zeros(STEPS - 1, 3, dtype=torch.float64))


@pytest.mark.parametrize(("t", "row"), [(0, 0), (1, 1), (2, 2), (3, 2), (10, 2)])
def test_eval_normalises_with_the_statistics_and_weights_of_the_current_step(t: int, row: int) -> None:
    bn = per_step_bn().eval()
    before = stats(bn)
    x = images()
    with inner_step(t):
        out = bn(x)
    expected = F.batch_norm(x, before["running_mean"][row], before["running_var"][row], before["weight"][row],
                            before["bias"][row], training=False, eps=bn.eps)
    torch.testing.assert_close(out, expected)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    # and by hand, so that the oracle does not only restate the implementation's call
    shape = (1, -1, 1, 1)
    mean, var = before["running_mean"][row].view(shape), before["running_var"][row].view(shape)
    by_hand = (x - mean) / torch.sqrt(var + bn.eps)
    torch.testing.assert_close(out, by_hand * before["weight"][row].view(shape) + before["bias"][row].view(shape))


def test_eval_beyond_the_trained_steps_reuses_the_last_row() -> None:
    bn = per_step_bn().eval()
    x = images()
    with inner_step(STEPS - 1):
        last = bn(x)
    for t in (STEPS, STEPS + 5):
        with inner_step(t):
            torch.testing.assert_close(bn(x), last, rtol=0, atol=0)
    with inner_step(0):
        assert not torch.allclose(bn(x), last)  # the rows really differ


def conv_bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(4)
    return model


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
@pytest.mark.parametrize(("per_step_stats", "per_step_affine"), [(True, True), (False, True), (True, False)])
def test_per_step_batchnorm_computes_the_original_function(training: bool, per_step_stats: bool,
                                                          per_step_affine: bool) -> None:
    model = conv_bn_model().train(training)
    original = copy.deepcopy(model)
    assert per_step_batchnorm(model, STEPS, per_step_stats, per_step_affine) is model
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [type(m) for m in layers] == [PerStepBatchNorm, PerStepBatchNorm]
    for bn, channels in zip(layers, (3, 4)):
        assert bn.training is training and bn.steps == STEPS
        assert bn.running_mean.shape == ((STEPS, channels) if per_step_stats else (channels,))
        assert bn.running_var.shape == bn.running_mean.shape
        assert bn.weight.shape == ((STEPS, channels) if per_step_affine else (channels,))
        assert bn.bias.shape == bn.weight.shape
        assert bn.weight.dtype == bn.running_mean.dtype == torch.float64
        assert int(bn.num_batches_tracked) == 4
    x = images(channels=2)
    for t in range(STEPS + 2):
        model, reference = per_step_batchnorm(copy.deepcopy(original), STEPS, per_step_stats, per_step_affine), \
            copy.deepcopy(original)
        with inner_step(t):
            torch.testing.assert_close(model(x), reference(x))
        if training:  # the current row (or the shared statistics) was updated exactly as the original layer's
            row = min(t, STEPS - 1)
            for bn, ref, old in zip([m for m in model.modules() if isinstance(m, PerStepBatchNorm)],
                                    [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)],
                                    [m for m in original.modules() if isinstance(m, nn.BatchNorm2d)]):
                assert not torch.allclose(ref.running_mean, old.running_mean)
                mean, var = (bn.running_mean[row], bn.running_var[row]) if per_step_stats else \
                    (bn.running_mean, bn.running_var)
                torch.testing.assert_close(mean, ref.running_mean)
                torch.testing.assert_close(var, ref.running_var)
                assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 5


def test_per_step_batchnorm_of_a_layer_without_affine_or_statistics() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, affine=False, track_running_stats=False)).double()
    original = copy.deepcopy(model)
    per_step_batchnorm(model, STEPS)
    bn = model[0]
    assert isinstance(bn, PerStepBatchNorm) and bn.weight is None and bn.running_mean is None
    assert not bn.per_step_stats and not bn.per_step_affine
    x = images()
    for training in (True, False):
        model.train(training), original.train(training)
        with inner_step(1):
            torch.testing.assert_close(model(x), original(x))


def test_per_step_batchnorm_argument_errors() -> None:
    with pytest.raises(ValueError, match="momentum"):
        PerStepBatchNorm(3, steps=2, momentum=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps >= 1"):
        PerStepBatchNorm(3, steps=0)
    with pytest.raises(ValueError, match="momentum"):
        per_step_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=None)), steps=2)
    with pytest.raises(ValueError, match=r"\[batch, channels, \.\.\.\]"):
        PerStepBatchNorm(3, steps=2)(torch.randn(3))


def test_outside_the_inner_loop_a_pass_uses_the_first_row() -> None:
    bn = per_step_bn().eval()
    x = images()
    with inner_step(0):
        first = bn(x)
    torch.testing.assert_close(bn(x), first, rtol=0, atol=0)
    assert repr(bn).endswith(f"steps={STEPS}, per_step_stats=True, per_step_affine=True)")
