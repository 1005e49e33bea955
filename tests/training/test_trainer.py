"""Tests of metaopt/training/trainer.py (and the logging it drives): updates, clipping, evaluation, best
checkpoint, exact resume, non-finite meta-updates, time budget; for both kinds of learner, a few-shot
MetaLearner estimated by Backprop and a learned optimizer (OptimizerLearner) estimated by TruncatedBackprop."""

from __future__ import annotations

import math
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from metaopt.algorithms import MAML
from metaopt.algorithms.lstm_optimizer import LSTMOptimizerRule
from metaopt.datasets import Sinusoid
from metaopt.datasets.quadratics import Quadratic, Quadratics
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import sgd
from metaopt.estimators import Backprop, TruncatedBackprop
from metaopt.models import MLP
from metaopt.problems.episode import Episode
from metaopt.problems.optimizees import OptimizeeStream
from metaopt.problems.sampling import EpisodeSampler
from metaopt.training.checkpoint import load_checkpoint
from metaopt.training.config import TrainerConfig
from metaopt.training.logging import read_metrics, truncate_metrics
from metaopt.training.trainer import MetaTrainer, NonFiniteError


def config(**changes) -> TrainerConfig:
    settings = {"iterations": 20, "eval_every": 10, "eval_episodes": 20, "log_every": 5, "checkpoint_every": 5}
    return TrainerConfig(**{**settings, **changes})


def tasks(seed: int = 0, batch_size: int = 4) -> Sinusoid:
    return Sinusoid(shots=5, query=10, batch_size=batch_size, seed=seed)


def maml(hidden: tuple[int, ...] = (8,), **kwargs) -> MAML:
    return MAML(MLP(1, 1, hidden=hidden), inner_lr=0.01, **kwargs)


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


class CrashError(Exception):
    """Stands for a crash in the middle of a run."""


