"""Update rules: SGD against its formula and against torch.optim.SGD, purity, meta-parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.rules import UpdateRule, sgd


def test_sgd_step_is_pure_gradient_descent() -> None:
    rule = sgd(0.25)
    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    gradients = {"w": torch.tensor([4.0, -4.0]), "b": torch.tensor(1.0)}
    state = rule.init(params)
    new, new_state = rule.step(params, gradients, state, t=0)
    torch.testing.assert_close(new["w"], torch.tensor([0.0, 3.0]))
    torch.testing.assert_close(new["b"], torch.tensor(2.75))
    assert new_state == state == ()
    torch.testing.assert_close(params["w"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_sgd_matches_torch_optim_sgd_over_several_steps() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule, state = sgd(0.1), ()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(5):
        leaves = {k: v.requires_grad_() for k, v in params.items()}
        loss = nn.functional.mse_loss(torch.func.functional_call(model, leaves, (x,)), y)
        gradients = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        params, state = rule.step({k: v.detach() for k, v in leaves.items()}, gradients, state, t)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach())


def test_learnable_lr_is_a_meta_parameter() -> None:
    fixed, learned = sgd(0.5), sgd(0.5, learnable=True)
    assert list(fixed.parameters()) == [] and "lr" in dict(fixed.named_buffers())
    assert [n for n, _ in learned.named_parameters()] == ["lr"]
    w = torch.ones(3)
    new, _ = learned.step({"w": w}, {"w": torch.full((3,), 2.0)}, (), t=0)
    (lr_grad,) = torch.autograd.grad(new["w"].sum(), learned.lr)
    torch.testing.assert_close(lr_grad, torch.tensor(-6.0))  # d/d lr of sum(w - lr * g) = -sum(g)
    assert "learnable=True" in repr(learned) and "lr=0.5" in repr(learned)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan")])
def test_sgd_rejects_a_non_positive_lr(lr: float) -> None:
    with pytest.raises(ValueError, match="inner learning rate must be > 0"):
        sgd(lr)


def test_sgd_as_torch_optimizer() -> None:
    model = nn.Linear(2, 1)
    make, learned = sgd(0.3).torch_optimizer()
    optimizer = make(list(model.parameters()))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == pytest.approx(0.3)
    assert learned == {}  # a fixed lr is baked into the optimizer
    rule = sgd(0.3, learnable=True)
    assert rule.torch_optimizer()[1].keys() == {"lr"} and rule.torch_optimizer()[1]["lr"] is rule.lr


def test_base_rule_has_no_torch_optimizer_and_no_step() -> None:
    class Identity(UpdateRule):
        pass

    with pytest.raises(NotImplementedError, match="Identity has no torch.optim counterpart"):
        Identity().torch_optimizer()
    with pytest.raises(NotImplementedError):
        Identity().step({}, {}, (), 0)
    assert Identity().init({"w": torch.zeros(1)}) == ()
