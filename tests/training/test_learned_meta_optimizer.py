"""A trained learned optimizer as the meta-optimizer of another run (Metz et al. 2020's self-training).

The trainer builds it from the checkpoint through the rule's torch.optim interface, feeds it the
meta-loss when it reads one, keeps its state in every checkpoint (a resumed run equals an
uninterrupted one), and refuses configs where the checkpoint option would do nothing.
"""

from __future__ import annotations

import pytest
import torch

from metaopt.algorithms.mlp_lopt import MLPLOptimizer
from metaopt.algorithms.rnn_mlp_lopt import RNNMLPOptimizer
from metaopt.options import ConfigError
from metaopt.training.checkpoint import CheckpointError, load_checkpoint
from metaopt.training.config import RunConfig, TrainerConfig
from metaopt.training.experiment import build_experiment, train
from metaopt.training.trainer import MetaTrainer


def quadratics(algorithm: str, **trainer) -> RunConfig:
    return RunConfig.from_dict({
        "data": {"name": "quadratics", "dim": 3, "batch": 2},
        "algorithm": {"name": algorithm, "horizon": 4, "truncation": 2},
        "trainer": {"iterations": 4, "meta_lr": 0.01, "eval_every": 100, "eval_episodes": 1, "test_episodes": 1,
                    "checkpoint_every": 2, "log_every": 1, **trainer},
        "baselines": {"tune_problems": 1, "grid": [0.1]}, "device": "cpu"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, str]:
    """Checkpoints of two short learned-optimizer runs: the per-parameter MLP and the hierarchical optimizer."""
    folder = tmp_path_factory.mktemp("trained")
    for algorithm in ("mlp-lopt", "rnn-mlp-lopt"):
        train(quadratics(algorithm, iterations=2), folder / algorithm)
    return {algorithm: str(folder / algorithm / "last.pt") for algorithm in ("mlp-lopt", "rnn-mlp-lopt")}


def test_the_trainer_steps_with_the_checkpoints_optimizer_and_feeds_it_the_meta_loss(trained) -> None:
    config = quadratics("mlp-lopt", meta_optimizer="learned", meta_optimizer_checkpoint=trained["rnn-mlp-lopt"],
                        meta_lr=1.0)
    experiment = build_experiment(config)
    before = [p.detach().clone() for p in experiment.learner.parameters()]
    trainer = MetaTrainer(experiment.learner, experiment.problems("train"), config, estimator=experiment.estimator)
    assert isinstance(trainer.optimizer, RNNMLPOptimizer)
    trainer.fit()
    assert trainer.optimizer.steps == 4
    assert int(trainer.optimizer.state["shared"]["train_loss"][2]) == 4  # the rule saw the 4 meta-losses
    assert all(not torch.equal(a, b) for a, b in zip(before, experiment.learner.parameters()))


def test_a_run_with_a_learned_meta_optimizer_resumes_exactly(tmp_path, trained) -> None:
    config = quadratics("mlp-lopt", meta_optimizer="learned", meta_optimizer_checkpoint=trained["mlp-lopt"],
                        meta_lr=0.5)
    assert isinstance(MetaTrainer(build_experiment(config).learner, None, config).optimizer, MLPLOptimizer)
    train(config, tmp_path / "whole")
    train(config.replace(trainer={"iterations": 2}), tmp_path / "cut")
    train(config, tmp_path / "cut", resume=True)
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("whole", "cut"))
    assert a["iteration"] == b["iteration"] == 4 and a["meta_optimizer"] == "learned"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_the_checkpoint_option_goes_with_the_learned_meta_optimizer_only() -> None:
    with pytest.raises(ConfigError, match="'meta_optimizer_checkpoint' goes with meta_optimizer='learned'"):
        TrainerConfig(meta_optimizer="learned")
    with pytest.raises(ConfigError, match="'meta_optimizer_checkpoint' goes with meta_optimizer='learned'"):
        TrainerConfig(meta_optimizer="adam", meta_optimizer_checkpoint="run/best.pt")


def test_a_missing_or_few_shot_checkpoint_is_named(tmp_path) -> None:
    missing = quadratics("mlp-lopt", meta_optimizer="learned", meta_optimizer_checkpoint=str(tmp_path / "none.pt"))
    with pytest.raises(CheckpointError, match="none.pt"):
        MetaTrainer(build_experiment(missing).learner, None, missing)
    few_shot = RunConfig.from_dict({"data": {"name": "sinusoid", "shots": 2, "query": 2, "meta_batch": 2},
                                    "model": {"name": "mlp", "hidden": [4]},
                                    "algorithm": {"name": "maml", "inner_steps": 1},
                                    "trainer": {"iterations": 1, "eval_every": 100, "eval_episodes": 1,
                                                "checkpoint_every": 100, "log_every": 1}, "device": "cpu"})
    train(few_shot, tmp_path / "maml")
    config = quadratics("mlp-lopt", meta_optimizer="learned", meta_optimizer_checkpoint=str(tmp_path / "maml" /
                                                                                           "last.pt"))
    with pytest.raises(CheckpointError, match="a few-shot learner, not a learned optimizer"):
        MetaTrainer(build_experiment(config).learner, None, config)
