"""Batch-norm policies: which statistics normalise, nothing mutated, everything restored."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.batchnorm import (
    BatchNormPolicy,
    PerStepBatchNorm,
    batchnorm_policy,
    composite_batch_norm,
    current_inner_step,
    inner_step,
    per_step_batchnorm,
)


def bn_with_stats() -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(3).double()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    bn.num_batches_tracked.fill_(7)
    return bn


def inputs(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1


def stats(bn: nn.BatchNorm1d) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bn.state_dict().items()}


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_batch_policy_uses_batch_statistics_and_touches_no_running_stats(training: bool) -> None:
    bn = bn_with_stats().train(training)
    before, mean = stats(bn), bn.running_mean
    x = inputs()
    with batchnorm_policy(bn, "batch"):
        out = bn(x)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(out, expected)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert bn.running_mean is mean and bn.training is training


def test_frozen_policy_normalises_with_running_statistics() -> None:
    bn = bn_with_stats().train()
    before = stats(bn)
    x = inputs()
    with batchnorm_policy(bn, BatchNormPolicy.FROZEN):
        assert not bn.training
        out = bn(x)
    torch.testing.assert_close(out, (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert bn.training


def test_policies_apply_to_nested_layers_only() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.BatchNorm1d(3)), nn.Dropout(0.5)).train()
    with batchnorm_policy(model, "frozen"):
        assert not model[1][0].training and model[2].training


def test_everything_is_restored_after_an_exception() -> None:
    bn = bn_with_stats().train()
    saved = {name: getattr(bn, name) for name in ("running_mean", "running_var", "num_batches_tracked")}
    for policy in BatchNormPolicy:
        with pytest.raises(RuntimeError, match="boom"), batchnorm_policy(bn, policy):
            raise RuntimeError("boom")
        assert bn.training
        assert all(getattr(bn, name) is value for name, value in saved.items())


def test_frozen_without_running_statistics_is_an_error() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)).train()
    match = "needs running statistics.*track_running_stats=False"
    with pytest.raises(ValueError, match=match), batchnorm_policy(model, "frozen"):
        pass
    assert model[0].training and model[0].running_mean is not None  # the first layer was restored too


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="'transductive'"), batchnorm_policy(nn.BatchNorm1d(2), "transductive"):
        pass


def test_composite_batch_norm_equals_the_fused_kernel() -> None:
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([1.5, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    fused = F.batch_norm(x, None, None, weight, bias, training=True)
    with composite_batch_norm():
        composite = F.batch_norm(x, None, None, weight, bias, training=True)
    torch.testing.assert_close(composite, fused)
    for a, b in zip(torch.autograd.grad(fused.pow(3).sum(), (x, weight, bias)),
                    torch.autograd.grad(composite.pow(3).sum(), (x, weight, bias))):
        torch.testing.assert_close(a, b)


def test_composite_batch_norm_passes_running_statistics_through() -> None:
    bn = bn_with_stats().eval()
    x = inputs()
    with composite_batch_norm():
        out = bn(x)
    torch.testing.assert_close(out, (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))


# --- per-step batch norm (MAML++ BNRS / BNWB) and the "running" policy ---------------------------------------------

STEPS = 3


def per_step_bn(steps: int = STEPS, channels: int = 3, **kwargs: bool) -> PerStepBatchNorm:
    """A float64 per-step batch norm whose rows of statistics and affine weights all differ."""
    bn = PerStepBatchNorm(channels, steps, **kwargs).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("running_mean", "weight", "bias"):
            tensor = getattr(bn, name)
            if tensor is not None:
                tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=torch.float64))
        if bn.running_var is not None:
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=torch.float64) * 2 + 0.5)
    return bn


def images(n: int = 6, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, 4, 4, generator=g, dtype=torch.float64) * 2 + 0.5


def test_inner_step_context_sets_and_restores_the_step() -> None:
    assert current_inner_step() == 0
    with inner_step(2):
        assert current_inner_step() == 2
        with inner_step(4):
            assert current_inner_step() == 4
        assert current_inner_step() == 2
    assert current_inner_step() == 0
    with pytest.raises(RuntimeError, match="boom"), inner_step(3):
        raise RuntimeError("boom")
    assert current_inner_step() == 0


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


def test_running_policy_with_update_normalises_with_the_batch_and_accumulates() -> None:
    bn = bn_with_stats().eval()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    x = inputs()
    with batchnorm_policy(bn, "running", update=True):
        assert bn.training
        out = bn(x)
    torch.testing.assert_close(out, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps))
    torch.testing.assert_close(bn.running_mean, 0.9 * mean + 0.1 * x.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 * var + 0.1 * x.var(0, unbiased=True))
    assert int(bn.num_batches_tracked) == 8
    assert not bn.training


def test_running_policy_without_update_normalises_with_the_running_statistics() -> None:
    bn = bn_with_stats().train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    before = stats(bn)
    x = inputs()
    with batchnorm_policy(bn, BatchNormPolicy.RUNNING):
        assert not bn.training
        out = bn(x)
    expected = F.batch_norm(x, before["running_mean"], before["running_var"], before["weight"], before["bias"],
                            training=False, eps=bn.eps)
    torch.testing.assert_close(out, expected)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert bn.training


def test_running_policy_on_per_step_batchnorm_updates_the_current_row() -> None:
    bn = per_step_bn().eval()
    before = stats(bn)
    x = images()
    with batchnorm_policy(bn, "running", update=True), inner_step(1):
        bn(x)
    assert not bn.training
    assert not torch.equal(bn.running_mean[1], before["running_mean"][1])
    torch.testing.assert_close(bn.running_mean[[0, 2]], before["running_mean"][[0, 2]], rtol=0, atol=0)
    with batchnorm_policy(bn, "batch"), inner_step(2):  # batch statistics, no row touched
        out = bn(x)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, bn.weight[2], bn.bias[2], training=True, eps=bn.eps))
    assert int(bn.num_batches_tracked) == 1


def test_running_policy_without_running_statistics_is_an_error() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    for update in (False, True):
        with pytest.raises(ValueError, match="'running' needs running statistics"), \
                batchnorm_policy(model, "running", update=update):
            pass
        assert not model[0].training and model[0].running_mean is not None


def test_per_step_batchnorm_argument_errors() -> None:
    with pytest.raises(ValueError, match="momentum"):
        PerStepBatchNorm(3, steps=2, momentum=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps >= 1"):
        PerStepBatchNorm(3, steps=0)
    with pytest.raises(ValueError, match="momentum"):
        per_step_batchnorm(nn.Sequential(nn.BatchNorm2d(3, momentum=None)), steps=2)
    with pytest.raises(ValueError, match=r"\[batch, channels, \.\.\.\]"):
        PerStepBatchNorm(3, steps=2)(torch.randn(3))
