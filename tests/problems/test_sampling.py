"""Task samplers (metaopt/problems/sampling.py): episode layout, seeded and resumable streams, DataLoader workers,
errors, the options of task datasets and the seeds of a run's splits."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from metaopt.options import ConfigError
from metaopt.problems.episode import Episode
from metaopt.problems.sampling import (
    SPLITS,
    ClassDataset,
    EpisodeOptions,
    EpisodeSampler,
    LabelledDataset,
    TaskOptions,
    TaskSampler,
    episode_sampler,
    split_seed,
)
from tests.helpers import assert_episodes_equal, class_dataset, decode

WAYS, SHOTS, QUERY, TASKS = 5, 2, 3, 4


def sampler(**kwargs: object) -> EpisodeSampler:
    options = {"ways": WAYS, "shots": SHOTS, "query": QUERY, "batch_size": TASKS, "seed": 0, **kwargs}
    return EpisodeSampler(class_dataset(num_classes=10, per_class=20), **options)


def test_shapes_and_label_layout() -> None:
    batch = next(iter(sampler()))
    assert batch.is_batched and batch.ways == WAYS
    assert batch.support_x.shape == (TASKS, WAYS * SHOTS, 1, 2)
    assert batch.query_x.shape == (TASKS, WAYS * QUERY, 1, 2)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.long
    torch.testing.assert_close(batch.support_y, torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1))
    torch.testing.assert_close(batch.query_y, torch.arange(WAYS).repeat_interleave(QUERY).repeat(TASKS, 1))


def test_each_label_is_one_class_and_classes_are_distinct() -> None:
    for task in sampler().batch(0).unbind():
        support, query = decode(task.support_x), decode(task.query_x)
        classes = []
        for label in range(WAYS):
            members = {support[i][0] for i in range(len(support)) if task.support_y[i] == label}
            members |= {query[i][0] for i in range(len(query)) if task.query_y[i] == label}
            assert len(members) == 1, f"label {label} mixes classes {members}"
            classes.append(members.pop())
        assert len(set(classes)) == WAYS, f"classes repeat within a task: {classes}"


def test_support_and_query_are_disjoint() -> None:
    for task in sampler(batch_size=16).batch(0).unbind():
        support, query = decode(task.support_x), decode(task.query_x)
        assert len(set(support)) == len(support) and len(set(query)) == len(query)
        assert not set(support) & set(query)


def ids(batch: Episode) -> list[tuple[int, int]]:
    return decode(batch.support_x) + decode(batch.query_x)


def test_seed_fixes_the_whole_stream() -> None:
    first, again, other = (list(sampler(seed=seed, num_batches=3)) for seed in (7, 7, 8))
    for a, b in zip(first, again):
        assert_episodes_equal(a, b)
    assert all(ids(a) != ids(b) for a, b in zip(first, other))
    assert ids(first[0]) != ids(first[1]), "consecutive batches must differ"


def test_start_resumes_at_a_position() -> None:
    stream = list(sampler(num_batches=5))
    resumed = list(sampler(num_batches=3, start=2))
    for a, b in zip(stream[2:], resumed):
        assert_episodes_equal(a, b)
    assert_episodes_equal(sampler().batch(4), stream[4])


def test_dataloader_workers_give_the_single_process_stream() -> None:
    tasks = sampler(num_batches=5)
    expected = list(tasks)
    loaded = list(DataLoader(tasks, batch_size=None, num_workers=2))
    assert len(loaded) == len(expected) == 5
    for a, b in zip(loaded, expected):
        assert_episodes_equal(a, b)
    seen = [tuple(ids(task)) for batch in loaded for task in batch.unbind()]
    assert len(set(seen)) == len(seen), "a task was repeated"


def test_length() -> None:
    assert len(sampler(num_batches=4)) == 4
    with pytest.raises(TypeError, match="endless"):
        len(sampler())


@pytest.mark.parametrize("kwargs, message", [
    ({"ways": 11}, "ways=11 exceeds the 10 classes of the dataset"),
    ({"shots": 15, "query": 6}, "shots \\+ query = 21 examples per class are needed, but only 0 of 10 classes"),
    ({"shots": 0}, "shots must be an integer >= 1, got 0"),
    ({"query": 1.5}, "query must be an integer >= 1, got 1.5"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"num_batches": -1}, "num_batches must be >= 0 or None"),
], ids=["too many ways", "too few examples", "no shots", "fractional query", "empty batch", "negative length"])
def test_invalid_options_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sampler(**kwargs)


def test_classes_too_small_are_never_drawn() -> None:
    data = class_dataset(num_classes=6, per_class=20)
    data[6] = class_dataset(num_classes=7, per_class=3)[6]  # too small for shots + query = 5: never drawn
    tasks = EpisodeSampler(data, ways=5, shots=2, query=3, batch_size=8)
    for batch in tasks.batch(0), tasks.batch(1):
        assert 6 not in {c for c, _ in ids(batch)}


class Tagged:
    """A ClassDataset without a mapping: example ``i`` of class ``c`` is ``[c, i]``."""

    num_classes = 6

    def class_size(self, cls: int) -> int:
        return 4 + cls

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        return torch.tensor([[[float(cls), float(i)]] for i in indices])


def test_any_class_dataset_can_be_sampled() -> None:
    assert isinstance(Tagged(), ClassDataset)
    batch = EpisodeSampler(Tagged(), ways=3, shots=1, query=3, batch_size=2).batch(0)
    assert all(0 <= i < 4 + c for c, i in ids(batch))


def test_task_sampler_subclasses_only_draw_tasks() -> None:
    class Constant(TaskSampler):
        def sample_task(self, rng: np.random.Generator) -> Episode:
            x = torch.full((2, 1), float(rng.integers(1000)))
            return Episode(x, x, x, x)

    a, b = Constant(batch_size=3, seed=1).batch(5), Constant(batch_size=3, seed=1).batch(5)
    assert_episodes_equal(a, b)
    assert len(a) == 3
    with pytest.raises(NotImplementedError):
        TaskSampler(batch_size=1).batch(0)


def test_the_splits_of_a_run_have_distinct_seeds() -> None:
    assert [split_seed(5, split) for split in SPLITS] == [15, 16, 17] and SPLITS == ("train", "val", "test")
    seeds = {split_seed(seed, split) for seed in range(50) for split in SPLITS}
    assert len(seeds) == 150
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        split_seed(0, "dev")


def test_episode_options_give_each_split_its_sampler() -> None:
    options = EpisodeOptions(ways=3, shots=2, query=4, eval_query=6, meta_batch=5)
    data = class_dataset(num_classes=10, per_class=20)
    train, val, test = (episode_sampler(data, options, split, seed=2) for split in SPLITS)
    assert (train.seed, val.seed, test.seed) == (6, 7, 8)
    assert (train.query, val.query, test.query) == (4, 6, 6)  # eval_query for validation and test tasks
    assert train.protocol() == {"ways": 3, "shots": 2, "query": 4} and val.protocol()["query"] == 6
    assert train.batch_size == 5 and train.batch(0).support_x.shape == (5, 6, 1, 2)
    assert_episodes_equal(train.batch(1), EpisodeSampler(data, ways=3, shots=2, query=4, batch_size=5, seed=6).batch(1))
    assert TaskOptions(query=7).query_of("test") == 7  # no eval_query: the training query everywhere
    assert TaskSampler(batch_size=1).protocol() == {}


@pytest.mark.parametrize("kwargs, message", [({"ways": 0}, "'ways' must be > 0, got 0"),
                                             ({"eval_query": 0}, "'eval_query' must be > 0, got 0"),
                                             ({"meta_batch": -1}, "'meta_batch' must be > 0, got -1"),
                                             ({"shots": 1.5}, "'shots' must be int, got 1.5")])
def test_episode_options_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EpisodeOptions(**kwargs)


# ---- errors at construction ---------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, "seed must be a non-negative integer, got -1; use a seed >= 0 (batch i is drawn from "
                   "numpy.random.default_rng([seed, i]))"),
    ({"seed": 1.5}, "seed must be a non-negative integer, got 1.5; use a seed >= 0 (batch i is drawn from "
                    "numpy.random.default_rng([seed, i]))"),
    ({"start": -2}, "start must be a non-negative integer (the index of the first batch), got -2"),
    ({"ways": "5"}, "ways must be an integer >= 1, got '5' (str); pass ways=5, a number, not the string '5'"),
    ({"shots": 2.0}, "shots must be an integer >= 1, got 2.0 (float)"),
    ({"batch_size": "4"}, "batch_size must be an integer >= 1, got '4' (str); pass batch_size=4, a number, not the "
                          "string '4'"),
], ids=["negative seed", "fractional seed", "negative start", "string ways", "float shots", "string batch size"])
def test_invalid_options_raise_exact_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        sampler(**kwargs)


def test_numpy_integers_are_integers() -> None:
    tasks = sampler(seed=np.int64(3), ways=np.int32(5), start=np.int64(1))
    assert_episodes_equal(tasks.batch(0), sampler(seed=3).batch(0))
    assert (tasks.seed, tasks.ways, tasks.start) == (3, 5, 1) and type(tasks.seed) is int


def test_classes_with_exactly_shots_plus_query_examples_are_drawn() -> None:
    data = class_dataset(num_classes=WAYS, per_class=SHOTS + QUERY)  # every class at the boundary
    data[WAYS] = class_dataset(num_classes=WAYS + 1, per_class=SHOTS + QUERY - 1)[WAYS]  # one below it
    for batch in EpisodeSampler(data, ways=WAYS, shots=SHOTS, query=QUERY, batch_size=3).batch(0).unbind():
        drawn = sorted(ids(batch))
        assert drawn == [(c, i) for c in range(WAYS) for i in range(SHOTS + QUERY)], "all of every boundary class"
    with pytest.raises(ValueError, match="only 5 of 6 classes have that many"):
        EpisodeSampler(data, ways=6, shots=SHOTS, query=QUERY)


NAN_CLASS = torch.zeros(20, 1, 2).index_fill_(0, torch.tensor([13]), float("nan"))

BAD_DATA = {
    "a dict of strings": ({c: f"text of class {c}" for c in range(10)},
                          "class 0 holds a str ('text of class 0'); the examples of a class must be a tensor [n, ...] "
                          "or a list of tensors, arrays or numbers: convert the data to tensors first (e.g. tokenise "
                          "or encode strings)"),
    "lists of strings": ({c: ["a", "b"] * 10 for c in range(10)},
                         "example 0 of class 0 is a str ('a'); examples must be tensors, numeric arrays or numbers: "
                         "convert the data to tensors first (e.g. tokenise or encode strings)"),
    "string arrays": ({c: np.array(["a", "b"] * 10) for c in range(10)},
                      "the data of class 0 is a numpy array of dtype <U1; examples must be tensors, numeric arrays "
                      "or numbers: convert the data to tensors first (e.g. tokenise or encode strings)"),
    "classes of different shapes": ({**class_dataset(), 7: torch.zeros(20, 3, 2)},
                                    "class 7 has examples of shape (3, 2) but class 0 has (1, 2); every example needs "
                                    "one shape: resize, crop or pad them first"),
    "examples of different shapes": ({**class_dataset(), 4: [torch.zeros(1, 2)] * 5 + [torch.zeros(2, 2)] * 15},
                                     "example 5 of class 4 has shape (2, 2) but example 0 has (1, 2); every example "
                                     "needs one shape: resize, crop or pad them first"),
    "a NaN example": ({**class_dataset(), 3: NAN_CLASS},
                      "class 3 holds NaN or infinite values (example 13); repair or drop those examples before "
                      "sampling"),
    "an infinite example in a list": ({**class_dataset(), 2: [torch.zeros(1, 2)] * 19 + [torch.full((1, 2), np.inf)]},
                                      "class 2 holds NaN or infinite values (example 19); repair or drop those "
                                      "examples before sampling"),
}


@pytest.mark.parametrize("data, message", BAD_DATA.values(), ids=BAD_DATA.keys())
def test_bad_class_data_is_refused_at_construction(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        EpisodeSampler(data, ways=WAYS, shots=SHOTS, query=QUERY)


def test_mapping_of_arrays_and_lists_is_sampled_as_tensors() -> None:
    tensors = class_dataset()
    arrays = {c: t.numpy() for c, t in tensors.items()}
    lists = {c: list(t.unbind()) for c, t in tensors.items()}
    expected = sampler().batch(2)
    for data in arrays, lists:
        assert_episodes_equal(EpisodeSampler(data, ways=WAYS, shots=SHOTS, query=QUERY, batch_size=TASKS).batch(2),
                              expected)


class Faulty(Tagged):
    """A ClassDataset whose class 4 holds a NaN (``fault="nan"``) or examples of another shape (``"shape"``)."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def examples(self, cls: int, indices: Sequence[int]) -> torch.Tensor:
        x = super().examples(cls, indices)
        if cls == 4:
            return x.fill_(float("nan")) if self.fault == "nan" else torch.zeros(len(indices), 2, 2)
        return x


