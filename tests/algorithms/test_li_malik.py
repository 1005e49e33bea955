"""Li & Malik's learned optimizer (algorithms/li_malik.py): steps against a numpy oracle of the formulas, the
gradient-descent start, the torch.optim wrapper, state round trips, meta-gradients, ES training, errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from metaopt.algorithms.li_malik import LiMalikOptimizer, LiMalikOptions, LiMalikRule
from metaopt.datasets.li_malik_problems import LiMalikProblems
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import StepInfo
from metaopt.estimators import PES, TruncatedES
from metaopt.options import ConfigError
from metaopt.problems.optimizees import optimizee_stream
from metaopt.registry import BuildContext, entry
from metaopt.training.config import RunConfig, Section
from metaopt.training.experiment import build_experiment
from metaopt.training.trainer import MetaTrainer
from tests.algorithms.lopt_checks import (
    assert_meta_gradients_match_finite_differences,
    assert_resumes_mid_run,
    model_with_every_rank,
)

#: A scalar, a bias, a matrix and a convolution kernel: the tensor ranks the rule must handle.
SHAPES = {"scale": (), "bias": (5,), "weight": (3, 4), "kernel": (2, 3, 3, 3)}


def randomised(rule: LiMalikRule, seed: int = 0) -> LiMalikRule:
    """``rule`` with every weight redrawn (N(0, 1/fan_in)), so that no unit is special."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rule.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 3))
    return rule


def oracle(rule: LiMalikRule, params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]],
           losses: list[float]) -> list[dict[str, np.ndarray]]:
    """The module docs' formulas with loops: the parameters after each step."""
    h, beta, eps = rule.history, 0.99, 1e-24
    (w1, b1), (w2, b2) = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in rule.policy
                          if isinstance(m, nn.Linear)]
    history = {name: np.zeros((p.size, h)) for name, p in params.items()}
    changes, v_g, v_d, previous, out = np.zeros(h), 0.0, 0.0, None, []
    for t, (g, f) in enumerate(zip(grads, losses)):
        v_g = beta * v_g + (1 - beta) * np.mean(np.concatenate([x.ravel() for x in g.values()]) ** 2)
        change = 0.0 if previous is None else f - previous
        if previous is not None:
            v_d = beta * v_d + (1 - beta) * change**2
        previous = f
        for name in params:
            history[name] = np.concatenate([g[name].reshape(-1, 1), history[name][:, :-1]], axis=1)
        changes = np.concatenate([[change], changes[:-1]])
        s_g = np.sqrt(v_g / (1 - beta ** (t + 1)) + eps)
        s_d = np.sqrt(v_d / (1 - beta ** max(t, 1)) + eps)
        relative = np.array([changes[:i].sum() if i <= t else 0.0 for i in range(1, h + 1)]) / s_d  # f_t - f_{t-i}
        new = {}
        for name, p in params.items():
            x = np.concatenate([history[name] / s_g, np.tile(relative, (p.size, 1))], axis=1)
            z = x @ w1.T + b1
            hidden = np.where(z > 20, z, np.log1p(np.exp(z)))  # torch's softplus (threshold 20)
            new[name] = p + rule.step_mult * (hidden @ w2.T + b2).reshape(p.shape)
        params = new
        out.append(params)
    return out


