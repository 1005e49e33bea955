"""Tests of metaopt/engine/learner_options.py: the option sets algorithms compose their options from."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from metaopt.engine.batching import STRATEGIES
from metaopt.engine.batchnorm import POLICIES
from metaopt.engine.learner_options import AdaptOptions, InnerLoopOptions, SecondOrderOptions
from metaopt.options import ConfigError


@dataclass(frozen=True)
class Composed(InnerLoopOptions, SecondOrderOptions, AdaptOptions):
    """All three."""


def test_a_composed_set_has_the_options_of_its_parts_and_their_defaults():
    assert set(Composed.field_names()) == {"inner_steps", "eval_inner_steps", "strategy", "bn_policy", "first_order",
                                           "checkpoint_steps", "adapt"}
    assert Composed().to_dict() == {"adapt": "all", "first_order": False, "checkpoint_steps": False, "inner_steps": 1,
                                    "eval_inner_steps": None, "strategy": "auto", "bn_policy": "batch"}


def test_the_choices_are_the_engines():
    for strategy in STRATEGIES:
        assert InnerLoopOptions(strategy=strategy).strategy == strategy
    for policy in POLICIES:
        assert InnerLoopOptions(bn_policy=policy).bn_policy == policy


@pytest.mark.parametrize(("options", "message"), [
    (lambda: InnerLoopOptions(strategy="vmapp"),
     "option 'strategy' must be one of ('auto', 'loop', 'vmap', 'compiled')"),
    (lambda: InnerLoopOptions(bn_policy="train"), "option 'bn_policy' must be one of ('batch', 'frozen'"),
    (lambda: InnerLoopOptions(inner_steps=0), "option 'inner_steps' must be > 0"),
    (lambda: InnerLoopOptions(eval_inner_steps=0), "option 'eval_inner_steps' must be > 0"),
    (lambda: SecondOrderOptions(first_order=True, checkpoint_steps=True), "it does nothing with first_order=True"),
    (lambda: AdaptOptions(adapt=" "), "option 'adapt' must not be empty"),
])
def test_bad_settings_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options()
