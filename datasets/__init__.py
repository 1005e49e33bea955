"""Task sources: few-shot class datasets and regression task families."""

from metaopt.datasets.sinusoid import Sinusoid

__all__ = ["Sinusoid"]
