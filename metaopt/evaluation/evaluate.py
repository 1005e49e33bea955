"""Meta-test evaluation: mean and 95% confidence interval over held-out tasks, with the protocol.

Every reported figure carries its protocol (ways, shots, query size, inner steps, number of
tasks, batch-norm policy), following the MAML evaluation (cbfinn/maml ``main.py``: 600 tasks,
interval 1.96 · std / sqrt(n)).

Example:
    >>> import torch
    >>> from metaopt.algorithms import MAML
    >>> from metaopt.datasets import Sinusoid
    >>> from metaopt.models import MLP
    >>> result = evaluate(MAML(MLP(1, 1), inner_lr=0.01), Sinusoid(shots=5, batch_size=10, seed=1), episodes=20)
    >>> result.metric, result.episodes
    ('mse', 20)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from metaopt.meta_learner import MetaLearner
from metaopt.sampling import TaskSampler

__all__ = ["EvalResult", "confidence_interval", "evaluate", "protocol_of"]


def confidence_interval(values: torch.Tensor) -> float:
    """Half-width of the normal 95% interval of the mean: 1.96 · std / sqrt(n)."""
    n = values.numel()
    return 1.96 * values.double().std(unbiased=n > 1).item() / math.sqrt(n) if n > 1 else float("nan")


@dataclass(frozen=True)
class EvalResult:
    """Mean ± 95% interval of a metric over ``episodes`` tasks, and the protocol that produced it."""

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


def protocol_of(learner: MetaLearner, sampler: TaskSampler, episodes: int, steps: int) -> dict:
    """The evaluation protocol as a dict: ways, shots, query, inner steps, tasks, batch-norm policy."""
    protocol = {name: getattr(sampler, name) for name in ("ways", "shots", "query") if hasattr(sampler, name)}
    return {**protocol, "inner_steps": steps, "episodes": episodes, "bn_policy": learner.bn_policy.value}


@torch.no_grad()
def evaluate(learner: MetaLearner, sampler: TaskSampler, episodes: int = 600, steps: int | None = None,
             device: torch.device | str | None = None) -> EvalResult:
    """Adapt to ``episodes`` tasks of ``sampler`` and score each on its query set.

    Classification reports query accuracy, regression the query mean squared error. The tasks
    are the first ``episodes`` of the sampler's seeded stream, so two calls see the same tasks.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    steps = learner.eval_inner_steps if steps is None else steps
    device = device or next(learner.parameters()).device
    values: list[torch.Tensor] = []
    classification = None
    index = sampler.start
    while sum(v.numel() for v in values) < episodes:
        outputs = learner.evaluate(sampler.batch(index).to(device), steps)
        classification = outputs.accuracy is not None
        values.append((outputs.accuracy if classification else outputs.losses).cpu())
        index += 1
    per_task = torch.cat(values)[:episodes]
    return EvalResult("accuracy" if classification else "mse", per_task.mean().item(), confidence_interval(per_task),
                      episodes, protocol_of(learner, sampler, episodes, steps))