@pytest.mark.parametrize(("history", "hidden", "steps"), [(25, 50, 4), (3, 6, 7)], ids=["paper", "wrapping"])
def test_steps_match_a_numpy_oracle_on_every_rank(history: int, hidden: int, steps: int) -> None:
    """Several steps (the short history fills and shifts out), randomised weights, float64, every tensor rank."""
    rule = randomised(LiMalikRule(history, hidden, step_mult=0.3).double())
    g = torch.Generator().manual_seed(1)
    params = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
    gradients = [{name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
                 for _ in range(steps)]
    losses = (3.0 - torch.rand(steps, generator=g, dtype=torch.float64).cumsum(0)).tolist()
    expected = oracle(rule, {k: v.numpy() for k, v in params.items()},
                      [{k: v.numpy() for k, v in step.items()} for step in gradients], losses)
    state, ours = rule.init(params), params
    with torch.no_grad():
        for t, (grads, loss) in enumerate(zip(gradients, losses)):
            ours, state = rule.step(ours, grads, state, StepInfo(t, torch.tensor(loss, dtype=torch.float64)))
            assert int(state["step"]) == t + 1 and state["grads"]["weight"].shape == (3, 4, history)
            for name, shape in SHAPES.items():
                assert ours[name].shape == shape
                np.testing.assert_allclose(ours[name].numpy(), expected[t][name], rtol=1e-12, atol=1e-14)


def test_the_untrained_policy_is_normalised_gradient_descent() -> None:
    """θ ← θ − step_mult · g / s_g at every step (s_g the running RMS); the objective's history does not matter."""
    rule = LiMalikRule(step_mult=0.05, generator=torch.Generator().manual_seed(0)).double()
    g = torch.Generator().manual_seed(2)
    params = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
    state, v = rule.init(params), 0.0
    for t in range(3):
        grads = {name: torch.randn(shape, generator=g, dtype=torch.float64) for name, shape in SHAPES.items()}
        new, state = rule.step(params, grads, state, StepInfo(t, torch.tensor(5.0 - t, dtype=torch.float64)))
        v = 0.99 * v + 0.01 * torch.cat([x.reshape(-1) for x in grads.values()]).square().mean()
        scale = torch.sqrt(v / (1 - 0.99 ** (t + 1)))
        for name in SHAPES:
            torch.testing.assert_close(new[name], params[name] - 0.05 * grads[name] / scale, rtol=1e-12, atol=1e-14)
        params = new
    hidden, out = rule.policy[0], rule.policy[2]
    assert (hidden.in_features, hidden.out_features, out.out_features) == (50, 50, 1)
    assert torch.count_nonzero(out.weight) == 2 and torch.count_nonzero(hidden.weight[:2]) == 2


def test_the_torch_optimizer_makes_the_rules_own_steps_on_every_rank() -> None:
    model, x = model_with_every_rank(), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    rule = randomised(LiMalikRule(step_mult=0.01).double())
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = rule.init(params)
    opt = LiMalikOptimizer(model.parameters(), rule=rule)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    for t in range(4):
        leaves = {name: p.requires_grad_() for name, p in params.items()}
        loss = torch.func.functional_call(model, leaves, (x,)).square().mean()
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        with torch.no_grad():
            params, state = rule.step(leaves, grads, state, StepInfo(t, loss.detach()))
        if t % 2:
            opt.step(closure)
        else:  # the other way to give the loss
            opt.step(loss=closure())
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]), name
        assert torch.equal(opt.state[p]["grads"], state["grads"][name])
    assert opt.steps == 4 and torch.equal(opt.state["shared"]["changes"], state["changes"])


def test_state_dict_round_trip_mid_run_continues_identically() -> None:
    rule, data = randomised(LiMalikRule(step_mult=0.01).double()), torch.randn(6, 8, 1, 4, 4, dtype=torch.float64)

    def check(resumed: nn.Module, opt: LiMalikOptimizer) -> None:
        assert opt.steps == 3 and opt.state[resumed.conv.weight]["grads"].shape == (2, 1, 3, 3, 25)

    assert_resumes_mid_run(model_with_every_rank, lambda model: LiMalikOptimizer(model.parameters(), rule=rule), data,
                           check)


def test_meta_gradients_match_finite_differences_in_float64() -> None:
    """d/dφ Σ_t f(θ_t) through a 3-step second-order unroll on quadratics, against central differences.

    The engine hands rules the objective detached (StepInfo.loss), so the meta-gradient takes the objective's
    changes as constants; with their input weights at zero that is exact, and the weights still get gradients."""
    rule = randomised(LiMalikRule(step_mult=0.1).double())
    with torch.no_grad():
        rule.policy[0].weight[:, rule.history:] = 0.0
    assert_meta_gradients_match_finite_differences(rule, eps=1e-6)


def test_es_and_pes_particles_batch_under_vmap_as_in_a_loop() -> None:
    """The rule is pure tensor code: vmap over the perturbed particles gives the loop's estimate."""
    for family in (TruncatedES, PES):
        estimates = []
        for vmap in (False, True):
            learner = OptimizerLearner(LiMalikRule(generator=torch.Generator().manual_seed(0)), horizon=6)
            problems = optimizee_stream(LiMalikProblems("two-layer-net"), "train", seed=0)
            estimator = family(sigma=0.01, pairs=2, truncation=3, vmap=vmap)
            for iteration in range(3):  # PES's second truncation straddles the end of the first run
                learner.zero_grad()
                estimator.estimate(learner, problems, iteration)
            estimates.append(torch.cat([p.grad.reshape(-1) for p in learner.parameters()]))
        assert estimates[0].abs().sum() > 0
        torch.testing.assert_close(estimates[0], estimates[1], rtol=1e-4, atol=1e-5)


