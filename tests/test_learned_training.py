"""Meta-training of learned optimizers: the truncated meta-loss, learning, best.pt, exact resume, baseline tuning."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from metaopt.algorithms.lstm_optimizer import LSTMOptimizerRule
from metaopt.checkpoint import CheckpointError, load_checkpoint
from metaopt.learned_training import LearnedOptimizerTrainer, run_optimizer, truncated_unroll, tune_learning_rate
from metaopt.logging import read_metrics
from metaopt.optimizees import Quadratic, Quadratics


class Parabola:
    """``f(θ) = θ²`` from θ_0 = 1: gradient descent with rate lr multiplies θ by ``1 - 2 lr`` per step."""

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"theta": torch.ones(1)}

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        del step
        return params["theta"].square().sum()


class Parabolas:
    def sample(self, seed: int) -> Parabola:
        del seed
        return Parabola()


class NaNQuadratics(Quadratics):
    """Quadratics that start at NaN: every loss and meta-gradient is NaN."""

    def sample(self, seed: int) -> Quadratic:
        problem = super().sample(seed)
        problem.theta0 = torch.full_like(problem.theta0, math.nan)
        return problem


def trainer(run_dir=None, epochs: int = 4, **kwargs) -> LearnedOptimizerTrainer:
    torch.manual_seed(0)
    options = {"steps": 8, "unroll": 4, "meta_lr": 0.01, "eval_every": 2, "val_problems": 2, **kwargs}
    return LearnedOptimizerTrainer(LSTMOptimizerRule(), Quadratics(dim=4, batch=4), epochs=epochs, run_dir=run_dir,
                                   **options)


def test_the_meta_loss_of_a_truncation_sums_the_losses_after_each_update() -> None:
    rule, problem = LSTMOptimizerRule(), Quadratics(batch=4).sample(seed=3)
    losses = run_optimizer(rule, problem, steps=10)
    params = problem.init_params()
    meta_loss, params, state, first = truncated_unroll(rule, problem, params, rule.init(params), start=0, length=5)
    torch.testing.assert_close(first, losses[1:6])
    torch.testing.assert_close(meta_loss.detach(), losses[1:6].sum())
    _, _, _, second = truncated_unroll(rule, problem, params, state, start=5, length=5)
    torch.testing.assert_close(second, losses[6:])


def test_meta_training_lowers_the_validation_loss() -> None:
    torch.manual_seed(0)
    run = LearnedOptimizerTrainer(LSTMOptimizerRule(), Quadratics(batch=8), epochs=20, steps=20, unroll=5,
                                  meta_lr=0.01, eval_every=5, val_problems=4)
    untrained = run.validate()
    summary = run.fit()
    assert summary["epoch"] == 20 and summary["nonfinite_skipped"] == 0
    assert summary["best"]["value"] < 0.1 * untrained


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path) -> None:
    whole = trainer(tmp_path / "whole")
    whole.fit()
    trainer(tmp_path / "cut", epochs=2).fit()
    torch.manual_seed(123)  # another rule initialisation and global random state: the checkpoint restores both
    resumed = LearnedOptimizerTrainer(LSTMOptimizerRule(), Quadratics(dim=4, batch=4), epochs=4, steps=8, unroll=4,
                                      meta_lr=0.01, eval_every=2, val_problems=2, run_dir=tmp_path / "cut")
    summary = resumed.fit(resume=True)
    assert summary["epoch"] == 4 and resumed.best == whole.best
    for a, b in zip(whole.rule.parameters(), resumed.rule.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(whole.optimizer.state.values(), resumed.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    def untimed(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(tmp_path / run)]

    assert untimed("cut/metrics.jsonl") == untimed("whole/metrics.jsonl")


def test_best_pt_holds_the_best_validated_rule(tmp_path) -> None:
    run = trainer(tmp_path, epochs=6, eval_every=1, meta_lr=0.2)
    run.fit()
    val = {r["iteration"]: r["val/loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(val) == list(range(1, 7))
    best_epoch = min(val, key=val.get)
    assert best_epoch < 6  # with this seed the last rule is not the best, so the selection is tested
    state = load_checkpoint(tmp_path / "best.pt")
    assert state["epoch"] == best_epoch and state["best"] == {"value": val[best_epoch], "epoch": best_epoch}
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 6
    assert (tmp_path / "config.json").exists() and list(tmp_path.glob("events.out.tfevents.*"))
    run.rule.load_state_dict(state["rule"])
    assert run.validate() == val[best_epoch]


def test_runs_refuse_to_overwrite_or_resume_with_other_settings(tmp_path) -> None:
    trainer(tmp_path, epochs=1).fit()
    with pytest.raises(CheckpointError, match="already holds a run"):
        trainer(tmp_path, epochs=1).fit()
    with pytest.raises(CheckpointError, match=r"differs from this trainer's settings in \['unroll'\]"):
        trainer(tmp_path, epochs=2, unroll=2).fit(resume=True)
    trainer(tmp_path, epochs=2).fit(resume=True)  # more epochs is allowed


def test_non_finite_truncations_take_no_meta_step() -> None:
    torch.manual_seed(0)
    run = LearnedOptimizerTrainer(LSTMOptimizerRule(), NaNQuadratics(dim=3, batch=2), epochs=2, steps=4, unroll=2,
                                  val_problems=1)
    before = [p.detach().clone() for p in run.rule.parameters()]
    summary = run.fit()
    assert summary["nonfinite_skipped"] == 2 and summary["best"] is None
    assert all(torch.equal(a, b) for a, b in zip(before, run.rule.parameters()))


def test_tune_learning_rate_picks_the_best_rate_and_ranks_divergence_last() -> None:
    # |1 - 2 lr| per step: 0.4 at lr 0.3 (best of the grid), 1 at lr 1, 5 at lr 3 (overflows to inf/NaN in 60 steps)
    assert run_optimizer(functools.partial(torch.optim.SGD, lr=3.0), Parabola(), 60)[-1].isnan()
    assert tune_learning_rate(torch.optim.SGD, Parabolas(), seeds=[0], steps=60) == 0.3
    assert tune_learning_rate(torch.optim.SGD, Parabolas(), seeds=[0], steps=60, grid=(3.0, 0.01)) == 0.01
    assert tune_learning_rate(torch.optim.SGD, Parabolas(), seeds=[0], steps=60, grid=(1.0, 0.1),
                              criterion="sum") == 0.1
    with pytest.raises(ValueError, match="no learning rate of"):
        tune_learning_rate(torch.optim.SGD, Parabolas(), seeds=[0], steps=60, grid=(3.0,))
    with pytest.raises(ValueError, match="unknown criterion"):
        tune_learning_rate(torch.optim.SGD, Parabolas(), seeds=[0], steps=60, criterion="best")
