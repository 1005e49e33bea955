"""Episodes: the support and query sets of one task, or a stacked batch of tasks.

An :class:`Episode` is the unit every few-shot algorithm consumes. Classification episodes carry
integer labels ``0..ways-1``, every class with at least one support example; regression episodes
carry floating-point targets. A batch of ``T`` tasks is the same class with a leading task
dimension, built by :meth:`Episode.stack` (or passed with ``batched=True``).

Episodes go through a :class:`torch.utils.data.DataLoader` unchanged: importing this module
registers :func:`collate_episodes` with torch's ``default_collate``, so ``DataLoader(sampler)``
with the loader's defaults yields the sampler's batches as they are.

Example:
    >>> import torch
    >>> ep = Episode(torch.randn(5, 3), torch.arange(5), torch.randn(10, 3), torch.arange(5).repeat(2))
    >>> ep.ways, ep.is_batched
    (5, False)
    >>> Episode.stack([ep, ep]).support_x.shape
    torch.Size([2, 5, 3])
    >>> Episode(torch.randn(5, 3), torch.arange(1, 6), torch.randn(5, 3), torch.arange(1, 6))
    Traceback (most recent call last):
        ...
    metaopt.problems.episode.EpisodeError: support_y has no example of class 0 of a 6-way task (ways=6 inferred \
from the largest label, 5; labels found: 1..5); relabel the classes as 0..ways-1
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Episode", "EpisodeError", "collate_episodes"]


class EpisodeError(ValueError):
    """An episode's tensors are inconsistent; the message names the tensor and the fix."""


def _where_not_finite(t: torch.Tensor, batched: bool) -> str:
    """`` (task 2, example 7)`` or `` (example 7)``: the first example holding a NaN or an infinity."""
    bad = ~torch.isfinite(t.reshape(*t.shape[: 2 if batched else 1], -1)).all(-1)
    position = bad.nonzero()[0].tolist()
    return f" (task {position[0]}, example {position[1]})" if batched else f" (example {position[0]})"


def _span(values: list[int]) -> str:
    """``1..5`` for consecutive integers, else the list."""
    return f"{values[0]}..{values[-1]}" if len(values) > 2 and values == list(range(values[0], values[-1] + 1)) \
        else str(values)


