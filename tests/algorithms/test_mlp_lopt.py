"""learned_optimization's per-parameter MLP optimizer: inputs and steps against a numpy oracle of the reference's
formulas, its initialisation, meta-gradients against finite differences, the torch.optim wrapper, meta-training."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from metaopt.algorithms.mlp_lopt import MLPLOptimizer, MLPLOptOptions, MLPLOptRule
from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import StepInfo
from metaopt.estimators import TruncatedBackprop
from metaopt.options import ConfigError
from metaopt.registry import BuildContext, entry
from metaopt.training.checkpoint import CheckpointError
from metaopt.training.config import Section, load_preset
from tests.algorithms.lopt_checks import (
    assert_meta_gradients_match_finite_differences,
    assert_meta_training_halves_the_loss,
    assert_resumes_mid_run,
    model_with_every_rank,
    one_iteration_checkpoint,
)

#: A scalar, a bias, a matrix and a convolution kernel: the tensor ranks the rule must handle.
SHAPES = {"scale": (), "bias": (5,), "weight": (3, 4), "kernel": (4, 3, 3, 3)}


def oracle(layers: list[tuple[np.ndarray, np.ndarray]], param: np.ndarray, grads: list[np.ndarray],
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The reference's ``MLPLOpt`` update of one tensor, written out with loops: its inputs and the parameter per step.

    ``layers`` are the MLP's (weight ``[out, in]``, bias) pairs, ReLU between them.
    """
    decays = [0.1, 0.5, 0.9, 0.99, 0.999, 0.9999]
    timescales = [1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000]
    momenta = [np.zeros_like(param) for _ in decays]
    features, params = [], []
    for t, g in enumerate(grads):
        momenta = [beta * m + (1 - beta) * g for beta, m in zip(decays, momenta)]
        inputs = [g, param] + momenta
        columns = [(x / np.sqrt(1e-5 + np.mean(np.square(x)))).reshape(-1) for x in inputs]
        columns += [np.full(param.size, np.tanh(t / tau - 1.0)) for tau in timescales]
        x = np.stack(columns, axis=1)
        features.append(x)
        out = x
        for i, (w, b) in enumerate(layers):
            out = out @ w.T + b
            if i < len(layers) - 1:
                out = np.maximum(out, 0.0)
        step = out[:, 0] * np.exp(out[:, 1] * 0.001) * 0.001
        param = param - step.reshape(param.shape)
        params.append(param)
    return features, params


def linear_layers(rule: MLPLOptRule) -> list[nn.Linear]:
    return [m for m in rule.mlp if isinstance(m, nn.Linear)]


def feed(opt: torch.optim.Optimizer, params: list[torch.Tensor], gradients: list[torch.Tensor]) -> None:
    """One step on given gradients."""
    for p, g in zip(params, gradients):
        p.grad = g.clone()
    opt.step()


