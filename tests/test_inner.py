"""The unrolled inner loop: loop == vmap, meta-gradients against finite differences and first-order formulas."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metaopt.inner
from metaopt.batchnorm import batchnorm_policy
from metaopt.episode import Episode
from metaopt.functional import Params, model_call, named_params
from metaopt.inner import InnerLoop, TaskOutputs, resolve_strategy
from metaopt.rules import sgd
from tests.helpers import assert_close_dicts, tiny_convnet, tiny_mlp, toy_classification_batch, toy_regression_batch

WEIGHTS = [0.3, 0.7]


def run(loop: InnerLoop, batch: Episode, steps: int = 2, weights: list[float] | None = None,
        strategy: str = "loop", bn_policy: str = "batch") -> tuple[TaskOutputs, dict[str, torch.Tensor]]:
    """Task outputs and the gradient of the mean outer loss w.r.t. the model's and the rule's parameters."""
    params = named_params(loop.model)
    with batchnorm_policy(loop.model, bn_policy):
        out = loop.run_tasks(params, *batch.tensors(), steps=steps, weights=weights, strategy=strategy, track=True)
    targets = {**params, **{f"rule.{k}": v for k, v in loop.rule.named_parameters()}}
    gradients = torch.autograd.grad(out.losses.mean(), list(targets.values()))
    return out, dict(zip(targets, gradients))


@pytest.mark.parametrize("bn_policy", ["batch", "frozen"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_loop_and_vmap_agree(first_order: bool, bn_policy: str) -> None:
    loop = InnerLoop(tiny_convnet(), sgd(0.3, learnable=True).double(), F.cross_entropy, first_order=first_order)
    batch = toy_classification_batch()
    by_loop, grads_loop = run(loop, batch, weights=WEIGHTS, strategy="loop", bn_policy=bn_policy)
    by_vmap, grads_vmap = run(loop, batch, weights=WEIGHTS, strategy="vmap", bn_policy=bn_policy)
    torch.testing.assert_close(by_vmap.losses, by_loop.losses)
    torch.testing.assert_close(by_vmap.step_losses, by_loop.step_losses)
    torch.testing.assert_close(by_vmap.accuracy, by_loop.accuracy)
    assert_close_dicts(grads_vmap, grads_loop)
    assert grads_loop["rule.lr"].abs() > 0 and grads_loop["3.weight"].abs().sum() > 0
    with torch.no_grad(), batchnorm_policy(loop.model, bn_policy):  # evaluation: no graph, same numbers
        for strategy in ("loop", "vmap"):
            out = loop.run_tasks(named_params(loop.model), *batch.tensors(), steps=2, weights=WEIGHTS,
                                 strategy=strategy)
            torch.testing.assert_close(out.losses, by_loop.losses.detach())


def test_vmap_needs_composite_batch_norm_for_second_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents the PyTorch bug behind ``metaopt.batchnorm.composite_batch_norm``.

    Through the fused batch-norm kernel, ``vmap`` gives wrong second-order gradients (torch
    2.14). If this test fails, PyTorch has fixed the bug: the workaround can be dropped.
    """
    loop = InnerLoop(tiny_convnet(), sgd(0.3), F.cross_entropy)
    batch = toy_classification_batch()
    _, expected = run(loop, batch, weights=WEIGHTS, strategy="loop")
    monkeypatch.setattr(metaopt.inner, "composite_batch_norm", contextlib.nullcontext)
    out, fused = run(loop, batch, weights=WEIGHTS, strategy="vmap")
    gap = max((fused[k] - expected[k]).abs().max().item() for k in expected)
    assert gap > 1e-6, ("vmap's second-order gradients through fused batch norm now match the per-task loop: the "
                        "PyTorch bug is fixed and metaopt.batchnorm.composite_batch_norm can be removed")


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
    stored, expected = run(InnerLoop(model, rule, F.cross_entropy, first_order=first_order), batch, steps, weights,
                           bn_policy=bn_policy)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    loss = CountingLoss()
    loop = InnerLoop(model, rule, loss, first_order=first_order, checkpoint_steps=True)
    params = named_params(model)
    with batchnorm_policy(model, bn_policy):
        out = loop.run_tasks(params, *batch.tensors(), steps=steps, weights=weights, strategy="auto", track=True)
    calls = loss.calls
    gradients = torch.autograd.grad(out.losses.mean(), [*params.values(), rule.lr])
    assert loss.calls - calls == (0 if first_order else len(batch) * steps)  # every inner loss, once more
    torch.testing.assert_close(out.losses, stored.losses)
    torch.testing.assert_close(out.step_losses, stored.step_losses)
    assert_close_dicts(dict(zip([*params, "rule.lr"], gradients)), expected)
    assert_close_dicts(model.state_dict(), buffers, rtol=0, atol=0)
    with torch.no_grad(), batchnorm_policy(model, bn_policy):  # evaluation: nothing to recompute, same numbers
        out = loop.run_tasks(params, *batch.tensors(), steps=steps, weights=weights, strategy="loop")
    torch.testing.assert_close(out.losses, stored.losses.detach())


