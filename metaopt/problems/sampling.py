"""Seeded task samplers: N-way K-shot Q-query episodes over class datasets, batched into meta-batches.

A sampler is the problem source of a few-shot run: the trainer's estimator reads meta-batch ``i``
as ``sampler.batch(i)``. :class:`TaskOptions` / :class:`EpisodeOptions` are the options of
task datasets, and :func:`split_seed` gives the train, validation and test streams of a run
distinct seeds.

Every batch is a pure function of ``(seed, index)``: batch ``i`` is drawn from its own
``numpy`` generator seeded with ``[seed, i]``. The stream is therefore fixed by the seed,
resumable at any position (``start``), and identical when a
:class:`torch.utils.data.DataLoader` reads it, with its defaults or with several workers (worker
``w`` of ``W`` makes batches ``w, w + W, ...`` and the loader interleaves them back in order):
``DataLoader(sampler)`` yields ``sampler.batch(start), sampler.batch(start + 1), ...`` unchanged
(:func:`metaopt.problems.episode.collate_episodes`).

:class:`EpisodeSampler` reads three kinds of data: a mapping ``class -> examples``, any
:class:`ClassDataset`, and any labelled map-style dataset whose items are ``(x, y)`` pairs
(``torchvision.datasets.FashionMNIST(...)``, an ``ImageFolder``, a list of pairs), which
:class:`LabelledDataset` groups by class once.

Example:
    >>> import torch
    >>> data = {c: torch.randn(20, 1, 28, 28) for c in range(10)}
    >>> sampler = EpisodeSampler(data, ways=5, shots=1, query=15, batch_size=4, seed=0)
    >>> batch = next(iter(sampler))
    >>> batch.support_x.shape, batch.query_x.shape
    (torch.Size([4, 5, 1, 28, 28]), torch.Size([4, 75, 1, 28, 28]))
    >>> pairs = [(torch.full((3,), float(i)), i % 4) for i in range(40)]   # a labelled dataset: 4 classes
    >>> EpisodeSampler(pairs, ways=4, shots=2, query=3).batch(0).query_x.shape
    torch.Size([1, 12, 3])
"""

from __future__ import annotations

import contextlib
import itertools
import numbers
import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import IterableDataset, Subset, get_worker_info

from metaopt.options import ConfigError, Options
from metaopt.problems.episode import Episode

__all__ = ["SPLITS", "ClassDataset", "EpisodeOptions", "EpisodeSampler", "LabelledDataset", "TaskOptions",
           "TaskSampler", "as_class_dataset", "episode_sampler", "split_seed"]

SPLITS = ("train", "val", "test")


def split_seed(seed: int, split: str) -> int:
    """Seed of the ``split`` task stream of a run: ``3·seed + {train: 0, val: 1, test: 2}`` (distinct for all seeds)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return 3 * seed + SPLITS.index(split)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_error(name: str, value: object, low: int) -> ValueError:
    """The error for an option ``name`` that must be an integer >= ``low``; a string gets a pointer to the number."""
    message = f"{name} must be an integer >= {low}, got {value!r} ({type(value).__name__})"
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        message += f"; pass {name}={int(value)}, a number, not the string {value!r}"
    return ValueError(message)


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
    """A dataset organised by class: ``num_classes`` classes, each with ``class_size(c)`` examples.

    A dataset may also set ``validated = True`` when its examples are known to be finite and of
    one shape (checked once when it was built); :class:`EpisodeSampler` then skips its cheap
    per-class checks of every drawn episode.
    """

    @property
    def num_classes(self) -> int: ...

    def class_size(self, cls: int) -> int: ...

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        """The examples ``indices`` of class ``cls`` stacked into one tensor."""
        ...


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _example_tensor(value: object, where: str) -> torch.Tensor:
    """``value`` (a tensor, a numeric numpy array or a number) as a tensor; anything else is refused."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
        return torch.from_numpy(np.array(value))  # a copy: numpy arrays may be read-only
    if isinstance(value, (numbers.Number, np.number)) and not isinstance(value, complex):
        return torch.tensor(value)
    what = (f"a numpy array of dtype {value.dtype}" if isinstance(value, np.ndarray)
            else f"a {type(value).__name__} ({_preview(value)})")
    raise ValueError(f"{where} is {what}; examples must be tensors, numeric arrays or numbers: convert the data to "
                     "tensors first (e.g. tokenise or encode strings)")


