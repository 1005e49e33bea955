"""What the benchmarks run: a MAML workload and the implementations of its meta-loss that are compared.

Every measure of :mod:`metaopt.bench` is of *one meta-iteration*: the meta-loss of a batch of
``T`` tasks, its backward pass and an Adam step on the meta-parameters. The implementations
(``METHODS``) start from the same initial parameters and see the same batch, so their
meta-gradients can be compared:

* ``"plain"``: the reference peer, a per-task loop written directly with
  :func:`torch.func.functional_call` and :func:`torch.autograd.grad`;
* ``"loop"``, ``"vmap"`` and ``"compiled"``: :class:`metaopt.MetaLearner` (func driver) with that
  strategy (``"compiled"``'s first meta-iteration includes compiling its graph);
* ``"checkpointed"``: ``"loop"`` with ``checkpoint_steps=True`` (inner steps recomputed);
* ``"higher"``: :class:`metaopt.MetaLearner` with the ``higher`` driver;
* ``"learn2learn"``: ``l2l.algorithms.MAML`` with ``clone()`` and ``adapt()``, when it imports.

Example:
    >>> import torch
    >>> workload = Workload(tasks=2, query=1, hidden=4)
    >>> workload.label, workload.order, workload.batch().query_x.shape
    ('5-way 1-shot', 'second', torch.Size([2, 5, 1, 28, 28]))
    >>> model, meta_loss = build_meta_loss("vmap", workload)
    >>> meta_loss().shape
    torch.Size([])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.higher_driver import HigherRule
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.rules import sgd
from metaopt.models import Conv4
from metaopt.problems.episode import Episode

__all__ = ["METHODS", "QueryLoss", "Workload", "build_meta_loss", "learn2learn_unavailable", "plain_meta_loss"]

#: ``query_loss(params, x, y)``: the loss of a task's adapted parameters on its query set.
QueryLoss = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]

#: MetaLearner options of the metaopt implementations.
_METAOPT = {
    "loop": {"strategy": "loop"},
    "vmap": {"strategy": "vmap"},
    "compiled": {"strategy": "compiled"},
    "checkpointed": {"strategy": "loop", "checkpoint_steps": True},
    "higher": {"strategy": "loop"},
}
METHODS = ("plain", *_METAOPT, "learn2learn")


@dataclass(frozen=True)
class Workload:
    """A MAML meta-training problem: N-way K-shot episodes of random images for a Conv4.

    Random inputs of the right shape cost what real ones do (no operator here depends on pixel
    values), so no data set is needed. Model and batch are functions of ``seed``.

    Attributes:
        ways, shots, query: classes per task, support and query examples per class.
        tasks: tasks per meta-batch (``T``).
        inner_steps: SGD steps of the inner loop.
        first_order: drop the second-order terms of the meta-gradient.
        hidden: filters of each Conv4 convolution (64 for Omniglot).
        image_size: side of the square one-channel images (28 for Omniglot).
        inner_lr: inner SGD step size (MAML's 0.4 for Omniglot).
        seed: seeds the model's initial parameters and the batch.
        device: where model and batch live (the batch is drawn on the CPU, then moved, so that it is
            the same on every device).
    """

    ways: int = 5
    shots: int = 1
    query: int = 15
    tasks: int = 16
    inner_steps: int = 1
    first_order: bool = False
    hidden: int = 64
    image_size: int = 28
    inner_lr: float = 0.4
    seed: int = 0
    device: str = "cpu"

    @property
    def label(self) -> str:
        """``"5-way 1-shot"`` and the like."""
        return f"{self.ways}-way {self.shots}-shot"

    @property
    def order(self) -> str:
        """``"first"`` or ``"second"``: the order of the meta-gradient."""
        return "first" if self.first_order else "second"

    def model(self) -> Conv4:
        """A freshly initialised Conv4 (the same parameters for the same seed)."""
        torch.manual_seed(self.seed)
        model = Conv4(in_channels=1, num_classes=self.ways, hidden=self.hidden, image_size=self.image_size)
        return model.to(self.device)

    def batch(self) -> Episode:
        """``tasks`` episodes of random images, labels class by class."""
        g = torch.Generator().manual_seed(self.seed)
        labels = torch.arange(self.ways)
        shape = (self.tasks, -1, 1, self.image_size, self.image_size)
        support = torch.rand(self.tasks * self.ways * self.shots, 1, self.image_size, self.image_size, generator=g)
        query = torch.rand(self.tasks * self.ways * self.query, 1, self.image_size, self.image_size, generator=g)
        return Episode(support.view(shape), labels.repeat_interleave(self.shots).repeat(self.tasks, 1),
                       query.view(shape), labels.repeat_interleave(self.query).repeat(self.tasks, 1),
                       batched=True).to(self.device)


def learn2learn_unavailable() -> str | None:
    """Why ``import learn2learn`` fails here, or ``None`` when it imports."""
    try:
        import learn2learn  # noqa: F401
    except Exception as error:  # missing, or installed but broken on this Python: report either
        return f"{type(error).__name__}: {error}"
    return None


def plain_meta_loss(model: nn.Module, batch: Episode, workload: Workload,
                    query_loss: QueryLoss | None = None) -> Callable[[], torch.Tensor]:
    """MAML as one writes it without a library: functional_call and autograd.grad, task after task.

    ``query_loss(params, x, y)`` scores the adapted parameters on a task's query set (default: the
    cross-entropy of ``model`` run on them, as on the support set), so that a measurement can swap
    in another implementation of that pass (``scripts/conv_levers.py`` compiles it).
    """
    params = dict(model.named_parameters())

    def loss(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, state, (x,)), y)

    outer = loss if query_loss is None else query_loss

    def meta_loss() -> torch.Tensor:
        losses = []
        for sx, sy, qx, qy in zip(*batch.tensors()):
            fast = params
            for _ in range(workload.inner_steps):
                grads = torch.autograd.grad(loss(fast, sx, sy), list(fast.values()),
                                            create_graph=not workload.first_order)
                fast = {name: p - workload.inner_lr * g for (name, p), g in zip(fast.items(), grads)}
            losses.append(outer(fast, qx, qy))
        return torch.stack(losses).mean()

    return meta_loss


def _learn2learn_meta_loss(model: nn.Module, batch: Episode, workload: Workload) -> Callable[[], torch.Tensor]:
    """MAML the learn2learn way: ``clone()`` the wrapped model per task and ``adapt()`` it."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=workload.inner_lr, first_order=workload.first_order)

    def meta_loss() -> torch.Tensor:
        losses = []
        for sx, sy, qx, qy in zip(*batch.tensors()):
            learner = maml.clone()
            for _ in range(workload.inner_steps):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            losses.append(F.cross_entropy(learner(qx), qy))
        return torch.stack(losses).mean()

    return meta_loss


def build_meta_loss(method: str, workload: Workload) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """The model whose parameters are meta-learned, and a closure: the meta-loss of ``workload.batch()``.

    Batch norm normalises with the statistics of the batch at hand in every method (MAML's
    convention): the metaopt learners by their ``"batch"`` policy, the others by running the model
    in training mode (which also updates its running statistics, without effect on the result).
    """
    model, batch = workload.model(), workload.batch()
    if method == "plain":
        return model, plain_meta_loss(model, batch, workload)
    if method == "learn2learn":
        return model, _learn2learn_meta_loss(model, batch, workload)
    if method not in _METAOPT:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    rule = sgd(workload.inner_lr)
    learner = MetaLearner(model, HigherRule(rule) if method == "higher" else rule, inner_steps=workload.inner_steps,
                          first_order=workload.first_order, **_METAOPT[method])
    return model, lambda: learner.meta_loss(batch)[0]