@pytest.mark.parametrize("fault, message", [
    ("nan", "class 4 of the Faulty holds NaN or infinite values; repair or drop those examples before sampling"),
    ("shape", "class 4 of the Faulty has examples of shape (2, 2) but another class of the episode has (1, 2); every "
              "example needs one shape: resize, crop or pad them first (e.g. with a transform)"),
])
def test_episodes_of_other_class_datasets_are_checked_per_class(fault: str, message: str) -> None:
    tasks = EpisodeSampler(Faulty(fault), ways=6, shots=1, query=2, batch_size=1)  # every task draws class 4
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        tasks.batch(0)


# ---- labelled map-style datasets ----------------------------------------------------------------

class Pairs(torch.utils.data.Dataset):
    """A labelled map-style dataset without ``targets``: item ``i`` is ``(x_i, y_i)``; counts ``__getitem__`` calls."""

    def __init__(self, xs: Sequence[object], ys: Sequence[object]) -> None:
        self.xs, self.ys, self.reads = list(xs), list(ys), 0

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, i: int) -> tuple[object, object]:
        self.reads += 1
        return self.xs[i], self.ys[i]


class WithTargets(Pairs):
    """The same with a ``targets`` tensor, as torchvision datasets have."""

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor(self.ys)


def shuffled_pairs(seed: int = 0) -> tuple[list[torch.Tensor], list[int], dict[int, torch.Tensor]]:
    """Items of :func:`class_dataset` in a shuffled order, and the mapping they group back into (the oracle)."""
    data = class_dataset(num_classes=8, per_class=12)
    items = [(x, c) for c, xs in data.items() for x in xs]
    order = np.random.default_rng(seed).permutation(len(items))
    xs, ys = zip(*(items[i] for i in order))
    grouped = {c: torch.stack([x for x, y in zip(xs, ys) if y == c]) for c in data}  # in dataset order
    return list(xs), list(ys), grouped


