"""Tests of metaopt/options.py: option sets convert and check their values, and unknown keys name the owner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from metaopt.options import ConfigError, Options, field_help


@dataclass(frozen=True)
class Toy(Options):
    """A toy option set.

    Args:
        lr: the step size, a long description that goes on
            over two lines.
        steps: how many steps.
        mode: how to step.
        sizes: layer sizes.
        clip: an optional bound.
    """

    positive = ("lr", "clip")
    lr: float = 0.1
    steps: int = 1
    mode: Literal["fast", "slow"] = "fast"
    sizes: tuple[int, ...] = (8, 8)
    clip: float | None = None


@dataclass(frozen=True)
class Derived(Toy):
    """A derived set.

    Args:
        extra: one more.
    """

    extra: bool = False

    def check(self) -> None:
        super().check()
        if self.extra and self.mode == "slow":
            raise ConfigError("option 'extra' needs mode='fast'")


def test_values_are_converted_to_the_field_types():
    toy = Toy(lr=1, sizes=[4, 2], clip=3)
    assert (toy.lr, toy.sizes, toy.clip) == (1.0, (4, 2), 3.0)
    assert isinstance(toy.lr, float) and isinstance(toy.clip, float)
    assert toy.to_dict() == {"lr": 1.0, "steps": 1, "mode": "fast", "sizes": [4, 2], "clip": 3.0}


@pytest.mark.parametrize(("changes", "message"), [
    ({"steps": 1.5}, "option 'steps' must be int, got 1.5 (float)"),
    ({"steps": True}, "option 'steps' must be int, got True (bool)"),
    ({"lr": "0.1"}, "option 'lr' must be float, got '0.1' (str)"),
    ({"mode": "slo"}, "option 'mode' must be one of ('fast', 'slow'), got 'slo' (did you mean 'slow'?)"),
    ({"sizes": 3}, "option 'sizes' must be a list, got 3 (int)"),
    ({"sizes": [1, "a"]}, "option 'sizes' must be int, got 'a' (str)"),
    ({"lr": 0}, "option 'lr' must be > 0, got 0.0"),
    ({"clip": -1}, "option 'clip' must be > 0, got -1.0"),
])
def test_bad_values_name_the_option_and_what_it_takes(changes, message):
    with pytest.raises(ConfigError) as error:
        Toy(**changes)
    assert str(error.value) == message


def test_unknown_keys_name_the_owner_the_closest_option_and_every_option():
    with pytest.raises(ConfigError) as error:
        Toy.from_dict({"step": 2, "moode": "slow"}, owner="algorithm 'toy'")
    assert str(error.value) == ("'step' (did you mean 'steps'?), 'moode' (did you mean 'mode'?) are not options of "
                                "algorithm 'toy'; its options are lr, steps, mode, sizes, clip")


def test_checks_across_fields_run_after_the_bases_checks():
    assert Derived(extra=True).extra
    with pytest.raises(ConfigError, match="needs mode='fast'"):
        Derived(extra=True, mode="slow")
    with pytest.raises(ConfigError, match="'lr' must be > 0"):
        Derived(lr=-1.0)


def test_replace_checks_the_changes():
    assert Toy().replace(steps=3).steps == 3
    with pytest.raises(ConfigError, match="'stepz' .* is not an option"):
        Toy().replace(stepz=3)


def test_help_comes_from_the_docstrings_of_the_class_and_its_bases():
    helps = field_help(Derived)
    assert helps["lr"] == "the step size, a long description that goes on over two lines"
    assert helps["extra"] == "one more" and set(helps) == {"lr", "steps", "mode", "sizes", "clip", "extra"}


@dataclass(frozen=True)
class WithChoices(Options):
    """Choices kept elsewhere."""

    choices = {"kind": ("loop", "vmap")}
    kind: str = "loop"


def test_choices_kept_elsewhere_are_checked_with_a_suggestion():
    assert WithChoices(kind="vmap").kind == "vmap"
    with pytest.raises(ConfigError, match=r"option 'kind' must be one of \('loop', 'vmap'\), got 'vmapp' "
                                          r"\(did you mean 'vmap'\?\)"):
        WithChoices(kind="vmapp")
