"""Batch-norm policies: which statistics normalise, nothing mutated, everything restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.batchnorm import BatchNormPolicy, batchnorm_policy, composite_batch_norm


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
    with pytest.raises(ValueError, match="'running'"), batchnorm_policy(nn.BatchNorm1d(2), "running"):
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
