"""Meta-learning algorithms, one file each, built on the :mod:`metaopt` engine."""

from metaopt.algorithms.maml import MAML

__all__ = ["MAML"]
