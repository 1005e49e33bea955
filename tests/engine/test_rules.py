"""Update rules: SGD against its formula and against torch.optim.SGD, purity, meta-parameters."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from metaopt.engine.rules import LearnedRates, StepInfo, UpdateRule, check_lr, meta_sgd, per_step_sgd, sgd


def test_sgd_step_is_pure_gradient_descent() -> None:
    rule = sgd(0.25)
    params = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    gradients = {"w": torch.tensor([4.0, -4.0]), "b": torch.tensor(1.0)}
    state = rule.init(params)
    new, new_state = rule.step(params, gradients, state, StepInfo(0))
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
        params, state = rule.step({k: v.detach() for k, v in leaves.items()}, gradients, state,
                                  StepInfo(t, loss.detach()))
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach())


def test_learnable_lr_is_a_meta_parameter() -> None:
    fixed, learned = sgd(0.5), sgd(0.5, learnable=True)
    assert list(fixed.parameters()) == [] and dict(fixed.named_buffers()) == {}  # a fixed lr is a Python float
    assert type(fixed.lr) is float and fixed.lr == 0.5
    assert [n for n, _ in learned.named_parameters()] == ["lr"] and isinstance(learned.lr, nn.Parameter)
    w = torch.ones(3)
    new, _ = learned.step({"w": w}, {"w": torch.full((3,), 2.0)}, (), StepInfo(0))
    (lr_grad,) = torch.autograd.grad(new["w"].sum(), learned.lr)
    torch.testing.assert_close(lr_grad, torch.tensor(-6.0))  # d/d lr of sum(w - lr * g) = -sum(g)
    assert "learnable=True" in repr(learned) and "lr=0.5" in repr(learned)


def test_sgd_logs_its_lr(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sgd(0.5).logged() == {"lr/inner": 0.5} and sgd(0.5).extra_repr() == "lr=0.5, learnable=False"
    # A learned lr is read as a number (logged, repr, the higher driver's optimizer) without float() of a tensor
    # that requires grad, for which torch warns "Converting a tensor with requires_grad=True to a scalar" (once
    # per process, so the conversion itself is watched, not the warning).
    to_float = torch.Tensor.__float__

    def checked(tensor: torch.Tensor) -> float:
        assert not tensor.requires_grad, "float() of a tensor that requires grad: torch warns, detach it first"
        return to_float(tensor)

    monkeypatch.setattr(torch.Tensor, "__float__", checked)
    rule = sgd(0.5, learnable=True)
    assert rule.logged() == {"lr/inner": 0.5}
    assert rule.extra_repr() == "lr=0.5, learnable=True"
    make, _ = rule.torch_optimizer()
    assert make([nn.Parameter(torch.zeros(1))]).defaults["lr"] == 0.5


def test_a_fixed_lr_takes_the_dtype_of_the_parameters_exactly() -> None:
    """0.3 is 0.3 in float64, not float32's 0.30000001192; a learnable lr is created in the dtype asked for."""
    params, gradients = {"w": torch.ones(1, dtype=torch.float64)}, {"w": torch.ones(1, dtype=torch.float64)}
    new, _ = sgd(0.3).step(params, gradients, (), StepInfo(0))
    assert new["w"].dtype == torch.float64 and new["w"].item() == 1.0 - 0.3
    assert sgd(0.3, learnable=True, dtype=torch.float64).lr.dtype == torch.float64
    assert sgd(0.3, learnable=True).lr.dtype == torch.get_default_dtype()


def test_step_info_carries_the_step_and_the_inner_loss() -> None:
    info = StepInfo(2)
    assert info.t == 2 and info.loss is None
    loss = torch.tensor(0.5)
    assert StepInfo(3, loss).loss is loss
    with pytest.raises(AttributeError):
        info.t = 3  # type: ignore[misc]


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan")])
def test_sgd_rejects_a_non_positive_lr(lr: float) -> None:
    with pytest.raises(ValueError, match="inner learning rate must be > 0"):
        sgd(lr)


