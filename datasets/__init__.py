"""Task sources: few-shot class datasets and regression task families.

Importing this package registers a builder per task family in :mod:`metaopt.registry`, so that
a config names its dataset (``"dataset": "sinusoid"``).
"""

from __future__ import annotations

from metaopt.config import ConfigError, ExperimentConfig
from metaopt.datasets.sinusoid import Sinusoid
from metaopt.registry import register_dataset

__all__ = ["Sinusoid", "build_sinusoid"]


@register_dataset("sinusoid")
def build_sinusoid(config: ExperimentConfig, split: str, seed: int) -> Sinusoid:
    """Sinusoid tasks; every split draws from the same task family, told apart by ``seed``."""
    del split
    if config.ways is not None:
        raise ConfigError(f"sinusoid tasks are regression tasks without classes; leave 'ways' unset "
                          f"(got ways={config.ways})")
    return Sinusoid(shots=config.shots, query=config.query, batch_size=config.meta_batch, seed=seed)
