"""The unroll options of a learned optimizer and the meta-gradient estimator they choose.

Every learned-optimizer algorithm (``l2l``, ``mlp-lopt``) is trained on runs of ``horizon``
optimizee steps, one truncation of ``truncation`` steps per meta-update, with one of three
estimators: truncated backpropagation (Andrychowicz et al. 2016), antithetic truncated ES or
PES (Metz et al. 2020; Vicol et al. 2021). Its options inherit :class:`UnrollOptions`, and its
builder returns :func:`estimator_of` its options. An option the chosen estimator does not read
is an error: ``sigma`` and ``pairs`` belong to ES and PES, ``second_derivatives`` to
backpropagation. All three read the run layout and loss guard of :mod:`metaopt.estimators.runs`
(google/learned_optimization's; reference §1.3, §5.2): ``min_horizon`` draws each training run's
length log-uniformly in [min_horizon, horizon], ``random_offset`` starts each task's first run
partway so that tasks do not reset in lock-step, and ``max_loss`` clips the per-step inner losses
the meta-loss uses. The defaults keep every run at ``horizon`` steps from step 0, unclipped.
Evaluation always runs ``horizon`` steps. ``vmap_particles`` (ES and PES) batches each task's
perturbed particles in one :func:`torch.func.vmap` call instead of a loop (:mod:`metaopt.estimators.es`):
the same estimate to rounding error, for rules and problems that can run under ``vmap``.

Example:
    >>> estimator_of(UnrollOptions(estimator="pes", sigma=0.01, pairs=4, truncation=10)).settings()
    {'sigma': 0.01, 'pairs': 4, 'truncation': 10, 'tasks': 1, 'seed': 0}
    >>> UnrollOptions(estimator="es", second_derivatives=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    metaopt.options.ConfigError: option 'second_derivatives' ... estimator='es' ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from metaopt.estimators.base import Estimator
from metaopt.estimators.es import TruncatedES
from metaopt.estimators.pes import PES
from metaopt.estimators.truncated import TruncatedBackprop
from metaopt.options import ConfigError, Options

__all__ = ["ESTIMATORS", "UnrollOptions", "estimator_of"]

#: The estimators a learned optimizer can be trained with, by option value.
ESTIMATORS = ("backprop", "es", "pes")
#: The options only ES and PES read (an error with estimator='backprop' unless at their defaults).
_ANTITHETIC = ("sigma", "pairs", "vmap_particles")


@dataclass(frozen=True)
class UnrollOptions(Options):
    """How a learned optimizer is unrolled and which estimator turns the unroll into a meta-gradient.

    Args:
        horizon: optimizee steps of a run, in training and evaluation.
        truncation: optimizee steps per meta-update.
        estimator: "backprop" (truncated backpropagation), "es" (antithetic truncated ES) or
            "pes" (persistent ES).
        second_derivatives: backpropagate through the optimizee's gradients (backprop only).
        sigma: standard deviation of the ES / PES perturbation (None: 0.01, the reference's).
        pairs: antithetic pairs per meta-update, ES / PES only (None: 8).
        tasks: runs unrolled side by side, each its own problem, their estimates averaged (None: 1; the
            reference's PES example: 16); on several processes the ranks share them (backprop) or their
            particles (ES / PES).
        min_horizon: draw each training run's length log-uniformly in [min_horizon, horizon], a new
            length per run (None: every run lasts the horizon; the reference: [100, 10000], small
            scale [50, 500]); must not be below the truncation.
        random_offset: start each task's first training run at a uniform step of its length (the
            rule sees the step counter from there), so that tasks do not reset in lock-step (the
            reference's random initial iteration offset).
        max_loss: clip every per-step inner loss the meta-loss uses to this value, NaN and inf
            included, and count the clipped steps (None: no clip; the reference's notebook clips
            at 3.0).
        vmap_particles: run each task's perturbed particles in one torch.func.vmap call instead of a loop, ES /
            PES only (the same estimate to rounding error; rules and problems with Python control flow on tensor
            values or .item() calls cannot run so, and say so).
    """

    positive = ("horizon", "truncation", "sigma", "pairs", "tasks", "min_horizon")
    choices = {"estimator": ESTIMATORS}
    horizon: int = 100
    truncation: int = 20
    estimator: str = "backprop"
    second_derivatives: bool = False
    sigma: float | None = None
    pairs: int | None = None
    tasks: int | None = None
    min_horizon: int | None = None
    random_offset: bool = False
    max_loss: float | None = None
    vmap_particles: bool = False

    def check(self) -> None:
        super().check()
        if self.truncation > self.horizon:
            raise ConfigError(f"option 'truncation' ({self.truncation}) must not exceed the horizon ({self.horizon})")
        if self.min_horizon is not None:
            if self.min_horizon > self.horizon:
                raise ConfigError(f"option 'min_horizon' ({self.min_horizon}) must not exceed the horizon "
                                  f"({self.horizon}): run lengths are drawn in [min_horizon, horizon]; lower "
                                  "min_horizon or raise horizon")
            if self.truncation > self.min_horizon:
                raise ConfigError(f"option 'truncation' ({self.truncation}) must not exceed min_horizon "
                                  f"({self.min_horizon}), the shortest drawn run: lower truncation or raise "
                                  "min_horizon")
        if self.max_loss is not None and not math.isfinite(self.max_loss):
            raise ConfigError(f"option 'max_loss' must be a finite number (None: no clip), got {self.max_loss}")
        if self.estimator == "backprop":
            unread = [f.name for f in fields(self) if f.name in _ANTITHETIC and getattr(self, f.name) != f.default]
            if unread:
                raise ConfigError(f"option {unread[0]!r} belongs to the ES and PES estimators; it does nothing with "
                                  "estimator='backprop': drop it, or pass estimator='es' or 'pes'")
        elif self.second_derivatives:
            raise ConfigError(f"option 'second_derivatives' is of backpropagation; estimator={self.estimator!r} "
                              "reads losses only: drop it, or pass estimator='backprop'")


def estimator_of(options: UnrollOptions) -> Estimator:
    """The estimator ``options`` choose, with their truncation and run layout (ES / PES: σ, pairs, tasks, vmap)."""
    runs = {"min_horizon": options.min_horizon, "random_offset": options.random_offset,
            "max_loss": options.max_loss}
    if options.estimator == "backprop":
        return TruncatedBackprop(options.truncation, tasks=1 if options.tasks is None else options.tasks, **runs)
    family = TruncatedES if options.estimator == "es" else PES
    return family(sigma=0.01 if options.sigma is None else options.sigma,
                  pairs=8 if options.pairs is None else options.pairs, truncation=options.truncation,
                  tasks=1 if options.tasks is None else options.tasks, vmap=options.vmap_particles, **runs)
