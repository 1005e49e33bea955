"""Optimizees: the training problems a learned optimizer is meta-trained and tested on.

An :class:`Optimizee` is one problem: its starting parameters and a loss ``f(θ, step)`` (the
step picks the minibatch of stochastic problems, so a run is reproducible). As an inner problem
(:class:`metaopt.problems.problem.Problem`) its inner and outer losses are both ``f``: the
learned optimizer descends ``f`` and is scored on ``f`` along its trajectory (Andrychowicz et al.
2016, §2). An :class:`OptimizeeFamily` draws problems from a seed; :class:`OptimizeeStream` is
the problem source the trainer reads, problem ``i`` of a split being ``family.sample(first + i)``.

The splits of a run with seed ``s`` are disjoint seed ranges (the numbering of the reference
code's port, so results stay comparable): training problems ``s · 10⁶ + i`` (``s < 1000``),
validation problems ``10⁹ + i``, test problems ``2 · 10⁹ + i``
(:func:`optimizee_stream`). Baselines tune their learning rates on the validation stream from
index ``10⁶`` on (:data:`TUNING_OFFSET`), apart from the validation problems.

Example:
    >>> import torch
    >>> class Parabola(Optimizee):
    ...     def init_params(self):
    ...         return {"x": torch.ones(3)}
    ...     def loss(self, params, step):
    ...         return params["x"].square().sum()
    >>> class Parabolas:
    ...     def sample(self, seed):
    ...         return Parabola()
    >>> stream = optimizee_stream(Parabolas(), "val", seed=0)
    >>> problem = stream.batch(0)
    >>> problem.inner_loss(problem.init_params(), step=0), stream.first
    (tensor(3.), 1000000000)
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from metaopt.engine.functional import Params
from metaopt.options import ConfigError
from metaopt.problems.problem import Problem

__all__ = ["EPOCH_SEEDS", "TEST_SEED", "TUNING_OFFSET", "VAL_SEED", "Optimizee", "OptimizeeFamily", "OptimizeeStream",
           "optimizee_stream"]

#: Training problems per run seed: problem ``i`` of a run with seed ``s`` is ``family.sample(s · EPOCH_SEEDS + i)``.
EPOCH_SEEDS = 10**6
#: First seed of the validation problems (above every training seed).
VAL_SEED = 10**9
#: First seed of the test problems.
TEST_SEED = 2 * 10**9
#: Index in the validation stream of the first problem that baselines tune their learning rate on.
TUNING_OFFSET = 10**6


class Optimizee(Problem):
    """One training problem of a learned optimizer: ``init_params()`` and the loss ``f(θ, step)``."""

    outer_is_inner: ClassVar[bool] = True

    def init_params(self) -> Params:
        """The starting parameters θ_0 (fresh tensors, the same at every call)."""
        raise NotImplementedError

    def loss(self, params: Params, step: int) -> torch.Tensor:
        """The scalar loss of ``params`` at optimisation step ``step`` (which picks the minibatch)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Optimizee:
        """The problem with its data on ``device`` (problems that move each minibatch return themselves)."""
        del device
        return self

    def inner_loss(self, params: Params, step: int) -> torch.Tensor:
        return self.loss(params, step)

    def outer_loss(self, params: Params, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.loss(params, step), None


@runtime_checkable
class OptimizeeFamily(Protocol):
    """A distribution over problems; ``sample(seed)`` is a pure function of the seed."""

    def sample(self, seed: int) -> Optimizee:
        ...


class OptimizeeStream:
    """Problems ``family.sample(first + i)`` for ``i = 0, 1, ...``: the problem source of one split.

    Args:
        family: the problem family.
        first: seed of problem 0.
        description: figures of the family that results record with their protocol.
    """

    batch_size = 1  # one problem per meta-update
    start = 0

    def __init__(self, family: OptimizeeFamily, first: int, description: dict | None = None) -> None:
        self.family, self.first = family, first
        self.description = dict(description or {})

    def batch(self, index: int) -> Optimizee:
        """Problem ``index`` of the stream."""
        return self.family.sample(self.first + index)

    def protocol(self) -> dict:
        return dict(self.description)


def optimizee_stream(family: OptimizeeFamily, split: str, seed: int, description: dict | None = None,
                     ) -> OptimizeeStream:
    """The stream of ``split`` (``"train"``, ``"val"`` or ``"test"``) of a run with seed ``seed`` (module docs).

    Raises:
        ConfigError: a seed outside ``[0, 1000)`` (its training problems would reach the
            validation seeds).
        ValueError: an unknown split.
    """
    if not 0 <= seed < VAL_SEED // EPOCH_SEEDS:
        raise ConfigError(f"optimizee runs take a seed in [0, {VAL_SEED // EPOCH_SEEDS}) so that training problems "
                         f"stay apart from the validation ones, got {seed}")
    firsts = {"train": seed * EPOCH_SEEDS, "val": VAL_SEED, "test": TEST_SEED}
    if split not in firsts:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(firsts)}")
    return OptimizeeStream(family, firsts[split], description)
