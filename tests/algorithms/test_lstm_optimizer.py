"""The Andrychowicz et al. LSTM optimizer: inputs, meta-gradients, SGD as a special case, the torch.optim wrapper."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch

from metaopt.algorithms.lstm_optimizer import LearnedOptimizer, LSTMOptimizerRule
from metaopt.checkpoint import CheckpointError, save_checkpoint
from metaopt.coordinatewise import LSTMState, preprocess
from metaopt.learned_training import LearnedOptimizerTrainer, run_optimizer, truncated_unroll
from metaopt.optimizees import Quadratics


class SGDNetwork(LSTMOptimizerRule):
    """The rule's plumbing with the network replaced by ``-lr · gradient``: plain gradient descent."""

    def __init__(self, lr: float) -> None:
        super().__init__(preprocessing=False)
        self.lr = lr

    def network(self, features: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
        return -self.lr * features[:, 0], state


def quadratic(batch: int = 3):
    return Quadratics(dim=4, batch=batch).sample(seed=0)


def plain_loop(opt_factory, problem, steps: int) -> torch.Tensor:
    """θ after ``steps`` steps of ``opt.zero_grad(); loss.backward(); opt.step()``."""
    theta = problem.init_params()["theta"].requires_grad_()
    opt = opt_factory([theta])
    for t in range(steps):
        opt.zero_grad()
        problem.loss({"theta": theta}, t).backward()
        opt.step()
    return theta.detach()


def test_gradients_are_preprocessed_or_fed_raw() -> None:
    grad = torch.tensor([3.0, -1e-6, 0.0, -0.5])
    rule = LSTMOptimizerRule(preprocessing=True)
    torch.testing.assert_close(rule.features(grad), preprocess(grad, 10.0))
    assert rule.lstm.cells[0].input_size == 2 and len(rule.lstm.cells) == 2 and rule.lstm.hidden == 20
    raw = LSTMOptimizerRule(preprocessing=False)
    assert raw.features(grad).shape == (4, 1) and raw.lstm.cells[0].input_size == 1
    assert torch.equal(raw.features(grad)[:, 0], grad)


def test_state_covers_every_coordinate_of_every_parameter() -> None:
    params = {"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}
    state = LSTMOptimizerRule(hidden=7, layers=3).init(params)
    assert len(state) == 3 and all(h.shape == c.shape == (11, 7) and h.dtype == torch.float64 for h, c in state)
    with pytest.raises(ValueError, match="at least one parameter"):
        LSTMOptimizerRule().init({})


def test_meta_gradients_reach_the_lstm_and_the_linear_layer_through_an_unroll() -> None:
    rule = LSTMOptimizerRule(preprocessing=True, output_scale=0.1)
    problem = quadratic()
    params = problem.init_params()
    meta_loss, _, _, losses = truncated_unroll(rule, problem, params, rule.init(params), start=0, length=4)
    meta_loss.backward()
    assert losses.shape == (4,)
    for name, p in rule.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_enter_as_constants_unless_second_derivatives() -> None:
    theta = torch.randn(5, requires_grad=True)
    grad = 2 * theta  # depends on θ, as a gradient does
    first = LSTMOptimizerRule(second_derivatives=False)
    new, _ = first.step({"w": theta}, {"w": grad}, first.init({"w": theta}), t=0)
    (jacobian,) = torch.autograd.grad(new["w"].sum(), theta)
    assert torch.equal(jacobian, torch.ones(5))  # θ + update(constant gradient): identity only
    second = LSTMOptimizerRule(second_derivatives=True)
    new, _ = second.step({"w": theta}, {"w": grad}, second.init({"w": theta}), t=0)
    (jacobian,) = torch.autograd.grad(new["w"].sum(), theta)
    assert not torch.allclose(jacobian, torch.ones(5))


def test_first_order_meta_gradient_equals_detaching_the_gradients_by_hand() -> None:
    problem = Quadratics(dim=4, batch=3, dtype=torch.float64).sample(seed=0)
    first = LSTMOptimizerRule(second_derivatives=False).double()
    second = LSTMOptimizerRule(second_derivatives=True).double()
    second.load_state_dict(first.state_dict())
    params = problem.init_params()

    meta_loss, *_ = truncated_unroll(first, problem, params, first.init(params), start=0, length=3)
    ours = torch.autograd.grad(meta_loss, list(first.parameters()))

    theta, state, by_hand = params["theta"].requires_grad_(), second.init(params), 0
    for t in range(3):
        (grad,) = torch.autograd.grad(problem.loss({"theta": theta}, t), theta)  # no graph: a constant
        new, state = second.step({"theta": theta}, {"theta": grad}, state, t)
        theta = new["theta"]
        by_hand = by_hand + problem.loss({"theta": theta}, t + 1)
    expected = torch.autograd.grad(by_hand, list(second.parameters()))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)

    meta_loss, *_ = truncated_unroll(second, problem, params, second.init(params), start=0, length=3)
    full = torch.autograd.grad(meta_loss, list(second.parameters()))
    assert not all(torch.allclose(a, b) for a, b in zip(full, expected))


def test_a_network_that_outputs_minus_lr_gradient_is_sgd() -> None:
    problem = quadratic()
    rule = SGDNetwork(lr=0.01)
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    torch.testing.assert_close(run_optimizer(rule, problem, 10), run_optimizer(sgd, problem, 10), rtol=1e-6, atol=0)
    torch.testing.assert_close(plain_loop(lambda ps: LearnedOptimizer(ps, rule=rule), problem, 10),
                               plain_loop(sgd, problem, 10), rtol=1e-6, atol=1e-7)


def test_the_torch_optimizer_makes_the_rules_own_steps() -> None:
    problem, rule = quadratic(), LSTMOptimizerRule(output_scale=0.1)
    params = problem.init_params()
    state = rule.init(params)
    for t in range(5):
        theta = params["theta"].requires_grad_()
        (grad,) = torch.autograd.grad(problem.loss({"theta": theta}, t), theta)
        with torch.no_grad():
            params, state = rule.step({"theta": theta}, {"theta": grad}, state, t)
    assert torch.equal(plain_loop(lambda ps: LearnedOptimizer(ps, rule=rule), problem, 5), params["theta"])


def test_parameters_without_gradient_keep_their_value_and_state() -> None:
    model = torch.nn.Linear(3, 2)
    opt = LearnedOptimizer(model.parameters(), rule=LSTMOptimizerRule(preprocessing=True, output_scale=0.1))
    bias = model.bias.detach().clone()
    model.bias.requires_grad_(False)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert torch.equal(model.bias, bias) and model.bias not in opt.state
    assert opt.state[model.weight]["step"] == 2 and opt.state[model.weight]["lstm"].shape == (2, 2, 6, 20)


def test_state_dict_round_trip_mid_run_continues_identically() -> None:
    torch.manual_seed(1)
    rule, data = LSTMOptimizerRule(preprocessing=True, output_scale=0.1), torch.randn(6, 8, 3)

    def train(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = LearnedOptimizer(model.parameters(), rule=rule)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[3:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved["model"])
    opt2 = LearnedOptimizer(resumed.parameters(), rule=rule)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0].weight]["step"] == 3
    train(resumed, opt2, data[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_trained_rule_loads_from_its_checkpoint(tmp_path) -> None:
    rule = LSTMOptimizerRule(preprocessing=True, output_scale=0.1, hidden=6)
    LearnedOptimizerTrainer(rule, Quadratics(dim=3, batch=2), epochs=1, steps=4, unroll=2, val_problems=1,
                            run_dir=tmp_path).fit()
    model = torch.nn.Linear(2, 1)
    opt = LearnedOptimizer(model.parameters(), checkpoint=tmp_path / "best.pt")
    assert opt.rule.hparams == rule.hparams
    for (name, a), b in zip(opt.rule.state_dict().items(), rule.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_corrupt_or_foreign_checkpoints_are_named(tmp_path) -> None:
    params = list(torch.nn.Linear(2, 1).parameters())
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope.pt'} does not exist"):
        LearnedOptimizer(params, checkpoint=tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'bad.pt'} cannot be read"):
        LearnedOptimizer(params, checkpoint=tmp_path / "bad.pt")
    save_checkpoint(tmp_path / "other.pt", {"rule_class": "_SGD", "rule_hparams": {}, "rule": {}})
    with pytest.raises(CheckpointError, match="holds a _SGD rule, not an LSTMOptimizerRule"):
        LearnedOptimizer(params, checkpoint=tmp_path / "other.pt")
    with pytest.raises(ValueError, match="exactly one of them"):
        LearnedOptimizer(params)