class _MappingClassDataset:
    """Adapts a mapping ``class -> tensor of examples`` (or a list of tensors) to ClassDataset, checked once."""

    validated = True

    def __init__(self, mapping: Mapping[object, torch.Tensor | Sequence[torch.Tensor]]) -> None:
        self._keys = sorted(mapping, key=repr)
        self._data = [self._checked(k, mapping[k]) for k in self._keys]
        shapes = [(k, self._shape(d)) for k, d in zip(self._keys, self._data) if len(d)]
        for key, shape in shapes[1:]:
            if shape != shapes[0][1]:
                raise ValueError(f"class {key!r} has examples of shape {shape} but class {shapes[0][0]!r} has "
                                 f"{shapes[0][1]}; every example needs one shape: resize, crop or pad them first")
        self.class_names = list(self._keys)

    @staticmethod
    def _shape(data: torch.Tensor | list[torch.Tensor]) -> tuple[int, ...]:
        return tuple(data.shape[1:]) if isinstance(data, torch.Tensor) else tuple(data[0].shape)

    @staticmethod
    def _checked(key: object, data: object) -> torch.Tensor | list[torch.Tensor]:
        """The examples of class ``key`` as a tensor (or a list of tensors), refused when not numbers or not finite."""
        fix = "the examples of a class must be a tensor [n, ...] or a list of tensors, arrays or numbers"
        if isinstance(data, (str, bytes)) or not isinstance(data, (torch.Tensor, np.ndarray, Sequence)):
            raise ValueError(f"class {key!r} holds a {type(data).__name__} ({_preview(data)}); {fix}: convert the "
                             "data to tensors first (e.g. tokenise or encode strings)")
        if isinstance(data, (torch.Tensor, np.ndarray)):
            tensor = _example_tensor(data, f"the data of class {key!r}")
            if tensor.dim() == 0:
                raise ValueError(f"class {key!r} holds a single number; {fix} (examples along the first dimension)")
            items = [tensor]
        else:
            items = [_example_tensor(v, f"example {i} of class {key!r}") for i, v in enumerate(data)]
            for i, item in enumerate(items[1:], 1):
                if item.shape != items[0].shape:
                    raise ValueError(f"example {i} of class {key!r} has shape {tuple(item.shape)} but example 0 has "
                                     f"{tuple(items[0].shape)}; every example needs one shape: resize, crop or pad "
                                     "them first")
        whole = isinstance(data, (torch.Tensor, np.ndarray))
        stacked = (items[0] if whole else torch.stack(items)) if items else torch.zeros(0)
        if stacked.numel() and (stacked.is_floating_point() or stacked.is_complex()):
            finite = torch.isfinite(stacked.reshape(len(stacked), -1)).all(-1)
            if not finite.all():
                raise ValueError(f"class {key!r} holds NaN or infinite values (example {int((~finite).nonzero()[0])}); "
                                 "repair or drop those examples before sampling")
        return items[0] if whole else items

    @property
    def num_classes(self) -> int:
        return len(self._keys)

    def class_size(self, cls: int) -> int:
        return len(self._data[cls])

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        data = self._data[cls]
        if isinstance(data, torch.Tensor):
            return data[torch.as_tensor(indices, dtype=torch.long)]
        return torch.stack([data[i] for i in indices])


def _pil_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image as ``torchvision.transforms.ToTensor`` gives it: ``[C, H, W]``, 8-bit images scaled to [0, 1]."""
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    array = np.array(image)
    tensor = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()
    return tensor.float().div_(255) if tensor.dtype == torch.uint8 else tensor.float()


def _item_to_tensor(x: object, where: str) -> torch.Tensor:
    """The input of a labelled dataset's item as a tensor (see :class:`LabelledDataset`)."""
    pil = sys.modules.get("PIL.Image")  # a PIL image means PIL is imported: no import, no torchvision needed
    if pil is not None and isinstance(x, pil.Image):
        return _pil_to_tensor(x)
    try:
        return _example_tensor(x, where)
    except ValueError:
        raise ValueError(f"{where} is a {type(x).__name__} ({_preview(x)}); EpisodeSampler needs tensors, PIL images, "
                         "numeric arrays or numbers: give the dataset a transform that returns tensors (e.g. "
                         "transform=torchvision.transforms.ToTensor())") from None


def _label(y: object, where: str) -> object:
    """A hashable class id from a label (an int, a 0-d tensor or array, a string)."""
    if isinstance(y, (torch.Tensor, np.ndarray)):
        if tuple(y.shape) != ():
            raise ValueError(f"{where} is {_preview(y)} of shape {tuple(y.shape)}; a labelled dataset needs one "
                             "class id per item (an int or a string): use the class index, not a one-hot vector")
        y = y.item()
    elif isinstance(y, np.generic):
        y = y.item()
    try:
        hash(y)
    except TypeError:
        raise ValueError(f"{where} is a {type(y).__name__} ({_preview(y)}); a labelled dataset needs one class id "
                         "per item (an int or a string)") from None
    return y


