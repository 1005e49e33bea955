"""The Andrychowicz et al. LSTM optimizer: inputs, meta-gradients, SGD as a special case, the torch.optim wrapper."""

from __future__ import annotations

import copy
import functools
import io
from pathlib import Path

import pytest
import torch

from metaopt.algorithms.lstm_optimizer import L2LOptions, LearnedOptimizer, LSTMOptimizerRule
from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.coordinatewise import LSTMState, preprocess
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import StepInfo
from metaopt.estimators import TruncatedBackprop
from metaopt.evaluation.tuned_baselines import run_optimizer
from metaopt.options import ConfigError
from metaopt.problems.optimizees import optimizee_stream
from metaopt.registry import BuildContext, entry
from metaopt.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metaopt.training.config import RunConfig, Section, load_preset
from metaopt.training.experiment import build_experiment
from metaopt.training.trainer import MetaTrainer

#: A metaopt 0.1 LearnedOptimizerTrainer run (config.json and best.pt; see tests/fixtures/legacy/README.md).
LEGACY_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "legacy" / "l2l-quadratics"


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


def hparams(rule: LSTMOptimizerRule) -> tuple:
    """The constructor's arguments of ``rule``: preprocessing, p, output_scale, hidden, layers."""
    return rule.preprocessing, rule.p, rule.output_scale, rule.lstm.hidden, len(rule.lstm.cells)


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
    score, trajectory = OptimizerLearner(rule, horizon=4).truncation(problem, params, None, start=0, steps=4)
    score.loss.backward()
    assert score.step_losses.shape == (5,) and len(trajectory.params) == 5  # f(θ_0), ..., f(θ_4)
    torch.testing.assert_close(score.loss.detach(), score.step_losses[1:].sum())  # the meta-loss: f(θ_1) + ... + f(θ_4)
    for name, p in rule.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradients_enter_as_constants_unless_second_derivatives() -> None:
    """The rule is pure (it passes d∇/dθ on); the learner's first_order, the paper's choice, makes ∇ a constant."""
    problem = quadratic()
    rule = LSTMOptimizerRule()
    theta = problem.init_params()["theta"].requires_grad_()
    first = OptimizerLearner(rule, horizon=1, first_order=True).inner.unroll(problem, {"theta": theta}, steps=1)
    (jacobian,) = torch.autograd.grad(first.params[-1]["theta"].sum(), theta)
    assert torch.equal(jacobian, torch.ones_like(theta))  # θ + update(constant gradient): identity only
    second = OptimizerLearner(rule, horizon=1, first_order=False).inner.unroll(problem, {"theta": theta}, steps=1)
    (jacobian,) = torch.autograd.grad(second.params[-1]["theta"].sum(), theta)
    assert not torch.allclose(jacobian, torch.ones_like(theta))


def test_first_order_meta_gradient_equals_detaching_the_gradients_by_hand() -> None:
    problem = Quadratics(dim=4, batch=3, dtype=torch.float64).sample(seed=0)
    first = OptimizerLearner(LSTMOptimizerRule().double(), horizon=3, first_order=True)
    second = OptimizerLearner(LSTMOptimizerRule().double(), horizon=3, first_order=False)
    second.load_state_dict(first.state_dict())
    params = problem.init_params()

    score, _ = first.truncation(problem, params, None, start=0, steps=3)
    ours = torch.autograd.grad(score.loss, list(first.parameters()))
    torch.testing.assert_close(first.meta_loss(problem)[0], score.loss)  # a whole run of the horizon is one truncation

    theta, state, by_hand = params["theta"].requires_grad_(), second.rule.init(params), 0
    for t in range(3):
        (grad,) = torch.autograd.grad(problem.loss({"theta": theta}, t), theta)  # no graph: a constant
        new, state = second.rule.step({"theta": theta}, {"theta": grad}, state, StepInfo(t))
        theta = new["theta"]
        by_hand = by_hand + problem.loss({"theta": theta}, t + 1)
    expected = torch.autograd.grad(by_hand, list(second.parameters()))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)

    score, _ = second.truncation(problem, params, None, start=0, steps=3)
    full = torch.autograd.grad(score.loss, list(second.parameters()))
    assert not all(torch.allclose(a, b) for a, b in zip(full, expected))


def test_a_network_that_outputs_minus_lr_gradient_is_sgd() -> None:
    problem = quadratic()
    rule = SGDNetwork(lr=0.01)
    sgd = functools.partial(torch.optim.SGD, lr=0.01)
    torch.testing.assert_close(OptimizerLearner(rule, horizon=10).losses(problem), run_optimizer(sgd, problem, 10),
                               rtol=1e-6, atol=0)
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
            params, state = rule.step({"theta": theta}, {"theta": grad}, state, StepInfo(t))
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
    """OptimizerLearner + TruncatedBackprop + MetaTrainer; best.pt and last.pt hold the trained rule."""
    config = RunConfig.from_dict({
        "data": {"name": "quadratics", "dim": 3, "batch": 2},
        "algorithm": {"name": "l2l", "preprocessing": True, "output_scale": 0.1, "lstm_units": 6, "horizon": 4,
                      "truncation": 2},
        "trainer": {"iterations": 4, "eval_every": 100, "eval_episodes": 1, "checkpoint_every": 100, "log_every": 1}})
    rule = LSTMOptimizerRule(preprocessing=True, output_scale=0.1, hidden=6)
    untrained = copy.deepcopy(rule.state_dict())
    family = Quadratics(dim=3, batch=2)
    MetaTrainer(OptimizerLearner(rule, horizon=4), optimizee_stream(family, "train", seed=0), config,
                estimator=TruncatedBackprop(truncation=2), val_problems=optimizee_stream(family, "val", seed=0),
                run_dir=tmp_path).fit()
    assert any(not torch.equal(v, untrained[k]) for k, v in rule.state_dict().items())  # it was trained
    model = torch.nn.Linear(2, 1)
    opt = LearnedOptimizer(model.parameters(), checkpoint=tmp_path / "best.pt")  # evaluated at the end only: the last
    for loaded in (opt.rule, LSTMOptimizerRule.from_checkpoint(tmp_path / "last.pt")):
        assert hparams(loaded) == hparams(rule) == (True, 10.0, 0.1, 6, 2)
        assert loaded.state_dict().keys() == rule.state_dict().keys()
        for (name, a), b in zip(loaded.state_dict().items(), rule.state_dict().values()):
            assert torch.equal(a, b), name


