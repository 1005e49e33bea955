"""How the truncated estimators lay out and guard their inner runs: sampled lengths, random offsets, a loss clip.

Truncated backpropagation, truncated ES and PES (:mod:`metaopt.estimators.truncated`,
:mod:`~metaopt.estimators.es`, :mod:`~metaopt.estimators.pes`) unroll each task's optimizee run a
truncation per call, and start the next problem of the stream when the run ends. By default every
run lasts the learner's ``horizon`` steps from step 0, so all tasks reset together. After
google/learned_optimization (``truncation_schedule.LogUniformLengthSchedule`` and
``VectorizedLOptTruncatedStep(random_initial_iteration_offset=...)``; reference §1.3, §5.2),
:class:`InnerRuns` can instead

- **sample each run's length** log-uniformly (``min_horizon``): ``length = ⌊exp(u)⌋`` with
  u ~ U(log min_horizon, log(horizon + 1)), kept in [min_horizon, horizon] (every integer of the range
  can occur; the reference floors a draw in [log min, log max), so never its maximum). Short runs are
  the more frequent, and the median length is about √(min_horizon · horizon);
- **offset each task's first run** (``random_offset``): the first run of a task starts at step
  o ~ U{0, ..., length − 1} instead of 0 and still ends at ``length``, so it lasts length − o steps,
  uniform in [1, length]. As in the reference the step counter the rule and the problem see starts at
  the offset (a learned optimizer's time features read step o, and a minibatch problem serves batch
  o first), from fresh parameters θ₀ and a fresh rule state. The tasks' resets then fall at different
  calls instead of in lock-step;
- **clip the inner loss** (``max_loss``): every per-step loss the estimate uses becomes
  ``nan_to_num(f, nan=max_loss, posinf=max_loss).clamp(max=max_loss)``, so a diverging inner run
  cannot poison the meta-loss (the reference's no-dependency notebook clips at 3.0; its
  ``gradient_learner`` replaces a NaN meta-loss by 20.0). ``-inf`` becomes the lowest finite value,
  as :func:`torch.nan_to_num` does. The estimators count the clipped steps (at or above the maximum,
  or NaN: those without gradient) in their ``clipped_losses`` metric.

The draws are counter-based: run ``k`` of task ``t`` under estimator seed ``s`` draws from the key
``(s, t, k)`` on its own stream (:func:`metaopt.estimators.perturbations.key_seed`), so a resumed
estimator (its per-task run counts are part of its state) draws the same lengths, and each run stores
its drawn length in its carried state anyway. With the defaults nothing is drawn and every run is
``(0, horizon)``.

Example:
    >>> import torch
    >>> runs = InnerRuns(min_horizon=50, random_offset=True)
    >>> step, length = runs.begin(horizon=500, seed=0, task=1, run=0)   # a task's first run: offset
    >>> 0 <= step < length and 50 <= length <= 500, runs.begin(500, 0, 1, 0) == (step, length)
    (True, True)
    >>> runs.begin(500, 0, 1, 1)[0]                                      # later runs start at step 0
    0
    >>> InnerRuns().begin(horizon=100, seed=0, task=0, run=7)
    (0, 100)
    >>> clipped, mask = InnerRuns(max_loss=3.0).clip(torch.tensor([1.0, 5.0, float("nan")]))
    >>> clipped.tolist(), mask.tolist()
    ([1.0, 3.0, 3.0], [False, True, True])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from metaopt.estimators.perturbations import key_seed

__all__ = ["RUN_STREAM", "InnerRuns"]

#: The :func:`~metaopt.estimators.perturbations.key_seed` stream of the run draws (the perturbations use ``()``).
RUN_STREAM = (1,)


@dataclass(frozen=True)
class InnerRuns:
    """The layout and loss guard of a truncated estimator's inner runs (see the module docs).

    Args:
        min_horizon: draw each run's length log-uniformly in [min_horizon, horizon] (None: the horizon).
        random_offset: start each task's first run at a uniform step of its length, not at 0.
        max_loss: clip the per-step losses the estimate uses to this value, NaN and +inf included (None: no clip).

    Raises:
        ValueError: ``min_horizon`` below 1, or a ``max_loss`` that is not a finite number.
    """

    min_horizon: int | None = None
    random_offset: bool = False
    max_loss: float | None = None

    def __post_init__(self) -> None:
        if self.min_horizon is not None and self.min_horizon < 1:
            raise ValueError(f"min_horizon must be >= 1 (None: every run lasts the horizon), got {self.min_horizon}")
        if self.max_loss is not None and not math.isfinite(self.max_loss):
            raise ValueError(f"max_loss must be a finite number (None: no clip), got {self.max_loss}")

    @property
    def sampled(self) -> bool:
        """Whether runs draw anything (a length or an offset), and so read the estimator's seed."""
        return self.min_horizon is not None or self.random_offset

    def begin(self, horizon: int, seed: int, task: int, run: int) -> tuple[int, int]:
        """``(step, length)`` of run ``run`` (0 for the first) of task ``task``: it covers steps ``step..length``.

        The run starts at step counter ``step`` and ends when the counter reaches ``length``.

        Raises:
            ValueError: ``min_horizon`` above ``horizon`` (the learner's).
        """
        if not self.sampled:
            return 0, horizon
        if self.min_horizon is not None and self.min_horizon > horizon:
            raise ValueError(f"min_horizon ({self.min_horizon}) exceeds the learner's horizon ({horizon}), the "
                             "longest run: lower min_horizon or raise the horizon")
        generator = torch.Generator().manual_seed(key_seed((seed, task, run), RUN_STREAM))
        u_length, u_offset = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        length = horizon
        if self.min_horizon is not None:
            low, high = math.log(self.min_horizon), math.log(horizon + 1)
            length = min(horizon, max(self.min_horizon, math.floor(math.exp(low + u_length * (high - low)))))
        step = min(length - 1, math.floor(u_offset * length)) if self.random_offset and run == 0 else 0
        return step, length

    def clip(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``losses`` clipped to ``max_loss`` (NaN and +inf to it too), and where they were clipped (bool).

        The clip is :func:`torch.clamp`'s, whose gradient is zero from the maximum on, so the marked
        steps are those at or above ``max_loss`` and NaN (the steps without gradient); without
        ``max_loss`` the losses come back as they are and nothing is marked.
        """
        if self.max_loss is None:
            return losses, torch.zeros(losses.shape, dtype=torch.bool, device=losses.device)
        clipped = ~(losses < self.max_loss)  # NaN compares False
        return torch.nan_to_num(losses, nan=self.max_loss, posinf=self.max_loss).clamp(max=self.max_loss), clipped

    def metrics(self, clipped: int) -> dict[str, float]:
        """``{"clipped_losses": clipped}`` when losses are clipped at all, else nothing (the default metrics)."""
        return {} if self.max_loss is None else {"clipped_losses": float(clipped)}

    def settings(self) -> dict[str, Any]:
        """The options that differ from the defaults, for :meth:`Estimator.settings` (old runs' settings stay)."""
        return {name: value for name, value, default in (("min_horizon", self.min_horizon, None),
                                                         ("random_offset", self.random_offset, False),
                                                         ("max_loss", self.max_loss, None)) if value != default}
