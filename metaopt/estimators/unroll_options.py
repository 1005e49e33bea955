"""The unroll options of a learned optimizer and the meta-gradient estimator they choose.

Every learned-optimizer algorithm (``l2l``, ``mlp-lopt``) is trained on runs of ``horizon``
optimizee steps, one truncation of ``truncation`` steps per meta-update, with one of three
estimators: truncated backpropagation (Andrychowicz et al. 2016), antithetic truncated ES or
PES (Metz et al. 2020; Vicol et al. 2021). Its options inherit :class:`UnrollOptions`, and its
builder returns :func:`estimator_of` its options. An option the chosen estimator does not read
is an error: ``sigma`` and ``pairs`` belong to ES and PES, ``second_derivatives`` to
backpropagation.

Example:
    >>> estimator_of(UnrollOptions(estimator="pes", sigma=0.01, pairs=4, truncation=10)).settings()
    {'sigma': 0.01, 'pairs': 4, 'truncation': 10, 'tasks': 1, 'seed': 0}
    >>> UnrollOptions(estimator="es", second_derivatives=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    metaopt.options.ConfigError: option 'second_derivatives' ... estimator='es' ...
"""

from __future__ import annotations

from dataclasses import dataclass

from metaopt.estimators.base import Estimator
from metaopt.estimators.es import TruncatedES
from metaopt.estimators.pes import PES
from metaopt.estimators.truncated import TruncatedBackprop
from metaopt.options import ConfigError, Options

__all__ = ["ESTIMATORS", "UnrollOptions", "estimator_of"]

#: The estimators a learned optimizer can be trained with, by option value.
ESTIMATORS = ("backprop", "es", "pes")


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
    """

    positive = ("horizon", "truncation", "sigma", "pairs")
    choices = {"estimator": ESTIMATORS}
    horizon: int = 100
    truncation: int = 20
    estimator: str = "backprop"
    second_derivatives: bool = False
    sigma: float | None = None
    pairs: int | None = None

    def check(self) -> None:
        super().check()
        if self.truncation > self.horizon:
            raise ConfigError(f"option 'truncation' ({self.truncation}) must not exceed the horizon ({self.horizon})")
        if self.estimator == "backprop":
            unread = [name for name in ("sigma", "pairs") if getattr(self, name) is not None]
            if unread:
                raise ConfigError(f"option {unread[0]!r} belongs to the ES and PES estimators; it does nothing with "
                                  "estimator='backprop': drop it, or pass estimator='es' or 'pes'")
        elif self.second_derivatives:
            raise ConfigError(f"option 'second_derivatives' is of backpropagation; estimator={self.estimator!r} "
                              "reads losses only: drop it, or pass estimator='backprop'")


def estimator_of(options: UnrollOptions) -> Estimator:
    """The estimator ``options`` choose, with their truncation (and σ and pairs for ES / PES)."""
    if options.estimator == "backprop":
        return TruncatedBackprop(options.truncation)
    family = TruncatedES if options.estimator == "es" else PES
    return family(sigma=0.01 if options.sigma is None else options.sigma,
                  pairs=8 if options.pairs is None else options.pairs, truncation=options.truncation)