@dataclass(frozen=True)
class Episode:
    """Support and query tensors of one task (or of ``T`` tasks when ``batched``).

    Args:
        support_x: inputs of the support set, ``[N_s, ...]`` (``[T, N_s, ...]`` when batched).
        support_y: targets of the support set: ``long`` labels ``0..ways-1`` for classification
            (every class with a support example), floating values for regression.
        query_x: inputs of the query set.
        query_y: targets of the query set, same kind as ``support_y``; query labels must occur in
            the support set.
        ways: number of classes; inferred from the largest label when omitted.
        batched: whether the first dimension indexes tasks (set by :meth:`stack`). Left unsaid,
            tensors that look like a batch (labels ``[T, N]``, or inputs and targets ``[T, N, D]``)
            are refused with a pointer to ``batched=True``; ``batched=False`` says "one task" and
            turns that guess off.
        validate: run the checks (shapes, dtypes, labels, finiteness) on construction.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int | None = None
    batched: bool | None = None
    validate: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        said, inferred = self.batched is not None, self.ways is None
        object.__setattr__(self, "batched", bool(self.batched))
        if inferred and isinstance(self.support_y, torch.Tensor) and self.is_classification:
            y = self.support_y
            object.__setattr__(self, "ways", int(y.max().item()) + 1 if y.numel() else 0)
        if self.validate:
            self._check(said, inferred)

    @property
    def is_batched(self) -> bool:
        return self.batched

    @property
    def is_classification(self) -> bool:
        return not self.support_y.is_floating_point()

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0] if self.batched else 1

    def _check(self, batched_said: bool = True, ways_inferred: bool = False) -> None:
        names = ("support_x", "support_y", "query_x", "query_y")
        tensors = self.tensors()
        for name, t in zip(names, tensors):
            if not isinstance(t, torch.Tensor):
                raise EpisodeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        lead = 2 if self.batched else 1
        for name, t in zip(names, tensors):
            if t.dim() < lead:
                raise EpisodeError(f"{name} has shape {tuple(t.shape)}; expected at least {lead} dimension(s)")
        if self.batched and len({t.shape[0] for t in tensors}) != 1:
            raise EpisodeError(f"task dimension differs: {[tuple(t.shape) for t in tensors]}")
        if not self.batched and not batched_said:
            self._check_not_a_batch()
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
                raise EpisodeError(f"{x_name} contains NaN or infinite values{_where_not_finite(x, self.batched)}; "
                                   "inputs must be finite: repair or drop those examples")
        if self.support_x.shape[d + 1:] != self.query_x.shape[d + 1:]:
            raise EpisodeError(f"support_x examples have shape {tuple(self.support_x.shape[d + 1:])} but "
                               f"query_x examples have shape {tuple(self.query_x.shape[d + 1:])}")
        if self.support_y.is_floating_point() != self.query_y.is_floating_point():
            raise EpisodeError("support_y and query_y must both be labels (torch.long) or both be "
                               f"regression targets (float); got {self.support_y.dtype} and {self.query_y.dtype}")
        if self.is_classification:
            self._check_labels(ways_inferred)
        else:
            for name, y in (("support_y", self.support_y), ("query_y", self.query_y)):
                if not torch.isfinite(y).all():
                    raise EpisodeError(f"{name} contains NaN or infinite values{_where_not_finite(y, self.batched)}; "
                                       "regression targets must be finite: repair or drop those examples")

    def _check_not_a_batch(self) -> None:
        """Refuse tensors with a leading task dimension passed as one task (``batched`` left unsaid)."""
        fix = "pass batched=True, or build the batch from single tasks with Episode.stack([...])"
        if self.is_classification:
            for x_name, x, y_name, y in (("support_x", self.support_x, "support_y", self.support_y),
                                         ("query_x", self.query_x, "query_y", self.query_y)):
                if y.dim() == 2 and x.dim() >= 2 and y.shape == x.shape[:2]:
                    raise EpisodeError(f"{y_name} has shape {tuple(y.shape)} and {x_name} {tuple(x.shape)}: a batch "
                                       f"of {y.shape[0]} tasks of {y.shape[1]} examples, but batched is not set; {fix}")
            return
        pairs = ((self.support_x, self.support_y), (self.query_x, self.query_y))
        if (all(x.dim() >= 3 and y.dim() >= 3 and x.shape[:2] == y.shape[:2] and x.shape[1] > 1 for x, y in pairs)
                and self.support_x.shape[0] == self.query_x.shape[0]):
            raise EpisodeError(f"support_x {tuple(self.support_x.shape)}, support_y {tuple(self.support_y.shape)}, "
                               f"query_x {tuple(self.query_x.shape)} and query_y {tuple(self.query_y.shape)} look like "
                               f"a batch of {self.support_x.shape[0]} tasks (a leading task dimension), but batched "
                               f"is not set; {fix}; or pass batched=False if this is one task")

    def _check_labels(self, ways_inferred: bool) -> None:
        batched = self.batched
        for name, y in (("support_y", self.support_y), ("query_y", self.query_y)):
            if y.dtype != torch.long:
                raise EpisodeError(f"{name} has dtype {y.dtype}; class labels must be torch.long "
                                   "(use .long()), regression targets floating point")
            if y.dim() != (2 if batched else 1):
                hint = ("" if batched or y.dim() != 2 else " (one-hot labels: use .argmax(-1); a leading task "
                        "dimension: pass batched=True or build the batch with Episode.stack)")
                raise EpisodeError(f"{name} has shape {tuple(y.shape)}; labels must be one integer per example{hint}")
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.ways:
                raise EpisodeError(f"{name} holds labels in [{low}, {high}], outside [0, {self.ways}) for a "
                                   f"{self.ways}-way task; relabel the classes as 0..ways-1")
        support, query = (y if batched else y.unsqueeze(0) for y in (self.support_y, self.query_y))
        counts = torch.zeros(support.shape[0], self.ways, dtype=torch.long)
        in_support = counts.scatter_add_(1, support, torch.ones_like(support)) > 0
        orphans = ~in_support.gather(1, query)
        if orphans.any():
            row = int(orphans.any(1).nonzero()[0])
            labels = sorted(set(query[row][orphans[row]].tolist()))
            task = f" of task {row}" if batched else ""
            raise EpisodeError(f"query_y{task} holds label(s) {labels} that no support example has; every query "
                               "class needs support examples: draw the support and query sets from the same classes")
        if not in_support.all():
            row = int((~in_support).any(1).nonzero()[0])
            missing = (~in_support[row]).nonzero().flatten().tolist()
            task = f" of task {row}" if batched else ""
            found = sorted(set(support[row].tolist()))
            how = "" if not ways_inferred else f"ways={self.ways} inferred from the largest label, {self.ways - 1}; "
            classes = f"class {missing[0]}" if len(missing) == 1 else f"classes {_span(missing)}"
            raise EpisodeError(f"support_y{task} has no example of {classes} of a {self.ways}-way task ({how}labels "
                               f"found: {_span(found)}); relabel the classes as 0..ways-1")

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> Episode:
        """The same episode with every tensor on ``device``.

        From the CPU to a GPU the copy goes through page-locked memory and, unless
        ``non_blocking=False``, is queued on the current CUDA stream without blocking the host
        (the kernels that read the episode wait for it while the host samples the next batch).
        """
        device = torch.device(device)
        if device.type == "cuda" and self.support_x.device.type == "cpu" and non_blocking is not False:
            return self.pin_memory().to(device, non_blocking=True)
        return Episode(*(t.to(device, non_blocking=bool(non_blocking)) for t in self.tensors()),
                       ways=self.ways, batched=self.batched, validate=False)

    def pin_memory(self) -> Episode:
        """The same episode in page-locked memory (what ``DataLoader(..., pin_memory=True)`` calls)."""
        return Episode(*(t.pin_memory() for t in self.tensors()), ways=self.ways, batched=self.batched,
                       validate=False)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    @staticmethod
    def stack(episodes: Sequence[Episode]) -> Episode:
        """Stack single-task episodes of equal shapes and ways into one batch with a leading task dim."""
        if not episodes:
            raise EpisodeError("Episode.stack needs at least one episode")
        if any(e.batched for e in episodes):
            raise EpisodeError("Episode.stack takes single-task episodes; concatenate batches with Episode.cat")
        kinds = {e.is_classification for e in episodes}
        if len(kinds) != 1:
            raise EpisodeError("Episode.stack got classification and regression episodes; a batch holds tasks of "
                               "one kind: stack them separately")
        ways = sorted({e.ways for e in episodes}, key=lambda w: -1 if w is None else w)
        if len(ways) != 1:
            raise EpisodeError(f"Episode.stack got episodes of different ways ({ways}); a batch holds tasks of one "
                               "ways: sample them with the same ways, or stack each ways separately")
        shapes = {tuple(tuple(t.shape) for t in e.tensors()) for e in episodes}
        if len(shapes) != 1:
            raise EpisodeError(f"episodes to stack have different shapes: {sorted(shapes)}; sample them "
                               "with the same ways, shots and query size")
        stacked = (torch.stack(ts) for ts in zip(*(e.tensors() for e in episodes)))
        return Episode(*stacked, ways=ways[0], batched=True, validate=False)

    @staticmethod
    def cat(batches: Sequence[Episode]) -> Episode:
        """Concatenate batches of tasks along the task dimension."""
        return Episode.stack([task for batch in batches for task in batch.unbind()])

    def unbind(self) -> list[Episode]:
        """The tasks of a batch as single-task episodes (views, no copies)."""
        if not self.batched:
            return [self]
        tasks = zip(*(t.unbind(0) for t in self.tensors()))
        return [Episode(*parts, ways=self.ways, batched=False, validate=False) for parts in tasks]

    def __getitem__(self, index: int | slice) -> Episode:
        if not self.batched:
            raise EpisodeError("indexing selects tasks; this episode holds a single task")
        parts = [t[index] for t in self.tensors()]
        return Episode(*parts, ways=self.ways, batched=isinstance(index, slice), validate=False)

    def __len__(self) -> int:
        return self.num_tasks


def collate_episodes(batch: Sequence[Episode], *, collate_fn_map: dict[Any, Callable] | None = None) -> Episode:
    """A DataLoader's collate function for episodes: one episode as it is, several joined into one batch.

    A list of one episode (what ``DataLoader(sampler)`` makes with its default ``batch_size=1``)
    gives that episode, so the loader yields ``sampler.batch(i)`` unchanged; batched episodes are
    concatenated along the task dimension (:meth:`Episode.cat`), single tasks stacked
    (:meth:`Episode.stack`). Registered with ``default_collate`` when this module is imported;
    pass it as ``collate_fn=`` where a loader uses another default.

    Example:
        >>> ep = Episode(torch.zeros(2, 1), torch.arange(2), torch.zeros(2, 1), torch.arange(2))
        >>> collate_episodes([ep]) is ep, collate_episodes([ep, ep]).support_x.shape
        (True, torch.Size([2, 2, 1]))
    """
    del collate_fn_map
    if len(batch) == 1:
        return batch[0]
    if all(e.batched for e in batch):
        return Episode.cat(batch)
    return Episode.stack(batch)


def _register_collate() -> None:
    """Teach ``torch.utils.data.default_collate`` episodes (the extension point its documentation describes)."""
    try:
        from torch.utils.data._utils.collate import default_collate_fn_map
    except ImportError:  # pragma: no cover  (a torch without the registry: pass collate_fn=collate_episodes)
        return
    default_collate_fn_map[Episode] = collate_episodes


_register_collate()
