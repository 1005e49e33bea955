"""metaopt: optimization-based meta-learning on one functional engine.

Initial parameters + update rule + inner/outer loss, turned into a meta-gradient by an
estimator and run by one trainer, for few-shot learners and learned optimizers alike.
"""

from metaopt.engine.batchnorm import BatchNormPolicy, batchnorm_policy
from metaopt.engine.learner import Learner
from metaopt.engine.meta_learner import AdaptedModel, MetaLearner
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.options import ConfigError
from metaopt.problems.episode import Episode, EpisodeError
from metaopt.problems.sampling import EpisodeSampler, TaskSampler
from metaopt.training.config import RunConfig, TrainerConfig, load_preset
from metaopt.training.experiment import load_run, load_weights
from metaopt.training.trainer import Interrupted, MetaTrainer

__all__ = [
    "AdaptedModel",
    "BatchNormPolicy",
    "ConfigError",
    "Episode",
    "EpisodeError",
    "EpisodeSampler",
    "Interrupted",
    "Learner",
    "MetaLearner",
    "MetaTrainer",
    "OptimizerLearner",
    "RunConfig",
    "TaskSampler",
    "TrainerConfig",
    "batchnorm_policy",
    "load_preset",
    "load_run",
    "load_weights",
]
