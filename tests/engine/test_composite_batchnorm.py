"""Batch norm from elementary operations: the fused kernel's values and gradients, and the torch bug it works around."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import metaopt.engine.batching
from metaopt.engine.batchnorm import batchnorm_policy
from metaopt.engine.composite_batchnorm import composite_batch_norm
from metaopt.engine.functional import named_params
from metaopt.engine.inner import InnerLoop
from metaopt.engine.rules import sgd
from tests.engine.common import bn_with_stats, inputs, run_tasks
from tests.helpers import tiny_convnet, toy_classification_batch

WEIGHTS = [0.3, 0.7]


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


def test_composite_batch_norm_without_affine_weights_on_features() -> None:
    x = inputs().requires_grad_()
    fused = F.batch_norm(x, None, None, training=True, eps=1e-3)
    with composite_batch_norm():
        composite = F.batch_norm(x, None, None, training=True, eps=1e-3)
    torch.testing.assert_close(composite, fused)
    torch.testing.assert_close(*(torch.autograd.grad(out.pow(3).sum(), x)[0] for out in (composite, fused)))


def test_composite_batch_norm_passes_running_statistics_through() -> None:
    bn = bn_with_stats().eval()
    x = inputs()
    with composite_batch_norm():
        out = bn(x)
    torch.testing.assert_close(out, (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))


def test_vmap_needs_composite_batch_norm_for_second_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents the PyTorch bug behind ``metaopt.engine.composite_batchnorm.composite_batch_norm``.

    Through the fused batch-norm kernel, ``vmap`` gives wrong second-order gradients (torch
    2.14). If this test fails, PyTorch has fixed the bug: the workaround can be dropped.
    """
    model, loop, batch = tiny_convnet(), InnerLoop(sgd(0.3)), toy_classification_batch()
    params = named_params(model)

    def meta_gradients(strategy: str) -> dict[str, torch.Tensor]:
        with batchnorm_policy("batch").meta_batch(model, training=False):
            out = run_tasks(loop, model, F.cross_entropy, batch, params, weights=WEIGHTS, strategy=strategy,
                            track=True)
        return dict(zip(params, torch.autograd.grad(out.losses.mean(), list(params.values()))))

    expected = meta_gradients("loop")
    monkeypatch.setattr(metaopt.engine.batching, "composite_batch_norm", contextlib.nullcontext)
    fused = meta_gradients("vmap")
    gap = max((fused[k] - expected[k]).abs().max().item() for k in expected)
    assert gap > 1e-6, ("vmap's second-order gradients through fused batch norm now match the per-task loop: the "
                        "PyTorch bug is fixed and metaopt.engine.composite_batchnorm can be removed")
