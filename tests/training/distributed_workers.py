"""The runs the distributed tests compare: each built alike on one process and on every rank of a gloo group.

A case builds a learner, its problems and its estimator from fixed seeds, and returns the first
meta-gradient and the meta-parameters after three outer steps of the trainer. :func:`worker` runs
the cases on one rank of a group and rank 0 saves what they return.
"""

from __future__ import annotations

import datetime
import itertools
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from metaopt.algorithms import MAML, MetaSGD
from metaopt.algorithms.lstm_optimizer import LSTMOptimizerRule
from metaopt.algorithms.rule_search import RuleController, RuleSearch
from metaopt.datasets import Quadratics, Sinusoid
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators import PES, PPO, Backprop, Estimator, TruncatedBackprop, TruncatedES
from metaopt.models import MLP
from metaopt.problems.optimizees import OptimizeeStream
from metaopt.training.config import TrainerConfig
from metaopt.training.distributed import DistributedError, World
from metaopt.training.trainer import Interrupted, MetaTrainer
from tests.helpers import tiny_convnet, tiny_mlp, toy_classification_batch, toy_regression_batch


class ImageTasks:
    """Batches of 4 random 3-way 2-shot float32 image tasks (batch ``i`` drawn from seed ``i``)."""

    batch_size = 4

    def batch(self, index: int) -> Any:
        return toy_classification_batch(tasks=4, seed=index, dtype=torch.float32)


class SineTasks:
    """Batches of 5 float64 sine regression tasks: 5 over 2 ranks shares unevenly (3 and 2)."""

    batch_size = 5

    def batch(self, index: int) -> Any:
        return toy_regression_batch(tasks=5, seed=index)


class AdamRewards:
    """Reward 1 for rules that read the Adam update, else 0.1 (a child training's stand-in)."""

    batch_size, seed = 8, 0

    def reward(self, rule: Any) -> float:
        return 1.0 if "adam" in rule.key else 0.1


def _lstm(horizon: int) -> OptimizerLearner:
    return OptimizerLearner(LSTMOptimizerRule(hidden=6), horizon=horizon)


#: name -> (learner, problems, estimator), built from fixed seeds.
CASES: dict[str, Callable[[], tuple[Any, Any, Estimator]]] = {
    "maml-second-order-batchnorm": lambda: (MAML(tiny_convnet().float(), inner_lr=0.1, inner_steps=2), ImageTasks(),
                                            Backprop()),
    "maml-running-batchnorm": lambda: (MAML(tiny_convnet().float(), inner_lr=0.1, bn_policy="running"), ImageTasks(),
                                       Backprop()),
    "metasgd": lambda: (MetaSGD(tiny_mlp(), init=0.05, inner_steps=2), SineTasks(), Backprop()),
    "truncated-backprop-lstm": lambda: (_lstm(6), OptimizeeStream(Quadratics(dim=3, batch=2), first=0),
                                        TruncatedBackprop(truncation=2, tasks=3)),
    "es": lambda: (_lstm(6), OptimizeeStream(Quadratics(dim=3, batch=2), first=0),
                   TruncatedES(sigma=0.01, pairs=3, truncation=2, tasks=2)),
    "pes": lambda: (_lstm(3), OptimizeeStream(Quadratics(dim=3, batch=2), first=0),
                    PES(sigma=0.01, pairs=2, truncation=2)),
    "ppo": lambda: (RuleSearch(RuleController(groups=1, hidden=8), eval_steps=1), AdamRewards(),
                    PPO("ppo", epochs=2)),
}


def _build(name: str) -> tuple[Any, Any, Estimator]:
    torch.manual_seed(0)
    return CASES[name]()


def run_case(name: str, world: World) -> dict[str, Any]:
    """The first meta-gradient of case ``name`` and its meta-parameters after 3 outer steps, on ``world``."""
    learner, problems, estimator = _build(name)
    if world.active:
        estimator.distribute(world)
    estimate = estimator.estimate(learner, problems, 0)
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    learner, problems, estimator = _build(name)
    # SGD, not Adam: the conv biases before batch norm get gradients that are rounding noise (batch norm cancels
    # them), which Adam would scale up to steps of its learning rate in directions the summation order decides
    config = TrainerConfig(iterations=3, meta_optimizer="sgd", meta_lr=0.1, eval_every=1000, checkpoint_every=1000,
                           log_every=1)
    MetaTrainer(learner, problems, config, estimator=estimator, world=world).fit()
    world.check_identical(learner, f"the end of case {name}")  # buffers too: running statistics are synced
    return {"loss": estimate.loss, "grads": grads, "params": {n: p.detach().clone() for n, p in
                                                                learner.named_parameters()},
            "buffers": {n: b.clone() for n, b in learner.named_buffers()}}


def diverged(world: World) -> str:
    """The error :meth:`World.check_identical` raises when rank 1's copy of a model differs."""
    model = tiny_mlp()
    if world.rank == 1:
        with torch.no_grad():
            model[2].bias.add_(1e-12)
    try:
        world.check_identical(model, "a test")
    except DistributedError as error:
        return str(error)
    return "no error"


def signalled_as_the_stop_agreement_returns(world: World) -> dict[str, Any]:
    """Rank 0 gets SIGTERM as the stop agreement of iteration 2 (an evaluation's) returns; every rank's record.

    A signal that reaches a rank blocked in the agreement's all-reduce is handled as it returns, once
    the other ranks have agreed not to stop: each rank must still evaluate and stop where the others do.
    """
    agreements = itertools.count(1)

    class SignalledWorld(World):
        def agree(self, flags: Sequence[bool]) -> list[bool]:
            agreed = super().agree(flags)
            if self.rank == 0 and next(agreements) == 3:  # the start's agreement, then iterations 1 and 2
                os.kill(os.getpid(), signal.SIGTERM)
            return agreed

    torch.manual_seed(0)
    config = TrainerConfig(iterations=10, eval_every=2, eval_episodes=4, log_every=1, checkpoint_every=1000)
    trainer = MetaTrainer(MAML(MLP(1, 1, hidden=(8,)), inner_lr=0.01), Sinusoid(shots=5, query=10, batch_size=4),
                          config, val_problems=Sinusoid(shots=5, query=10, batch_size=4, seed=1),
                          world=SignalledWorld(world.rank, world.size))
    evaluated: list[int] = []
    update_best = trainer._update_best

    def recording_evaluations(result: Any) -> bool:
        evaluated.append(trainer.iteration)
        return update_best(result)

    trainer._update_best = recording_evaluations
    try:
        trainer.fit()
        stopped = None
    except Interrupted as stop:
        stopped = stop.iteration
    return {"rank": world.rank, "evaluated": evaluated, "stopped": stopped}


def worker(rank: int, size: int, port: int, out: str, names: list[str]) -> None:
    """Join the gloo group on ``port`` as ``rank`` of ``size``, run the cases; rank 0 saves them to ``out``."""
    os.environ.update(LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results: dict[str, Any] = {name: run_case(name, World(rank, size)) for name in names}
        results["diverged"] = diverged(World(rank, size))
        world = World(rank, size)
        results["signalled"] = world.gather(signalled_as_the_stop_agreement_returns(world))
        if rank == 0:
            torch.save(results, Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # as metaopt's own ranks do (metaopt/__main__.py): skip the interpreter's teardown, where gloo's threads
    # abort a process now and then ("terminate called without an active exception", SIGABRT)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
