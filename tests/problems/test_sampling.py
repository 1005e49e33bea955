"""Task samplers (metaopt/problems/sampling.py): episode layout, seeded and resumable streams, DataLoader workers,
errors, the options of task datasets and the seeds of a run's splits."""

from __future__ import annotations

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
