"""Meta-learning algorithms, one file each, built on the :mod:`metaopt` engine.

Each module registers its algorithm in :mod:`metaopt.registry` with the options it takes
(:func:`metaopt.registry.load_plugins` imports every module here), so that a config names its
algorithm (``"algorithm": {"name": "maml", ...}``). A new algorithm is a new file; the names
below are re-exported for ``from metaopt.algorithms import MAML``.
"""

from __future__ import annotations

from metaopt.algorithms.arml import ARML
from metaopt.algorithms.lstm_optimizer import LearnedOptimizer, LSTMOptimizerRule
from metaopt.algorithms.maml import MAML
from metaopt.algorithms.mamlpp import MAMLPlusPlus
from metaopt.algorithms.metalstm import MetaLSTM
from metaopt.algorithms.metasgd import MetaSGD
from metaopt.algorithms.mlp_lopt import MLPLOptimizer, MLPLOptRule
from metaopt.algorithms.mtnet import MTNet

__all__ = [
    "ARML",
    "MAML",
    "LSTMOptimizerRule",
    "LearnedOptimizer",
    "MAMLPlusPlus",
    "MLPLOptRule",
    "MLPLOptimizer",
    "MTNet",
    "MetaLSTM",
    "MetaSGD",
]
