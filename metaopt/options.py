"""Typed, checked option sets: the base of every config section (trainer, algorithm, dataset, model).

An option set is a frozen dataclass whose fields are the options; building one converts each
value to its field's type (an int where a float is declared, a list where a tuple is) and runs
:meth:`Options.check`. Loading from a mapping rejects unknown keys, naming the closest valid one
and listing every option the owner takes, so that a misspelt or misplaced key is never silently
ignored. ``Literal`` fields list their choices, ``X | None`` fields accept ``None``.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Toy(Options):
    ...     '''A toy.
    ...
    ...     Args:
    ...         lr: step size.
    ...         steps: how many steps.
    ...     '''
    ...     lr: float = 0.1
    ...     steps: int = 1
    >>> Toy.from_dict({"lr": 1}, owner="algorithm 'toy'")
    Toy(lr=1.0, steps=1)
    >>> Toy.from_dict({"step": 2}, owner="algorithm 'toy'")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    metaopt.options.ConfigError: 'step' (did you mean 'steps'?) is not an option of algorithm 'toy'; its options are ...
    >>> Toy(steps="3")
    Traceback (most recent call last):
        ...
    metaopt.options.ConfigError: option 'steps' must be int, got '3' (str)
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeVar

__all__ = ["ConfigError", "Options", "closest", "field_help"]

OptionsT = TypeVar("OptionsT", bound="Options")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names it and what is allowed."""


def closest(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``name``, or an empty string."""
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _conform(name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the field type ``hint`` (int -> float, list -> tuple), or a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _conform(name, value, options[0])
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            hint_text = closest(value, list(choices)) if isinstance(value, str) else ""
            raise ConfigError(f"option {name!r} must be one of {choices}, got {value!r}{hint_text}")
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        kind = typing.get_args(hint)[0]
        return tuple(_conform(name, v, kind) for v in value)
    if origin in (dict, Mapping) and isinstance(value, Mapping):
        return dict(value)
    if hint is float and (_is_int(value) or isinstance(value, float)):
        return float(value)
    if (hint is int and _is_int(value)) or (hint in (str, bool) and type(value) is hint):
        return value
    expected = {tuple: "a list", dict: "a mapping"}.get(origin, getattr(hint, "__name__", str(hint)))
    raise ConfigError(f"option {name!r} must be {expected}, got {value!r} ({type(value).__name__})")


def field_help(cls: type) -> dict[str, str]:
    """One help line per field, taken from the ``Args:`` section of the docstrings of ``cls`` and its bases."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        name = None
        for line in (inspect.getdoc(klass) or "").partition("Args:\n")[2].splitlines():
            match = re.fullmatch(r" {4}(\w+): (.*)", line)
            if match:
                name, helps[match.group(1)] = match.group(1), match.group(2)
            elif name and line.startswith(" " * 8):
                helps[name] += " " + line.strip()
            elif line.strip() and not line.startswith(" "):
                break
    return {k: v.replace("``", "").rstrip(".") for k, v in helps.items()}


@dataclass(frozen=True)
class Options:
    """Base of the option sets: fields are options, values are converted and checked when built.

    Subclasses declare fields with defaults and document each in an ``Args:`` section (that text
    is the command line's help); they override :meth:`check` for checks across fields, calling
    ``super().check()``. Fields listed in ``positive`` must be > 0 when set; a field in
    ``choices`` must hold one of its values (for choices kept elsewhere, such as the engine's
    strategies; fixed ones are ``Literal`` fields).
    """

    positive: ClassVar[tuple[str, ...]] = ()
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            object.__setattr__(self, f.name, _conform(f.name, getattr(self, f.name), hints[f.name]))
        self.check()

    def check(self) -> None:
        """Checks across fields; raise :class:`ConfigError` naming the option and what is allowed."""
        for name in self.positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"option {name!r} must be > 0, got {value}")
        for name, allowed in self.choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"option {name!r} must be one of {allowed}, got {value!r}"
                                  f"{closest(value, list(allowed)) if isinstance(value, str) else ''}")

    @classmethod
    def field_names(cls) -> list[str]:
        """The options, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls: type[OptionsT], raw: Mapping[str, Any], owner: str = "this config") -> OptionsT:
        """Build from a mapping; an unknown key names the closest option and lists all of them."""
        valid = cls.field_names()
        unknown = [key for key in raw if key not in valid]
        if unknown:
            listed = ", ".join(f"{key!r}{closest(key, valid)}" for key in unknown)
            verb = "are not options" if len(unknown) > 1 else "is not an option"
            takes = f"its options are {', '.join(valid)}" if valid else "it takes no options"
            raise ConfigError(f"{listed} {verb} of {owner}; {takes}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON-ready values (tuples become lists)."""
        return {name: list(v) if isinstance(v, tuple) else v for name, v in dataclasses.asdict(self).items()}

    def replace(self: OptionsT, **changes: Any) -> OptionsT:
        """A copy with ``changes`` applied and checked (unknown names are an error)."""
        return type(self).from_dict({**self.to_dict(), **changes}, owner=type(self).__name__)
