"""Tests of metaopt/training/checkpoint.py: atomic writes, safe and checked loads, random states."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from metaopt.algorithms import MAML
from metaopt.datasets import Sinusoid
from metaopt.datasets.quadratics import Quadratics
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.engine.rules import LearnedRates, sgd
from metaopt.estimators import Backprop, TruncatedBackprop
from metaopt.models import MLP
from metaopt.problems.optimizees import OptimizeeStream
from metaopt.training.checkpoint import (
    READABLE_VERSIONS,
    VERSION,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_module_state,
    remove_stale_temporaries,
    restore_rng_state,
    save_checkpoint,
    write_json,
)
from metaopt.training.config import TrainerConfig
from metaopt.training.trainer import MetaTrainer


def _draws() -> tuple:
    return torch.rand(4), torch.randn(2), np.random.rand(3), np.random.randn(), random.random(), random.gauss(0, 1)


def test_round_trip_keeps_tensors_and_values(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"iteration": 7, "model": model.state_dict(), "best": {"metric": "mse", "value": 0.5},
                           "nothing": None})
    state = load_checkpoint(path, required=["iteration", "model"])
    assert state["iteration"] == 7 and state["best"] == {"metric": "mse", "value": 0.5} and state["nothing"] is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(state["model"][name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
    raw = torch.load(path, weights_only=True)
    assert (raw["format"], raw["version"]) == ("metaopt-checkpoint", VERSION) and VERSION == 2


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iteration": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"iteration": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint .*nope.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_file_names_the_file(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iteration": 3, "model": torch.nn.Linear(8, 8).state_dict()})
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint at all", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"checkpoint {path} cannot be read: it is corrupt, truncated"):
        load_checkpoint(path)


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "metaopt-checkpoint", "version": 1, "object": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt cannot be read"):
        load_checkpoint(path)
    assert not _Payload.unpickled


class _Payload:
    unpickled = False

    def __setstate__(self, state):
        type(self).unpickled = True


def test_foreign_and_versioned_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt is not a metaopt checkpoint"):
        load_checkpoint(foreign)
    future = tmp_path / "future.pt"
    torch.save({"format": "metaopt-checkpoint", "version": 99}, future)
    with pytest.raises(CheckpointError, match=r"future.pt has format version 99, this metaopt reads versions \(1, 2\)"):
        load_checkpoint(future)
    assert READABLE_VERSIONS == (1, 2)
    old = tmp_path / "old.pt"  # written before the one-engine rebuild: still read (training.legacy converts it)
    torch.save({"format": "metaopt-checkpoint", "version": 1, "iteration": 4}, old)
    assert load_checkpoint(old, required=["iteration"])["iteration"] == 4
    partial = tmp_path / "partial.pt"
    save_checkpoint(partial, {"iteration": 1})
    with pytest.raises(CheckpointError, match=r"partial.pt lacks the entries \['model', 'optimizer'\]"):
        load_checkpoint(partial, required=["iteration", "model", "optimizer"])


def test_module_state_mismatch_names_keys_and_shapes(tmp_path):
    path = tmp_path / "last.pt"
    small = MLP(1, 1, hidden=(8,))
    mismatch = r"last.pt does not fit this MLP: shape mismatches \['0.weight \(checkpoint \(8, 1\), model \(16, 1\)\)'"
    with pytest.raises(CheckpointError, match=mismatch):
        load_module_state(MLP(1, 1, hidden=(16,)), small.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing entries \['4.bias', '4.weight'\]"):
        load_module_state(MLP(1, 1, hidden=(8, 8)), small.state_dict(), path)
    extra = {**small.state_dict(), "head.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"unexpected entries \['head.weight'\]"):
        load_module_state(MLP(1, 1, hidden=(8,)), extra, path)
    target = MLP(1, 1, hidden=(8,))
    load_module_state(target, small.state_dict(), path)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), small.parameters()))


def test_random_states_round_trip_through_a_file(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": capture_rng_state()})
    expected = _draws()
    _draws()
    restore_rng_state(load_checkpoint(path)["rng"])
    for a, b in zip(_draws(), expected):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_write_json_is_atomic_and_strict(tmp_path):
    path = tmp_path / "final.json"
    write_json(path, {"mean": 0.5, "nan": float("nan"), "nested": [float("inf"), 1], "text": "± 95%"})
    assert json.loads(path.read_text()) == {"mean": 0.5, "nan": None, "nested": [None, 1], "text": "± 95%"}
    assert [p.name for p in tmp_path.iterdir()] == ["final.json"]


# ---------------------------------------------------------------- checkpoints of the trainer


def _trainer(run_dir, model=None, learner_class=MAML, estimator=None, **config):
    model = model or MLP(1, 1, hidden=(8,))
    learner = MAML(model, inner_lr=0.01) if learner_class is MAML else learner_class(model, sgd(0.01))
    settings = {"iterations": 3, "eval_every": 100, "log_every": 100, "checkpoint_every": 100, **config}
    return MetaTrainer(learner, Sinusoid(shots=5, batch_size=2, seed=0), TrainerConfig(**settings),
                       estimator=estimator, run_dir=run_dir)


class OtherEstimator(Backprop):
    """An estimator of another name (its state would not fit a Backprop run's)."""


class OtherLearner(MetaLearner):
    """A learner of another algorithm, with exactly MAML's parameters."""


def test_trainer_checkpoint_of_another_model_is_refused(tmp_path):
    _trainer(tmp_path).fit()
    with pytest.raises(CheckpointError, match=r"last.pt does not fit this MAML: shape mismatches \['model.0.weight"):
        _trainer(tmp_path, model=MLP(1, 1, hidden=(16,))).fit(resume=True)


def test_trainer_checkpoint_of_another_algorithm_is_refused(tmp_path):
    _trainer(tmp_path).fit()
    with pytest.raises(CheckpointError, match="written by a MAML run, but this trainer trains OtherLearner"):
        _trainer(tmp_path, learner_class=OtherLearner).fit(resume=True)


def test_trainer_resume_with_another_config_is_refused(tmp_path):
    _trainer(tmp_path).fit()
    with pytest.raises(CheckpointError, match=r"config.json differs from this trainer's config in "
                                              r"\['trainer.epoch_length'\]; a resumed run must keep its config "
                                              r"\(only "
                                              r"\['trainer.iterations', 'trainer.time_budget', "
                                              r"'trainer.max_nonfinite', "
                                              r"'trainer.grad_clip', 'trainer.grad_clip_value', 'trainer.meta_lr', "
                                              r"'device', 'threads', 'world_size'\] may change"):
        _trainer(tmp_path, epoch_length=7).fit(resume=True)
    assert _trainer(tmp_path, iterations=5, time_budget=10.0).fit(resume=True)["iteration"] == 5  # may change
    assert json.loads((tmp_path / "config.json").read_text())["iterations"] == 5


def test_a_resumed_run_takes_the_fixes_a_non_finite_stop_suggests(tmp_path):
    _trainer(tmp_path).fit()
    trainer = _trainer(tmp_path, iterations=5, meta_lr=1e-4, grad_clip=1.0, max_nonfinite=3)
    trainer.restore()
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-4]  # not the saved state's 1e-3
    assert trainer.fit(resume=True)["iteration"] == 5
    stored = json.loads((tmp_path / "config.json").read_text())
    assert (stored["meta_lr"], stored["grad_clip"], stored["max_nonfinite"]) == (1e-4, 1.0, 3)