def test_checkpointed_steps_need_the_loop_strategy() -> None:
    loop, batch = mse_loop(), toy_regression_batch()
    loop.checkpoint_steps = True
    with pytest.raises(ValueError, match="checkpoint_steps needs strategy='loop'"):
        loop.run_tasks(named_params(loop.model), *batch.tensors(), steps=2, strategy="vmap")


def mse_loop(first_order: bool = False, rule: nn.Module | None = None) -> InnerLoop:
    return InnerLoop(tiny_mlp(), rule or sgd(0.1).double(), F.mse_loss, first_order=first_order)


def meta_loss_at(loop: InnerLoop, batch: Episode, params: Params, steps: int) -> torch.Tensor:
    return loop.run_tasks(params, *batch.tensors(), steps=steps, strategy="loop").losses.mean()


def test_second_order_meta_gradient_matches_central_differences() -> None:
    loop, batch, steps, eps = mse_loop(rule=sgd(0.1, learnable=True).double()), toy_regression_batch(), 2, 1e-6
    params = named_params(loop.model)
    loss = meta_loss_at(loop, batch, params, steps)
    analytic = dict(zip([*params, "lr"], torch.autograd.grad(loss, [*params.values(), loop.rule.lr])))
    numeric = {}
    with torch.no_grad():
        for name, p in [*params.items(), ("lr", loop.rule.lr)]:
            numeric[name] = torch.zeros_like(p)
            for i in range(p.numel()):
                values = []
                for sign in (1, -1):
                    p.view(-1)[i] += sign * eps
                    with torch.enable_grad():
                        values.append(meta_loss_at(loop, batch, params, steps).item())
                    p.view(-1)[i] -= sign * eps
                numeric[name].view(-1)[i] = (values[0] - values[1]) / (2 * eps)
    assert_close_dicts(analytic, numeric, rtol=1e-6, atol=1e-8)
    first_order = mse_loop(first_order=True)
    (fo_weight, *_) = torch.autograd.grad(meta_loss_at(first_order, batch, params, steps), list(params.values()))
    assert not torch.allclose(fo_weight, analytic["0.weight"], rtol=1e-3), "second-order terms must matter here"


