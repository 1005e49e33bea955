"""Which inner step and which kind of pass a forward pass belongs to, for layers that depend on it.

The inner loops mark every forward pass: :func:`inner_step` with the step it belongs to (the
support pass that takes step ``t``, and the outer pass on the parameters that step produced),
:func:`outer_pass` for passes that score the outer loss (the query set). Layers read the marks:
MAML++'s per-step batch norm (:class:`metaopt.engine.per_step_batchnorm.PerStepBatchNorm`) picks
its row for the step, the ``"support"`` batch-norm policy normalises outer passes with the support
statistics. The marks are context variables, restored on exit, so nothing global changes.

Example:
    >>> with inner_step(2), outer_pass():
    ...     current_inner_step(), in_outer_pass()
    (2, True)
    >>> current_inner_step(), in_outer_pass()
    (0, False)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["current_inner_step", "in_outer_pass", "inner_step", "outer_pass"]

_INNER_STEP: contextvars.ContextVar[int] = contextvars.ContextVar("metaopt_inner_step", default=0)
_OUTER_PASS: contextvars.ContextVar[bool] = contextvars.ContextVar("metaopt_outer_pass", default=False)


@contextlib.contextmanager
def _setting(variable: contextvars.ContextVar, value: object) -> Iterator[None]:
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def inner_step(t: int) -> contextlib.AbstractContextManager[None]:
    """Forward passes inside this context belong to inner step ``t``."""
    return _setting(_INNER_STEP, t)


def current_inner_step() -> int:
    """The step set by the innermost :func:`inner_step` context (0 outside any)."""
    return _INNER_STEP.get()


def outer_pass() -> contextlib.AbstractContextManager[None]:
    """Forward passes inside this context score the outer loss (a query set)."""
    return _setting(_OUTER_PASS, True)


def in_outer_pass() -> bool:
    """Whether the current forward pass scores the outer loss (:func:`outer_pass`)."""
    return _OUTER_PASS.get()