def test_trainer_checkpoint_of_another_estimator_is_refused(tmp_path):
    _trainer(tmp_path).fit()
    with pytest.raises(CheckpointError, match="holds the state of a Backprop estimator with settings {}, but this run "
                                              "estimates with OtherEstimator"):
        _trainer(tmp_path, estimator=OtherEstimator()).fit(resume=True)


def test_trainer_state_of_another_meta_optimizer_or_schedule_is_refused(tmp_path):
    _trainer(tmp_path).fit()
    path = tmp_path / "last.pt"
    state = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="holds 'adam' meta-optimizer state, but this run uses 'sgd'"):
        _trainer(None, meta_optimizer="sgd").load_state_dict(state, path)
    with pytest.raises(CheckpointError, match="written without a learning-rate schedule, this run has "
                                              "lr_schedule='cosine'"):
        _trainer(None, lr_schedule="cosine").load_state_dict(state, path)


def test_trainer_resume_from_a_corrupt_checkpoint_names_it(tmp_path):
    _trainer(tmp_path).fit()
    (tmp_path / "last.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'last.pt'} cannot be read"):
        _trainer(tmp_path).fit(resume=True)


def test_trainer_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="last.pt does not exist"):
        _trainer(tmp_path).fit(resume=True)
    with pytest.raises(CheckpointError, match="needs the run_dir"):
        _trainer(None).fit(resume=True)


def test_trainer_does_not_overwrite_a_run(tmp_path):
    _trainer(tmp_path).fit()
    with pytest.raises(CheckpointError, match="already holds a run .*resume=True"):
        _trainer(tmp_path).fit()


def test_trainer_checkpoint_holds_the_whole_state(tmp_path):
    trainer = _trainer(tmp_path, lr_schedule="cosine")
    trainer.fit()
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["iteration"] == 3 and state["algorithm"] == "MAML" and state["meta_optimizer"] == "adam"
    assert set(state["model"]) == set(trainer.learner.state_dict())
    assert state["optimizer"]["state"][0]["step"] == 3
    assert state["scheduler"]["last_epoch"] == 3
    assert state["nonfinite"] == {"total": 0, "in_a_row": 0}
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["estimator"] == {"name": "Backprop", "settings": {}, "state": {}}
    assert state["config"] == trainer.config.to_dict() == json.loads((tmp_path / "config.json").read_text())
    assert set(state["time"]) == {"train_s", "total_s", "train_cpu_s"} and state["best"] is None
    assert state["version"] == VERSION


def test_trainer_checkpoint_of_other_estimator_settings_is_refused(tmp_path):
    def trainer(truncation: int) -> MetaTrainer:
        learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=4)
        return MetaTrainer(learner, OptimizeeStream(Quadratics(dim=3, batch=2), first=0),
                           TrainerConfig(iterations=2, log_every=1, checkpoint_every=1),
                           estimator=TruncatedBackprop(truncation), run_dir=tmp_path)

    trainer(2).fit()
    with pytest.raises(CheckpointError, match="with settings {'truncation': 2}, but this run estimates with "
                                              "TruncatedBackprop with {'truncation': 4}"):
        trainer(4).fit(resume=True)


def test_temporaries_of_killed_writes_are_removed_and_a_write_under_way_is_kept(tmp_path):
    stale = [tmp_path / ".last.pt.12345.tmp", tmp_path / ".final.json.999999.tmp"]
    ours = tmp_path / f".best.pt.{os.getpid()}.tmp"
    for path in (*stale, ours, tmp_path / "notes.tmp"):
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert ours.exists() and (tmp_path / "notes.tmp").exists()


def test_random_states_of_an_older_layout_restore_or_fail_naming_the_file():
    state = capture_rng_state()
    del state["cuda"]  # written where CUDA was never used: nothing to restore there
    restore_rng_state(state)
    del state["numpy"]
    with pytest.raises(CheckpointError, match=r"old/last.pt: the random states lack \['numpy'\]"):
        restore_rng_state(state, "old/last.pt")
