"""UnrollOptions: each estimator is built from the options it reads, and options it does not read are refused."""

from __future__ import annotations

import pytest

from metaopt.estimators import PES, InnerRuns, TruncatedBackprop, TruncatedES
from metaopt.estimators.unroll_options import UnrollOptions, estimator_of
from metaopt.options import ConfigError, field_help
from metaopt.registry import BuildContext, entry, load_plugins


@pytest.mark.parametrize("estimator", ["backprop", "es", "pes"])
def test_each_estimator_gets_the_run_layout_and_loss_clip(estimator: str) -> None:
    runs = {"min_horizon": 50, "random_offset": True, "max_loss": 3.0}
    built = estimator_of(UnrollOptions(estimator=estimator, horizon=500, truncation=10, **runs))
    assert built.runs == InnerRuns(**runs) and {k: built.settings()[k] for k in runs} == runs
    assert "min_horizon" not in estimator_of(UnrollOptions(estimator=estimator)).settings()  # off: as before


def test_the_run_options_have_command_line_help() -> None:
    helps = field_help(UnrollOptions)
    assert "log-uniformly in [min_horizon, horizon]" in helps["min_horizon"]
    assert "lock-step" in helps["random_offset"] and "clip" in helps["max_loss"]


def test_each_estimator_gets_its_settings() -> None:
    assert estimator_of(UnrollOptions(truncation=5)).settings() == TruncatedBackprop(5).settings()
    es = estimator_of(UnrollOptions(estimator="es", truncation=4))
    assert isinstance(es, TruncatedES) and es.settings() == TruncatedES(truncation=4).settings()  # σ 0.01, 8 pairs
    pes = estimator_of(UnrollOptions(estimator="pes", sigma=0.1, pairs=3, tasks=4, truncation=2, horizon=6))
    assert isinstance(pes, PES) and (pes.sigma, pes.pairs, pes.tasks, pes.truncation) == (0.1, 3, 4, 2)
    assert estimator_of(UnrollOptions(truncation=5, tasks=3)).tasks == 3


@pytest.mark.parametrize("options, message", [
    ({"sigma": 0.1}, "option 'sigma' belongs to the ES and PES estimators; it does nothing with estimator='backprop'"),
    ({"pairs": 4}, "option 'pairs' belongs to the ES and PES estimators"),
    ({"vmap_particles": True}, "option 'vmap_particles' belongs to the ES and PES estimators"),
    ({"estimator": "pes", "tasks": 0}, "option 'tasks' must be > 0"),
    ({"estimator": "pes", "second_derivatives": True}, "option 'second_derivatives' is of backpropagation; "
                                                       "estimator='pes' reads losses only"),
    ({"estimator": "reinforce"}, r"option 'estimator' must be one of \('backprop', 'es', 'pes'\)"),
    ({"estimator": "es", "sigma": 0.0}, "option 'sigma' must be > 0"),
    ({"truncation": 30, "horizon": 20}, r"option 'truncation' \(30\) must not exceed the horizon \(20\)"),
    ({"min_horizon": 0}, "option 'min_horizon' must be > 0, got 0"),
    ({"min_horizon": 200, "horizon": 100}, r"option 'min_horizon' \(200\) must not exceed the horizon \(100\): "
                                           r"run lengths are drawn in \[min_horizon, horizon\]"),
    ({"min_horizon": 10, "truncation": 20}, r"option 'truncation' \(20\) must not exceed min_horizon \(10\), the "
                                            "shortest drawn run"),
    ({"max_loss": float("inf")}, "option 'max_loss' must be a finite number"),
    ({"random_offset": 1}, "option 'random_offset' must be bool"),
])
def test_options_an_estimator_does_not_read_are_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UnrollOptions(**options)


@pytest.mark.parametrize("algorithm", ["l2l", "mlp-lopt", "rnn-mlp-lopt"])
def test_the_learned_optimizers_train_with_the_estimator_their_options_choose(algorithm: str) -> None:
    load_plugins()
    found = entry("algorithm", algorithm)
    options = found.options.from_dict({"estimator": "pes", "pairs": 2, "horizon": 8, "truncation": 4})
    _, estimator = found.build(options, BuildContext(None, None))
    assert isinstance(estimator, PES) and (estimator.pairs, estimator.truncation) == (2, 4)