def test_a_rule_trained_by_metaopt_0_1_loads_from_its_checkpoint(tmp_path) -> None:
    """LearnedOptimizerTrainer checkpoints of metaopt 0.1 (rule_class, rule_hparams, rule) still load."""
    legacy = load_checkpoint(LEGACY_RUN / "best.pt")
    opt = LearnedOptimizer(torch.nn.Linear(2, 1).parameters(), checkpoint=LEGACY_RUN / "best.pt")
    assert legacy["rule_hparams"] == {"preprocessing": False, "p": 10.0, "output_scale": 1.0,
                                      "second_derivatives": False, "hidden": 20, "layers": 2}
    assert hparams(opt.rule) == (False, 10.0, 1.0, 20, 2)
    assert opt.rule.state_dict().keys() == legacy["rule"].keys()
    for name, value in opt.rule.state_dict().items():
        assert torch.equal(value, legacy["rule"][name]), name
    rule = LSTMOptimizerRule(preprocessing=True, p=5.0, output_scale=0.1, hidden=6, layers=3).double()
    save_checkpoint(tmp_path / "best.pt", {"rule_class": "LSTMOptimizerRule", "rule": rule.state_dict(),
                                           "rule_hparams": {"preprocessing": True, "p": 5.0, "output_scale": 0.1,
                                                            "second_derivatives": True, "hidden": 6, "layers": 3}})
    loaded = LSTMOptimizerRule.from_checkpoint(tmp_path / "best.pt")
    assert hparams(loaded) == (True, 5.0, 0.1, 6, 3) and next(loaded.parameters()).dtype == torch.float64
    for (name, a), b in zip(loaded.state_dict().items(), rule.state_dict().values()):
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
    config = load_preset("maml-sinusoid-5shot").replace(model={"hidden": [8]}, data={"meta_batch": 2}, trainer={
        "iterations": 1, "eval_every": 100, "checkpoint_every": 100, "log_every": 1})
    experiment = build_experiment(config)  # a run of another algorithm, in today's format
    MetaTrainer(experiment.learner, experiment.problems("train"), config, run_dir=tmp_path / "maml").fit()
    with pytest.raises(CheckpointError, match="holds a _SGD rule, not an LSTMOptimizerRule"):
        LearnedOptimizer(params, checkpoint=tmp_path / "maml" / "last.pt")


L2L_OPTIONS = ("preprocessing", "p", "output_scale", "lstm_units", "lstm_layers", "second_derivatives", "horizon",
               "truncation")


def test_registered_options_build_l2l_and_refuse_others() -> None:
    """The "l2l" entry builds the learner and its truncated estimator; p without preprocessing is refused."""
    found = entry("algorithm", "l2l")
    assert found.options is L2LOptions and found.problems == "optimizees"
    assert tuple(L2LOptions.field_names()) == L2L_OPTIONS
    context = BuildContext(None, quadratic())
    options = L2LOptions(preprocessing=True, output_scale=0.1, lstm_units=6, lstm_layers=3, horizon=8, truncation=4)
    learner, estimator = found.build(options, context)
    assert isinstance(learner, OptimizerLearner) and isinstance(estimator, TruncatedBackprop)
    assert isinstance(learner.rule, LSTMOptimizerRule) and hparams(learner.rule) == (True, 10.0, 0.1, 6, 3)
    assert (learner.horizon, learner.eval_steps, estimator.truncation, learner.inner.first_order) == (8, 8, 4, True)
    second, _ = found.build(L2LOptions(preprocessing=True, p=5.0, second_derivatives=True), context)
    assert second.rule.p == 5.0 and not second.inner.first_order
    default, estimator = found.build(L2LOptions(), context)
    assert hparams(default.rule) == (False, 10.0, 1.0, 20, 2) and (default.horizon, estimator.truncation) == (100, 20)
    with pytest.raises(ConfigError, match="option 'p' is the constant of the gradient preprocessing; it does nothing "
                                          "without preprocessing=True"):
        Section.from_dict("algorithm", {"name": "l2l", "p": 5.0})
    with pytest.raises(ConfigError, match=r"option 'truncation' \(30\) must not exceed the horizon \(20\)"):
        L2LOptions(horizon=20, truncation=30)
    listed = ", ".join(L2L_OPTIONS)
    for option in ("hidden", "inner_lr", "unroll"):
        with pytest.raises(ConfigError, match=rf"^'{option}'( \(did you mean '\w+'\?\))? is not an option of "
                                              rf"algorithm 'l2l'; its options are {listed}$"):
            Section.from_dict("algorithm", {"name": "l2l", option: 1})