class CrashingTasks(Sinusoid):
    """Sinusoid tasks whose batch ``crash_at`` raises, as if the process died there."""

    def __init__(self, crash_at: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.crash_at = crash_at

    def batch(self, index: int) -> Episode:
        if index == self.crash_at:
            raise CrashError
        return super().batch(index)


class SlowTasks(Sinusoid):
    """Sinusoid tasks that take at least ``seconds`` to sample, so that time passes at a known pace."""

    def __init__(self, seconds: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds

    def batch(self, index: int) -> Episode:
        time.sleep(self.seconds)
        return super().batch(index)


class NaNTasks(Sinusoid):
    """Sinusoid tasks whose query targets are NaN for the batch indices in ``bad``."""

    def __init__(self, bad, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bad = bad

    def batch(self, index: int) -> Episode:
        batch = super().batch(index)
        if index in self.bad:
            return Episode(batch.support_x, batch.support_y, batch.query_x, batch.query_y * math.nan, batched=True,
                           validate=False)
        return batch


def test_fit_writes_a_complete_run_directory(tmp_path):
    torch.manual_seed(0)
    trainer = MetaTrainer(maml(), tasks(), config(), val_problems=tasks(seed=1), run_dir=tmp_path)
    summary = trainer.fit()
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert {"train/loss", "train/query_loss_step0", "train/query_loss_step1", "train/grad_norm",
                "train/nonfinite_skipped", "lr/meta", "lr/inner", "time/tasks_per_s", "time/train_s",
                "time/train_cpu_s", "time/elapsed_s"} <= set(r)
        assert 0 < r["time/train_s"] < r["time/elapsed_s"]
        assert r["lr/meta"] == 1e-3 and r["lr/inner"] == pytest.approx(0.01)
        assert r["train/query_loss_step1"] == pytest.approx(r["train/loss"])
        assert ("val/mse" in r) == (r["iteration"] in (10, 20)) == ("val/mse_ci95" in r)
    assert summary["iteration"] == 20 and summary["nonfinite_skipped"] == 0 and summary["stopped_by"] == "iterations"
    assert summary["time"]["train_s"] == records[-1]["time/train_s"] < summary["time"]["total_s"]
    assert summary["val"]["metric"] == "mse" and summary["val"]["mean"] == records[-1]["val/mse"]
    assert summary["train_loss"] == records[-1]["train/loss"]
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["iteration"] == 20 and checkpoint["estimator"] == {"name": "Backprop", "settings": {},
                                                                                   "state": {}}
    assert isinstance(trainer.estimator, Backprop)  # the default estimator
    assert trainer.train_problems.seed == 0 and trainer.val_problems.seed == 1


def test_tensorboard_gets_every_figure_and_the_hparams(tmp_path):
    MetaTrainer(maml(), tasks(), config(iterations=10), val_problems=tasks(seed=1), run_dir=tmp_path).fit()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/query_loss_step0", "train/query_loss_step1", "val/mse", "val/mse_ci95",
            "time/tasks_per_s", "lr/meta", "lr/inner", "hparam/best_val"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_iteration_i_trains_on_batch_i_with_adam(tmp_path):
    torch.manual_seed(0)
    learner, reference = maml(), maml()
    reference.load_state_dict(learner.state_dict())
    sampler = tasks()
    MetaTrainer(learner, sampler, config(iterations=3, meta_lr=0.01), run_dir=None).fit()
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    for i in range(3):
        optimizer.zero_grad()
        reference.meta_loss(sampler.batch(i))[0].backward()
        optimizer.step()
    for a, b in zip(learner.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_track_steps_only_on_logging_iterations(monkeypatch):
    learner = maml()
    seen = []
    meta_loss = learner.meta_loss

    def spy(batch, track_steps=False):
        seen.append(track_steps)
        return meta_loss(batch, track_steps=track_steps)

    monkeypatch.setattr(learner, "meta_loss", spy)
    MetaTrainer(learner, tasks(), config(iterations=12, log_every=4)).fit()
    assert [i + 1 for i, tracked in enumerate(seen) if tracked] == [4, 8, 12]


def _one_sgd_step(**clipping) -> tuple[dict, dict, dict]:
    """Parameters before and after one SGD(lr=1) meta-step, and the unclipped meta-gradient."""
    torch.manual_seed(0)
    learner = maml()
    before = {k: v.detach().clone() for k, v in learner.named_parameters()}
    probe = maml()
    probe.load_state_dict(learner.state_dict())
    probe.meta_loss(tasks().batch(0))[0].backward()
    grads = {k: v.grad for k, v in probe.named_parameters()}
    MetaTrainer(learner, tasks(), config(iterations=1, meta_optimizer="sgd", meta_lr=1.0, **clipping)).fit()
    after = {k: v.detach() for k, v in learner.named_parameters()}
    return before, after, grads


def test_clipping_by_global_norm():
    before, after, grads = _one_sgd_step(grad_clip=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    assert norm > 1e-3
    for name, g in grads.items():
        torch.testing.assert_close(after[name], before[name] - g * 1e-3 / (norm + 1e-6))


def test_clipping_by_value():
    before, after, grads = _one_sgd_step(grad_clip_value=1e-4)
    for name, g in grads.items():
        torch.testing.assert_close(after[name], before[name] - g.clamp(-1e-4, 1e-4))
    assert any((g.abs() > 1e-4).any() for g in grads.values())


def test_clipping_by_value_comes_before_clipping_by_norm():
    before, after, grads = _one_sgd_step(grad_clip_value=1e-4, grad_clip=1e-4)
    clamped = {k: g.clamp(-1e-4, 1e-4) for k, g in grads.items()}
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in clamped.values()]))
    assert norm > 1e-4  # both clips act, so their order shows
    for name, g in clamped.items():
        torch.testing.assert_close(after[name], before[name] - g * 1e-4 / (norm + 1e-6))


def test_cosine_schedule_anneals_the_meta_lr(tmp_path):
    MetaTrainer(maml(), tasks(), config(lr_schedule="cosine", meta_lr=0.1, log_every=1, epoch_length=1),
                run_dir=tmp_path).fit()
    rates = [r["lr/meta"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert rates[0] == pytest.approx(0.1 * (1 + math.cos(math.pi / 20)) / 2)
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_cosine_schedule_steps_once_per_epoch_down_to_the_minimum(tmp_path):
    """MAML++'s CA: ``CosineAnnealingLR(T_max=epochs, eta_min)`` stepped per epoch (here 4 epochs of 5 iterations)."""
    MetaTrainer(maml(), tasks(), config(lr_schedule="cosine", meta_lr=0.1, min_meta_lr=0.01, log_every=1,
                                        epoch_length=5), run_dir=tmp_path).fit()
    rates = [r["lr/meta"] for r in read_metrics(tmp_path / "metrics.jsonl")]  # logged after iterations 1..20
    expected = [0.01 + 0.09 * (1 + math.cos(math.pi * min(i // 5, 4) / 4)) / 2 for i in range(1, 21)]
    assert rates == pytest.approx(expected)
    assert len(set(rates[:4])) == 1 and rates[0] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.01)


def test_the_trainer_sets_the_epoch_before_every_meta_update():
    seen = []

    class Recording(MAML):
        def set_epoch(self, epoch: int) -> None:
            seen.append(epoch)

    learner = Recording(MLP(1, 1, hidden=(4,)), inner_lr=0.01)
    seen.clear()
    MetaTrainer(learner, tasks(), config(iterations=7, epoch_length=3)).fit()
    assert seen == [0, 0, 0, 1, 1, 1, 2]


def test_best_checkpoint_has_the_lowest_mse(tmp_path):
    learner = maml(hidden=(16,))
    MetaTrainer(learner, tasks(), config(iterations=30, eval_every=3, meta_lr=0.02), val_problems=tasks(seed=1),
                run_dir=tmp_path).fit()
    evaluated = [(r["val/mse"], r["iteration"]) for r in read_metrics(tmp_path / "metrics.jsonl") if "val/mse" in r]
    assert len({mse for mse, _ in evaluated}) > 1
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["best"]["metric"] == "mse"
    assert (best["best"]["value"], best["iteration"]) == min(evaluated)
    assert best["best"]["iteration"] == best["iteration"]


def test_a_new_best_refreshes_last_pt_so_it_is_never_older_than_best_pt(tmp_path):
    with pytest.raises(CrashError):
        MetaTrainer(maml(hidden=(16,)), CrashingTasks(crash_at=4, shots=5, query=10, batch_size=4, seed=0),
                    config(iterations=100, eval_every=3, checkpoint_every=100, meta_lr=0.02),
                    val_problems=tasks(seed=1), run_dir=tmp_path / "cut").fit()
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["iteration"] == 3  # written with the new best at 3


def test_a_good_meta_update_ends_a_non_finite_streak(tmp_path):
    bad = {0, 1, 3, 4, 6, 7}  # never three in a row
    summary = MetaTrainer(maml(), NaNTasks(bad=bad, shots=5, query=10, batch_size=4, seed=0),
                          config(iterations=9, max_nonfinite=3)).fit()
    assert summary["iteration"] == 9 and summary["nonfinite_skipped"] == 6


def test_best_checkpoint_has_the_highest_accuracy(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = {c: torch.randn(1, 4, generator=generator) + 0.3 * torch.randn(12, 4, generator=generator)
            for c in range(6)}
    train = EpisodeSampler(data, ways=3, shots=1, query=3, batch_size=4, seed=0)
    val = EpisodeSampler(data, ways=3, shots=1, query=3, batch_size=10, seed=1)
    learner = MetaLearner(MLP(4, 3, hidden=(8,)), sgd(0.5))
    summary = MetaTrainer(learner, train, config(iterations=30, eval_every=3, meta_lr=0.05), val_problems=val,
                          run_dir=tmp_path).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    evaluated = [(r["val/accuracy"], -r["iteration"]) for r in records if "val/accuracy" in r]
    assert len({acc for acc, _ in evaluated}) > 1
    best_accuracy, minus_iteration = max(evaluated)  # the first of equal accuracies
    assert summary["best"]["metric"] == "accuracy"
    assert (summary["best"]["value"], summary["best"]["iteration"]) == (best_accuracy, -minus_iteration)
    assert load_checkpoint(tmp_path / "best.pt")["iteration"] == -minus_iteration
    assert all("train/accuracy" in r for r in records if "train/loss" in r)


def _dropout_maml() -> MAML:
    """A learner that draws from the global torch generator at every forward pass."""
    return MAML(nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1)), inner_lr=0.01)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    settings = config(iterations=20, log_every=4, checkpoint_every=5, eval_every=7)
    torch.manual_seed(0)
    reference = MetaTrainer(_dropout_maml(), tasks(), settings, val_problems=tasks(seed=1), run_dir=tmp_path / "ref")
    reference.fit()

    torch.manual_seed(0)
    crashing = MetaTrainer(_dropout_maml(), CrashingTasks(crash_at=13, shots=5, batch_size=4, seed=0), settings,
                           val_problems=tasks(seed=1), run_dir=tmp_path / "run")
    with pytest.raises(CrashError):
        crashing.fit()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 10
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["iteration"] == 12  # written after the checkpoint

    torch.manual_seed(1234)  # a different model and random state: the checkpoint must restore everything
    resumed = MetaTrainer(_dropout_maml(), tasks(), settings, val_problems=tasks(seed=1), run_dir=tmp_path / "run")
    summary = resumed.fit(resume=True)

    assert summary["iteration"] == 20
    for a, b in zip(resumed.learner.parameters(), reference.learner.parameters()):
        assert torch.equal(a, b)
    ref_metrics = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    assert without_timing(read_metrics(tmp_path / "run" / "metrics.jsonl")) == without_timing(ref_metrics)
    ref_best, run_best = (load_checkpoint(tmp_path / d / "best.pt") for d in ("ref", "run"))
    assert ref_best["best"] == run_best["best"]
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [4, 8, 12, 16, 20]  # the events after 10 were purged


def test_time_budget_stops_after_the_meta_update_that_spends_it_and_leaves_validation_out(tmp_path):
    budget_s = 0.1
    trainer = MetaTrainer(maml(), SlowTasks(0.01, shots=5, batch_size=4, seed=0),
                          config(iterations=1000, time_budget=budget_s / 60, log_every=1, eval_every=1),
                          val_problems=SlowTasks(0.05, shots=5, batch_size=20, seed=1), run_dir=tmp_path)
    summary = trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    iterations = summary["iteration"]
    assert summary["stopped_by"] == "time_budget" and 2 <= iterations <= 10  # >= 0.01 s per meta-update
    assert [r["iteration"] for r in records] == list(range(1, iterations + 1))
    before, last = records[-2], records[-1]
    assert before["time/train_s"] < budget_s <= last["time/train_s"] == summary["time"]["train_s"]
    assert before["time/elapsed_s"] > budget_s  # the 0.05 s validations did not count
    assert summary["time"]["total_s"] > last["time/elapsed_s"] > 2 * last["time/train_s"]
    assert "val/mse" in last and summary["val"]["mean"] == last["val/mse"]
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["iteration"] == iterations and checkpoint["time"]["train_s"] == summary["time"]["train_s"]


def test_a_cpu_time_budget_does_not_count_waiting(tmp_path):
    """budget_clock='cpu': a meta-batch that sleeps 20 ms (as if another process had the core) costs no budget."""
    budget_s = 0.05
    summary = MetaTrainer(maml(), SlowTasks(0.02, shots=5, batch_size=4, seed=0),
                          config(iterations=10000, time_budget=budget_s / 60, budget_clock="cpu", log_every=1),
                          run_dir=tmp_path).fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert summary["stopped_by"] == "time_budget"
    assert records[-2]["time/train_cpu_s"] < budget_s <= records[-1]["time/train_cpu_s"]
    assert summary["time"]["train_s"] > summary["time"]["train_cpu_s"] + 0.015 * summary["iteration"]


def test_a_resumed_run_continues_the_time_budget(tmp_path):
    settings = config(iterations=1000, time_budget=0.1 / 60, log_every=1, eval_every=1000)

    def fit(settings: TrainerConfig, resume: bool) -> dict:
        slow = SlowTasks(0.01, shots=5, batch_size=4, seed=0)
        return MetaTrainer(maml(), slow, settings, val_problems=tasks(seed=1), run_dir=tmp_path).fit(resume=resume)

    first = fit(settings, resume=False)
    spent = load_checkpoint(tmp_path / "last.pt")["time"]
    assert first["stopped_by"] == "time_budget" and spent["train_s"] == first["time"]["train_s"] >= 0.1
    again = fit(settings, resume=True)  # nothing left to spend
    assert (again["iteration"], again["stopped_by"], again["train_loss"]) == (first["iteration"], "time_budget", None)

    longer = fit(settings.replace(time_budget=0.2 / 60), resume=True)
    resumed = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["iteration"] > first["iteration"]]
    assert [r["iteration"] for r in resumed] == list(range(first["iteration"] + 1, longer["iteration"] + 1))
    assert resumed[0]["time/train_s"] > spent["train_s"] and resumed[0]["time/elapsed_s"] > spent["total_s"]
    assert resumed[-2]["time/train_s"] < 0.2 <= resumed[-1]["time/train_s"] == longer["time"]["train_s"]
    assert longer["stopped_by"] == "time_budget" and longer["time"]["total_s"] > first["time"]["total_s"]


def test_a_nonfinite_meta_batch_is_skipped_and_counted(tmp_path):
    trainer = MetaTrainer(maml(), NaNTasks(bad={2}, shots=5, batch_size=4, seed=0), config(iterations=6, log_every=1),
                          run_dir=tmp_path)
    summary = trainer.fit()
    assert summary["nonfinite_skipped"] == 1
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["train/nonfinite_skipped"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["train/loss"] is None and records[2]["train/grad_norm"] is None
    assert all(s["step"] == 5 for s in trainer.optimizer.state.values())  # no optimizer step on the skipped batch


def test_a_nonfinite_meta_gradient_is_skipped():
    learner = MAML(MLP(1, 1, hidden=(8,)), inner_lr=0.01, learn_inner_lr=True)
    learner.rule.lr.register_hook(lambda grad: grad * math.nan)  # finite loss, NaN meta-gradient
    before = [p.detach().clone() for p in learner.parameters()]
    with pytest.raises(NonFiniteError, match="NaN or infinite for 3 meta-updates in a row \\(iterations 1..3\\)"):
        MetaTrainer(learner, tasks(), config(iterations=5, max_nonfinite=3)).fit()
    assert all(torch.equal(a, b) for a, b in zip(learner.parameters(), before))


def test_too_many_nonfinite_meta_batches_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    reference = maml()
    trainer_model = maml()
    trainer_model.load_state_dict(reference.state_dict())
    MetaTrainer(reference, tasks(), config(iterations=5), run_dir=tmp_path / "good").fit()  # the last checkpoint

    trainer = MetaTrainer(trainer_model, NaNTasks(bad=range(7, 100), shots=5, batch_size=4, seed=0),
                          config(iterations=40, max_nonfinite=4), run_dir=tmp_path / "bad")
    with pytest.raises(NonFiniteError) as error:
        trainer.fit()
    message = str(error.value)
    assert "for 4 meta-updates in a row (iterations 8..11)" in message
    assert f"{tmp_path / 'bad' / 'last.pt'} (iteration 5), is intact" in message
    assert "grad_clip" in message and "max_nonfinite" in message
    kept = load_checkpoint(tmp_path / "bad" / "last.pt")  # no checkpoint during the streak: the last good one
    assert kept["iteration"] == 5 and kept["nonfinite"] == {"total": 0, "in_a_row": 0}
    good = load_checkpoint(tmp_path / "good" / "last.pt")["model"]
    assert all(torch.equal(kept["model"][k], good[k]) for k in good)
    assert read_metrics(tmp_path / "bad" / "metrics.jsonl")[-1]["iteration"] == 10


def test_fit_without_run_dir_keeps_nothing_on_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = MetaTrainer(maml(), tasks(), config(iterations=4, eval_every=2), val_problems=tasks(seed=1)).fit()
    assert summary["best"]["metric"] == "mse" and summary["iteration"] == 4
    assert list(tmp_path.iterdir()) == []


def test_meta_optimizer_choice():
    assert isinstance(MetaTrainer(maml(), tasks(), config(meta_optimizer="sgd")).optimizer, torch.optim.SGD)
    assert isinstance(MetaTrainer(maml(), tasks(), config()).optimizer, torch.optim.Adam)


def test_metrics_of_a_killed_writer_are_read_and_truncated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 5, "train/loss": 1.0}\n{"iteration": 10, "train/loss": null}\n{"iteration": 15, "tr')
    assert read_metrics(path) == [{"iteration": 5, "train/loss": 1.0}, {"iteration": 10, "train/loss": None}]
    truncate_metrics(path, 5)
    assert path.read_text() == '{"iteration": 5, "train/loss": 1.0}\n'
    path.write_text('{"iteration": 5}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2 is not valid JSON"):
        read_metrics(path)


# ------------------------------------------------------------------ learned optimizers: OptimizerLearner + truncations

HORIZON, TRUNCATION = 4, 2  # two truncations (meta-updates) per optimizee run
VAL_FIRST = 10**9


def quadratics(first: int = 0) -> OptimizeeStream:
    return OptimizeeStream(Quadratics(dim=3, batch=2), first=first, description={"functions": 2})


class NaNQuadratics(Quadratics):
    """Quadratics that start at NaN: every loss and meta-gradient is NaN."""

    def sample(self, seed: int) -> Quadratic:
        problem = super().sample(seed)
        return Quadratic(problem.w, problem.y, torch.full_like(problem.theta0, math.nan))


class CrashingStream(OptimizeeStream):
    """An optimizee stream whose problem ``crash_at`` raises, as if the process died when starting it."""

    def __init__(self, crash_at: int) -> None:
        super().__init__(Quadratics(dim=3, batch=2), first=0, description={"functions": 2})
        self.crash_at = crash_at

    def batch(self, index: int) -> Quadratic:
        if index == self.crash_at:
            raise CrashError
        return super().batch(index)


def l2l(seed: int = 0) -> OptimizerLearner:
    torch.manual_seed(seed)
    return OptimizerLearner(LSTMOptimizerRule(hidden=6), horizon=HORIZON)


def l2l_trainer(run_dir, iterations: int = 6, problems: OptimizeeStream | None = None, seed: int = 0,
                **changes) -> MetaTrainer:
    settings = config(**{"iterations": iterations, "meta_lr": 0.01, "eval_every": 3, "eval_episodes": 2,
                         "log_every": 1, "checkpoint_every": 3, **changes})
    return MetaTrainer(l2l(seed), problems or quadratics(), settings, estimator=TruncatedBackprop(TRUNCATION),
                       val_problems=quadratics(VAL_FIRST), run_dir=run_dir)


def test_a_learned_optimizer_takes_one_adam_step_per_truncation(tmp_path):
    """Meta-update i backpropagates truncation i mod 2 of optimizee run i // 2, from the carried θ and LSTM state."""
    learner, reference = l2l(), l2l()
    stream = quadratics()
    trainer = MetaTrainer(learner, stream, config(iterations=5, meta_lr=0.01, log_every=1),
                          estimator=TruncatedBackprop(TRUNCATION), run_dir=tmp_path)
    trainer.fit()
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    losses = []
    for i in range(5):
        run, part = divmod(i, HORIZON // TRUNCATION)
        if part == 0:
            problem = stream.batch(run)
            params, state = problem.init_params(), None
        optimizer.zero_grad()
        score, trajectory = reference.truncation(problem, params, state, part * TRUNCATION, TRUNCATION)
        score.loss.backward()
        optimizer.step()
        params, state = trajectory.params[-1], trajectory.state
        losses.append(score.step_losses[1:].mean().item())
    for a, b in zip(learner.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert trainer.estimator.started == 3  # runs 0 and 1 done, run 2 one truncation in
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["train/loss"] for r in records] == pytest.approx(losses, rel=1e-6)
    assert all(r["time/tasks_per_s"] > 0 and "lr/meta" in r for r in records)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["algorithm"] == "OptimizerLearner" and state["estimator"]["name"] == "TruncatedBackprop"
    carried = state["estimator"]["state"]
    assert carried["started"] == 3 and carried["carried"]["step"] == TRUNCATION
    torch.testing.assert_close(carried["carried"]["params"]["theta"], params["theta"].detach(), rtol=0, atol=0)


def _untimed(path) -> list[dict]:
    return without_timing(read_metrics(path))


def _assert_same_runs(a: MetaTrainer, b: MetaTrainer) -> None:
    for x, y in zip(a.learner.parameters(), b.learner.parameters()):
        assert torch.equal(x, y)
    for x, y in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.best == b.best and a.estimator.started == b.estimator.started
    assert _untimed(a.run_dir / "metrics.jsonl") == _untimed(b.run_dir / "metrics.jsonl")


def test_a_learned_optimizer_run_resumed_mid_problem_equals_an_uninterrupted_one(tmp_path):
    whole = l2l_trainer(tmp_path / "whole")
    whole.fit()
    cut = l2l_trainer(tmp_path / "cut", iterations=3)
    cut.fit()
    carried = load_checkpoint(tmp_path / "cut" / "last.pt")["estimator"]["state"]
    assert carried["started"] == 2 and carried["carried"]["step"] == TRUNCATION  # stopped inside run 1
    resumed = l2l_trainer(tmp_path / "cut", seed=123)  # another rule initialisation: the checkpoint restores it
    torch.manual_seed(123)
    summary = resumed.fit(resume=True)
    assert summary["iteration"] == 6 and summary["best"]["metric"] == "loss"
    _assert_same_runs(resumed, whole)
    assert resumed.estimator.state_dict()["carried"] is None  # run 2 finished at iteration 6, as in the whole run


def test_a_learned_optimizer_run_killed_mid_problem_resumes_exactly(tmp_path):
    whole = l2l_trainer(tmp_path / "whole")
    whole.fit()
    crashing = l2l_trainer(tmp_path / "run", problems=CrashingStream(crash_at=2))  # dies starting run 2 (iteration 5)
    with pytest.raises(CrashError):
        crashing.fit()
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["iteration"] == 3 and state["estimator"]["state"]["carried"]["step"] == TRUNCATION
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["iteration"] == 4  # written after the checkpoint
    resumed = l2l_trainer(tmp_path / "run", seed=7)  # the live run's problem is rebuilt from the stream
    resumed.fit(resume=True)
    _assert_same_runs(resumed, whole)
    run_best, whole_best = (load_checkpoint(tmp_path / d / "best.pt") for d in ("run", "whole"))
    assert run_best["best"] == whole_best["best"] and torch.equal(run_best["rng"]["torch"], whole_best["rng"]["torch"])


def test_a_learned_optimizer_keeps_its_best_validated_rule(tmp_path):
    trainer = l2l_trainer(tmp_path, iterations=8, eval_every=2, meta_lr=0.05)
    summary = trainer.fit()
    evaluated = [(r["val/loss"], r["iteration"]) for r in read_metrics(tmp_path / "metrics.jsonl") if "val/loss" in r]
    assert [i for _, i in evaluated] == [2, 4, 6, 8] and len({v for v, _ in evaluated}) > 1
    best = load_checkpoint(tmp_path / "best.pt")
    assert (best["best"]["value"], best["iteration"]) == min(evaluated) == (summary["best"]["value"],
                                                                             summary["best"]["iteration"])
    assert summary["val"]["metric"] == "loss" and summary["val"]["mean"] == evaluated[-1][0]


def test_non_finite_truncations_take_no_meta_step_and_start_the_next_problem():
    learner = l2l()
    before = [p.detach().clone() for p in learner.parameters()]
    trainer = MetaTrainer(learner, OptimizeeStream(NaNQuadratics(dim=3, batch=2), first=0), config(iterations=3),
                          estimator=TruncatedBackprop(TRUNCATION), val_problems=quadratics(VAL_FIRST))
    summary = trainer.fit()
    assert summary["nonfinite_skipped"] == 3 and math.isnan(summary["train_loss"]) and summary["best"] is not None
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    assert trainer.estimator.started == 3  # a non-finite truncation ends its run
    assert trainer.optimizer.state == {}
