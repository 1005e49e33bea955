"""PowerSign and AddSign: the formulas entry by entry against a plain-Python oracle, the sign-decay schedules at
t = 0, T/2, T, 2T (the restart decay ends at 0, not TF-contrib's 1), state_dict round trips, option errors."""

from __future__ import annotations

import io
import math

import pytest
import torch

from metaopt.algorithms.sign_rules import AddSign, PowerSign, sign_decay


def oracle(rule: str, grads: list[list[float]], lr: float, alpha: float, beta: float, decay) -> list[list[float]]:
    """The parameters after each step, one coordinate at a time, from θ = 0."""
    theta, m, out = [0.0] * len(grads[0]), [0.0] * len(grads[0]), []
    for t, g in enumerate(grads):
        f = decay(t)
        for i, gi in enumerate(g):
            m[i] = beta * m[i] + (1 - beta) * gi
            agree = math.copysign(1, gi) * math.copysign(1, m[i]) * f if gi and m[i] else 0.0
            update = alpha ** agree * gi if rule == "power" else (alpha + agree) * gi
            theta[i] -= lr * update
        out.append(list(theta))
    return out


GRADS = [[1.0, -2.0, 0.5, 0.0], [-1.0, -1.0, 0.5, 3.0], [2.0, 1.0, -0.25, 1.0], [0.5, -3.0, -1.0, -1.0]]


@pytest.mark.parametrize("rule, cls, alpha", [("power", PowerSign, math.e), ("add", AddSign, 1.0),
                                              ("power", PowerSign, 2.0), ("add", AddSign, 0.5)])
@pytest.mark.parametrize("decay", [None, "linear", "cosine", "restart"])
def test_every_entry_follows_the_formula(rule, cls, alpha, decay) -> None:
    theta = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    kwargs = {} if decay is None else {"sign_decay": decay, "decay_steps": 3}
    opt = cls([theta], 0.1, alpha, 0.9, **kwargs)
    expected = oracle(rule, GRADS, 0.1, alpha, 0.9, (lambda t: 1.0) if decay is None else
                      (lambda t: sign_decay(decay, t, 3)))
    for g, want in zip(GRADS, expected):
        theta.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        torch.testing.assert_close(theta.detach(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule, cls, alpha", [("power", PowerSign, math.e), ("add", AddSign, 1.0)])
def test_tensors_stepped_together_each_follow_the_formula_at_their_own_step_count(rule, cls, alpha) -> None:
    # the tensors of a group are updated together (foreach); one without a gradient at the first step lags a step
    a, b, c = (torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)) for _ in range(3))
    opt = cls([a, b, c], 0.1, alpha, 0.9, sign_decay="linear", decay_steps=4)
    decay = lambda t: sign_decay("linear", t, 4)  # noqa: E731
    for k, g in enumerate(GRADS):
        a.grad, c.grad = torch.tensor(g, dtype=torch.float64), torch.tensor(g[::-1], dtype=torch.float64)
        b.grad = None if k == 0 else torch.tensor(g, dtype=torch.float64)
        opt.step()
    for param, grads in ((a, GRADS), (b, GRADS[1:]), (c, [g[::-1] for g in GRADS])):
        want = oracle(rule, grads, 0.1, alpha, 0.9, decay)[-1]
        torch.testing.assert_close(param.detach(), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_agreement_scales_the_step_and_disagreement_shrinks_or_stops_it() -> None:
    for cls, agree, disagree in ((PowerSign, math.e, 1 / math.e), (AddSign, 2.0, 0.0)):
        w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        opt = cls([w], lr=1.0)
        w.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
        opt.step()  # m = 0.1 g: agrees
        assert w.tolist() == pytest.approx([-agree, agree])
        w.grad = torch.tensor([-0.01, 0.01], dtype=torch.float64)
        before = w.detach().clone()
        opt.step()  # m = 0.09 g₁ + 0.1 g₂ keeps g₁'s sign: disagrees
        assert (w - before).tolist() == pytest.approx([0.01 * disagree, -0.01 * disagree])


@pytest.mark.parametrize("name, values", [("linear", [1.0, 0.5, 0.0, 0.0]), ("cosine", [1.0, 0.5, 0.0, 0.0]),
                                          ("restart", [1.0, 0.5, 0.0, 0.0])])
def test_schedules_at_zero_half_the_decay_its_end_and_beyond(name, values) -> None:
    assert [sign_decay(name, t, 100) for t in (0, 50, 100, 200)] == pytest.approx(values, abs=1e-12)


def test_the_restart_decay_restarts_within_the_decay_and_ends_at_zero() -> None:
    values = [sign_decay("restart", t, 100, num_periods=2) for t in (0, 25, 49, 50, 75, 99, 100, 150)]
    assert values[:3] == pytest.approx([1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 0.98))])
    assert values[3] == 1.0 and values[4] == pytest.approx(0.5)  # the restart at T / n
    assert values[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.98))) and values[6:] == [0.0, 0.0]
    assert sign_decay("cosine", 50, 100, num_periods=1.0) == pytest.approx(0.0)  # a full period back to 1 at T
    assert sign_decay("cosine", 100, 100, num_periods=1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("cls", [PowerSign, AddSign])
def test_state_dict_round_trip_through_torch_save_continues_identically(cls) -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 2, generator=g) for _ in range(6)]
    a = torch.nn.Parameter(torch.randn(3, 2, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = cls([a], lr=0.05, sign_decay="restart", decay_steps=4)
    for grad in grads[:3]:
        a.grad = grad.clone()
        opt_a.step()
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    with torch.no_grad():
        b.copy_(a)
    opt_b = cls([b], lr=0.05, sign_decay="restart", decay_steps=4)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt_b.state[b]["step"] == 3
    for grad in grads[3:]:
        for p, opt in ((a, opt_a), (b, opt_b)):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(a, b)


def test_the_closure_loss_is_returned_and_parameters_without_gradient_stay() -> None:
    w, untouched = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = PowerSign([w, untouched])
    loss = opt.step(lambda: (w.square().sum()).backward() or w.square().sum())
    assert float(loss.detach()) == 2.0 and untouched.tolist() == [1.0, 1.0] and not opt.state[untouched]
    assert w.tolist() != [1.0, 1.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"decay_steps": 10}, "decay_steps and num_periods shape a sign decay and do nothing without one"),
    ({"sign_decay": "cosine"}, "sign_decay='cosine' needs decay_steps >= 1"),
    ({"sign_decay": "exponential", "decay_steps": 10}, "unknown sign_decay 'exponential'"),
    ({"sign_decay": "linear", "decay_steps": 10, "num_periods": 2}, "num_periods does nothing for the linear decay"),
    ({"lr": -1.0}, "lr must be a finite number >= 0"),
    ({"beta": 1.0}, r"beta must be in \[0, 1\)"),
])
def test_bad_options_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AddSign([torch.nn.Parameter(torch.ones(1))], **kwargs)
    with pytest.raises(ValueError, match="base must be a finite number > 0"):
        PowerSign([torch.nn.Parameter(torch.ones(1))], base=0.0)
    with pytest.raises(ValueError, match="unknown sign decay 'step'"):
        sign_decay("step", 0, 10)
