"""Which inner step and which kind of pass a forward pass belongs to, for layers that depend on it.

The inner loops mark every forward pass: :func:`inner_step` with the step it belongs to (the
support pass that takes step ``t``, and the outer pass on the parameters that step produced),
:func:`outer_pass` for passes that score the outer loss (the query set). Layers read the marks:
MAML++'s per-step batch norm (:class:`metaopt.engine.per_step_batchnorm.PerStepBatchNorm`) picks
its row for the step, the ``"support"`` batch-norm policy normalises outer passes with the support
statistics. The marks are thread-local attributes, set on entry and restored on exit, so nothing
global changes (thread-local attributes rather than context variables, because ``torch.compile``
traces them, as the compiled strategy needs, and cannot trace ``ContextVar.set``).

Example:
    >>> with inner_step(2), outer_pass():
    ...     current_inner_step(), in_outer_pass()
    (2, True)
    >>> current_inner_step(), in_outer_pass()
    (0, False)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["current_inner_step", "in_outer_pass", "inner_step", "outer_pass"]


class _Marks(threading.local):
    """This thread's marks: the inner step and whether the pass is an outer one."""

    def __init__(self) -> None:
        self.step = 0
        self.outer = False


_MARKS = _Marks()


@contextlib.contextmanager
def _setting(name: str, value: object) -> Iterator[None]:
    previous = getattr(_MARKS, name)
    setattr(_MARKS, name, value)
    try:
        yield
    finally:
        setattr(_MARKS, name, previous)


def inner_step(t: int) -> contextlib.AbstractContextManager[None]:
    """Forward passes inside this context belong to inner step ``t``."""
    return _setting("step", t)


def current_inner_step() -> int:
    """The step set by the innermost :func:`inner_step` context (0 outside any)."""
    return _MARKS.step


def outer_pass() -> contextlib.AbstractContextManager[None]:
    """Forward passes inside this context score the outer loss (a query set)."""
    return _setting("outer", True)


def in_outer_pass() -> bool:
    """Whether the current forward pass scores the outer loss (:func:`outer_pass`)."""
    return _MARKS.outer