def test_sgd_as_torch_optimizer() -> None:
    model = nn.Linear(2, 1)
    make, learned = sgd(0.3).torch_optimizer()
    optimizer = make(list(model.parameters()))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == pytest.approx(0.3)
    assert learned(0) == {}  # a fixed lr is baked into the optimizer
    rule = sgd(0.3, learnable=True)
    hyper = rule.torch_optimizer()[1]
    assert hyper(0).keys() == {"lr"} and hyper(0)["lr"][0] is rule.lr and hyper(3)["lr"][0] is rule.lr


def test_base_rule_has_no_torch_optimizer_and_no_step() -> None:
    class Identity(UpdateRule):
        pass

    with pytest.raises(NotImplementedError, match="Identity has no torch.optim counterpart"):
        Identity().torch_optimizer()
    with pytest.raises(NotImplementedError):
        Identity().step({}, {}, (), StepInfo(0))
    assert Identity().logged() == {}
    assert Identity().init({"w": torch.zeros(1)}) == ()


# --- learned step sizes: LSLR (per layer and step) and Meta-SGD (per entry) ----------------------------------------

def lslr_rule() -> tuple[LearnedRates, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64),
              "layer.b": torch.tensor([0.5, -0.5], dtype=torch.float64)}
    gradients = {"w": torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.float64),
                 "layer.b": torch.tensor([2.0, 3.0], dtype=torch.float64)}
    rule = per_step_sgd(params, steps=3, lr=0.1)
    with torch.no_grad():
        rule.rates["w"].data = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        rule.rates["layer-b"].data = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    return rule, params, gradients


def test_per_step_sgd_starts_every_rate_at_lr() -> None:
    rule = per_step_sgd({"w": torch.zeros(3, 2), "b": torch.zeros(3, dtype=torch.float64)}, steps=4, lr=0.05)
    assert isinstance(rule, LearnedRates) and rule.per_step
    assert sorted(n for n, _ in rule.named_parameters()) == ["rates.b", "rates.w"]
    torch.testing.assert_close(rule.rates["w"], torch.full((4,), 0.05))
    torch.testing.assert_close(rule.rates["b"], torch.full((4,), 0.05, dtype=torch.float64))
    with pytest.raises(ValueError, match="steps >= 1"):
        per_step_sgd({"w": torch.zeros(1)}, steps=0, lr=0.1)


