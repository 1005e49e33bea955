"""The higher driver: same meta-gradients as torch.func with SGD; Adam, RMSprop and learnable overrides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.functional import named_params
from metaopt.higher_backend import HigherLoop
from metaopt.meta_learner import MetaLearner
from metaopt.rules import sgd
from tests.helpers import assert_close_dicts, meta_grads, tiny_convnet, toy_classification_batch

BN_SHIFTED = ("0.0.bias", "1.0.bias")  # conv biases right before batch norm: zero gradient up to rounding


@pytest.mark.parametrize("learnable_lr", [False, True], ids=["fixed-lr", "learned-lr"])
@pytest.mark.parametrize("adapt", ["all", "head"], ids=["maml", "anil"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_sgd_meta_gradients_equal_the_torch_func_driver(first_order: bool, adapt: str, learnable_lr: bool) -> None:
    batch = toy_classification_batch()
    results = {}
    for driver in ("func", "higher"):
        learner = MetaLearner(tiny_convnet(), sgd(0.3, learnable=learnable_lr), inner_steps=2, step_weights=[0.4, 0.6],
                              first_order=first_order, adapt=adapt, driver=driver).double()
        _, metrics = learner.meta_loss(batch, track_steps=True)
        results[driver] = (metrics, *meta_grads(learner, batch))
    (func_metrics, func_loss, func_grads), (higher_metrics, higher_loss, higher_grads) = results.values()
    assert higher_metrics == pytest.approx(func_metrics, rel=1e-12)
    torch.testing.assert_close(higher_loss, func_loss)
    assert_close_dicts(higher_grads, func_grads)
    assert all(g.abs().sum() > 0 for name, g in higher_grads.items() if name.removeprefix("model.") not in BN_SHIFTED)


def optimizer_learner(make_optimizer: object, override: dict | None = None, first_order: bool = False) -> MetaLearner:
    return MetaLearner(tiny_convnet(), driver="higher", inner_optimizer=make_optimizer, override=override,
                       inner_steps=2, first_order=first_order).double()


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_adam_meta_gradients_are_finite_and_reach_the_initial_weights(first_order: bool) -> None:
    learner = optimizer_learner(lambda params: torch.optim.Adam(params, lr=0.05), {"lr": 0.05}, first_order)
    _, grads = meta_grads(learner, toy_classification_batch())
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for name, g in grads.items() if name.removeprefix("model.") not in BN_SHIFTED)
    assert grads["override.lr"] != 0


def test_first_order_adam_drops_second_order_terms_only() -> None:
    batch = toy_classification_batch()
    def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=0.05)

    _, second = meta_grads(optimizer_learner(make), batch)
    _, first = meta_grads(optimizer_learner(make, first_order=True), batch)
    assert not torch.allclose(first["model.3.weight"], second["model.3.weight"])


def test_rmsprop_runs_with_higher_s_warning() -> None:
    learner = optimizer_learner(lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5))
    with pytest.warns(UserWarning, match="Differentiable RMSprop suffers from gradient correctness issues"):
        _, grads = meta_grads(learner, toy_classification_batch())
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["model.0.0.weight"].abs().sum() > 0 and grads["model.3.weight"].abs().sum() > 0


def test_learnable_lr_override_equals_a_learnable_sgd_rule() -> None:
    batch = toy_classification_batch()
    func = MetaLearner(tiny_convnet(), sgd(0.3, learnable=True), inner_steps=2).double()
    higher = optimizer_learner(lambda params: torch.optim.SGD(params, lr=1.0), {"lr": 0.3})  # override wins
    _, func_grads = meta_grads(func, batch)
    _, higher_grads = meta_grads(higher, batch)
    assert higher_grads["override.lr"] != 0
    torch.testing.assert_close(higher_grads.pop("override.lr"), func_grads.pop("rule.lr"))
    assert_close_dicts(higher_grads, func_grads)


def test_evaluation_and_adaptation_without_gradients_match_torch_func() -> None:
    batch = toy_classification_batch()
    func, higher = (MetaLearner(tiny_convnet(), sgd(0.3), eval_inner_steps=3, driver=d).double()
                    for d in ("func", "higher"))
    by_func, by_higher = func.evaluate(batch), higher.evaluate(batch)
    assert not by_higher.losses.requires_grad
    torch.testing.assert_close(by_higher.losses, by_func.losses)
    torch.testing.assert_close(by_higher.accuracy, by_func.accuracy)
    with torch.no_grad():
        adapted = higher.adapt(batch[0])
    assert not any(p.requires_grad for p in adapted.params.values())
    assert_close_dicts(adapted.params, func.adapt(batch[0]).params)


def test_loop_checks_its_arguments() -> None:
    model = nn.Linear(2, 1).double()
    with pytest.raises(TypeError, match="make_optimizer must return a torch.optim.Optimizer, got list"):
        HigherLoop(model, lambda params: params, F.mse_loss)
    loop = HigherLoop(model, lambda params: torch.optim.SGD(params, lr=0.1), F.mse_loss)
    x = torch.ones(2, 3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="strategy 'vmap' is not available"):
        loop.run_tasks(named_params(model), x, x[..., :1], x, x[..., :1], steps=1, strategy="vmap")


def test_unsupported_optimizers_are_named() -> None:
    learner = optimizer_learner(lambda params: torch.optim.AdamW(params, lr=0.1))
    with pytest.raises(ValueError, match="AdamW'> not supported by higher"):
        learner.meta_loss(toy_classification_batch())


class WithSpare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(2, 1)
        self.spare = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_parameter_without_inner_gradient_is_named() -> None:
    model = WithSpare()
    loop = HigherLoop(model, lambda params: torch.optim.SGD(params, lr=0.1), F.mse_loss)
    x = torch.ones(3, 2)
    with pytest.raises(ValueError, match="parameter 'spare' received no gradient from the inner loss"):
        loop.adapt(named_params(model), x, x[:, :1], steps=1)
    anil = HigherLoop(model, lambda params: torch.optim.SGD(params, lr=0.1), F.mse_loss, adapted=["used.weight"])
    path = anil.adapt(named_params(model), x, x[:, :1], steps=1)
    assert path[1]["spare"] is model.spare and path[1]["used.bias"] is model.used.bias
    assert not torch.equal(path[1]["used.weight"], model.used.weight)
