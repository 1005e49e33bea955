"""Meta-gradient estimators behind one interface (:class:`Estimator`), one file each (policy gradients too)."""

from metaopt.estimators.backprop import Backprop
from metaopt.estimators.base import Estimate, Estimator
from metaopt.estimators.es import TruncatedES
from metaopt.estimators.perturbations import perturbation
from metaopt.estimators.pes import PES
from metaopt.estimators.policy_gradient import PPO
from metaopt.estimators.runs import InnerRuns
from metaopt.estimators.truncated import TruncatedBackprop

__all__ = [
    "Backprop",
    "Estimate",
    "Estimator",
    "InnerRuns",
    "PES",
    "PPO",
    "TruncatedBackprop",
    "TruncatedES",
    "perturbation",
]
