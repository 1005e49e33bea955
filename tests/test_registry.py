"""Tests of metaopt/registry.py: plugins register themselves with their options, names are checked."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from metaopt import registry
from metaopt.options import ConfigError, Options
from metaopt.registry import entry, load_plugins, names, register_algorithm


@dataclass(frozen=True)
class _NoOptions(Options):
    """No options."""


def test_loading_the_plugins_registers_every_shipped_part():
    load_plugins()
    assert {"maml", "mamlpp", "metasgd", "mtnet", "tnet", "arml", "metalstm", "l2l"} <= set(names("algorithm"))
    assert {"sinusoid", "omniglot", "miniimagenet", "quadratics", "mnist-mlp"} <= set(names("dataset"))
    assert {"mlp", "conv4"} <= set(names("model"))


def test_entries_declare_their_options_and_problems():
    load_plugins()
    maml, l2l = entry("algorithm", "maml"), entry("algorithm", "l2l")
    assert (maml.options.__name__, maml.problems, maml.kind) == ("MAMLOptions", "episodes", "algorithm")
    assert (l2l.problems, entry("dataset", "quadratics").problems) == ("optimizees", "optimizees")
    assert entry("model", "conv4").problems is None
    assert maml.summary.startswith("MAML (Finn et al. 2017)")


def test_an_unknown_name_suggests_the_closest():
    load_plugins()
    with pytest.raises(ConfigError, match=r"unknown algorithm 'mamll' \(did you mean 'maml'\?\); registered: \["):
        entry("algorithm", "mamll")


def test_a_name_registered_twice_by_different_builders_is_an_error(monkeypatch):
    monkeypatch.setitem(registry._TABLES, "algorithm", dict(registry._TABLES["algorithm"]))

    @register_algorithm("toy-twice", _NoOptions)
    def first(options, context):
        """First."""

    assert entry("algorithm", "toy-twice").build is first
    register_algorithm("toy-twice", _NoOptions)(first)  # the same function again (a module imported twice): fine
    with pytest.raises(ValueError, match="'toy-twice' is already registered"):
        @register_algorithm("toy-twice", _NoOptions)
        def second(options, context):
            """Second."""


def test_options_must_be_an_option_set():
    with pytest.raises(TypeError, match="options must be a metaopt.options.Options subclass"):
        register_algorithm("toy-bad", dict)
