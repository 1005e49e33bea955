"""Step and pass marks: set inside their contexts, restored on exit (also after an exception), nothing global."""

from __future__ import annotations

import threading

import pytest

from metaopt.engine.step_context import current_inner_step, in_outer_pass, inner_step, outer_pass


def test_inner_step_context_sets_and_restores_the_step() -> None:
    assert current_inner_step() == 0
    with inner_step(2):
        assert current_inner_step() == 2
        with inner_step(4):
            assert current_inner_step() == 4
        assert current_inner_step() == 2
    assert current_inner_step() == 0
    with pytest.raises(RuntimeError, match="boom"), inner_step(3):
        raise RuntimeError("boom")
    assert current_inner_step() == 0


def test_outer_pass_context_sets_and_restores_the_mark() -> None:
    assert not in_outer_pass()
    with outer_pass():
        assert in_outer_pass()
        with outer_pass():
            assert in_outer_pass()
        assert in_outer_pass()  # the inner context restores the outer one's mark, not the default
    assert not in_outer_pass()
    with pytest.raises(RuntimeError, match="boom"), outer_pass():
        raise RuntimeError("boom")
    assert not in_outer_pass()


def test_the_marks_are_independent() -> None:
    with inner_step(5):
        assert not in_outer_pass()
        with outer_pass():
            assert current_inner_step() == 5
        with inner_step(1), outer_pass():
            assert (current_inner_step(), in_outer_pass()) == (1, True)
        assert (current_inner_step(), in_outer_pass()) == (5, False)


def test_the_marks_are_not_global() -> None:
    """Thread-local: another thread sees the defaults while this one is inside the contexts."""
    seen = []
    with inner_step(3), outer_pass():
        thread = threading.Thread(target=lambda: seen.append((current_inner_step(), in_outer_pass())))
        thread.start()
        thread.join()
        assert (current_inner_step(), in_outer_pass()) == (3, True)
    assert seen == [(0, False)]
