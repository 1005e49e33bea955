"""Evaluation on held-out problems: mean and 95% confidence interval, with the protocol that produced it.

Every reported figure carries its protocol: what the problems are (ways, shots, query size for
few-shot tasks; the functions of an optimizee family), the inner steps, the number of problems and
the learner's settings (the batch-norm policy of few-shot learners), following the MAML
evaluation (cbfinn/maml ``main.py``: 600 tasks, interval 1.96 · std / sqrt(n)). The problems are
the first ``episodes`` of the source's seeded stream, so two calls see the same problems.

Example:
    >>> from metaopt.algorithms import MAML
    >>> from metaopt.datasets import Sinusoid
    >>> from metaopt.models import MLP
    >>> result = evaluate(MAML(MLP(1, 1), inner_lr=0.01), Sinusoid(shots=5, batch_size=10, seed=1), episodes=20)
    >>> result.metric, result.episodes, result.protocol["shots"]
    ('mse', 20, 5)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from metaopt.engine.learner import Learner

__all__ = ["EvalResult", "confidence_interval", "evaluate"]


def confidence_interval(values: torch.Tensor) -> float:
    """Half-width of the normal 95% interval of the mean: 1.96 · std / sqrt(n)."""
    n = values.numel()
    return 1.96 * values.double().std(unbiased=n > 1).item() / math.sqrt(n) if n > 1 else float("nan")


@dataclass(frozen=True)
class EvalResult:
    """Mean ± 95% interval of a metric over ``episodes`` problems, and the protocol that produced it."""

    metric: str
    mean: float
    ci95: float
    episodes: int
    protocol: dict = field(default_factory=dict)

    def __str__(self) -> str:
        scale, unit = (100.0, "%") if self.metric == "accuracy" else (1.0, "")
        details = ", ".join(f"{k}={v}" for k, v in self.protocol.items())
        return f"{self.metric} {self.mean * scale:.2f}{unit} ± {self.ci95 * scale:.2f}{unit} (95% CI; {details})"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(learner: Learner, problems: Any, episodes: int = 600, steps: int | None = None,
             device: torch.device | str | None = None, progress: str | None = None) -> EvalResult:
    """Adapt (or optimize) on ``episodes`` problems of ``problems`` and score each (:meth:`Learner.evaluate`).

    Few-shot classification reports query accuracy, regression the query mean squared error, a
    learned optimizer the mean loss of its run. ``progress`` names a bar shown on a terminal.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    steps = learner.eval_steps if steps is None else steps
    device = device or learner.device
    values: list[torch.Tensor] = []
    metric = None
    index = problems.start
    with tqdm(total=episodes, desc=progress, unit="problem", leave=False, disable=None if progress else True) as bar:
        while sum(v.numel() for v in values) < episodes:
            scored = learner.evaluate(problems.batch(index).to(device), steps)
            metric = scored.metric
            values.append(scored.values.cpu())
            bar.update(min(scored.values.numel(), episodes - bar.n))
            index += 1
    per_problem = torch.cat(values)[:episodes]
    protocol = {**problems.protocol(), "inner_steps": steps, "episodes": episodes, **learner.protocol()}
    return EvalResult(metric, per_problem.mean().item(), confidence_interval(per_problem), episodes, protocol)
