"""Episodes: the support and query sets of one task, or a stacked batch of tasks.

An :class:`Episode` is the unit every few-shot algorithm consumes. Classification episodes carry
integer labels in ``[0, ways)``; regression episodes carry floating-point targets. A batch of ``T``
tasks is the same class with a leading task dimension, built by :meth:`Episode.stack`.

Example:
    >>> import torch
    >>> ep = Episode(torch.randn(5, 3), torch.arange(5), torch.randn(10, 3), torch.arange(5).repeat(2))
    >>> ep.ways, ep.is_batched
    (5, False)
    >>> Episode.stack([ep, ep]).support_x.shape
    torch.Size([2, 5, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Episode", "EpisodeError"]


class EpisodeError(ValueError):
    """An episode's tensors are inconsistent; the message names the tensor and the fix."""


@dataclass(frozen=True)
class Episode:
    """Support and query tensors of one task (or of ``T`` tasks when ``batched``).

    Args:
        support_x: inputs of the support set, ``[N_s, ...]`` (``[T, N_s, ...]`` when batched).
        support_y: targets of the support set: ``long`` labels for classification, floating
            values for regression.
        query_x: inputs of the query set.
        query_y: targets of the query set, same kind as ``support_y``.
        ways: number of classes; inferred from the support labels when omitted.
        batched: whether the first dimension indexes tasks (set by :meth:`stack`).
        validate: run the checks (shapes, dtypes, label range, finiteness) on construction.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int | None = None
    batched: bool = False
    validate: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.is_classification and self.ways is None:
            object.__setattr__(self, "ways", int(self.support_y.max().item()) + 1 if self.support_y.numel() else 0)
        if self.validate:
            self._check()

    @property
    def is_batched(self) -> bool:
        return self.batched

    @property
    def is_classification(self) -> bool:
        return not self.support_y.is_floating_point()

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0] if self.batched else 1

    def _check(self) -> None:
        names = ("support_x", "support_y", "query_x", "query_y")
        tensors = (self.support_x, self.support_y, self.query_x, self.query_y)
        for name, t in zip(names, tensors):
            if not isinstance(t, torch.Tensor):
                raise EpisodeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        lead = 2 if self.batched else 1
        for name, t in zip(names, tensors):
            if t.dim() < lead:
                raise EpisodeError(f"{name} has shape {tuple(t.shape)}; expected at least {lead} dimension(s)")
        if self.batched and len({t.shape[0] for t in tensors}) != 1:
            raise EpisodeError(f"task dimension differs: {[tuple(t.shape) for t in tensors]}")
        d = 1 if self.batched else 0
        for x_name, x, y_name, y in (("support_x", self.support_x, "support_y", self.support_y),
                                     ("query_x", self.query_x, "query_y", self.query_y)):
            if x.shape[d] != y.shape[d]:
                raise EpisodeError(f"{x_name} has {x.shape[d]} examples but {y_name} has {y.shape[d]}")
            if x.shape[d] == 0:
                raise EpisodeError(f"{x_name} is empty: every task needs at least one support and one query example")
            if not x.is_floating_point():
                raise EpisodeError(f"{x_name} has dtype {x.dtype}; inputs must be floating point (use .float())")
            if not torch.isfinite(x).all():
                raise EpisodeError(f"{x_name} contains NaN or infinite values")
        if self.support_x.shape[d + 1:] != self.query_x.shape[d + 1:]:
            raise EpisodeError(f"support_x examples have shape {tuple(self.support_x.shape[d + 1:])} but "
                               f"query_x examples have shape {tuple(self.query_x.shape[d + 1:])}")
        if self.support_y.is_floating_point() != self.query_y.is_floating_point():
            raise EpisodeError("support_y and query_y must both be labels (torch.long) or both be "
                               f"regression targets (float); got {self.support_y.dtype} and {self.query_y.dtype}")
        if self.is_classification:
            self._check_labels()
        else:
            for name, y in (("support_y", self.support_y), ("query_y", self.query_y)):
                if not torch.isfinite(y).all():
                    raise EpisodeError(f"{name} contains NaN or infinite values")

    def _check_labels(self) -> None:
        for name, y in (("support_y", self.support_y), ("query_y", self.query_y)):
            if y.dtype != torch.long:
                raise EpisodeError(f"{name} has dtype {y.dtype}; class labels must be torch.long "
                                   "(use .long()), regression targets floating point")
            if y.dim() != (2 if self.batched else 1):
                raise EpisodeError(f"{name} has shape {tuple(y.shape)}; labels must be one integer per example")
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.ways:
                raise EpisodeError(f"{name} holds labels in [{low}, {high}], outside [0, {self.ways}) for a "
                                   f"{self.ways}-way task; relabel the classes as 0..ways-1")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Episode:
        """The same episode with every tensor on ``device``."""
        return Episode(*(t.to(device, non_blocking=non_blocking) for t in self.tensors()),
                       ways=self.ways, batched=self.batched, validate=False)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    @staticmethod
    def stack(episodes: Sequence[Episode]) -> Episode:
        """Stack single-task episodes of equal shapes into one batch with a leading task dim."""
        if not episodes:
            raise EpisodeError("Episode.stack needs at least one episode")
        if any(e.batched for e in episodes):
            raise EpisodeError("Episode.stack takes single-task episodes; concatenate batches with Episode.cat")
        shapes = {tuple(tuple(t.shape) for t in e.tensors()) for e in episodes}
        if len(shapes) != 1:
            raise EpisodeError(f"episodes to stack have different shapes: {sorted(shapes)}; sample them "
                               "with the same ways, shots and query size")
        ways = {e.ways for e in episodes}
        stacked = (torch.stack(ts) for ts in zip(*(e.tensors() for e in episodes)))
        return Episode(*stacked, ways=max(ways) if episodes[0].is_classification else None,
                       batched=True, validate=False)

    @staticmethod
    def cat(batches: Sequence[Episode]) -> Episode:
        """Concatenate batches of tasks along the task dimension."""
        return Episode.stack([task for batch in batches for task in batch.unbind()])

    def unbind(self) -> list[Episode]:
        """The tasks of a batch as single-task episodes (views, no copies)."""
        if not self.batched:
            return [self]
        tasks = zip(*(t.unbind(0) for t in self.tensors()))
        return [Episode(*parts, ways=self.ways, validate=False) for parts in tasks]

    def __getitem__(self, index: int | slice) -> Episode:
        if not self.batched:
            raise EpisodeError("indexing selects tasks; this episode holds a single task")
        parts = [t[index] for t in self.tensors()]
        return Episode(*parts, ways=self.ways, batched=isinstance(index, slice), validate=False)

    def __len__(self) -> int:
        return self.num_tasks

