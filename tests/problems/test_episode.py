"""Episodes (metaopt/problems/episode.py): validation messages, batching (stack / unbind / index / cat), device
moves."""

from __future__ import annotations

import pytest
import torch

from metaopt.problems.episode import Episode, EpisodeError
from tests.helpers import assert_episodes_equal


def task(ways: int = 3, shots: int = 2, query: int = 4, dim: int = 5, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(torch.randn(ways * shots, dim, generator=g), labels.repeat_interleave(shots),
                   torch.randn(ways * query, dim, generator=g), labels.repeat_interleave(query))


def parts(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a valid 3-way task, with some replaced."""
    ep = task()
    return {"support_x": ep.support_x, "support_y": ep.support_y, "query_x": ep.query_x, "query_y": ep.query_y,
            **changes}


def test_valid_classification_episode() -> None:
    ep = task(ways=4)
    assert (ep.ways, ep.is_classification, ep.is_batched, ep.num_tasks, len(ep)) == (4, True, False, 1, 1)


def test_regression_episode_has_no_ways() -> None:
    x = torch.linspace(-1, 1, 6).unsqueeze(1)
    ep = Episode(x[:3], torch.sin(x[:3]), x[3:], torch.sin(x[3:]))
    assert not ep.is_classification and ep.ways is None


NAN_INPUTS = torch.zeros(12, 5).index_fill_(0, torch.tensor([3]), float("nan"))

INVALID = {
    "mismatched support lengths": (parts(support_y=torch.arange(3).repeat(3)),
                                   "support_x has 6 examples but support_y has 9"),
    "mismatched query lengths": (parts(query_x=torch.zeros(5, 5)), "query_x has 5 examples but query_y has 12"),
    "label above ways": (dict(parts(query_y=torch.arange(4).repeat(3)), ways=3),
                         r"query_y holds labels in \[0, 3\], outside \[0, 3\) for a 3-way task; relabel"),
    "negative label": (parts(support_y=torch.tensor([0, 0, 1, 1, -1, 2])), r"labels in \[-1, 2\], outside \[0, 3\)"),
    "empty support": (parts(support_x=torch.zeros(0, 5), support_y=torch.zeros(0, dtype=torch.long)),
                      "support_x is empty"),
    "empty query": (parts(query_x=torch.zeros(0, 5), query_y=torch.zeros(0, dtype=torch.long)), "query_x is empty"),
    "nan input": (parts(query_x=NAN_INPUTS), "query_x contains NaN or infinite values"),
    "infinite input": (parts(support_x=torch.full((6, 5), float("inf"))), "support_x contains NaN or infinite"),
    "integer inputs": (parts(support_x=torch.ones(6, 5, dtype=torch.long)), r"support_x has dtype torch.int64; inputs "
                       r"must be floating point \(use .float\(\)\)"),
    "int32 labels": (parts(support_y=torch.arange(3).repeat(2).int()), r"support_y has dtype torch.int32; class "
                     r"labels must be torch.long \(use .long\(\)\)"),
    "labels and targets mixed": (parts(query_y=torch.zeros(12)), "must both be labels"),
    "example shapes differ": (parts(query_x=torch.zeros(12, 4)), r"support_x examples have shape \(5,\) but query_x"),
    "one-hot labels": (parts(support_y=torch.eye(3, dtype=torch.long).repeat(2, 1)),
                       "labels must be one integer per example"),
    "nan regression target": (parts(support_y=torch.full((6,), float("nan")), query_y=torch.zeros(12)),
                              "support_y contains NaN or infinite values"),
    "not a tensor": (parts(support_x=[[0.0] * 5] * 6), "support_x must be a torch.Tensor, got list"),
}


@pytest.mark.parametrize("kwargs, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_episodes_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(EpisodeError, match=message):
        Episode(**kwargs)


def test_episode_error_is_a_value_error() -> None:
    assert issubclass(EpisodeError, ValueError)


def test_validate_false_skips_checks() -> None:
    ep = Episode(**parts(support_y=torch.tensor([0, 0, 1, 1, 2, 7])), validate=False)
    assert ep.ways == 8


def test_batched_task_dimension_must_agree() -> None:
    batch = Episode.stack([task(), task(seed=1)])
    with pytest.raises(EpisodeError, match="task dimension differs"):
        Episode(batch.support_x, batch.support_y, batch.query_x[:1], batch.query_y[:1], batched=True)


def test_stack_unbind_index_round_trip() -> None:
    tasks = [task(seed=s) for s in range(3)]
    batch = Episode.stack(tasks)
    assert batch.is_batched and len(batch) == 3 and batch.ways == 3
    assert batch.support_x.shape == (3, 6, 5) and batch.query_y.shape == (3, 12)
    for original, unbound in zip(tasks, batch.unbind()):
        assert_episodes_equal(unbound, original)
    assert_episodes_equal(batch[1], tasks[1])
    assert_episodes_equal(batch[1:], Episode.stack(tasks[1:]))
    assert_episodes_equal(Episode.cat([batch[:1], batch[1:]]), batch)
    assert_episodes_equal(Episode.stack(batch.unbind()), batch)
    single = task()
    assert len(single.unbind()) == 1 and single.unbind()[0] is single


def test_stack_checks_its_input() -> None:
    with pytest.raises(EpisodeError, match="different shapes"):
        Episode.stack([task(shots=2), task(shots=3)])
    with pytest.raises(EpisodeError, match="at least one episode"):
        Episode.stack([])
    with pytest.raises(EpisodeError, match="takes single-task episodes"):
        Episode.stack([Episode.stack([task()])])
    with pytest.raises(EpisodeError, match="indexing selects tasks"):
        task()[0]


def test_stack_of_regression_tasks_has_no_ways() -> None:
    x = torch.linspace(-1, 1, 4).unsqueeze(1)
    ep = Episode(x[:2], x[:2], x[2:], x[2:])
    assert Episode.stack([ep, ep]).ways is None


def test_to_moves_every_tensor_and_keeps_the_layout() -> None:
    batch = Episode.stack([task(), task(seed=1)])
    assert_episodes_equal(batch.to("cpu"), batch)
    moved = batch.to("meta")  # a real device move that needs no accelerator
    assert all(t.device.type == "meta" for t in moved.tensors())
    assert (moved.ways, moved.batched, moved.support_x.shape) == (batch.ways, batch.batched, batch.support_x.shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_round_trip() -> None:
    batch = Episode.stack([task(), task(seed=1)])
    assert_episodes_equal(batch.to("cuda").to("cpu"), batch)