@pytest.mark.parametrize("kind", [Pairs, WithTargets])
def test_labelled_dataset_gives_the_episodes_of_its_grouping(kind: type[Pairs]) -> None:
    xs, ys, grouped = shuffled_pairs()
    dataset = kind(xs, ys)
    tasks = EpisodeSampler(dataset, ways=WAYS, shots=SHOTS, query=QUERY, batch_size=TASKS, seed=4)
    oracle = EpisodeSampler(grouped, ways=WAYS, shots=SHOTS, query=QUERY, batch_size=TASKS, seed=4)
    for index in range(3):
        assert_episodes_equal(tasks.batch(index), oracle.batch(index))
    assert isinstance(tasks.dataset, LabelledDataset) and tasks.dataset.class_names == list(range(8))
    assert tasks.dataset.example_shape == (1, 2)


def test_labelled_dataset_is_grouped_once() -> None:
    xs, ys, _ = shuffled_pairs()
    plain, fast = Pairs(xs, ys), WithTargets(xs, ys)
    EpisodeSampler(plain, ways=WAYS, shots=SHOTS, query=QUERY)
    assert plain.reads == len(xs) + 1, "one pass over the items, and one item for the example shape"
    EpisodeSampler(fast, ways=WAYS, shots=SHOTS, query=QUERY)
    assert fast.reads == 1, "targets: the items are not read to group them"
    for dataset in plain, fast:
        before = dataset.reads
        again = EpisodeSampler(dataset, ways=3, shots=1, query=1)
        assert dataset.reads == before + 1, "the grouping is cached per dataset object"
        assert [again.dataset.class_size(c) for c in range(8)] == [12] * 8


