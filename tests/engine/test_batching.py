"""Task batching: loop == vmap (values and meta-gradients), the strategy resolved in one place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaopt.engine.batching import STRATEGIES, map_tasks, resolve_strategy
from metaopt.engine.batchnorm import batchnorm_policy
from metaopt.engine.functional import named_params
from metaopt.engine.inner import InnerLoop
from metaopt.engine.meta_learner import TaskOutputs
from metaopt.engine.rules import sgd
from metaopt.problems.episode import Episode
from tests.engine.common import run_tasks
from tests.helpers import assert_close_dicts, tiny_convnet, toy_classification_batch

WEIGHTS = [0.3, 0.7]


def run(loop: InnerLoop, model: torch.nn.Module, batch: Episode, steps: int = 2, weights: list[float] | None = None,
        strategy: str = "loop", bn_policy: str = "batch") -> tuple[TaskOutputs, dict[str, torch.Tensor]]:
    """Task outputs and the gradient of the mean outer loss w.r.t. the model's and the rule's parameters."""
    params = named_params(model)
    with batchnorm_policy(bn_policy).meta_batch(model, training=False):
        out = run_tasks(loop, model, F.cross_entropy, batch, params, steps, weights, strategy, track=True)
    targets = {**params, **{f"rule.{k}": v for k, v in loop.rule.named_parameters()}}
    gradients = torch.autograd.grad(out.losses.mean(), list(targets.values()))
    return out, dict(zip(targets, gradients))


@pytest.mark.parametrize("bn_policy", ["batch", "frozen"])
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_loop_and_vmap_agree(first_order: bool, bn_policy: str) -> None:
    model, loop = tiny_convnet(), InnerLoop(sgd(0.3, learnable=True).double(), first_order=first_order)
    batch = toy_classification_batch()
    by_loop, grads_loop = run(loop, model, batch, weights=WEIGHTS, strategy="loop", bn_policy=bn_policy)
    by_vmap, grads_vmap = run(loop, model, batch, weights=WEIGHTS, strategy="vmap", bn_policy=bn_policy)
    torch.testing.assert_close(by_vmap.losses, by_loop.losses)
    torch.testing.assert_close(by_vmap.step_losses, by_loop.step_losses)
    torch.testing.assert_close(by_vmap.accuracy, by_loop.accuracy)
    assert_close_dicts(grads_vmap, grads_loop)
    assert grads_loop["rule.lr"].abs() > 0 and grads_loop["3.weight"].abs().sum() > 0
    with torch.no_grad(), batchnorm_policy(bn_policy).meta_batch(model, training=False):  # evaluation: no graph
        for strategy in ("loop", "vmap"):
            out = run_tasks(loop, model, F.cross_entropy, batch, steps=2, weights=WEIGHTS, strategy=strategy)
            torch.testing.assert_close(out.losses, by_loop.losses.detach())


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_map_tasks_stacks_the_results_of_every_task(strategy: str) -> None:
    flags = []

    def task(x: torch.Tensor, y: torch.Tensor, functional: bool) -> tuple[torch.Tensor, torch.Tensor]:
        flags.append(functional)
        return (x * y).sum(), x.max(0).values

    x = torch.arange(12.0).reshape(4, 3)
    y = torch.tensor([1.0, -1.0, 2.0, 0.5])
    products, maxima = map_tasks(task, (x, y), strategy)
    torch.testing.assert_close(products, x.sum(1) * y)
    torch.testing.assert_close(maxima, x.max(1).values)
    # one call per task by the loop, with torch.autograd; one batched call by vmap, with torch.func
    assert flags == ([False] * 4 if strategy == "loop" else [True])


def test_vmap_draws_different_random_numbers_per_task() -> None:
    (draws,) = map_tasks(lambda x, functional: (x + torch.rand(()),), (torch.zeros(5),), "vmap")
    assert draws.unique().numel() == 5


def test_strategy_is_resolved_and_checked() -> None:
    assert STRATEGIES == ("auto", "loop", "vmap", "compiled")
    assert resolve_strategy("auto", torch.device("cpu")) == "loop"
    assert resolve_strategy("compiled", torch.device("cpu")) == "compiled"
    assert resolve_strategy("auto", torch.device("cuda")) == "vmap"
    assert resolve_strategy("vmap", torch.device("cpu")) == "vmap"
    assert resolve_strategy("loop", torch.device("cuda")) == "loop"
    with pytest.raises(ValueError, match=r"unknown task-batching strategy 'threads'; choose one of \('auto', "):
        resolve_strategy("threads", torch.device("cpu"))


def test_tasks_that_must_run_one_after_another() -> None:
    why = "the tasks write one shared counter"
    for device in ("cpu", "cuda"):
        assert resolve_strategy("auto", torch.device(device), loop_only=why) == "loop"
        assert resolve_strategy("loop", torch.device(device), loop_only=why) == "loop"
        for batched in ("vmap", "compiled"):
            with pytest.raises(ValueError, match=f"strategy='{batched}' is not available: {why}; use strategy='loop'"):
                resolve_strategy(batched, torch.device(device), loop_only=why)
    with pytest.raises(ValueError, match="unknown task-batching strategy 'threads'"):
        resolve_strategy("threads", torch.device("cpu"), loop_only=why)
