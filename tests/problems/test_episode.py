"""Episodes (metaopt/problems/episode.py): validation messages, batching (stack / unbind / index / cat), device
moves, DataLoader collation."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import default_collate

from metaopt.problems.episode import Episode, EpisodeError, collate_episodes
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


X6, X12 = torch.zeros(6, 5), torch.zeros(12, 5)
NAN_TARGETS, INF_TARGETS = torch.zeros(12).index_fill_(0, torch.tensor([7]), float("nan")), torch.zeros(12)
INF_TARGETS[2] = -float("inf")
BATCH_X, BATCH_Y = torch.zeros(4, 10, 1), torch.zeros(4, 10, 1)

EXACT = {
    "nan query regression target": (parts(support_y=torch.zeros(6), query_y=NAN_TARGETS),
                                    "query_y contains NaN or infinite values (example 7); regression targets must be "
                                    "finite: repair or drop those examples"),
    "infinite query regression target": (parts(support_y=torch.zeros(6), query_y=INF_TARGETS),
                                         "query_y contains NaN or infinite values (example 2); regression targets must "
                                         "be finite: repair or drop those examples"),
    "nan query input": (parts(query_x=NAN_INPUTS), "query_x contains NaN or infinite values (example 3); inputs must "
                                                   "be finite: repair or drop those examples"),
    "labels 1..ways": (parts(support_y=torch.arange(1, 4).repeat(2), query_y=torch.arange(1, 4).repeat(4)),
                       "support_y has no example of class 0 of a 4-way task (ways=4 inferred from the largest label, "
                       "3; labels found: 1..3); relabel the classes as 0..ways-1"),
    "labels 1..ways with ways given": (dict(parts(support_y=torch.arange(1, 4).repeat(2),
                                                  query_y=torch.arange(1, 4).repeat(4)), ways=3),
                                       "support_y holds labels in [1, 3], outside [0, 3) for a 3-way task; relabel "
                                       "the classes as 0..ways-1"),
    "a gap in the labels": (parts(support_y=torch.tensor([0, 0, 2, 2, 3, 3]), query_y=torch.tensor([0, 2, 3] * 4)),
                            "support_y has no example of class 1 of a 4-way task (ways=4 inferred from the largest "
                            "label, 3; labels found: [0, 2, 3]); relabel the classes as 0..ways-1"),
    "a class without support examples": (dict(parts(), ways=5), "support_y has no example of classes [3, 4] of a "
                                                                "5-way task (labels found: 0..2); relabel the classes "
                                                                "as 0..ways-1"),
    "query label absent from the support set": (dict(parts(query_y=torch.tensor([0, 1, 2, 3] * 3)), ways=4),
                                                "query_y holds label(s) [3] that no support example has; every query "
                                                "class needs support examples: draw the support and query sets from "
                                                "the same classes"),
    "batched labels without batched=True": (dict(support_x=torch.zeros(4, 6, 5), support_y=torch.arange(3).repeat(4, 2),
                                                 query_x=torch.zeros(4, 12, 5), query_y=torch.arange(3).repeat(4, 4)),
                                            "support_y has shape (4, 6) and support_x (4, 6, 5): a batch of 4 tasks of "
                                            "6 examples, but batched is not set; pass batched=True, or build the batch "
                                            "from single tasks with Episode.stack([...])"),
    "batched regression without batched=True": (dict(support_x=BATCH_X, support_y=BATCH_Y, query_x=BATCH_X,
                                                     query_y=BATCH_Y),
                                                "support_x (4, 10, 1), support_y (4, 10, 1), query_x (4, 10, 1) and "
                                                "query_y (4, 10, 1) look like a batch of 4 tasks (a leading task "
                                                "dimension), but batched is not set; pass batched=True, or build the "
                                                "batch from single tasks with Episode.stack([...]); or pass "
                                                "batched=False if this is one task"),
    "batched labels with batched=False": (dict(support_x=torch.zeros(4, 6, 5), support_y=torch.arange(3).repeat(4, 2),
                                               query_x=torch.zeros(4, 6, 5), query_y=torch.arange(3).repeat(4, 2),
                                               batched=False),
                                          "support_y has shape (4, 6); labels must be one integer per example "
                                          "(one-hot labels: use .argmax(-1); a leading task dimension: pass "
                                          "batched=True or build the batch with Episode.stack)"),
}


@pytest.mark.parametrize("kwargs, message", EXACT.values(), ids=EXACT.keys())
def test_invalid_episodes_raise_exact_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(EpisodeError, match=f"^{re.escape(message)}$"):
        Episode(**kwargs)


def test_batched_checks_name_the_task() -> None:
    batch = Episode.stack([task(), task(seed=1), task(seed=2)])
    support_y = batch.support_y.clone()
    support_y[1] = torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(EpisodeError, match=re.escape("query_y of task 1 holds label(s) [2] that no support example")):
        Episode(batch.support_x, support_y, batch.query_x, batch.query_y, batched=True)
    query_y = batch.query_y.clone().float()
    query_y[2, 5] = float("nan")
    with pytest.raises(EpisodeError, match=re.escape("query_y contains NaN or infinite values (task 2, example 5)")):
        Episode(batch.support_x, batch.support_y.float(), batch.query_x, query_y, batched=True)
    assert Episode(*batch.tensors(), batched=True).ways == 3


def test_batched_false_says_one_task_of_sequences() -> None:
    x, y = torch.randn(4, 10, 1), torch.randn(4, 10, 1)  # 4 examples, each a sequence of 10 steps
    ep = Episode(x, y, x, y, batched=False)
    assert not ep.is_batched and ep.num_tasks == 1 and ep.batched is False
    assert Episode(torch.randn(4, 10, 1), torch.randn(4, 1), x, torch.randn(4, 1)).batched is False, "not a batch"


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


def test_stack_refuses_tasks_of_different_ways() -> None:
    three = task(ways=3, shots=5, query=5)   # 15 support and 15 query examples, as the 5-way task below
    five = task(ways=5, shots=3, query=3)
    assert [tuple(t.shape) for t in three.tensors()] == [tuple(t.shape) for t in five.tensors()]
    message = ("Episode.stack got episodes of different ways ([3, 5]); a batch holds tasks of one ways: sample them "
               "with the same ways, or stack each ways separately")
    for order in ([three, five], [five, three], [three, three, five]):
        with pytest.raises(EpisodeError, match=f"^{re.escape(message)}$"):
            Episode.stack(order)
    assert Episode.stack([five, five]).ways == 5 and Episode.stack([three]).ways == 3
    x = torch.zeros(15, 5)
    with pytest.raises(EpisodeError, match="^Episode.stack got classification and regression episodes; a batch "
                                           "holds tasks of one kind: stack them separately$"):
        Episode.stack([three, Episode(x, torch.zeros(15), x, torch.zeros(15))])


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_pin_memory_keeps_the_episode() -> None:
    batch = Episode.stack([task(), task(seed=1)])
    pinned = batch.pin_memory()
    assert all(t.is_pinned() for t in pinned.tensors())
    assert_episodes_equal(pinned, batch)


def test_to_the_cpu_is_a_plain_move(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = Episode.stack([task(), task(seed=1)])
    monkeypatch.setattr(Episode, "pin_memory", lambda self: pytest.fail("pinned memory is for transfers to a GPU"))
    assert_episodes_equal(batch.to("cpu"), batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_to_the_gpu_copies_through_pinned_memory() -> None:
    batch = Episode.stack([task(), task(seed=1)])
    moved = batch.to("cuda")
    assert all(t.device.type == "cuda" for t in moved.tensors())
    assert_episodes_equal(moved.to("cpu"), batch)


def test_default_collate_passes_episodes_through() -> None:
    batch = Episode.stack([task(), task(seed=1)])
    assert default_collate([batch]) is batch, "DataLoader(sampler) with batch_size=1 yields the sampler's batches"
    assert_episodes_equal(default_collate([batch[:1], batch[1:]]), batch)
    assert_episodes_equal(collate_episodes([task(), task(seed=1)]), batch)
    assert collate_episodes([batch]) is batch