def _targets(dataset: Any) -> list | np.ndarray | None:
    """The labels of every item without reading the items: ``.targets`` (also through ``Subset``), else None."""
    if isinstance(dataset, Subset):
        parent = _targets(dataset.dataset)
        if parent is None:
            return None
        indices = np.asarray(dataset.indices, dtype=np.int64)
        return parent[indices] if isinstance(parent, np.ndarray) else [parent[i] for i in indices.tolist()]
    targets = getattr(dataset, "targets", None)
    if targets is None or isinstance(targets, (str, bytes)):
        return None
    if isinstance(targets, torch.Tensor):
        targets = targets.numpy(force=True)
    try:
        if len(targets) != len(dataset):
            return None
    except TypeError:
        return None
    return targets if isinstance(targets, np.ndarray) else list(targets)


def _group(dataset: Any) -> tuple[list[object], list[np.ndarray]]:
    """Class ids (sorted) and, per class, the indices of its items: from ``.targets``, else one pass over the items."""
    labels = _targets(dataset)
    name = type(dataset).__name__
    if labels is None:
        labels = []
        for i in range(len(dataset)):
            item = dataset[i]
            if not (isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2):
                raise ValueError(f"item {i} of the {name} is a {type(item).__name__} ({_preview(item)}), not an "
                                 "(x, y) pair; EpisodeSampler takes a mapping class -> examples, a ClassDataset, or "
                                 "a labelled dataset whose items are (x, y) pairs")
            labels.append(item[1])
    array = labels if isinstance(labels, np.ndarray) else None
    if array is None or array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.dtype.kind == "U"):
        ids = [_label(y, f"the label of item {i} of the {name}") for i, y in enumerate(labels)]
        try:
            array = np.asarray(ids)
        except (TypeError, ValueError):
            array = None
        if array is None or array.ndim != 1 or array.dtype == object:  # mixed kinds of labels: group by hand
            groups: dict[object, list[int]] = {}
            for i, y in enumerate(ids):
                groups.setdefault(y, []).append(i)
            keys = sorted(groups, key=repr)
            return keys, [np.asarray(groups[k], dtype=np.int64) for k in keys]
    classes, inverse = np.unique(array, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse, minlength=len(classes))
    return classes.tolist(), np.split(order, np.cumsum(counts)[:-1])


