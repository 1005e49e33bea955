"""UnrollOptions: each estimator is built from the options it reads, and options it does not read are refused."""

from __future__ import annotations

import pytest

from metaopt.estimators import PES, TruncatedBackprop, TruncatedES
from metaopt.estimators.unroll_options import UnrollOptions, estimator_of
from metaopt.options import ConfigError
from metaopt.registry import BuildContext, entry, load_plugins


def test_each_estimator_gets_its_settings() -> None:
    assert estimator_of(UnrollOptions(truncation=5)).settings() == TruncatedBackprop(5).settings()
    es = estimator_of(UnrollOptions(estimator="es", truncation=4))
    assert isinstance(es, TruncatedES) and es.settings() == TruncatedES(truncation=4).settings()  # σ 0.01, 8 pairs
    pes = estimator_of(UnrollOptions(estimator="pes", sigma=0.1, pairs=3, truncation=2, horizon=6))
    assert isinstance(pes, PES) and (pes.sigma, pes.pairs, pes.truncation) == (0.1, 3, 2)


@pytest.mark.parametrize("options, message", [
    ({"sigma": 0.1}, "option 'sigma' belongs to the ES and PES estimators; it does nothing with estimator='backprop'"),
    ({"pairs": 4}, "option 'pairs' belongs to the ES and PES estimators"),
    ({"estimator": "pes", "second_derivatives": True}, "option 'second_derivatives' is of backpropagation; "
                                                       "estimator='pes' reads losses only"),
    ({"estimator": "reinforce"}, r"option 'estimator' must be one of \('backprop', 'es', 'pes'\)"),
    ({"estimator": "es", "sigma": 0.0}, "option 'sigma' must be > 0"),
    ({"truncation": 30, "horizon": 20}, r"option 'truncation' \(30\) must not exceed the horizon \(20\)"),
])
def test_options_an_estimator_does_not_read_are_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        UnrollOptions(**options)


@pytest.mark.parametrize("algorithm", ["l2l", "mlp-lopt"])
def test_the_learned_optimizers_train_with_the_estimator_their_options_choose(algorithm: str) -> None:
    load_plugins()
    found = entry("algorithm", algorithm)
    options = found.options.from_dict({"estimator": "pes", "pairs": 2, "horizon": 8, "truncation": 4})
    _, estimator = found.build(options, BuildContext(None, None))
    assert isinstance(estimator, PES) and (estimator.pairs, estimator.truncation) == (2, 4)
