"""Recomputed inner steps: keep a step's inputs and outputs, recompute the rest in the meta-backward.

With ``checkpoint_steps`` (:class:`metaopt.engine.inner.InnerLoop`) every second-order inner step
runs through :func:`recomputed`, a non-reentrant :func:`torch.utils.checkpoint.checkpoint`: it
keeps only the parameters and rule state the step starts from and ends with, and recomputes the
step's inner loss, gradients and update when the meta-backward reaches it. The meta-gradients
are the same (recomputation repeats the same operations); each step costs two more inner forward
passes and one more inner backward pass (torch recomputes the forward once when the step takes
its inner gradient, and the whole step in the meta-backward).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> x = torch.randn(4, 2, requires_grad=True)
    >>> y = recomputed(model, lambda x: (model(x) ** 2).sum(), x)
    >>> y.backward()
    >>> x.grad.shape
    torch.Size([4, 2])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["recomputed"]


class _ModuleState:
    """Re-enterable context that puts ``model`` back as it was at construction: training flags and buffers.

    A checkpointed step is recomputed during the meta-backward, usually after the batch-norm
    policy of the forward pass (:meth:`metaopt.engine.batchnorm.BatchNormPolicy.meta_batch`) has been exited.
    Inside this context the recomputation sees the modules as the forward did (train/eval mode,
    running statistics or their absence), so it repeats the same operations and leaves the
    model's buffers alone. Torch may enter it more than once (a gradient taken inside the step
    recomputes it during the forward pass too).
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved = self._state(model)
        self._outer: list[list[tuple[nn.Module, bool, dict[str, torch.Tensor | None]]]] = []

    @staticmethod
    def _state(model: nn.Module) -> list[tuple[nn.Module, bool, dict[str, torch.Tensor | None]]]:
        return [(m, m.training, dict(m._buffers)) for m in model.modules()]

    @staticmethod
    def _apply(state: list[tuple[nn.Module, bool, dict[str, torch.Tensor | None]]]) -> None:
        for module, training, buffers in state:
            module.training = training
            module._buffers.update(buffers)

    def __enter__(self) -> None:
        self._outer.append(self._state(self._saved[0][0]))
        self._apply(self._saved)

    def __exit__(self, *exc_info: object) -> None:
        self._apply(self._outer.pop())


def recomputed(model: nn.Module, step: Callable[..., Any], *args: Any) -> Any:
    """``step(*args)`` keeping only its inputs and outputs; the rest is recomputed in the backward pass."""
    state = _ModuleState(model)
    return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), state))