@pytest.mark.parametrize(("t", "w_rate", "b_rate"), [(0, 0.1, 1.0), (1, 0.2, 0.5), (2, 0.3, 0.25), (5, 0.3, 0.25)])
def test_per_step_sgd_uses_the_rate_of_step_t(t: int, w_rate: float, b_rate: float) -> None:
    rule, params, gradients = lslr_rule()
    new, state = rule.step(params, gradients, rule.init(params), StepInfo(t))
    assert state == ()
    torch.testing.assert_close(new["w"], params["w"] - w_rate * gradients["w"])
    torch.testing.assert_close(new["layer.b"], params["layer.b"] - b_rate * gradients["layer.b"])
    torch.testing.assert_close(params["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))


@pytest.mark.parametrize(("t", "row"), [(0, 0), (1, 1), (5, 2)])
def test_per_step_rates_get_gradients_at_their_step_only(t: int, row: int) -> None:
    rule, params, gradients = lslr_rule()
    new, _ = rule.step(params, gradients, (), StepInfo(t))
    w_grad, b_grad = torch.autograd.grad((new["w"].sum(), new["layer.b"].sum()),
                                         (rule.rates["w"], rule.rates["layer-b"]))
    expected_w, expected_b = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    expected_w[row] = -gradients["w"].sum()  # d/d α_t of sum(θ - α_t g) = -sum(g)
    expected_b[row] = -gradients["layer.b"].sum()
    torch.testing.assert_close(w_grad, expected_w)
    torch.testing.assert_close(b_grad, expected_b)


@pytest.mark.parametrize("make", [lambda p: per_step_sgd(p, steps=2, lr=0.1), lambda p: meta_sgd(p, init=0.1)],
                         ids=["per_step_sgd", "meta_sgd"])
def test_learned_rates_for_an_unknown_parameter(make: Callable[[dict[str, torch.Tensor]], LearnedRates]) -> None:
    rule = make({"w": torch.zeros(2)})
    params = {"w": torch.ones(2), "conv.weight": torch.ones(2)}
    with pytest.raises(ValueError, match="no learned rate for parameter 'conv.weight'"):
        rule.step(params, dict(params), (), StepInfo(0))


def test_learned_rates_need_a_parameter() -> None:
    with pytest.raises(ValueError, match="at least one parameter"):
        per_step_sgd({}, steps=2, lr=0.1)
    with pytest.raises(ValueError, match="at least one parameter"):
        meta_sgd({}, init=0.1)


def test_meta_sgd_uniform_init_is_reproducible_and_in_range() -> None:
    params = {"w": torch.zeros(20, 30, dtype=torch.float64), "b": torch.zeros(30)}
    rule = meta_sgd(params, generator=torch.Generator().manual_seed(0))
    assert not rule.per_step
    for name, p in params.items():
        rates = rule.rates[name]
        assert rates.shape == p.shape and rates.dtype == p.dtype
        assert rates.min() >= 0.005 and rates.max() <= 0.1
        assert rates.std() > 0.01  # really drawn, not constant
    again = meta_sgd(params, generator=torch.Generator().manual_seed(0))
    other = meta_sgd(params, generator=torch.Generator().manual_seed(1))
    for name in params:
        torch.testing.assert_close(again.rates[name], rule.rates[name], rtol=0, atol=0)
        assert not torch.equal(other.rates[name], rule.rates[name])
    custom = meta_sgd(params, init=(0.2, 0.3), generator=torch.Generator().manual_seed(0))
    assert custom.rates["w"].min() >= 0.2 and custom.rates["w"].max() <= 0.3


def test_meta_sgd_constant_init() -> None:
    rule = meta_sgd({"w": torch.zeros(3, 2)}, init=0.01)
    torch.testing.assert_close(rule.rates["w"], torch.full((3, 2), 0.01))
    assert rule.rate("w", 0) is rule.rate("w", 7) is rule.rates["w"]


@pytest.mark.parametrize("init", [(-0.1, 0.1), (0.1, 0.05), (-0.2, -0.1)])
def test_meta_sgd_rejects_bad_uniform_bounds(init: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="0 <= low <= high"):
        meta_sgd({"w": torch.zeros(2)}, init=init)


def test_meta_sgd_step_is_elementwise() -> None:
    params = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    gradients = {"w": torch.tensor([[1.0, 1.0], [-2.0, 0.5]])}
    rule = meta_sgd(params, init=0.1)
    alpha = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    rule.rates["w"].data = alpha.clone()
    for t in (0, 3):
        new, _ = rule.step(params, gradients, (), StepInfo(t))
        torch.testing.assert_close(new["w"], torch.tensor([[0.9, 2.2], [3.6, 4.0]]))
    (alpha_grad,) = torch.autograd.grad(new["w"].sum(), rule.rates["w"])
    torch.testing.assert_close(alpha_grad, -gradients["w"])
    with pytest.raises(NotImplementedError, match="LearnedRates has no torch.optim counterpart"):
        rule.torch_optimizer()


def test_per_step_sgd_as_torch_optimizer() -> None:
    rule, params, _ = lslr_rule()
    make, hyper = rule.torch_optimizer()
    leaves = [nn.Parameter(p.clone()) for p in params.values()]
    optimizer = make(leaves)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [group["params"] for group in optimizer.param_groups] == [[leaves[0]], [leaves[1]]]
    for t, expected in [(0, [0.1, 1.0]), (1, [0.2, 0.5]), (2, [0.3, 0.25]), (9, [0.3, 0.25])]:
        lrs = hyper(t)["lr"]
        assert hyper(t).keys() == {"lr"} and len(lrs) == 2
        torch.testing.assert_close(torch.stack(lrs), torch.tensor(expected, dtype=torch.float64))
        assert all(lr.requires_grad for lr in lrs)  # views of the meta-parameters, so meta-gradients reach them
    with pytest.raises(ValueError, match="built for 2 parameters"):
        make(leaves[:1])
    with pytest.raises(ValueError, match="adapts 3"):
        make([*leaves, nn.Parameter(torch.zeros(1))])


def test_per_step_sgd_torch_optimizer_applies_the_step_t_rates() -> None:
    rule, params, gradients = lslr_rule()
    make, hyper = rule.torch_optimizer()
    leaves = [nn.Parameter(p.clone()) for p in params.values()]
    optimizer = make(leaves)
    for group, lr in zip(optimizer.param_groups, hyper(1)["lr"]):
        group["lr"] = lr.item()
    for leaf, g in zip(leaves, gradients.values()):
        leaf.grad = g.clone()
    optimizer.step()
    expected, _ = rule.step(params, gradients, (), StepInfo(1))
    for leaf, name in zip(leaves, params):
        torch.testing.assert_close(leaf.detach(), expected[name].detach())


@pytest.mark.parametrize("lr, message", [
    ("0.1", "inner_lr must be a number, got the string '0.1'; pass inner_lr=0.1 (a float, not a str)"),
    ("fast", "inner_lr must be a number, got the string 'fast'; pass a number, e.g. inner_lr=0.01"),
    (None, "inner_lr must be a number, got None (NoneType); pass a float, e.g. inner_lr=0.01"),
    (True, "inner_lr must be a number, got True (bool); pass a float, e.g. inner_lr=0.01"),
    (float("inf"), "inner learning rate must be finite, got inf; pass a finite positive step size as inner_lr, e.g. "
                   "inner_lr=0.01"),
    (float("nan"), "inner learning rate must be > 0, got nan; pass a finite positive step size as inner_lr, e.g. "
                   "inner_lr=0.01"),
    (-1, "inner learning rate must be > 0, got -1.0; pass a finite positive step size as inner_lr, e.g. "
         "inner_lr=0.01"),
])
def test_a_learning_rate_is_a_finite_positive_number(lr: object, message: str) -> None:
    for make in (lambda: check_lr(lr), lambda: sgd(lr), lambda: sgd(lr, learnable=True),
                 lambda: per_step_sgd({"w": torch.zeros(2)}, steps=2, lr=lr)):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            make()


def test_numbers_of_every_kind_are_learning_rates() -> None:
    import numpy as np

    assert [check_lr(v) for v in (1, 0.5, np.float32(0.25), torch.tensor(0.125))] == [1.0, 0.5, 0.25, 0.125]
    assert type(sgd(np.float64(0.3)).lr) is float and sgd(torch.tensor(0.3, dtype=torch.float64)).lr == 0.3


@pytest.mark.parametrize("init, message", [
    (float("nan"), "inner learning rate must be > 0, got nan; pass a finite positive step size as init, e.g. "
                   "init=0.01"),
    ("0.01", "init must be a number, got the string '0.01'; pass init=0.01 (a float, not a str)"),
    ((float("nan"), 0.1), "meta_sgd's uniform init bound must be a finite number, got nan; pass e.g. "
                          "init=(0.005, 0.1)"),
    ((0.005, float("inf")), "meta_sgd's uniform init bound must be a finite number, got inf; pass e.g. "
                            "init=(0.005, 0.1)"),
    ((0.1,), "meta_sgd's uniform init is (low, high), got (0.1,); pass e.g. init=(0.005, 0.1)"),
])
def test_meta_sgd_rejects_non_numbers_and_non_finite_inits(init: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        meta_sgd({"w": torch.zeros(2)}, init=init)


def test_meta_sgd_takes_uniform_bounds_as_a_list_too() -> None:
    params = {"w": torch.zeros(50)}
    listed = meta_sgd(params, init=[0.2, 0.3], generator=torch.Generator().manual_seed(0))
    paired = meta_sgd(params, init=(0.2, 0.3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(listed.rates["w"], paired.rates["w"])
