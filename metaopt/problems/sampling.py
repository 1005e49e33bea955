"""Seeded task samplers: N-way K-shot Q-query episodes over class datasets, batched into meta-batches.

A sampler is the problem source of a few-shot run: the trainer's estimator reads meta-batch ``i``
as ``sampler.batch(i)``. :class:`TaskOptions` / :class:`EpisodeOptions` are the options of
task datasets, and :func:`split_seed` gives the train, validation and test streams of a run
distinct seeds.

Every batch is a pure function of ``(seed, index)``: batch ``i`` is drawn from its own
``numpy`` generator seeded with ``[seed, i]``. The stream is therefore fixed by the seed,
resumable at any position (``start``), and identical when a
:class:`torch.utils.data.DataLoader` with several workers reads it (worker ``w`` of ``W`` makes
batches ``w, w + W, ...`` and the loader interleaves them back in order).

Example:
    >>> import torch
    >>> data = {c: torch.randn(20, 1, 28, 28) for c in range(10)}
    >>> sampler = EpisodeSampler(data, ways=5, shots=1, query=15, batch_size=4, seed=0)
    >>> batch = next(iter(sampler))
    >>> batch.support_x.shape, batch.query_x.shape
    (torch.Size([4, 5, 1, 28, 28]), torch.Size([4, 75, 1, 28, 28]))
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from metaopt.options import Options
from metaopt.problems.episode import Episode

__all__ = ["SPLITS", "ClassDataset", "EpisodeOptions", "EpisodeSampler", "TaskOptions", "TaskSampler",
           "episode_sampler", "split_seed"]

SPLITS = ("train", "val", "test")


def split_seed(seed: int, split: str) -> int:
    """Seed of the ``split`` task stream of a run: ``3·seed + {train: 0, val: 1, test: 2}`` (distinct for all seeds)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return 3 * seed + SPLITS.index(split)


@dataclass(frozen=True)
class TaskOptions(Options):
    """Tasks of K support examples (per class) and a query set.

    Args:
        shots: support examples per class (per task for regression): the K of K-shot.
        query: query examples per class (per task for regression) of the meta-training tasks.
        eval_query: query examples of the validation and test tasks (None: query); few-shot
            benchmarks score 15 per class whatever the training query.
        meta_batch: tasks per meta-batch.
    """

    positive = ("shots", "query", "eval_query", "meta_batch")
    shots: int = 1
    query: int = 15
    eval_query: int | None = None
    meta_batch: int = 32

    def query_of(self, split: str) -> int:
        """The query size of ``split``'s tasks."""
        return self.query if split == "train" or self.eval_query is None else self.eval_query


@dataclass(frozen=True)
class EpisodeOptions(TaskOptions):
    """N-way K-shot classification tasks of a class dataset.

    Args:
        ways: classes per task (N).
    """

    positive = ("ways", *TaskOptions.positive)
    ways: int = 5


@runtime_checkable
class ClassDataset(Protocol):
    """A dataset organised by class: ``num_classes`` classes, each with ``class_size(c)`` examples."""

    @property
    def num_classes(self) -> int: ...

    def class_size(self, cls: int) -> int: ...

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        """The examples ``indices`` of class ``cls`` stacked into one tensor."""
        ...


class _MappingClassDataset:
    """Adapts a mapping ``class -> tensor of examples`` (or a list of tensors) to ClassDataset."""

    def __init__(self, mapping: Mapping[object, torch.Tensor | Sequence[torch.Tensor]]) -> None:
        self._keys = sorted(mapping, key=repr)
        self._data = [mapping[k] for k in self._keys]

    @property
    def num_classes(self) -> int:
        return len(self._keys)

    def class_size(self, cls: int) -> int:
        return len(self._data[cls])

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        data = self._data[cls]
        if isinstance(data, torch.Tensor):
            return data[torch.as_tensor(indices, dtype=torch.long)]
        return torch.stack([torch.as_tensor(data[i]) for i in indices])


