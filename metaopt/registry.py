"""Named algorithms, datasets and models, each with the option set it takes.

A plugin registers itself in its own file with a decorator on its builder; the options class
beside it declares and checks what a config may set (:class:`metaopt.options.Options`). The core
never imports a plugin: :func:`load_plugins` imports every module of the plugin packages
``metaopt.algorithms`` and ``metaopt.datasets``, which registers them, so a new algorithm or
dataset is one new file.

* an algorithm builder is ``build(options, context) -> Learner`` (or ``(learner, estimator)``;
  a bare learner is trained by backpropagation through its inner loop);
* a dataset builder is ``build(options, split, seed) -> problem source`` with ``split`` one of
  ``"train"``, ``"val"``, ``"test"`` and ``seed`` the run's seed;
* a model builder is ``build(options, example) -> nn.Module``, sized for a sample batch.

Algorithms and datasets declare the kind of problems they work on, ``"episodes"`` (few-shot
tasks), ``"optimizees"`` (training problems of a learned optimizer) or ``"rules"`` (the rewards of
searched update rules), so that mismatched pairs
are refused with a message instead of failing deep inside a run.

Example:
    >>> load_plugins()
    >>> "sinusoid" in names("dataset"), entry("algorithm", "maml").options.__name__
    (True, 'MAMLOptions')
    >>> entry("dataset", "sinusiod")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    metaopt.options.ConfigError: unknown dataset 'sinusiod' (did you mean 'sinusoid'?); registered: [...]
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from metaopt.options import ConfigError, Options, closest

__all__ = ["KINDS", "PLUGIN_PACKAGES", "BuildContext", "Entry", "entry", "load_plugins", "names",
           "register_algorithm", "register_dataset", "register_model"]

Kind = Literal["algorithm", "dataset", "model"]
Problems = Literal["episodes", "optimizees", "rules"]
KINDS: tuple[Kind, ...] = ("algorithm", "dataset", "model")
PLUGIN_PACKAGES = ("metaopt.algorithms", "metaopt.datasets")
Builder = TypeVar("Builder", bound=Callable)


@dataclass(frozen=True)
class Entry:
    """A registered builder.

    Attributes:
        kind: ``"algorithm"``, ``"dataset"`` or ``"model"``.
        name: the name configs use.
        options: the option set its builder takes.
        build: the builder.
        problems: algorithms and datasets: the kind of problems they work on.
        summary: the first line of the builder's docstring (command-line help).
    """

    kind: Kind
    name: str
    options: type[Options]
    build: Callable
    problems: Problems | None = None

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.build) or "").split("\n")[0]


@dataclass(frozen=True)
class BuildContext:
    """What an algorithm builder receives besides its options.

    Attributes:
        model: the network built from the run's model section (few-shot algorithms), else ``None``.
        example: a sample batch of the training problems (an ``Episode`` batch, or an optimizee).
    """

    model: Any
    example: Any


_TABLES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}


def _same_function(a: Callable, b: Callable) -> bool:
    """Whether ``a`` and ``b`` are one function whose file was imported under two module names.

    pytest's doctest collection imports ``algorithms/maml.py`` as ``algorithms.maml`` besides the
    installed ``metaopt.algorithms.maml``; the second registration must not fail.
    """
    return a.__qualname__ == b.__qualname__ and inspect.getsourcefile(a) == inspect.getsourcefile(b)


def _register(kind: Kind, name: str, options: type[Options], problems: Problems | None) -> Callable[[Builder], Builder]:
    if not (isinstance(options, type) and issubclass(options, Options)):
        raise TypeError(f"{kind} {name!r}: options must be a metaopt.options.Options subclass, got {options!r}")

    def decorator(build: Builder) -> Builder:
        table = _TABLES[kind]
        if name in table and not _same_function(table[name].build, build):
            raise ValueError(f"{kind} {name!r} is already registered (by {table[name].build.__module__}); "
                             "pick another name")
        table.setdefault(name, Entry(kind, name, options, build, problems))
        return build

    return decorator


def register_algorithm(name: str, options: type[Options], problems: Problems = "episodes",
                       ) -> Callable[[Builder], Builder]:
    """Register ``build(options, context) -> Learner | (Learner, Estimator)`` as algorithm ``name``."""
    return _register("algorithm", name, options, problems)


def register_dataset(name: str, options: type[Options], problems: Problems = "episodes",
                     ) -> Callable[[Builder], Builder]:
    """Register ``build(options, split, seed) -> problem source`` as dataset ``name``."""
    return _register("dataset", name, options, problems)


def register_model(name: str, options: type[Options]) -> Callable[[Builder], Builder]:
    """Register ``build(options, example) -> nn.Module`` as model ``name``."""
    return _register("model", name, options, None)


def load_plugins() -> None:
    """Import every module of the plugin packages, which registers their algorithms and datasets."""
    importlib.import_module("metaopt.models")
    for package_name in PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package_name}.{module.name}")


def entry(kind: Kind, name: str) -> Entry:
    """The entry registered as ``name``; an unknown name is a ConfigError suggesting the closest one."""
    table = _TABLES[kind]
    if name not in table:
        raise ConfigError(f"unknown {kind} {name!r}{closest(name, list(table))}; registered: {sorted(table)}")
    return table[name]


def names(kind: Kind) -> list[str]:
    """The registered names of ``kind``, sorted."""
    return sorted(_TABLES[kind])