def test_subset_of_a_dataset_with_targets_is_grouped_without_reading_items() -> None:
    xs, ys, _ = shuffled_pairs()
    dataset = WithTargets(xs, ys)
    keep = [i for i, y in enumerate(ys) if y != 3]
    subset = EpisodeSampler(torch.utils.data.Subset(dataset, keep), ways=WAYS, shots=SHOTS, query=QUERY)
    assert dataset.reads == 1
    assert subset.dataset.class_names == [0, 1, 2, 4, 5, 6, 7]
    assert subset.dataset.class_index[3].tolist() == [keep.index(i) for i, y in enumerate(ys) if y == 4]


def test_labels_of_any_hashable_kind() -> None:
    xs = [torch.tensor([float(i)]) for i in range(12)]
    names = EpisodeSampler(Pairs(xs, ["cat", "dog", "emu"] * 4), ways=3, shots=2, query=2).dataset
    assert names.class_names == ["cat", "dog", "emu"] and names.examples(1, [0, 3]).flatten().tolist() == [1.0, 10.0]
    tensors = EpisodeSampler(Pairs(xs, [torch.tensor(i % 3) for i in range(12)]), ways=3, shots=2, query=2).dataset
    assert tensors.class_names == [0, 1, 2] and tensors.class_size(2) == 4


