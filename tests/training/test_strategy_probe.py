"""Tests of metaopt/training/strategy_probe.py: the probe changes no state, picks the fastest strategy it measured,
tries compiling only for long runs, drops a compiled strategy that fell back; the trainer probes new ``auto`` runs
only, stores the choice in its checkpoints and resumes with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.algorithms import MAML
from metaopt.datasets import Sinusoid
from metaopt.estimators import Backprop
from metaopt.models import MLP
from metaopt.training import strategy_probe, trainer
from metaopt.training.checkpoint import CheckpointError, load_checkpoint
from metaopt.training.config import TrainerConfig
from metaopt.training.strategy_probe import COMPILE_PAYBACK, StrategyChoice, estimated_compile_s, probe_strategy
from metaopt.training.trainer import MetaTrainer

SHORT = lambda seconds: 1.0  # noqa: E731  (a run too short to compile for)
STRATEGY = 4  # the position of the strategy among strategy_probe._time's arguments


def tasks(seed: int = 0) -> Sinusoid:
    return Sinusoid(shots=5, query=10, batch_size=4, seed=seed)


def maml(**kwargs) -> MAML:
    torch.manual_seed(0)
    return MAML(MLP(1, 1, hidden=(8,)), inner_lr=0.01, **kwargs)


class BatchNormNet(nn.Module):
    """An MLP with batch norm tracking running statistics: buffers a meta-gradient would change."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_the_probe_leaves_parameters_gradients_buffers_and_random_states_as_they_were():
    torch.manual_seed(0)
    learner = MAML(BatchNormNet(), inner_lr=0.01)
    for p in learner.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in learner.state_dict().items()}
    rng = torch.get_rng_state()
    choice = probe_strategy(learner, Backprop(), tasks(), iteration=0, expected_s=SHORT)
    assert choice.strategy in ("loop", "vmap") and learner.strategy == choice.strategy
    assert set(choice.seconds) == {"loop", "vmap"} and all(s > 0 for s in choice.seconds.values())
    assert all(torch.equal(v, learner.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in learner.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_probe_chooses_the_fastest_strategy_it_measured(monkeypatch):
    speeds = {"loop": 0.03, "vmap": 0.01, "compiled": 0.02}
    monkeypatch.setattr(strategy_probe, "_time", lambda *args: (1.0, speeds[args[STRATEGY]]))
    learner = maml()
    choice = probe_strategy(learner, Backprop(), tasks(), iteration=0, expected_s=SHORT)
    assert (choice.strategy, learner.strategy, choice.seconds) == ("vmap", "vmap", {"loop": 0.03, "vmap": 0.01})
    speeds["vmap"] = 0.05
    assert probe_strategy(maml(), Backprop(), tasks(), 0, expected_s=SHORT).strategy == "loop"


def test_compiling_is_tried_only_for_a_run_expected_to_repay_it(monkeypatch):
    monkeypatch.setattr(strategy_probe, "_time", lambda *args: (30.0, 0.01 if args[STRATEGY] == "compiled" else 0.02))
    enough = COMPILE_PAYBACK * estimated_compile_s(0.02)
    expected = []
    short = probe_strategy(maml(), Backprop(), tasks(), 0, expected_s=lambda s: expected.append(s) or 0.99 * enough)
    assert expected == [0.02] and "compiled" not in short.seconds and "too short" in short.skipped["compiled"]
    long = probe_strategy(maml(), Backprop(), tasks(), 0, expected_s=lambda s: enough)
    assert (long.strategy, long.compile_s, long.skipped) == ("compiled", 30.0, {})
    assert "compiling 30 s" in long.summary()


def test_compiling_is_estimated_from_the_eager_vmap_time_with_a_floor():
    assert estimated_compile_s(0.2) == pytest.approx(100.0) and estimated_compile_s(1e-3) == 20.0


def test_a_compiled_strategy_that_falls_back_to_vmap_is_not_chosen():
    learner = maml()
    learner._compiled.fallback_reason = "no C++ compiler"  # as a failed compile leaves it: vmap runs, unwarned
    choice = probe_strategy(learner, Backprop(), tasks(), 0, expected_s=lambda s: 1e9)
    assert set(choice.seconds) == {"loop", "vmap"} and choice.strategy in ("loop", "vmap")
    assert choice.skipped == {"compiled": "it fell back to vmap (no C++ compiler)"}


def test_every_process_takes_the_leaders_choice():
    leader = {str: "loop"}  # what rank 0 decided, whatever this process measured
    choice = probe_strategy(maml(), Backprop(), tasks(), 0, expected_s=SHORT,
                            agree=lambda value: leader.get(type(value), value))
    assert choice.strategy == "loop"


def test_every_process_drops_compiled_when_the_leaders_fell_back(monkeypatch):
    monkeypatch.setattr(strategy_probe, "_time_compiled", lambda *args: (1.0, 1e-6, None))  # fastest here
    leader = {type(None): "no C++ compiler on rank 0"}
    choice = probe_strategy(maml(), Backprop(), tasks(), 0, expected_s=lambda s: 1e9,
                            agree=lambda value: leader.get(type(value), value))
    assert choice.strategy != "compiled" and choice.skipped == {
        "compiled": "it fell back to vmap (no C++ compiler on rank 0)"}


def test_a_learner_that_must_loop_has_nothing_to_probe():
    learner = MAML(BatchNormNet(), inner_lr=0.01, bn_policy="running")
    with pytest.raises(ValueError, match="one after another.*batch-norm policy 'running'"):
        probe_strategy(learner, Backprop(), tasks(), 0, expected_s=SHORT)


def test_a_failing_probe_leaves_the_strategy_as_it_was(monkeypatch):
    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(strategy_probe, "_time", fail)
    learner = maml()
    with pytest.raises(RuntimeError, match="out of memory"):
        probe_strategy(learner, Backprop(), tasks(), 0, expected_s=SHORT)
    assert learner.strategy == "auto"


def config(**changes) -> TrainerConfig:
    return TrainerConfig(**{"iterations": 6, "log_every": 3, "checkpoint_every": 3, **changes})


def test_a_new_auto_run_is_probed_and_keeps_the_choice_in_its_checkpoints_and_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "PROBE_WORTH_FROM", 4)
    run = MetaTrainer(maml(), tasks(), config(), run_dir=tmp_path)
    summary = run.fit()
    chosen = summary["strategy"]
    assert chosen["strategy"] in ("loop", "vmap") and run.learner.strategy == chosen["strategy"]
    assert load_checkpoint(tmp_path / "last.pt")["strategy"] == chosen
    assert chosen["strategy"] in (tmp_path / "train.log").read_text().split("strategy auto chose ")[1]


def test_a_resumed_run_keeps_its_probed_strategy_without_probing_again(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "PROBE_WORTH_FROM", 4)
    monkeypatch.setattr(strategy_probe, "_time", lambda *args: (1.0, {"loop": 2.0, "vmap": 1.0}[args[STRATEGY]]))
    MetaTrainer(maml(), tasks(), config(iterations=4), run_dir=tmp_path).fit()
    monkeypatch.setattr(trainer, "probe_strategy", lambda *args, **kwargs: pytest.fail("probed on resume"))
    resumed = MetaTrainer(maml(), tasks(), config(iterations=6), run_dir=tmp_path)
    summary = resumed.fit(resume=True)
    assert resumed.learner.strategy == "vmap" and summary["strategy"]["seconds"] == {"loop": 2.0, "vmap": 1.0}
    log = (tmp_path / "train.log").read_text()
    assert log.count("strategy auto chose vmap: loop 2000.0 ms") == 2 and "; kept from the start of the run\n" in log


def test_a_run_saved_before_probing_existed_resumes_with_the_device_rule(tmp_path, monkeypatch):
    MetaTrainer(maml(), tasks(), config(iterations=3), run_dir=tmp_path).fit()
    state = load_checkpoint(tmp_path / "last.pt")
    del state["strategy"]
    torch.save(state, tmp_path / "last.pt")
    resumed = MetaTrainer(maml(), tasks(), config(), run_dir=tmp_path)
    assert resumed.fit(resume=True)["strategy"] is None and resumed.learner.strategy == "auto"


@pytest.mark.parametrize("why", ["short", "explicit", "loop_only"])
def test_runs_that_are_not_probed(tmp_path, monkeypatch, why):
    monkeypatch.setattr(trainer, "probe_strategy", lambda *args, **kwargs: pytest.fail("probed"))
    if why != "short":
        monkeypatch.setattr(trainer, "PROBE_WORTH_FROM", 1)
    learner = {"short": maml(), "explicit": maml(strategy="vmap"),
               "loop_only": MAML(BatchNormNet(), inner_lr=0.01, bn_policy="running")}[why]
    strategy = learner.strategy
    assert MetaTrainer(learner, tasks(), config(), run_dir=tmp_path).fit()["strategy"] is None
    assert learner.strategy == strategy


def test_a_choice_round_trips_through_its_dict():
    choice = StrategyChoice("vmap", {"loop": 0.2, "vmap": 0.1}, None, {"compiled": "too short"})
    assert StrategyChoice(**choice.to_dict()) == choice
    assert choice.summary() == ("strategy auto chose vmap: loop 200.0 ms, vmap 100.0 ms per meta-gradient; "
                                "compiled not used: too short")


def test_a_checkpoint_with_a_malformed_choice_is_a_checkpoint_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "PROBE_WORTH_FROM", 1)
    MetaTrainer(maml(), tasks(), config(iterations=3), run_dir=tmp_path).fit()
    state = load_checkpoint(tmp_path / "last.pt")
    state["strategy"] = {"chosen": "vmap"}
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="last.pt: the strategy chosen by the timing probe is malformed"):
        MetaTrainer(maml(), tasks(), config(), run_dir=tmp_path).fit(resume=True)
