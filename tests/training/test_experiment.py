"""Tests of metaopt/training/experiment.py: building a run's parts from its config, training it to a final test
result, evaluating and loading its checkpoints, and resuming a learned-optimizer run exactly in the middle of a
problem."""

from __future__ import annotations

import json

import pytest
import torch

from metaopt.algorithms import MAML, MetaSGD
from metaopt.datasets import Sinusoid
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators import Backprop, TruncatedBackprop
from metaopt.evaluation import evaluate
from metaopt.models import MLP
from metaopt.options import ConfigError
from metaopt.problems.optimizees import TEST_SEED, VAL_SEED
from metaopt.problems.sampling import split_seed
from metaopt.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metaopt.training.config import TrainerConfig, load_preset
from metaopt.training.experiment import (
    SPLITS,
    build_experiment,
    default_run_dir,
    evaluate_run,
    load_learner,
    load_run,
    load_weights,
    resolve_device,
    train,
)
from metaopt.training.logging import read_metrics
from metaopt.training.trainer import MetaTrainer


def sinusoid(**trainer):
    return load_preset("maml-sinusoid-5shot").replace(
        trainer={"iterations": 4, "eval_every": 2, "eval_episodes": 6, "test_episodes": 8, "log_every": 2,
                 "checkpoint_every": 2, **trainer},
        model={"hidden": [8]}, data={"meta_batch": 3}, device="cpu")


def quadratics(device: str = "cpu", **trainer):
    """A learned optimizer on 4-step runs in truncations of 2: two meta-updates per training problem."""
    return load_preset("l2l-quadratics").replace(
        trainer={"iterations": 6, "eval_every": 2, "eval_episodes": 2, "test_episodes": 2, "log_every": 1,
                 "checkpoint_every": 2, **trainer},
        algorithm={"horizon": 4, "truncation": 2, "lstm_units": 6}, data={"dim": 3, "batch": 2},
        baselines={"tune_problems": 1, "grid": [0.3, 0.03]}, device=device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def untimed(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run_dir / "metrics.jsonl")]


def test_build_experiment_makes_the_parts_of_the_config():
    config = sinusoid()
    experiment = build_experiment(config)
    assert type(experiment.learner).__name__ == "MAML" and isinstance(experiment.estimator, Backprop)
    assert experiment.config is config and experiment.device == torch.device("cpu")
    assert experiment.learner.model[0].out_features == 8 and experiment.learner.rule.lr == 0.01
    assert [experiment.problems(split).seed for split in SPLITS] == [split_seed(0, s) for s in SPLITS] == [0, 1, 2]
    assert experiment.problems("train") is experiment.problems("train")  # built once, when first asked for
    assert experiment.problems("train").batch_size == 3 and experiment.problems("val").shots == 5
    other = experiment.problems("test", config.data.replace(shots=2))  # another variant of the data
    assert other.shots == 2 and experiment.problems("test").shots == 5
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        experiment.problems("dev")

    l2l = build_experiment(quadratics())
    assert isinstance(l2l.learner, OptimizerLearner) and isinstance(l2l.estimator, TruncatedBackprop)
    assert (l2l.learner.horizon, l2l.estimator.truncation, l2l.learner.rule.lstm.hidden) == (4, 2, 6)
    assert [l2l.problems(split).first for split in SPLITS] == [0, VAL_SEED, TEST_SEED]
    assert l2l.problems("test").protocol() == {"functions": 1, "convention": "gaussian"}


def test_initial_parameters_depend_on_the_seed_only_and_leave_the_global_generators_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a, b = build_experiment(sinusoid()).learner, build_experiment(sinusoid()).learner
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = build_experiment(sinusoid().replace(seed=1)).learner
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_devices_and_run_folders():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert default_run_dir(sinusoid(), "root").parent.name == "root"
    assert default_run_dir(sinusoid()).name.startswith("maml-sinusoid-5shot-")
    assert default_run_dir(quadratics()).name.startswith("l2l-quadratics-")
    assert default_run_dir(load_preset("fomaml-sinusoid-10shot")).name.startswith("fomaml-sinusoid-10shot-")


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "sinusoid"
    return run_dir, train(sinusoid(), run_dir)