def test_inputs_and_steps_match_a_numpy_oracle_of_the_reference_on_every_rank() -> None:
    rule = MLPLOptRule(generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(1)
    params = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
    gradients = [{name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
                 for _ in range(4)]
    layers = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linear_layers(rule)]
    expected = {name: oracle(layers, params[name].numpy(), [step[name].numpy() for step in gradients])
                for name in SHAPES}
    state, ours = rule.init(params), params
    with torch.no_grad():
        for t, grads in enumerate(gradients):
            for name in SHAPES:  # the inputs of each tensor, normalised over that tensor alone
                momenta = rule.accumulate(state["momenta"][name], grads[name])
                features = rule.features(ours[name], grads[name], momenta, state["step"])
                assert features.shape == (max(ours[name].numel(), 1), 19)
                np.testing.assert_allclose(features.numpy(), expected[name][0][t], rtol=1e-12, atol=1e-12)
            ours, state = rule.step(ours, grads, state, StepInfo(t))
            assert int(state["step"]) == t + 1
            for name, shape in SHAPES.items():
                assert ours[name].shape == shape
                np.testing.assert_allclose(ours[name].numpy(), expected[name][1][t], rtol=1e-12, atol=1e-15)


def test_initialisation_is_haikus_and_a_zero_output_layer_takes_no_step() -> None:
    """Weights ~ N(0, 1/fan_in) truncated at ±2 std, zero biases: the untrained rule steps; a zero read-out does not."""
    before = torch.random.get_rng_state()
    rule = MLPLOptRule(generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), before)  # a generator given: the global one is left alone
    layers = linear_layers(rule)
    assert [(m.in_features, m.out_features) for m in layers] == [(19, 32), (32, 32), (32, 2)]
    assert [type(m).__name__ for m in rule.mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    for m in layers[:2]:
        std = m.in_features ** -0.5
        assert m.weight.abs().max() <= 2 * std and torch.equal(m.bias, torch.zeros_like(m.bias))
        assert m.weight.std().item() == pytest.approx(0.8796 * std, rel=0.1)  # the std of N(0, 1) cut at ±2
    again = MLPLOptRule(generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(rule.parameters(), again.parameters()))

    params, grads = {"w": torch.randn(3, 4)}, {"w": torch.randn(3, 4)}
    new, _ = rule.step(params, grads, rule.init(params), StepInfo(0))
    step = (params["w"] - new["w"]).abs()
    assert 0 < step.max() < 1e-2 and step.min() > 0
    with torch.no_grad():
        layers[-1].weight.zero_()
        layers[-1].bias.zero_()
    new, state = rule.step(params, grads, rule.init(params), StepInfo(0))
    assert torch.equal(new["w"], params["w"]) and int(state["step"]) == 1
    torch.testing.assert_close(state["momenta"]["w"][..., 0], 0.9 * grads["w"])  # the momenta still advance


def test_meta_gradients_match_finite_differences_in_float64() -> None:
    """d/dφ Σ_t f(θ_t) through a 3-step unroll (second order), against central differences along random directions."""
    rule = MLPLOptRule(generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # steps large enough that the losses depend visibly on the weights
        linear_layers(rule)[-1].weight.mul_(100.0)
    assert_meta_gradients_match_finite_differences(rule)  # eps 1e-7: a ReLU kink lies within 1e-5 of these weights


def test_the_torch_optimizer_makes_the_rules_own_steps_on_every_rank() -> None:
    model, x = model_with_every_rank(), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    assert sorted(p.dim() for p in model.parameters()) == [0, 1, 1, 2, 4]
    rule = MLPLOptRule(generator=torch.Generator().manual_seed(0)).double()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = rule.init(params)
    opt = MLPLOptimizer(model.parameters(), rule=rule)
    for t in range(4):
        leaves = {name: p.requires_grad_() for name, p in params.items()}
        loss = torch.func.functional_call(model, leaves, (x,)).square().mean()
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        with torch.no_grad():
            params, state = rule.step(leaves, grads, state, StepInfo(t))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert torch.equal(opt.state[p]["momenta"], state["momenta"][name]) and opt.state[p]["step"] == 4


def test_the_loss_is_optional_and_parameters_without_gradient_keep_their_value_and_state() -> None:
    model = nn.Linear(3, 2)
    opt = MLPLOptimizer(model.parameters(), rule=MLPLOptRule())
    x = torch.randn(4, 3)
    assert opt.step() is None  # no gradients yet: nothing moves
    model.bias.requires_grad_(False)
    bias = model.bias.detach().clone()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    closure()
    assert opt.step() is None
    assert torch.equal(model.bias, bias) and model.bias not in opt.state
    assert opt.state[model.weight]["step"] == 2 and opt.state[model.weight]["momenta"].shape == (2, 3, 6)


def test_state_dict_round_trip_mid_run_continues_identically() -> None:
    torch.manual_seed(1)
    rule, data = MLPLOptRule().double(), torch.randn(6, 8, 1, 4, 4, dtype=torch.float64)

    def check(resumed: nn.Module, opt: torch.optim.Optimizer) -> None:
        assert opt.state[resumed.scale]["step"] == 3
        assert opt.state[resumed.conv.weight]["momenta"].shape == (2, 1, 3, 3, 6)

    assert_resumes_mid_run(model_with_every_rank, lambda model: MLPLOptimizer(model.parameters(), rule=rule), data,
                           check)


def test_step_lr_scales_the_rules_step_exactly_and_groups_have_their_own_lr() -> None:
    """p ← p - lr · step: StepLR halves lr every step, and with it the step, bit for bit; lr=0 freezes a group."""
    torch.manual_seed(0)
    rule = MLPLOptRule()
    gradients = [[torch.randn(3, 2), torch.randn(3)] for _ in range(4)]
    params = [torch.randn(3, 2), torch.randn(3)]
    opt = MLPLOptimizer(params, rule=rule)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected, momenta = [p.clone() for p in params], [torch.zeros(3, 2, 6), torch.zeros(3, 6)]
    for t, grads in enumerate(gradients):
        lr = opt.param_groups[0]["lr"]
        assert lr == 0.5 ** t
        with torch.no_grad():
            momenta = [rule.accumulate(m, g) for m, g in zip(momenta, grads)]
            steps = rule.steps([(e, g, m, t) for e, g, m in zip(expected, grads, momenta)])
        expected = [e - lr * s for e, s in zip(expected, steps)]
        feed(opt, params, grads)
        schedule.step()
        for p, e in zip(params, expected):
            assert torch.equal(p, e)

    moving, frozen = torch.zeros(3), torch.ones(2)
    opt = MLPLOptimizer([{"params": [moving]}, {"params": [frozen], "lr": 0.0}], rule=rule, lr=2.0)
    assert [group["lr"] for group in opt.param_groups] == [2.0, 0.0]
    grads = [torch.randn(3), torch.randn(2)]
    feed(opt, [moving, frozen], grads)
    alone = torch.zeros(3)  # each tensor's inputs are its own: only the MLP's batch (and so its rounding) differs
    feed(MLPLOptimizer([alone], rule=rule), [alone], grads[:1])
    torch.testing.assert_close(moving, 2.0 * alone, rtol=1e-6, atol=0)
    assert torch.equal(frozen, torch.ones(2))
    assert opt.state[frozen]["step"] == 1 and opt.state[frozen]["momenta"].abs().sum() > 0  # its state advances


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.5", True])
def test_a_bad_lr_multiplier_is_named(lr: object) -> None:
    message = (f"MLPLOptimizer's lr multiplies the learned rule's update and must be a finite number >= 0, got "
               f"{lr!r}; pass lr=1.0 (the rule as trained) or a fraction such as lr=0.5")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        MLPLOptimizer([torch.zeros(2)], rule=MLPLOptRule(), lr=lr)
    with pytest.raises(ValueError, match=re.escape(message)):
        MLPLOptimizer([{"params": [torch.zeros(2)], "lr": lr}], rule=MLPLOptRule())


def test_rule_and_checkpoint_exclude_each_other_and_bad_checkpoints_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of them; got \\[.rule., .checkpoint.\\]"):
        MLPLOptimizer([torch.zeros(2)], rule=MLPLOptRule(), checkpoint=tmp_path / "best.pt")
    with pytest.raises(ValueError, match="exactly one of them; got none"):
        MLPLOptimizer([torch.zeros(2)])
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope.pt'} does not exist"):
        MLPLOptimizer([torch.zeros(2)], checkpoint=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="at least one parameter"):
        MLPLOptRule().init({})


MLP_LOPT_OPTIONS = ("horizon", "truncation", "estimator", "second_derivatives", "sigma", "pairs", "tasks",
                    "min_horizon", "random_offset", "max_loss", "vmap_particles", "hidden_size", "hidden_layers",
                    "exp_mult", "step_mult")


def test_registered_options_build_the_learner_and_refuse_others() -> None:
    found = entry("algorithm", "mlp-lopt")
    assert found.options is MLPLOptOptions and found.problems == "optimizees"
    assert tuple(MLPLOptOptions.field_names()) == MLP_LOPT_OPTIONS
    context = BuildContext(None, Quadratics(dim=4, batch=3).sample(seed=0))
    options = MLPLOptOptions(hidden_size=8, hidden_layers=3, exp_mult=0.01, horizon=8, truncation=4)
    learner, estimator = found.build(options, context)
    assert isinstance(learner, OptimizerLearner) and isinstance(estimator, TruncatedBackprop)
    assert isinstance(learner.rule, MLPLOptRule) and (learner.rule.exp_mult, learner.rule.step_mult) == (0.01, 1e-3)
    assert [(m.in_features, m.out_features) for m in linear_layers(learner.rule)] == [(19, 8), (8, 8), (8, 8), (8, 2)]
    assert (learner.horizon, estimator.truncation, learner.inner.first_order) == (8, 4, True)
    assert not found.build(MLPLOptOptions(second_derivatives=True), context)[0].inner.first_order
    with pytest.raises(ConfigError, match=r"option 'truncation' \(30\) must not exceed the horizon \(20\)"):
        MLPLOptOptions(horizon=20, truncation=30)
    with pytest.raises(ConfigError, match="option 'step_mult' must be > 0"):
        MLPLOptOptions(step_mult=0.0)
    with pytest.raises(ConfigError, match=f"is not an option of algorithm 'mlp-lopt'; its options are "
                                          f"{', '.join(MLP_LOPT_OPTIONS)}$"):
        Section.from_dict("algorithm", {"name": "mlp-lopt", "lstm_units": 4})
    preset = load_preset("mlp-lopt-quadratics")
    assert (preset.algorithm.name, preset.data.name, preset.algorithm.options) == ("mlp-lopt", "quadratics",
                                                                                     MLPLOptOptions())


def test_meta_training_through_the_trainer_lowers_the_loss_and_the_checkpoint_loads(tmp_path) -> None:
    """The registered algorithm, TruncatedBackprop and MetaTrainer: the trained rule beats its start on held-out
    quadratics; MLPLOptimizer(checkpoint=...) runs the trained rule; another algorithm's checkpoint is refused."""
    learner = assert_meta_training_halves_the_loss("mlp-lopt", tmp_path / "mlp")

    opt = MLPLOptimizer(torch.nn.Linear(2, 1).parameters(), checkpoint=tmp_path / "mlp" / "last.pt")
    for (name, a), b in zip(opt.rule.state_dict().items(), learner.rule.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="holds a LSTMOptimizerRule rule, not an MLPLOptRule"):
        MLPLOptimizer([torch.zeros(2)], checkpoint=one_iteration_checkpoint("l2l", tmp_path / "l2l", lstm_units=4))
