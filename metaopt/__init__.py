"""metaopt: optimization-based meta-learning on one functional engine."""

from metaopt.batchnorm import BatchNormPolicy
from metaopt.episode import Episode, EpisodeError
from metaopt.meta_learner import AdaptedModel, MetaLearner
from metaopt.sampling import EpisodeSampler, TaskSampler
from metaopt.trainer import MetaTrainer

__all__ = [
    "AdaptedModel",
    "BatchNormPolicy",
    "Episode",
    "EpisodeError",
    "EpisodeSampler",
    "MetaLearner",
    "MetaTrainer",
    "TaskSampler",
]