def test_es_meta_training_through_the_trainer_lowers_the_meta_loss(tmp_path) -> None:
    """The registered algorithm with antithetic ES and MetaTrainer on held-out logistic regressions; the checkpoint
    loads into the torch.optim optimizer."""
    config = RunConfig.from_dict({
        "data": {"name": "li-malik", "family": "logistic"},
        "algorithm": {"name": "li-malik", "horizon": 20, "truncation": 10, "estimator": "es", "pairs": 4,
                      "step_mult": 0.05},
        "trainer": {"iterations": 40, "meta_lr": 0.01, "eval_every": 100, "eval_episodes": 1,
                    "checkpoint_every": 100, "log_every": 100}, "device": "cpu"})
    experiment = build_experiment(config)
    learner, validation = experiment.learner, experiment.problems("val")
    problems = [validation.batch(i) for i in range(8)]
    before = torch.cat([learner.evaluate(p).values for p in problems]).mean()
    MetaTrainer(learner, experiment.problems("train"), config, estimator=experiment.estimator,
                run_dir=tmp_path).fit()
    after = torch.cat([learner.evaluate(p).values for p in problems]).mean()
    assert after < 0.9 * before
    opt = LiMalikOptimizer(torch.nn.Linear(2, 1).parameters(), checkpoint=tmp_path / "last.pt")
    for (name, a), b in zip(opt.rule.state_dict().items(), learner.rule.state_dict().values()):
        assert torch.equal(a, b), name


LI_MALIK_OPTIONS = ("horizon", "truncation", "estimator", "second_derivatives", "sigma", "pairs", "tasks",
                    "min_horizon", "random_offset", "max_loss", "vmap_particles", "history", "hidden_size",
                    "step_mult")


def test_registered_options_build_the_learner_with_es_and_refuse_others() -> None:
    found = entry("algorithm", "li-malik")
    assert found.options is LiMalikOptions and found.problems == "optimizees"
    assert tuple(LiMalikOptions.field_names()) == LI_MALIK_OPTIONS
    learner, estimator = found.build(LiMalikOptions(history=5, hidden_size=8, horizon=8, truncation=4),
                                     BuildContext(None, None))
    assert isinstance(learner.rule, LiMalikRule) and isinstance(estimator, TruncatedES)
    assert learner.rule.history == 5 and learner.rule.policy[0].in_features == 10
    assert (learner.horizon, estimator.truncation, learner.rule.step_mult) == (8, 4, 0.1)
    assert isinstance(found.build(LiMalikOptions(estimator="pes"), BuildContext(None, None))[1], PES)
    with pytest.raises(ConfigError, match="option 'step_mult' must be > 0"):
        LiMalikOptions(step_mult=0.0)
    with pytest.raises(ConfigError, match="option 'second_derivatives' is of backpropagation"):
        LiMalikOptions(second_derivatives=True)
    with pytest.raises(ConfigError, match=f"is not an option of algorithm 'li-malik'; its options are "
                                          f"{', '.join(LI_MALIK_OPTIONS)}$"):
        Section.from_dict("algorithm", {"name": "li-malik", "hidden": 4})


def test_the_loss_is_required_and_bad_inputs_are_named(tmp_path) -> None:
    rule = LiMalikRule()
    params = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=re.escape("LiMalikRule reads the objective f(θ_t) of every step")):
        rule.step(params, {"w": torch.ones(2)}, rule.init(params), StepInfo(0))
    w = torch.zeros(2, requires_grad=True)
    opt = LiMalikOptimizer([w], rule=rule)
    assert opt.step() is None  # no gradient yet: nothing to do, nothing read
    w.sum().backward()
    with pytest.raises(ValueError, match=re.escape("LiMalikOptimizer reads the loss of every step: call "
                                                   "opt.step(closure)")):
        opt.step()
    with pytest.raises(ValueError, match="give step\\(\\) a closure or a loss, not both"):
        opt.step(lambda: w.sum(), loss=1.0)
    with pytest.raises(ValueError, match="must be a finite number >= 0, got -1.0"):
        LiMalikOptimizer([w], rule=rule, lr=-1.0)
    with pytest.raises(ValueError, match="exactly one of them; got none"):
        LiMalikOptimizer([w])
    with pytest.raises(ValueError, match="exactly one of them; got \\['rule', 'checkpoint'\\]"):
        LiMalikOptimizer([w], rule=rule, checkpoint=tmp_path / "best.pt")
    with pytest.raises(ValueError, match="at least one parameter"):
        rule.init({})
    with pytest.raises(ValueError, match="needs history >= 1, hidden_size >= 2 and step_mult > 0, got history=0"):
        LiMalikRule(history=0)
    with pytest.raises(ValueError, match="hidden_size=1"):
        LiMalikRule(hidden_size=1)