class TaskSampler(IterableDataset):
    """Base of every sampler: an endless (or ``num_batches``-long), seeded stream of task batches.

    Subclasses implement :meth:`sample_task`, drawing one task from a ``numpy`` generator.

    Args:
        batch_size: tasks per meta-batch (``T``).
        seed: fixes the whole stream.
        num_batches: length of the stream; ``None`` for endless.
        start: index of the first batch (to resume a run at its position).
    """

    def __init__(self, batch_size: int, seed: int = 0, num_batches: int | None = None, start: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_batches is not None and num_batches < 0:
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_batches = num_batches
        self.start = start

    def sample_task(self, rng: np.random.Generator) -> Episode:
        raise NotImplementedError

    def protocol(self) -> dict:
        """Figures of the tasks that evaluation results record (ways, shots, query size); none by default."""
        return {}

    def batch(self, index: int) -> Episode:
        """Batch number ``index`` of the stream (a pure function of seed and index)."""
        rng = np.random.default_rng([self.seed, index])
        return Episode.stack([self.sample_task(rng) for _ in range(self.batch_size)])

    def __iter__(self) -> Iterator[Episode]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stop = None if self.num_batches is None else self.start + self.num_batches
        for index in itertools.islice(itertools.count(self.start), worker, None, workers):
            if stop is not None and index >= stop:
                return
            yield self.batch(index)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this sampler is endless; pass num_batches=... to give it a length")
        return self.num_batches


class EpisodeSampler(TaskSampler):
    """N-way K-shot Q-query classification episodes from a class dataset.

    Each task draws ``ways`` distinct classes, relabels them ``0..ways-1`` in drawing order, and
    takes ``shots + query`` distinct examples of each: the first ``shots`` for the support set,
    the rest for the query set (both ordered class by class).

    Args:
        dataset: a mapping ``class -> examples`` or any :class:`ClassDataset`.
        ways, shots, query: classes per task, support and query examples per class.
        batch_size, seed, num_batches, start: see :class:`TaskSampler`.
    """

    def __init__(self, dataset: ClassDataset | Mapping, ways: int, shots: int, query: int, batch_size: int = 1,
                 seed: int = 0, num_batches: int | None = None, start: int = 0) -> None:
        super().__init__(batch_size, seed, num_batches, start)
        self.dataset = dataset if isinstance(dataset, ClassDataset) else _MappingClassDataset(dataset)
        for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("query", query, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value}")
        n = self.dataset.num_classes
        if ways > n:
            raise ValueError(f"ways={ways} exceeds the {n} classes of the dataset; use ways <= {n}")
        sizes = np.array([self.dataset.class_size(c) for c in range(n)])
        self._eligible = np.flatnonzero(sizes >= shots + query)
        if len(self._eligible) < ways:
            raise ValueError(f"shots + query = {shots + query} examples per class are needed, but only "
                             f"{len(self._eligible)} of {n} classes have that many (smallest class: "
                             f"{sizes.min()} examples); lower shots or query")
        self.ways, self.shots, self.query = ways, shots, query

    def protocol(self) -> dict:
        return {"ways": self.ways, "shots": self.shots, "query": self.query}

    def sample_task(self, rng: np.random.Generator) -> Episode:
        classes = rng.choice(self._eligible, size=self.ways, replace=False)
        support, query = [], []
        for cls in classes:
            picks = rng.choice(self.dataset.class_size(int(cls)), size=self.shots + self.query, replace=False)
            examples = self.dataset.examples(int(cls), picks.tolist())
            support.append(examples[: self.shots])
            query.append(examples[self.shots:])
        labels = torch.arange(self.ways)
        return Episode(torch.cat(support).float(), labels.repeat_interleave(self.shots),
                       torch.cat(query).float(), labels.repeat_interleave(self.query), ways=self.ways, validate=False)


def episode_sampler(dataset: ClassDataset | Mapping, options: EpisodeOptions, split: str, seed: int) -> EpisodeSampler:
    """The episodes of ``split`` of a run with seed ``seed``, as ``options`` say (query size per split)."""
    return EpisodeSampler(dataset, ways=options.ways, shots=options.shots, query=options.query_of(split),
                          batch_size=options.meta_batch, seed=split_seed(seed, split))