#: groupings by dataset object (weakly held): a dataset is grouped by class once, whatever the samplers on it
_GROUPINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LabelledDataset:
    """A :class:`ClassDataset` view of a labelled map-style dataset, whose items are ``(x, y)`` pairs.

    Items are grouped by their label ``y`` once: from the dataset's ``targets`` when it has them
    (torchvision datasets, ``Subset`` of one), else by one pass over the items. The grouping is
    cached per dataset object, so every sampler over the same object shares it (a dataset whose
    labels change needs a new object). Classes are the distinct labels in sorted order
    (``class_names``); an episode relabels the classes it draws as ``0..ways-1``.

    The inputs ``x`` become tensors like this: tensors are used as they are (a dataset with a
    ``transform`` such as ``ToTensor()`` already returns them); a PIL image becomes ``[C, H, W]``
    floats, 8-bit images scaled to [0, 1], exactly what ``torchvision.transforms.ToTensor`` gives,
    computed with numpy; numeric numpy arrays and numbers keep their values and shape (uint8 arrays
    are not rescaled: the sampler converts them to floats in 0..255). Anything else is refused
    with a pointer to a transform.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``) of ``(x, y)`` pairs.

    Example:
        >>> pairs = [(torch.tensor([float(i)]), "ab"[i % 2]) for i in range(6)]
        >>> data = LabelledDataset(pairs)
        >>> data.class_names, data.class_size(0), data.examples(1, [0, 2]).flatten().tolist()
        (['a', 'b'], 3, [1.0, 5.0])
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        try:
            cached = _GROUPINGS.get(dataset)
        except TypeError:  # not hashable or not weakly referable: grouped for this view only
            cached = None
        if cached is None or cached[0] != len(dataset):
            cached = (len(dataset), *_group(dataset))
            with contextlib.suppress(TypeError):
                _GROUPINGS[dataset] = cached
        _, self.class_names, self.class_index = cached
        if self.class_names:
            self.example_shape = tuple(self.examples(0, [0]).shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_size(self, cls: int) -> int:
        return len(self.class_index[cls])

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        """The inputs of items ``indices`` of class ``cls``, stacked."""
        rows = self.class_index[cls][np.asarray(indices, dtype=np.int64)].tolist()
        name = type(self.dataset).__name__
        return torch.stack([_item_to_tensor(self.dataset[i][0], f"the input of item {i} of the {name}") for i in rows])


def as_class_dataset(data: ClassDataset | Mapping | Any) -> ClassDataset:
    """``data`` as a :class:`ClassDataset`: as it is, a mapping ``class -> examples``, or a labelled dataset."""
    if isinstance(data, ClassDataset):
        return data
    if isinstance(data, Mapping):
        return _MappingClassDataset(data)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes, torch.Tensor)):
        return LabelledDataset(data)
    raise ValueError(f"cannot sample episodes from a {type(data).__name__}: pass a mapping class -> tensor of "
                     "examples, a ClassDataset, or a labelled map-style dataset whose items are (x, y) pairs")


class TaskSampler(IterableDataset):
    """Base of every sampler: an endless (or ``num_batches``-long), seeded stream of task batches.

    Subclasses implement :meth:`sample_task`, drawing one task from a ``numpy`` generator.

    Args:
        batch_size: tasks per meta-batch (``T``).
        seed: fixes the whole stream (a non-negative integer).
        num_batches: length of the stream; ``None`` for endless.
        start: index of the first batch (to resume a run at its position).
    """

    def __init__(self, batch_size: int, seed: int = 0, num_batches: int | None = None, start: int = 0) -> None:
        if not _is_int(batch_size):
            raise _int_error("batch_size", batch_size, 1)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_batches is not None and (not _is_int(num_batches) or num_batches < 0):
            raise ValueError(f"num_batches must be >= 0 or None, got {num_batches!r}")
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}; use a seed >= 0 (batch i is drawn "
                             "from numpy.random.default_rng([seed, i]))")
        if not _is_int(start) or start < 0:
            raise ValueError(f"start must be a non-negative integer (the index of the first batch), got {start!r}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_batches = num_batches
        self.start = int(start)

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


def _class_sizes(dataset: ClassDataset) -> np.ndarray:
    return np.array([dataset.class_size(c) for c in range(dataset.num_classes)], dtype=np.int64)


class EpisodeSampler(TaskSampler):
    """N-way K-shot Q-query classification episodes from a class dataset.

    Each task draws ``ways`` distinct classes among those with at least ``shots + query``
    examples, relabels them ``0..ways-1`` in drawing order, and takes ``shots + query`` distinct
    examples of each: the first ``shots`` for the support set, the rest for the query set (both
    ordered class by class).

    A mapping's examples are checked once, here (numbers, one shape, finite); episodes of any
    other dataset that does not declare itself ``validated`` get a cheap check per drawn class
    (one shape, finite), which names the class at fault.

    Args:
        dataset: a mapping ``class -> examples``, any :class:`ClassDataset`, or a labelled
            map-style dataset of ``(x, y)`` pairs (see :class:`LabelledDataset`).
        ways, shots, query: classes per task, support and query examples per class.
        batch_size, seed, num_batches, start: see :class:`TaskSampler`.
    """

    def __init__(self, dataset: ClassDataset | Mapping | Any, ways: int, shots: int, query: int, batch_size: int = 1,
                 seed: int = 0, num_batches: int | None = None, start: int = 0) -> None:
        super().__init__(batch_size, seed, num_batches, start)
        for name, value, low in (("ways", ways, 1), ("shots", shots, 1), ("query", query, 1)):
            if not _is_int(value) or value < low:
                raise _int_error(name, value, low)
        self.dataset = as_class_dataset(dataset)
        n = self.dataset.num_classes
        if ways > n:
            raise ValueError(f"ways={ways} exceeds the {n} classes of the dataset; use ways <= {n}")
        sizes = _class_sizes(self.dataset)
        self._eligible = np.flatnonzero(sizes >= shots + query)
        if len(self._eligible) < ways:
            raise ValueError(f"shots + query = {shots + query} examples per class are needed, but only "
                             f"{len(self._eligible)} of {n} classes have that many (smallest class: "
                             f"{sizes.min()} examples); lower shots or query")
        self.ways, self.shots, self.query = int(ways), int(shots), int(query)
        self._validated = bool(getattr(self.dataset, "validated", False))

    def protocol(self) -> dict:
        return {"ways": self.ways, "shots": self.shots, "query": self.query}

    def _where(self, cls: int) -> str:
        """``class 3 ('Sandal') of the FashionMNIST``: a class of the dataset, for error messages."""
        names = getattr(self.dataset, "class_names", None)
        label = f" ({names[cls]!r})" if isinstance(names, Sequence) and cls < len(names) else ""
        return f"class {cls}{label} of the {type(getattr(self.dataset, 'dataset', self.dataset)).__name__}"

    def _check_examples(self, cls: int, examples: object, count: int, first: torch.Tensor | None) -> None:
        """The cheap checks of one drawn class of a dataset that is not ``validated``."""
        if not isinstance(examples, torch.Tensor) or len(examples) != count:
            found = f"{len(examples)} examples" if isinstance(examples, torch.Tensor) else type(examples).__name__
            raise ValueError(f"examples() of {self._where(cls)} returned {found} for {count} indices; a ClassDataset "
                             "returns one tensor with the requested examples along the first dimension")
        if first is not None and examples.shape[1:] != first.shape[1:]:
            raise ValueError(f"{self._where(cls)} has examples of shape {tuple(examples.shape[1:])} but another class "
                             f"of the episode has {tuple(first.shape[1:])}; every example needs one shape: resize, "
                             "crop or pad them first (e.g. with a transform)")
        if examples.is_floating_point() and not torch.isfinite(examples).all():
            raise ValueError(f"{self._where(cls)} holds NaN or infinite values; repair or drop those examples before "
                             "sampling")

    def sample_task(self, rng: np.random.Generator) -> Episode:
        classes = rng.choice(self._eligible, size=self.ways, replace=False)
        support, query = [], []
        for cls in classes:
            picks = rng.choice(self.dataset.class_size(int(cls)), size=self.shots + self.query, replace=False)
            examples = self.dataset.examples(int(cls), picks.tolist())
            if not self._validated:
                self._check_examples(int(cls), examples, len(picks), support[0] if support else None)
            support.append(examples[: self.shots])
            query.append(examples[self.shots:])
        labels = torch.arange(self.ways)
        return Episode(torch.cat(support).float(), labels.repeat_interleave(self.shots),
                       torch.cat(query).float(), labels.repeat_interleave(self.query), ways=self.ways, batched=False,
                       validate=False)


def _check_sizes(dataset: ClassDataset, options: EpisodeOptions, split: str, name: str) -> None:
    """Refuse, naming the option at fault, options that ``split`` of the dataset cannot serve."""
    n, ways, shots, query = dataset.num_classes, options.ways, options.shots, options.query_of(split)
    if ways > n:
        raise ConfigError(f"ways={ways} exceeds the {n} classes of {name}; lower --ways to at most {n}")
    sizes = _class_sizes(dataset)
    eligible = int((sizes >= shots + query).sum())
    if eligible >= ways:
        return
    option = "query" if split == "train" or options.eval_query is None else "eval_query"
    if eligible == 0:
        excess = f"exceeds {sizes.max(initial=0)}, the most examples a class of {name} has"
    else:
        excess = (f"exceeds the examples of all but {eligible} of the {n} classes of {name}, fewer than the ways="
                  f"{ways} a task draws")
    if split == "train":
        why = "meta-training tasks draw shots + query examples per class"
    elif option == "eval_query":
        why = "validation and test tasks draw shots + eval_query examples per class"
    else:
        why = "eval_query is not set, so validation and test tasks draw shots + query examples per class"
    also = " (or set --eval-query for validation and test tasks)" if split != "train" and option == "query" else ""
    raise ConfigError(f"{option}={query} plus shots={shots} {excess} ({why}); lower --{option.replace('_', '-')} "
                      f"or --shots{also}")


def episode_sampler(dataset: ClassDataset | Mapping | Any, options: EpisodeOptions, split: str,
                    seed: int) -> EpisodeSampler:
    """The episodes of ``split`` of a run with seed ``seed``, as ``options`` say (query size per split).

    Options the data cannot serve (more ways than classes, more ``shots`` + query examples than
    the classes have) raise a :class:`metaopt.options.ConfigError` that names the option to change
    (``eval_query`` for validation and test tasks when it is set).
    """
    data = as_class_dataset(dataset)
    name = "the dataset" if isinstance(dataset, Mapping) else f"the {type(dataset).__name__}"
    _check_sizes(data, options, split, f"{name} {split} split")
    return EpisodeSampler(data, ways=options.ways, shots=options.shots, query=options.query_of(split),
                          batch_size=options.meta_batch, seed=split_seed(seed, split))