def test_pil_images_become_what_to_tensor_gives() -> None:
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)) for _ in range(6)]
    images += [Image.fromarray(rng.integers(0, 256, (5, 4), dtype=np.uint8)).convert("RGB") for _ in range(6)]
    data = LabelledDataset(Pairs(images, [0, 1] * 6))
    torch.testing.assert_close(data.examples(0, range(6)), torch.stack([to_tensor(im) for im in images[::2]]),
                               rtol=0, atol=0)
    for mode in ("L", "1", "P"):
        converted = [im.convert(mode) for im in images]
        got = LabelledDataset(Pairs(converted, [0] * 12)).examples(0, range(12))
        want = torch.stack([to_tensor(im.convert("L" if mode == "1" else "RGB" if mode == "P" else mode))
                            for im in converted])
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=mode)


@pytest.mark.parametrize("dataset, message", [
    (Pairs([torch.zeros(2)] * 4, [0, 1] * 2), None),
    ([torch.zeros(2)] * 4, "item 0 of the list is a Tensor (tensor([0., 0.])), not an (x, y) pair; EpisodeSampler "
                           "takes a mapping class -> examples, a ClassDataset, or a labelled dataset whose items are "
                           "(x, y) pairs"),
    (Pairs(["some text"] * 4, [0, 1] * 2), "the input of item 0 of the Pairs is a str ('some text'); EpisodeSampler "
                                           "needs tensors, PIL images, numeric arrays or numbers: give the dataset a "
                                           "transform that returns tensors (e.g. "
                                           "transform=torchvision.transforms.ToTensor())"),
    (Pairs([torch.zeros(2)] * 4, [torch.eye(2)[0], torch.eye(2)[1]] * 2),
     "the label of item 0 of the Pairs is tensor([1., 0.]) of shape (2,); a labelled dataset needs one class id per "
     "item (an int or a string): use the class index, not a one-hot vector"),
    (torch.zeros(4, 2), "cannot sample episodes from a Tensor: pass a mapping class -> tensor of examples, a "
                        "ClassDataset, or a labelled map-style dataset whose items are (x, y) pairs"),
], ids=["valid", "items without labels", "string inputs", "one-hot labels", "a bare tensor"])
def test_bad_labelled_datasets_are_refused(dataset: object, message: str | None) -> None:
    if message is None:
        assert EpisodeSampler(dataset, ways=2, shots=1, query=1).batch(0).support_x.shape == (1, 2, 2)
        return
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        EpisodeSampler(dataset, ways=2, shots=1, query=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_with_its_defaults_gives_the_samplers_batches(workers: int) -> None:
    xs, ys, _ = shuffled_pairs()
    for data in class_dataset(), WithTargets(xs, ys):
        tasks = EpisodeSampler(data, ways=WAYS, shots=SHOTS, query=QUERY, batch_size=TASKS, seed=3, num_batches=4,
                               start=2)
        loaded = list(DataLoader(tasks, num_workers=workers))
        assert len(loaded) == 4
        for offset, batch in enumerate(loaded):
            assert_episodes_equal(batch, tasks.batch(2 + offset))


# ---- options the data cannot serve, through the registered builders' helper ---------------------

@pytest.mark.parametrize("split, options, message", [
    ("test", EpisodeOptions(ways=5, shots=10, query=1, eval_query=15),
     "eval_query=15 plus shots=10 exceeds 20, the most examples a class of the dataset test split has (validation and "
     "test tasks draw shots + eval_query examples per class); lower --eval-query or --shots"),
    ("val", EpisodeOptions(ways=5, shots=10, query=15),
     "query=15 plus shots=10 exceeds 20, the most examples a class of the dataset val split has (eval_query is not "
     "set, so validation and test tasks draw shots + query examples per class); lower --query or --shots (or set "
     "--eval-query for validation and test tasks)"),
    ("train", EpisodeOptions(ways=5, shots=10, query=11, eval_query=1),
     "query=11 plus shots=10 exceeds 20, the most examples a class of the dataset train split has (meta-training tasks "
     "draw shots + query examples per class); lower --query or --shots"),
    ("train", EpisodeOptions(ways=11, shots=1, query=1),
     "ways=11 exceeds the 10 classes of the dataset train split; lower --ways to at most 10"),
])
def test_options_the_data_cannot_serve_name_the_option(split: str, options: EpisodeOptions, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        episode_sampler(class_dataset(num_classes=10, per_class=20), options, split, seed=0)
    assert episode_sampler(class_dataset(), EpisodeOptions(ways=5, shots=10, query=10, eval_query=10), split,
                           seed=0).query == 10, "exactly the examples of a class: allowed"


def test_too_few_large_classes_are_named() -> None:
    data = {**class_dataset(num_classes=3, per_class=25), **{c: class_dataset(per_class=20)[c] for c in range(3, 10)}}
    with pytest.raises(ConfigError, match=re.escape(
            "eval_query=15 plus shots=10 exceeds the examples of all but 3 of the 10 classes of the dataset test "
            "split, fewer than the ways=5 a task draws (validation and test tasks draw shots + eval_query examples per "
            "class); lower --eval-query or --shots")):
        episode_sampler(data, EpisodeOptions(ways=5, shots=10, eval_query=15), "test", seed=0)