def sgd_path(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> list[Params]:
    """θ_0..θ_K of plain gradient descent, each θ_t a fresh leaf (so gradients stop there)."""
    path = [{k: v.detach().requires_grad_() for k, v in params.items()}]
    for _ in range(steps):
        theta = path[-1]
        gradients = torch.autograd.grad(F.mse_loss(model_call(model, theta, x), y), list(theta.values()))
        path.append({k: (v - lr * g).detach().requires_grad_() for (k, v), g in zip(theta.items(), gradients)})
    return path


@pytest.mark.parametrize("steps, weights", [(1, None), (3, None), (3, [0.2, 0.3, 0.5])],
                         ids=["1-step", "3-steps", "3-steps-weighted"])
def test_first_order_meta_gradient_is_the_query_gradient_at_adapted_params(steps: int, weights: list | None) -> None:
    """FOMAML: d meta-loss / d θ_0 = mean over tasks of Σ_t w_t ∇_{θ_t} L_query(θ_t) (∇ at θ_K for MAML's weights)."""
    loop, batch = mse_loop(first_order=True), toy_regression_batch()
    params = named_params(loop.model)
    out = loop.run_tasks(params, *batch.tensors(), steps=steps, weights=weights, strategy="loop")
    actual = dict(zip(params, torch.autograd.grad(out.losses.mean(), list(params.values()))))
    weights = weights or [0.0] * (steps - 1) + [1.0]
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for sx, sy, qx, qy in zip(*batch.tensors()):
        path = sgd_path(loop.model, params, sx, sy, lr=0.1, steps=steps)
        for w, theta in zip(weights, path[1:]):
            gradients = torch.autograd.grad(F.mse_loss(model_call(loop.model, theta, qx), qy), list(theta.values()))
            for k, g in zip(theta, gradients):
                expected[k] += w * g / len(batch)
    assert_close_dicts(actual, expected)


def test_tracked_step_losses_and_accuracy() -> None:
    loop = InnerLoop(tiny_convnet(), sgd(0.5).double(), F.cross_entropy)
    batch = toy_classification_batch()
    out, _ = run(loop, batch, steps=3)
    assert out.losses.shape == (3,) and out.step_losses.shape == (3, 4) and out.accuracy.shape == (3,)
    torch.testing.assert_close(out.step_losses[:, -1], out.losses.detach())
    params = named_params(loop.model)
    with batchnorm_policy(loop.model, "batch"):
        for i, (sx, sy, qx, qy) in enumerate(zip(*batch.tensors())):
            torch.testing.assert_close(out.step_losses[i, 0], F.cross_entropy(model_call(loop.model, params, qx), qy))
            adapted = loop.adapt(params, sx, sy, steps=3)[-1]
            hits = (model_call(loop.model, adapted, qx).argmax(-1) == qy).float().mean()
            torch.testing.assert_close(out.accuracy[i], hits)


def test_regression_has_no_accuracy_and_untracked_has_no_step_losses() -> None:
    loop, batch = mse_loop(), toy_regression_batch()
    out = loop.run_tasks(named_params(loop.model), *batch.tensors(), steps=1)
    assert out.accuracy is None and out.step_losses is None and out.losses.shape == (3,)


def test_only_the_adapted_parameters_move() -> None:
    model = tiny_convnet()
    loop = InnerLoop(model, sgd(0.5).double(), F.cross_entropy, adapted=["3.weight", "3.bias"])
    params = named_params(model)
    batch = toy_classification_batch()
    with batchnorm_policy(model, "batch"):
        path = loop.adapt(params, batch.support_x[0], batch.support_y[0], steps=2)
    assert len(path) == 3 and list(path[-1]) == list(params)
    for name, p in path[-1].items():
        assert (p is params[name]) is (name not in ("3.weight", "3.bias")), name


def test_adapt_without_gradients_is_detached_and_equal() -> None:
    loop, batch = mse_loop(), toy_regression_batch()
    params = named_params(loop.model)
    with_graph = loop.adapt(params, batch.support_x[0], batch.support_y[0], steps=2)[-1]
    with torch.no_grad():
        detached = loop.adapt(params, batch.support_x[0], batch.support_y[0], steps=2)[-1]
    assert with_graph["0.weight"].requires_grad and not detached["0.weight"].requires_grad
    assert_close_dicts(detached, {k: v.detach() for k, v in with_graph.items()})


def test_strategy_and_weights_are_checked() -> None:
    assert resolve_strategy("auto", torch.device("cpu")) == "loop"
    assert resolve_strategy("auto", torch.device("cuda")) == "vmap"
    assert resolve_strategy("vmap", torch.device("cpu")) == "vmap"
    assert resolve_strategy("auto", torch.device("cuda"), checkpoint_steps=True) == "loop"
    with pytest.raises(ValueError, match="unknown task-batching strategy 'threads'"):
        resolve_strategy("threads", torch.device("cpu"))
    loop, batch = mse_loop(), toy_regression_batch()
    with pytest.raises(ValueError, match="3 step weights given for 2 inner steps"):
        loop.run_tasks(named_params(loop.model), *batch.tensors(), steps=2, weights=[1, 1, 1])
