"""Truncated backpropagation (metaopt/estimators/truncated.py) through a learned optimizer's unroll
(metaopt/engine/optimizer_learner.py): the truncated meta-loss and its gradient against a hand-written unroll,
carried θ and rule state, one problem per run, learning, best.pt, exact resume, non-finite truncations."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.algorithms.lstm_optimizer import LSTMOptimizerRule
from metaopt.datasets.quadratics import Quadratic, Quadratics
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates, StepInfo
from metaopt.estimators import Estimator, TruncatedBackprop
from metaopt.evaluation import evaluate
from metaopt.problems.optimizees import Optimizee, OptimizeeStream, optimizee_stream
from metaopt.training.checkpoint import CheckpointError, load_checkpoint
from metaopt.training.config import TrainerConfig, load_preset
from metaopt.training.experiment import build_experiment
from metaopt.training.logging import read_metrics
from metaopt.training.trainer import MetaTrainer


class NaNQuadratics(Quadratics):
    """Quadratics that start at NaN: every loss and meta-gradient is NaN."""

    def sample(self, seed: int) -> Quadratic:
        problem = super().sample(seed)
        return Quadratic(problem.w, problem.y, torch.full_like(problem.theta0, math.nan))


class Recorded:
    """A problem source that records which problems were read."""

    def __init__(self, family, first: int = 0) -> None:
        self.stream = OptimizeeStream(family, first)
        self.read: list[int] = []

    def batch(self, index: int) -> Optimizee:
        self.read.append(index)
        return self.stream.batch(index)


def hand_unroll(rule, problem: Optimizee, params: dict, state, start: int, length: int,
                second_order: bool = False) -> tuple[torch.Tensor, dict, object, torch.Tensor]:
    """The truncated meta-loss Σ_{t=start+1..start+length} f(θ_t), written out step by step (Andrychowicz et al. §2).

    θ and the state enter as constants; the optimizee's gradients are constants unless ``second_order``.
    """
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    state = rule.init(params) if state is None else [(h.detach(), c.detach()) for h, c in state]  # LSTM (h, c)
    losses = []
    for t in range(start, start + length):
        loss = problem.loss(params, t)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
        grads = dict(zip(params, grads if second_order else (g.detach() for g in grads)))
        params, state = rule.step(params, grads, state, StepInfo(t, loss.detach()))
        losses.append(problem.loss(params, t + 1))
    stacked = torch.stack(losses)
    return stacked.sum(), params, state, stacked.detach()


def rule_grads(learner: OptimizerLearner) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in learner.named_parameters()}


def test_the_meta_loss_of_a_truncation_sums_the_losses_after_each_update() -> None:
    torch.manual_seed(0)
    learner = OptimizerLearner(LSTMOptimizerRule(), horizon=10)
    problem = Quadratics(batch=4).sample(seed=3)
    losses = learner.losses(problem, steps=10)
    assert losses.shape == (11,) and torch.equal(losses, learner.losses(problem))  # the horizon by default
    score, trajectory = learner.truncation(problem, problem.init_params(), None, start=0, steps=5)
    torch.testing.assert_close(score.step_losses[1:], losses[1:6])
    torch.testing.assert_close(score.step_losses[0], losses[0])
    torch.testing.assert_close(score.loss.detach(), losses[1:6].sum())
    assert (trajectory.start, trajectory.end, len(trajectory.params)) == (0, 5, 6)
    second, _ = learner.truncation(problem, trajectory.params[-1], trajectory.state, start=5, steps=5)
    torch.testing.assert_close(second.step_losses[1:], losses[6:])
    whole, _ = learner.meta_loss(problem)
    torch.testing.assert_close(whole.detach(), losses[1:].sum())


@pytest.mark.parametrize("second_order", [False, True], ids=["first-order", "second derivatives"])
def test_each_call_backpropagates_one_truncation_from_the_carried_parameters_and_state(second_order: bool) -> None:
    """Three calls on a horizon of 5 in truncations of 2: steps 0-2, 2-4, 4-5, each against the hand-written unroll."""
    torch.manual_seed(0)
    learner = OptimizerLearner(LSTMOptimizerRule(hidden=6), horizon=5, first_order=not second_order)
    reference = LSTMOptimizerRule(hidden=6)
    reference.load_state_dict(learner.rule.state_dict())
    problems = Recorded(Quadratics(dim=3, batch=2))
    estimator = TruncatedBackprop(truncation=2)
    problem = problems.stream.batch(0)
    params, state = problem.init_params(), None
    for start, length in ((0, 2), (2, 2), (4, 1)):
        learner.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        estimate = estimator.estimate(learner, problems, iteration=start)
        meta_loss, params, state, losses = hand_unroll(reference, problem, params, state, start, length, second_order)
        meta_loss.backward()
        assert estimate.loss == pytest.approx(losses.mean().item(), rel=1e-6)
        assert estimate.metrics == {"loss": estimate.loss}
        expected = {f"rule.{name}": p.grad for name, p in reference.named_parameters()}
        for name, grad in rule_grads(learner).items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert problems.read == [0] and estimator.started == 1
    assert estimator.state_dict() == {"started": 1, "carried": None}  # the run is over: the next call starts problem 1
    estimator.estimate(learner, problems, iteration=3)
    assert problems.read == [0, 1] and estimator.state_dict()["carried"]["step"] == 2


def test_runs_of_consecutive_problems_follow_the_stream_whatever_the_iteration() -> None:
    learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=4)
    problems = Recorded(Quadratics(dim=3, batch=2), first=50)
    estimator = TruncatedBackprop(truncation=2)
    for i in range(7):
        estimator.estimate(learner, problems, iteration=100 + i)  # the problem index is the estimator's count
    assert problems.read == [0, 1, 2, 3] and estimator.started == 4


def test_a_truncation_longer_than_the_rest_of_the_run_is_cut_at_the_horizon() -> None:
    learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.02)}, per_step=False), horizon=5)
    stream = OptimizeeStream(Quadratics(dim=3, batch=2), first=0)
    losses = learner.losses(stream.batch(0))
    estimator = TruncatedBackprop(truncation=3)
    first, second = (estimator.estimate(learner, stream, i).loss for i in range(2))
    assert first == pytest.approx(losses[1:4].mean().item(), rel=1e-6)
    assert second == pytest.approx(losses[4:6].mean().item(), rel=1e-6)  # steps 4 and 5 only
    assert estimator.state_dict()["carried"] is None
    with pytest.raises(ValueError, match="truncation must be >= 1, got 0"):
        TruncatedBackprop(truncation=0)


def test_the_carried_state_round_trips_and_continues_the_run_exactly() -> None:
    torch.manual_seed(0)
    learner = OptimizerLearner(LSTMOptimizerRule(hidden=6), horizon=6)
    stream = OptimizeeStream(Quadratics(dim=3, batch=2), first=0)
    whole = TruncatedBackprop(truncation=2)
    whole_losses = []
    for i in range(5):
        learner.zero_grad(set_to_none=True)
        whole_losses.append(whole.estimate(learner, stream, i).loss)
    grads = rule_grads(learner)
    cut = TruncatedBackprop(truncation=2)
    for i in range(2):
        cut.estimate(learner, stream, i)
    saved = cut.state_dict()
    assert saved["started"] == 1 and saved["carried"]["step"] == 4 and isinstance(cut, Estimator)
    assert sorted(saved["carried"]) == ["length", "params", "problem", "state", "step"]
    assert saved["carried"]["length"] == 6 and saved["carried"]["problem"] == 0
    assert not saved["carried"]["params"]["theta"].requires_grad  # detached: a truncation boundary
    resumed = TruncatedBackprop(truncation=2)
    resumed.load_state_dict(saved)  # rebuilds the live run's problem from the stream
    losses = []
    for i in range(2, 5):
        learner.zero_grad(set_to_none=True)
        losses.append(resumed.estimate(learner, stream, i).loss)
    assert losses == whole_losses[2:]
    for name, grad in rule_grads(learner).items():
        assert torch.equal(grad, grads[name]), name
    assert resumed.state_dict()["started"] == whole.state_dict()["started"] == 2


def test_a_non_finite_truncation_ends_its_run() -> None:
    learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=4)
    problems = Recorded(NaNQuadratics(dim=3, batch=2))
    estimator = TruncatedBackprop(truncation=2)
    estimate = estimator.estimate(learner, problems, 0)
    assert math.isnan(estimate.loss) and estimator.state_dict() == {"started": 1, "carried": None}
    estimator.estimate(learner, problems, 1)
    assert problems.read == [0, 1]  # the next call starts the next problem


def test_a_non_finite_meta_gradient_ends_its_run() -> None:
    learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=4)
    next(learner.parameters()).register_hook(lambda grad: grad * math.nan)  # finite loss, NaN meta-gradient
    estimator = TruncatedBackprop(truncation=2)
    estimate = estimator.estimate(learner, OptimizeeStream(Quadratics(dim=3, batch=2), first=0), 0)
    assert math.isfinite(estimate.loss) and estimate.metrics["loss"] == estimate.loss  # the loss was finite
    assert math.isnan(next(learner.parameters()).grad)  # the trainer skips the update on this gradient
    assert estimator.state_dict()["carried"] is None


# ----------------------------------------------------------- meta-training with the trainer (MetaTrainer)


def lstm_trainer(run_dir=None, iterations: int = 8, family: Quadratics | None = None, seed: int = 0,
                 truncation: int = 4, horizon: int = 8, **settings) -> MetaTrainer:
    """The old ``LearnedOptimizerTrainer(epochs=iterations / 2, steps=8, unroll=4, val_problems=2)``."""
    torch.manual_seed(seed)
    family = family or Quadratics(dim=4, batch=4)
    config = TrainerConfig(**{"iterations": iterations, "meta_lr": 0.01, "eval_every": 4, "eval_episodes": 2,
                              "log_every": 1, "checkpoint_every": 4, **settings})
    return MetaTrainer(OptimizerLearner(LSTMOptimizerRule(), horizon=horizon), optimizee_stream(family, "train", 0),
                       config, estimator=TruncatedBackprop(truncation), val_problems=optimizee_stream(family, "val", 0),
                       run_dir=run_dir)


def test_meta_training_lowers_the_validation_loss() -> None:
    """20 problems of 20 steps in truncations of 5 (80 meta-updates): a tenth of the untrained rule's loss."""
    run = lstm_trainer(iterations=80, family=Quadratics(batch=8), truncation=5, horizon=20, eval_every=20,
                       eval_episodes=4)
    untrained = evaluate(run.learner, run.val_problems, episodes=4).mean
    summary = run.fit()
    assert summary["iteration"] == 80 and summary["nonfinite_skipped"] == 0 and run.estimator.started == 20
    assert summary["best"]["value"] < 0.1 * untrained


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path) -> None:
    whole = lstm_trainer(tmp_path / "whole")
    whole.fit()
    lstm_trainer(tmp_path / "cut", iterations=4).fit()
    resumed = lstm_trainer(tmp_path / "cut", seed=123)  # another rule initialisation: the checkpoint restores it
    torch.manual_seed(123)  # and another global random state
    summary = resumed.fit(resume=True)
    assert summary["iteration"] == 8 and resumed.best == whole.best
    for a, b in zip(whole.learner.rule.parameters(), resumed.learner.rule.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    def untimed(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(tmp_path / run)]

    assert untimed("cut/metrics.jsonl") == untimed("whole/metrics.jsonl")


def test_best_pt_holds_the_best_validated_rule(tmp_path) -> None:
    run = lstm_trainer(tmp_path, iterations=12, eval_every=2, meta_lr=0.2)
    run.fit()
    val = {r["iteration"]: r["val/loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val/loss" in r}
    assert sorted(val) == list(range(2, 13, 2))
    best_iteration = min(val, key=val.get)
    assert best_iteration < 12  # with this seed the last rule is not the best, so the selection is tested
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["iteration"] == best_iteration
    assert {k: state["best"][k] for k in ("metric", "value", "iteration")} == {"metric": "loss",
                                                                              "value": val[best_iteration],
                                                                              "iteration": best_iteration}
    assert load_checkpoint(tmp_path / "last.pt")["iteration"] == 12
    assert (tmp_path / "config.json").exists() and list(tmp_path.glob("events.out.tfevents.*"))
    run.learner.load_state_dict(state["model"])
    assert evaluate(run.learner, run.val_problems, episodes=2).mean == val[best_iteration]


def test_runs_refuse_to_overwrite_or_resume_with_other_settings(tmp_path) -> None:
    config = load_preset("l2l-quadratics").replace(
        trainer={"iterations": 2, "eval_every": 2, "eval_episodes": 1, "checkpoint_every": 2},
        algorithm={"horizon": 4, "truncation": 2, "lstm_units": 4}, data={"dim": 3, "batch": 2}, device="cpu")

    def trainer(run_config) -> MetaTrainer:
        experiment = build_experiment(run_config)
        return MetaTrainer(experiment.learner, experiment.problems("train"), run_config,
                           estimator=experiment.estimator, val_problems=experiment.problems("val"), run_dir=tmp_path)

    trainer(config).fit()
    with pytest.raises(CheckpointError, match="already holds a run"):
        trainer(config).fit()
    with pytest.raises(CheckpointError, match=r"differs from this trainer's config in \['algorithm.truncation'\]"):
        trainer(config.replace(algorithm={"truncation": 1})).fit(resume=True)
    assert trainer(config.replace(trainer={"iterations": 4})).fit(resume=True)["iteration"] == 4  # more is allowed


def test_non_finite_truncations_take_no_meta_step() -> None:
    run = lstm_trainer(iterations=2, family=NaNQuadratics(dim=3, batch=2), truncation=2, horizon=4, eval_episodes=1)
    before = [p.detach().clone() for p in run.learner.parameters()]
    summary = run.fit()
    assert summary["nonfinite_skipped"] == 2 and summary["best"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, run.learner.parameters()))
    assert run.estimator.started == 2  # each non-finite truncation ended its run
