"""Batch-norm policies: which statistics normalise, nothing mutated, everything restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.batchnorm import (
    POLICIES,
    BatchStatistics,
    FrozenStatistics,
    RunningStatistics,
    SupportStatistics,
    batchnorm_policy,
    restored_statistics,
)
from metaopt.engine.step_context import inner_step, outer_pass
from tests.engine.common import STEPS, bn_with_stats, images, inputs, per_step_bn, stats


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_batch_policy_uses_batch_statistics_and_touches_no_running_stats(training: bool) -> None:
    for meta_training in (False, True):  # the batch policy does not depend on it
        bn = bn_with_stats().train(training)
        before, mean = stats(bn), bn.running_mean
        x = inputs()
        with batchnorm_policy("batch").meta_batch(bn, training=meta_training):
            out = bn(x)
        expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
        torch.testing.assert_close(out, expected)
        for k, v in bn.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        assert bn.running_mean is mean and bn.training is training


def test_frozen_policy_normalises_with_running_statistics() -> None:
    for meta_training in (False, True):  # the frozen policy does not depend on it
        bn = bn_with_stats().train()
        before = stats(bn)
        x = inputs()
        with FrozenStatistics().meta_batch(bn, training=meta_training):
            assert not bn.training
            out = bn(x)
        torch.testing.assert_close(out, (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))
        for k, v in bn.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        assert bn.training


def test_policies_apply_to_nested_layers_only() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.BatchNorm1d(3)), nn.Dropout(0.5)).train()
    with batchnorm_policy("frozen").meta_batch(model, training=False):
        assert not model[1][0].training and model[2].training


def test_everything_is_restored_after_an_exception() -> None:
    bn = bn_with_stats().train()
    saved = {name: getattr(bn, name) for name in ("running_mean", "running_var", "num_batches_tracked")}
    for name in POLICIES:
        for training in (False, True):
            with pytest.raises(RuntimeError, match="boom"), batchnorm_policy(name).meta_batch(bn, training=training):
                raise RuntimeError("boom")
            assert bn.training
            assert all(getattr(bn, name) is value for name, value in saved.items())


def test_frozen_without_running_statistics_is_an_error() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)).train()
    match = "needs running statistics.*track_running_stats=False"
    with pytest.raises(ValueError, match=match), batchnorm_policy("frozen").meta_batch(model, training=False):
        pass
    assert model[0].training and model[0].running_mean is not None  # the first layer was restored too


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="'transductive'"):
        batchnorm_policy("transductive")


def test_policies_by_name() -> None:
    assert tuple(POLICIES) == ("batch", "frozen", "running", "support")
    for cls in (BatchStatistics, FrozenStatistics, RunningStatistics, SupportStatistics):
        policy = batchnorm_policy(cls.name)
        assert type(policy) is cls and policy == cls() and hash(policy) == hash(cls())
        assert batchnorm_policy(policy) is policy  # a policy is taken as it is
        assert repr(policy) == f"batchnorm_policy({cls.name!r})"
    assert batchnorm_policy("batch") != batchnorm_policy("frozen")
    # statistics the tasks of a meta-batch share force them to run one after another
    assert [name for name, cls in POLICIES.items() if cls.shares_statistics] == ["running", "support"]


def test_restored_statistics_puts_back_modes_and_statistics() -> None:
    model = nn.Sequential(bn_with_stats(), nn.Linear(3, 3)).train()
    bn = model[0]
    saved = {name: getattr(bn, name) for name in ("running_mean", "running_var", "num_batches_tracked")}
    with restored_statistics(model):
        bn.eval()
        bn.running_mean, bn.running_var, bn.num_batches_tracked = None, None, None
        model[1].eval()  # not a batch-norm layer: left as it is
    assert bn.training and all(getattr(bn, name) is value for name, value in saved.items())
    assert not model[1].training


def test_running_policy_with_update_normalises_with_the_batch_and_accumulates() -> None:
    bn = bn_with_stats().eval()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    x = inputs()
    with batchnorm_policy("running").meta_batch(bn, training=True):
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
    with RunningStatistics().meta_batch(bn, training=False):
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
    with batchnorm_policy("running").meta_batch(bn, training=True), inner_step(1):
        bn(x)
    assert not bn.training
    assert not torch.equal(bn.running_mean[1], before["running_mean"][1])
    torch.testing.assert_close(bn.running_mean[[0, 2]], before["running_mean"][[0, 2]], rtol=0, atol=0)
    with batchnorm_policy("batch").meta_batch(bn, training=False), inner_step(2):  # batch statistics, no row touched
        out = bn(x)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, bn.weight[2], bn.bias[2], training=True, eps=bn.eps))
    assert int(bn.num_batches_tracked) == 1


def test_running_policy_without_running_statistics_is_an_error() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    for training in (False, True):
        with pytest.raises(ValueError, match="'running' needs running statistics"), \
                batchnorm_policy("running").meta_batch(model, training=training):
            pass
        assert not model[0].training and model[0].running_mean is not None


# --- the "support" policy (Ravi & Larochelle): per-task statistics of the support set ----------------------------

def test_support_policy_normalises_outer_passes_with_what_the_support_passes_accumulated() -> None:
    bn = bn_with_stats().eval()
    before = stats(bn)
    policy = batchnorm_policy("support")
    support, query = inputs(), inputs(5) * 2 - 1
    with policy.meta_batch(bn, training=True), policy.task(bn):
        torch.testing.assert_close(bn.running_mean, torch.zeros(3, dtype=torch.float64))  # fresh statistics
        torch.testing.assert_close(bn.running_var, torch.ones(3, dtype=torch.float64))
        out = bn(support)  # a support pass: batch statistics, accumulated into the fresh ones
        torch.testing.assert_close(out, (support - support.mean(0)) / torch.sqrt(support.var(0, unbiased=False)
                                                                                  + bn.eps))
        mean, var = 0.1 * support.mean(0), 0.9 + 0.1 * support.var(0, unbiased=True)
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        accumulated = stats(bn)
        with outer_pass():  # an outer pass: the support statistics, nothing accumulated
            scored = bn(query)
        torch.testing.assert_close(scored, (query - mean) / torch.sqrt(var + bn.eps))
        for k, v in bn.state_dict().items():
            torch.testing.assert_close(v, accumulated[k], rtol=0, atol=0)
        assert int(bn.num_batches_tracked) == 1
        params, predictor = policy.predictor(bn, {"weight": bn.weight})
        assert isinstance(predictor, FrozenStatistics) and params["weight"] is bn.weight
        torch.testing.assert_close(params["running_mean"], accumulated["running_mean"], rtol=0, atol=0)
        assert params["running_mean"] is not bn.running_mean  # a copy, kept after the task
    assert not bn.training and not bn._forward_pre_hooks  # modes restored, hooks removed
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_support_policy_gives_per_step_layers_per_step_statistics() -> None:
    bn = per_step_bn()
    with SupportStatistics().task(bn):
        assert bn.running_mean.shape == bn.running_var.shape == (STEPS, 3)
        with inner_step(1):
            bn(images())
        assert bn.running_mean[1].ne(0).all() and bn.running_mean[[0, 2]].eq(0).all()


def test_policies_without_a_task_context_or_predictor_of_their_own() -> None:
    bn = bn_with_stats()
    params = {"weight": bn.weight}
    for name in ("batch", "frozen", "running"):
        policy = batchnorm_policy(name)
        with policy.task(bn):
            assert bn.running_mean.shape == (3,) and not bn._forward_pre_hooks
        assert policy.predictor(bn, params) == (params, policy)