def test_train_scores_the_best_checkpoint_on_the_test_problems(sinusoid_run):
    run_dir, final = sinusoid_run
    assert json.loads((run_dir / "final.json").read_text()) == json.loads(json.dumps(final))
    assert set(final) == {"result", "summary", "split", "checkpoint", "checkpoint_iteration", "run_dir", "train"}
    best = load_checkpoint(run_dir / "best.pt")
    assert (final["split"], final["checkpoint"], final["checkpoint_iteration"]) == ("test", "best.pt",
                                                                                    best["iteration"])
    assert final["run_dir"] == str(run_dir) and final["train"]["iteration"] == 4
    assert final["train"]["stopped_by"] == "iterations" and final["train"]["best"] == best["best"]
    learner = load_learner(run_dir / "best.pt")
    experiment = build_experiment(sinusoid())
    expected = evaluate(learner, experiment.problems("test"), episodes=8)  # test_episodes
    assert final["result"] == expected.to_dict() and final["summary"] == str(expected)
    assert final["result"]["protocol"] == {"shots": 5, "query": 10, "inner_steps": 1, "episodes": 8,
                                           "bn_policy": "batch"}
    assert json.loads((run_dir / "config.json").read_text()) == sinusoid().to_dict()


def test_a_fresh_run_is_a_pure_function_of_its_config(sinusoid_run, tmp_path):
    run_dir, final = sinusoid_run
    torch.manual_seed(99)  # train seeds the global generators itself
    again = train(sinusoid(), tmp_path)
    assert again["result"] == final["result"] and untimed(tmp_path) == untimed(run_dir)
    assert all(torch.equal(a, b) for a, b in zip(load_checkpoint(tmp_path / "last.pt")["model"].values(),
                                                 load_checkpoint(run_dir / "last.pt")["model"].values()))


def test_evaluate_run_scores_a_checkpoint_and_writes_eval_json(sinusoid_run):
    run_dir, _ = sinusoid_run
    record = evaluate_run(run_dir, checkpoint="last", episodes=5, steps=3, split="val")
    assert json.loads((run_dir / "eval.json").read_text()) == json.loads(json.dumps(record))
    assert (record["split"], record["checkpoint"], record["checkpoint_iteration"]) == ("val", "last.pt", 4)
    experiment = build_experiment(sinusoid())
    expected = evaluate(load_learner(run_dir / "last.pt"), experiment.problems("val"), episodes=5, steps=3)
    assert record["result"] == expected.to_dict() and record["summary"] == str(expected)
    assert evaluate_run(run_dir)["result"]["episodes"] == 8  # the test split: test_episodes
    assert evaluate_run(run_dir, split="val")["result"]["episodes"] == 6  # else eval_episodes
    with pytest.raises(ValueError, match="checkpoint must be 'best' or 'last', got 'first'"):
        evaluate_run(run_dir, checkpoint="first")


def test_load_learner_rebuilds_the_learner_of_a_checkpoint(sinusoid_run, tmp_path):
    run_dir, _ = sinusoid_run
    state = load_checkpoint(run_dir / "last.pt")
    learner = load_learner(run_dir / "last.pt")
    assert type(learner).__name__ == "MAML" and learner.device == torch.device("cpu")
    assert learner.state_dict().keys() == state["model"].keys()
    assert all(torch.equal(learner.state_dict()[k], v) for k, v in state["model"].items())
    # a checkpoint written before checkpoints carried their config: the config.json beside it is read
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in state.items() if k not in ("config", "format", "version")})
    old = load_learner(tmp_path / "old.pt")
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), learner.parameters()))
    save_checkpoint(tmp_path / "other.pt", {**state, "algorithm": "MetaSGD"})
    with pytest.raises(CheckpointError, match="holds a MetaSGD learner, not a MAML; load it into a MetaSGD"):
        load_learner(tmp_path / "other.pt")


