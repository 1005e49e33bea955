"""The higher driver: same meta-gradients as torch.func with SGD; Adam, RMSprop and learnable overrides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.functional import named_params
from metaopt.engine.higher_driver import HigherLoop, HigherRule
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.rules import sgd
from metaopt.problems.episode_task import EpisodeTask
from tests.helpers import assert_close_dicts, meta_grads, tiny_convnet, toy_classification_batch

BN_SHIFTED = ("0.0.bias", "1.0.bias")  # conv biases right before batch norm: zero gradient up to rounding


def by_rule_name(gradients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta-gradients named as for the torch.func driver: a HigherRule keeps the rule it runs as ``rule.source``."""
    return {name.replace("rule.source.", "rule.", 1): g for name, g in gradients.items()}


@pytest.mark.parametrize("learnable_lr", [False, True], ids=["fixed-lr", "learned-lr"])
@pytest.mark.parametrize("adapt", ["all", "head"], ids=["maml", "anil"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_sgd_meta_gradients_equal_the_torch_func_driver(first_order: bool, adapt: str, learnable_lr: bool) -> None:
    batch = toy_classification_batch()
    results = {}
    for driver in ("func", "higher"):
        rule = sgd(0.3, learnable=learnable_lr)
        learner = MetaLearner(tiny_convnet(), HigherRule(rule) if driver == "higher" else rule, inner_steps=2,
                              step_weights=[0.4, 0.6], first_order=first_order, adapt=adapt).double()
        _, metrics = learner.meta_loss(batch, track_steps=True)
        loss, gradients = meta_grads(learner, batch)
        results[driver] = (metrics, loss, by_rule_name(gradients))
    (func_metrics, func_loss, func_grads), (higher_metrics, higher_loss, higher_grads) = results.values()
    assert higher_metrics == pytest.approx(func_metrics, rel=1e-12)
    torch.testing.assert_close(higher_loss, func_loss)
    assert_close_dicts(higher_grads, func_grads)
    assert all(g.abs().sum() > 0 for name, g in higher_grads.items() if name.removeprefix("model.") not in BN_SHIFTED)


def optimizer_learner(make_optimizer: object, override: dict | None = None, first_order: bool = False) -> MetaLearner:
    return MetaLearner(tiny_convnet(), HigherRule(make_optimizer, override=override), inner_steps=2,
                       first_order=first_order).double()


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_adam_meta_gradients_are_finite_and_reach_the_initial_weights(first_order: bool) -> None:
    learner = optimizer_learner(lambda params: torch.optim.Adam(params, lr=0.05), {"lr": 0.05}, first_order)
    _, grads = meta_grads(learner, toy_classification_batch())
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for name, g in grads.items() if name.removeprefix("model.") not in BN_SHIFTED)
    assert grads["rule.override.lr"] != 0


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
    assert higher_grads["rule.override.lr"] != 0
    torch.testing.assert_close(higher_grads.pop("rule.override.lr"), func_grads.pop("rule.lr"))
    assert_close_dicts(higher_grads, func_grads)


def test_evaluation_and_adaptation_without_gradients_match_torch_func() -> None:
    batch = toy_classification_batch()
    func, higher = (MetaLearner(tiny_convnet(), rule, eval_inner_steps=3).double()
                    for rule in (sgd(0.3), HigherRule(sgd(0.3))))
    by_func, by_higher = func.evaluate(batch), higher.evaluate(batch)
    assert by_higher.metric == by_func.metric == "accuracy" and not by_higher.values.requires_grad
    torch.testing.assert_close(by_higher.values, by_func.values)
    with torch.no_grad():  # the losses of the evaluation
        by_func, by_higher = (learner.task_outputs(batch, learner.eval_steps, final_step_only=True)
                              for learner in (func, higher))
    assert not by_higher.losses.requires_grad
    torch.testing.assert_close(by_higher.losses, by_func.losses)
    torch.testing.assert_close(by_higher.accuracy, by_func.accuracy)
    with torch.no_grad():
        adapted = higher.adapt(batch[0])
    assert not any(p.requires_grad for p in adapted.params.values())
    assert_close_dicts(adapted.params, func.adapt(batch[0]).params)


def test_loop_checks_its_arguments() -> None:
    model = nn.Linear(2, 1).double()
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer, got list"):
        HigherLoop(model, HigherRule(lambda params: params))
    loop = HigherLoop(model, HigherRule(lambda params: torch.optim.SGD(params, lr=0.1)))
    x = torch.ones(3, 2, dtype=torch.float64)
    task = EpisodeTask(model, F.mse_loss, x, x[..., :1], x, x[..., :1])
    assert len(loop.unroll(task, named_params(model), steps=1).params) == 2
    for kwargs in ({"functional": True}, {"start": 1}, {"state": ()}):
        with pytest.raises(ValueError, match="whole unrolls from a fresh optimizer, outside vmap"):
            loop.unroll(task, named_params(model), steps=1, **kwargs)
    with pytest.raises(ValueError, match="strategy='vmap' is not available: the higher driver runs tasks one after"):
        MetaLearner(model, HigherRule(lambda params: torch.optim.SGD(params, lr=0.1)), strategy="vmap")


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
    loop = HigherLoop(model, HigherRule(lambda params: torch.optim.SGD(params, lr=0.1)))
    x = torch.ones(3, 2)
    task = EpisodeTask(model, F.mse_loss, x, x[:, :1], x, x[:, :1])
    with pytest.raises(ValueError, match="parameter 'spare' received no gradient from the inner loss"):
        loop.unroll(task, named_params(model), steps=1)
    anil = HigherLoop(model, HigherRule(lambda params: torch.optim.SGD(params, lr=0.1)), adapted=["used.weight"])
    path = anil.unroll(task, named_params(model), steps=1).params
    assert path[1]["spare"] is model.spare and path[1]["used.bias"] is model.used.bias
    assert not torch.equal(path[1]["used.weight"], model.used.weight)


def test_higher_rule_of_a_factory_or_of_an_update_rule() -> None:
    factory = HigherRule(lambda params: torch.optim.Adam(params, lr=0.1), override={"lr": 0.1})
    assert factory.source is None and factory.logged() == {}
    assert factory.hyperparameters(0) == {"lr": [factory.override.lr]}
    rule = sgd(0.4)
    wrapped = HigherRule(rule)
    assert wrapped.source is rule and wrapped.logged() == {"lr/inner": 0.4} and len(wrapped.override) == 0
    assert wrapped.hyperparameters(0) == {}  # a fixed lr is baked into the optimizer
    assert wrapped.make_optimizer([nn.Parameter(torch.zeros(1))]).defaults["lr"] == 0.4
