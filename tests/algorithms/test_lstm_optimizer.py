"""The Andrychowicz et al. LSTM optimizer: inputs, meta-gradients, SGD as a special case, the torch.optim wrapper."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import torch

from metaopt.algorithms.lstm_optimizer import L2LOptions, LearnedOptimizer, LSTMOptimizerRule, _pack, _unpack
from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.coordinatewise import CHUNK, LSTMState, preprocess
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
from tests.algorithms.lopt_checks import assert_resumes_mid_run

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
    start = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def check(resumed: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        assert opt.state[resumed[0].weight]["step"] == 3

    assert_resumes_mid_run(lambda: copy.deepcopy(start), lambda model: LearnedOptimizer(model.parameters(), rule=rule),
                           data, check)


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
    with pytest.raises(CheckpointError, match="is of a 'maml' run, a few-shot learner, not a learned optimizer"):
        LearnedOptimizer(params, checkpoint=tmp_path / "maml" / "last.pt")


def test_a_rule_loads_from_its_checkpoint_without_the_training_data(tmp_path) -> None:
    """Only the rule is rebuilt: a run on MNIST loads where no MNIST files are (no learner, no data read)."""
    rule = LSTMOptimizerRule(preprocessing=True, output_scale=0.1, hidden=6)
    config = load_preset("l2l-mnist").replace(algorithm={"lstm_units": 6}, data={"data_root": str(tmp_path / "none")})
    save_checkpoint(tmp_path / "best.pt", {"algorithm": "OptimizerLearner", "iteration": 3, "config": config.to_dict(),
                                           "model": {f"rule.{k}": v for k, v in rule.state_dict().items()}})
    loaded = LSTMOptimizerRule.from_checkpoint(tmp_path / "best.pt")
    assert hparams(loaded) == hparams(rule) == (True, 10.0, 0.1, 6, 2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), rule.state_dict().values()))


L2L_OPTIONS = ("horizon", "truncation", "estimator", "second_derivatives", "sigma", "pairs", "tasks", "min_horizon",
               "random_offset", "max_loss", "vmap_particles", "preprocessing", "p", "output_scale", "lstm_units",
               "lstm_layers")


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


def feed(opt: torch.optim.Optimizer, params: list[torch.Tensor], gradients: list[torch.Tensor],
         schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """One step on given gradients (so that runs with different multipliers see the same LSTM inputs)."""
    for p, g in zip(params, gradients):
        p.grad = g.clone()
    opt.step()
    if schedule is not None:
        schedule.step()


def test_step_lr_scales_the_rules_update_exactly() -> None:
    """θ ← θ + lr · s · W h: StepLR halves lr every step, and with it the update, bit for bit."""
    torch.manual_seed(0)
    rule = LSTMOptimizerRule(preprocessing=True, output_scale=0.1)
    gradients = [[torch.randn(3, 2), torch.randn(3)] for _ in range(4)]
    params = [torch.randn(3, 2), torch.randn(3)]
    opt = LearnedOptimizer(params, rule=rule)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    expected, state = [p.clone() for p in params], rule.init({"w": params[0], "b": params[1]})
    for t, grads in enumerate(gradients):
        lr = opt.param_groups[0]["lr"]
        assert lr == 0.5 ** t
        with torch.no_grad():
            update, state = rule.update(torch.cat([g.reshape(-1) for g in grads]), state)
        expected = [e + lr * u.view_as(e) for e, u in zip(expected, update.split([6, 3]))]
        feed(opt, params, grads, schedule)
        for p, e in zip(params, expected):
            assert torch.equal(p, e)
    full, halved = [torch.zeros(4)], [torch.zeros(4)]  # from zero, a parameter is its update
    feed(LearnedOptimizer(full, rule=rule), full, [torch.randn(4)])
    feed(LearnedOptimizer(halved, rule=rule, lr=0.5), halved, [full[0].grad])
    assert torch.equal(halved[0], 0.5 * full[0]) and full[0].abs().min() > 0


def test_lr_one_is_the_rules_own_step_and_groups_have_their_own_lr() -> None:
    problem, rule = quadratic(), LSTMOptimizerRule(output_scale=0.1)
    assert torch.equal(plain_loop(lambda ps: LearnedOptimizer(ps, rule=rule, lr=1.0), problem, 5),
                       plain_loop(lambda ps: LearnedOptimizer(ps, rule=rule), problem, 5))
    moving, frozen = torch.zeros(3), torch.ones(2)
    opt = LearnedOptimizer([{"params": [moving]}, {"params": [frozen], "lr": 0.0}], rule=rule, lr=2.0)
    assert [group["lr"] for group in opt.param_groups] == [2.0, 0.0]
    grads = [torch.randn(3), torch.randn(2)]
    feed(opt, [moving, frozen], grads)
    alone = torch.zeros(3)  # the LSTM runs on both parameters' coordinates as one batch; each row is its own
    feed(LearnedOptimizer([alone], rule=rule), [alone], grads[:1])
    assert torch.equal(moving, 2.0 * alone) and torch.equal(frozen, torch.ones(2))
    assert opt.state[frozen]["step"] == 1 and opt.state[frozen]["lstm"].abs().sum() > 0  # its state still advances


def test_a_scheduled_run_resumes_from_its_state_dicts_and_old_state_dicts_get_lr_one() -> None:
    torch.manual_seed(2)
    rule, gradients = LSTMOptimizerRule(preprocessing=True, output_scale=0.1), torch.randn(6, 5)

    def start(params: list[torch.Tensor]) -> tuple[LearnedOptimizer, torch.optim.lr_scheduler.StepLR]:
        opt = LearnedOptimizer(params, rule=rule)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)

    theta = [torch.zeros(5)]
    opt, schedule = start(theta)
    for g in gradients[:3]:
        feed(opt, theta, [g], schedule)
    saved = copy.deepcopy({"theta": theta[0], "opt": opt.state_dict(), "schedule": schedule.state_dict()})
    for g in gradients[3:]:
        feed(opt, theta, [g], schedule)
    resumed = [saved["theta"].clone()]
    opt2, schedule2 = start(resumed)
    opt2.load_state_dict(saved["opt"])
    schedule2.load_state_dict(saved["schedule"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    for g in gradients[3:]:
        feed(opt2, resumed, [g], schedule2)
    assert torch.equal(resumed[0], theta[0])

    old = copy.deepcopy(saved["opt"])  # written before groups had an lr
    for group in old["param_groups"]:
        del group["lr"]
    opt3 = LearnedOptimizer([saved["theta"].clone()], rule=rule, lr=0.5)
    opt3.load_state_dict(old)
    assert opt3.param_groups[0]["lr"] == 1.0


@pytest.mark.parametrize("lr", [-0.1, float("nan"), float("inf"), "0.5", True])
def test_a_bad_lr_multiplier_is_named(lr: object) -> None:
    message = (f"LearnedOptimizer's lr multiplies the learned rule's update and must be a finite number >= 0, got "
               f"{lr!r}; pass lr=1.0 (the rule as trained) or a fraction such as lr=0.5")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        LearnedOptimizer([torch.zeros(2)], rule=LSTMOptimizerRule(), lr=lr)
    with pytest.raises(ValueError, match=re.escape(message)):
        LearnedOptimizer([{"params": [torch.zeros(2)], "lr": lr}], rule=LSTMOptimizerRule())


def test_rule_checkpoint_and_pretrained_exclude_each_other() -> None:
    with pytest.raises(ValueError, match=re.escape("exactly one of them; got ['rule', 'pretrained']")):
        LearnedOptimizer([torch.zeros(2)], rule=LSTMOptimizerRule(), pretrained="l2l-mnist")
    with pytest.raises(ValueError, match=re.escape("exactly one of them; got none")):
        LearnedOptimizer([torch.zeros(2)])


def test_the_shared_state_buffer_follows_the_parameters_with_a_gradient_and_state_dicts_are_snapshots() -> None:
    """The LSTM states of all parameters live in one buffer; a parameter without a gradient keeps its rows."""
    torch.manual_seed(0)
    rule = LSTMOptimizerRule(preprocessing=True, output_scale=0.1)
    a, b = torch.zeros(3), torch.zeros(2)
    opt = LearnedOptimizer([a, b], rule=rule)
    state = rule.init({"a": a, "b": b})
    for present in ([a, b], [a], [a, b]):  # b has no gradient at the second step
        grads = [torch.randn(p.shape) for p in present]
        with torch.no_grad():
            rows = [s[:, :3] for s in _pack(state)] if len(present) == 1 else list(_pack(state))
            _, new = rule.update(torch.cat(grads), _unpack(torch.stack(rows)))
        packed = _pack(new)
        state = _unpack(packed if len(present) == 2 else torch.cat([packed, _pack(state)[:, :, 3:]], dim=2))
        snapshot = opt.state_dict()
        before = {k: v["lstm"].clone() for k, v in snapshot["state"].items()}
        a.grad = b.grad = None
        feed(opt, present, grads)
        assert all(torch.equal(snapshot["state"][k]["lstm"], v) for k, v in before.items())  # the step left it
        assert torch.equal(torch.cat([opt.state[a]["lstm"], opt.state[b]["lstm"]], dim=2), _pack(state))
    assert (opt.state[a]["step"], opt.state[b]["step"]) == (3, 2)
    assert opt.state_dict()["state"][1]["lstm"].untyped_storage().nbytes() == 2 * 2 * 2 * 20 * 4  # its rows only


def test_a_step_over_several_chunks_of_coordinates_is_the_rules_update_on_all_of_them() -> None:
    torch.manual_seed(0)
    rule = LSTMOptimizerRule(preprocessing=True, output_scale=0.1)
    params = [torch.zeros(2 * CHUNK + 5), torch.zeros(7, 3)]  # three chunks, one cut through the first tensor
    opt = LearnedOptimizer(params, rule=rule)
    state = rule.init({"a": params[0], "b": params[1]})
    expected = [p.clone() for p in params]
    for _ in range(2):
        grads = [torch.randn(p.shape) for p in params]
        with torch.enable_grad():  # the reference: the rule on every coordinate at once
            update, state = rule.update(torch.cat([g.reshape(-1) for g in grads]), state)
        expected = [e + u.detach().view_as(e) for e, u in zip(expected, update.split([p.numel() for p in params]))]
        feed(opt, params, grads)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([opt.state[p]["lstm"] for p in params], dim=2), _pack(state).detach(),
                               rtol=1e-6, atol=1e-7)