def test_load_run_gives_the_trained_learner_in_evaluation_mode_ready_to_adapt(sinusoid_run):
    run_dir, _ = sinusoid_run
    learner = load_run(run_dir, checkpoint="last")
    assert not learner.training and not learner.model.training
    assert all(torch.equal(a, b) for a, b in zip(learner.parameters(), load_learner(run_dir / "last.pt").parameters()))
    episode = build_experiment(sinusoid()).problems("test").batch(0)[0]
    x = torch.linspace(-5, 5, 7).unsqueeze(1)
    by_support = learner.adapt_to(episode.support_x, episode.support_y, steps=2)(x)
    assert torch.equal(by_support, learner.adapt(episode, steps=2)(x))  # the query set is never read
    assert not torch.equal(by_support, learner.model(x))  # adapted: not the meta-learned initialisation
    with pytest.raises(ValueError, match="checkpoint must be 'best' or 'last'"):
        load_run(run_dir, checkpoint="final")


def test_a_run_trained_from_python_objects_loads_into_a_learner_built_again(tmp_path):
    def learner() -> MAML:
        torch.manual_seed(3)
        return MAML(MLP(1, 1, hidden=(8,)), inner_lr=0.01)

    trained = learner()
    MetaTrainer(trained, Sinusoid(batch_size=2, seed=0), TrainerConfig(iterations=2), run_dir=tmp_path).fit()
    with pytest.raises(ConfigError, match=r"trained from Python objects.*metaopt.load_weights\(learner, "):
        load_run(tmp_path, checkpoint="last")
    again = learner()
    assert not all(torch.equal(a, b) for a, b in zip(again.parameters(), trained.parameters()))
    assert load_weights(again, tmp_path / "last.pt")["iteration"] == 2
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), trained.parameters()))
    with pytest.raises(CheckpointError, match="holds a MAML learner, not a MetaSGD"):
        load_weights(MetaSGD(MLP(1, 1, hidden=(8,))), tmp_path / "last.pt")


@pytest.mark.parametrize("device", DEVICES)
def test_a_learned_optimizer_run_resumed_mid_problem_equals_an_uninterrupted_run(tmp_path, device):
    """Stopped after 3 truncations (the second problem half done), resumed to 6: the 6-iteration run, exactly.

    The carried θ and LSTM state come back from the checkpoint on the CPU and move to the run's device.
    """
    whole = train(quadratics(device), tmp_path / "whole")
    assert whole["result"]["metric"] == "loss" and whole["result"]["episodes"] == 2  # test_episodes
    assert set(whole["baselines"]) == {"scored", "table"} and (tmp_path / "whole" / "baselines.png").exists()
    assert list(whole["baselines"]["scored"]) == ["quadratics"]
    assert whole["baselines"]["table"].startswith("2 test problems, 4-step horizon; baselines' learning rates tuned "
                                                  "over (0.3, 0.03) on 1 validation problems")
    learner = load_learner(tmp_path / "whole" / "best.pt")
    assert isinstance(learner, OptimizerLearner) and learner.horizon == 4 and learner.device.type == "cpu"
    cut = train(quadratics(device, iterations=3), tmp_path / "cut")
    carried = load_checkpoint(tmp_path / "cut" / "last.pt")["estimator"]
    assert carried["name"] == "TruncatedBackprop" and cut["train"]["iteration"] == 3
    assert carried["state"]["started"] == 2 and carried["state"]["carried"]["step"] == 2  # inside problem 1
    torch.manual_seed(1234)  # the checkpoint restores the random state
    resumed = train(quadratics(device), tmp_path / "cut", resume=True)
    assert resumed["train"]["iteration"] == 6
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in ("whole", "cut"))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["estimator"]["state"]["started"] == b["estimator"]["state"]["started"] == 3
    assert a["best"] == b["best"]
    cut_records = untimed(tmp_path / "cut")
    assert {"val/loss", "val/loss_ci95"} <= set(cut_records[2])  # the first session ended at 3: it was evaluated
    cut_records[2] = {k: v for k, v in cut_records[2].items() if not k.startswith("val/")}
    assert cut_records == untimed(tmp_path / "whole")
    assert resumed["result"] == whole["result"] and resumed["baselines"] == whole["baselines"]
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["trainer"]["iterations"] == 6
    with pytest.raises(CheckpointError, match=r"differs from this trainer's config in \['algorithm.horizon'\]"):
        train(quadratics(device).replace(algorithm={"horizon": 6}), tmp_path / "cut", resume=True)
