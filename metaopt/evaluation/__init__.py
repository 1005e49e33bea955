"""Evaluation: scores on held-out problems with intervals, learned optimizers against tuned baselines, comparison."""

from metaopt.evaluation.evaluate import EvalResult, confidence_interval, evaluate

__all__ = [
    "EvalResult",
    "confidence_interval",
    "evaluate",
]
