"""Name -> builder tables that the plugin packages fill: ``metaopt.algorithms`` and ``metaopt.datasets``.

Core modules never import an algorithm or a dataset (the dependency points the other way). A
plugin registers a builder under the name a config uses; the experiment layer imports the
plugin packages (:func:`metaopt.experiment.load_plugins`) and looks builders up here.

* an algorithm builder is ``build(model, config) -> MetaLearner``;
* a dataset builder is ``build(config, split, seed) -> TaskSampler`` with ``split`` one of
  ``"train"``, ``"val"``, ``"test"``.

The tables are filled once, while the plugin packages are imported; registering a name for a
second builder is an error.

Example:
    >>> import metaopt.datasets  # the plugin package registers its builders on import
    >>> "sinusoid" in dataset_names()
    True
    >>> dataset_builder("sinusiod")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: unknown dataset 'sinusiod'; did you mean 'sinusoid'? Registered: [...]
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "algorithm_builder",
    "algorithm_names",
    "dataset_builder",
    "dataset_names",
    "register_algorithm",
    "register_dataset",
]

Builder = TypeVar("Builder", bound=Callable)

_ALGORITHMS: dict[str, Callable] = {}
_DATASETS: dict[str, Callable] = {}


def _same_function(a: Callable, b: Callable) -> bool:
    """Whether ``a`` and ``b`` are one function whose file was imported under two module names.

    pytest's doctest collection imports ``algorithms/__init__.py`` as ``algorithms`` besides the
    installed ``metaopt.algorithms``; the second registration must not fail.
    """
    return a.__qualname__ == b.__qualname__ and inspect.getsourcefile(a) == inspect.getsourcefile(b)


def _register(table: dict[str, Callable], kind: str, name: str) -> Callable[[Builder], Builder]:
    def decorator(builder: Builder) -> Builder:
        if name not in table:
            table[name] = builder
        elif not _same_function(table[name], builder):
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__module__}); pick another name")
        return builder

    return decorator


def _lookup(table: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown {kind} {name!r}; {hint}Registered: {sorted(table)}")
    return table[name]


def register_algorithm(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``build(model, config) -> MetaLearner`` under ``name``."""
    return _register(_ALGORITHMS, "algorithm", name)


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``build(config, split, seed) -> TaskSampler`` under ``name``."""
    return _register(_DATASETS, "dataset", name)


def algorithm_builder(name: str) -> Callable:
    """The builder registered as algorithm ``name``; the error suggests the closest name."""
    return _lookup(_ALGORITHMS, "algorithm", name)


def dataset_builder(name: str) -> Callable:
    """The builder registered as dataset ``name``; the error suggests the closest name."""
    return _lookup(_DATASETS, "dataset", name)


def algorithm_names() -> list[str]:
    """Names of the registered algorithms, sorted."""
    return sorted(_ALGORITHMS)


def dataset_names() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(_DATASETS)
