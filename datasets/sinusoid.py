"""Sinusoid regression tasks of the MAML paper (Finn et al. 2017, §5.1).

Each task is y = A · sin(x - φ) with amplitude A ~ U[0.1, 5], phase φ ~ U[0, π] and inputs
x ~ U[-5, 5]; the learner sees K support points and is scored on the query points. The paper
meta-trains an MLP 40-40 (ReLU) with one inner step of lr 0.01, Adam 1e-3 and 25 tasks per
meta-batch (preset ``maml-sinusoid-5shot`` / ``-10shot``).

Example:
    >>> tasks = Sinusoid(shots=5, query=10, batch_size=25, seed=0)
    >>> batch = tasks.batch(0)
    >>> batch.support_x.shape, batch.query_y.shape
    (torch.Size([25, 5, 1]), torch.Size([25, 10, 1]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from metaopt.problems.episode import Episode
from metaopt.problems.sampling import TaskOptions, TaskSampler, split_seed
from metaopt.registry import register_dataset

__all__ = ["Sinusoid", "SinusoidOptions", "build_sinusoid"]


class Sinusoid(TaskSampler):
    """Seeded stream of sinusoid regression tasks.

    Args:
        shots: support points per task (K).
        query: query points per task.
        batch_size, seed, num_batches, start: see :class:`metaopt.problems.sampling.TaskSampler`.
        amplitude, phase, x_range: the uniform ranges of A, φ and x.
    """

    def __init__(self, shots: int = 10, query: int = 10, batch_size: int = 25, seed: int = 0,
                 num_batches: int | None = None, start: int = 0, amplitude: tuple[float, float] = (0.1, 5.0),
                 phase: tuple[float, float] = (0.0, math.pi), x_range: tuple[float, float] = (-5.0, 5.0)) -> None:
        super().__init__(batch_size, seed, num_batches, start)
        if shots < 1 or query < 1:
            raise ValueError(f"shots and query must be >= 1, got shots={shots}, query={query}")
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"{name} range must be (low, high) with low <= high, got {(low, high)}")
        self.shots, self.query = shots, query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def sample_task(self, rng: np.random.Generator) -> Episode:
        amp = rng.uniform(*self.amplitude)
        phase = rng.uniform(*self.phase)
        x = torch.from_numpy(rng.uniform(*self.x_range, size=(self.shots + self.query, 1))).float()
        y = amp * torch.sin(x - phase)
        k = self.shots
        return Episode(x[:k], y[:k], x[k:], y[k:], validate=False)

    def protocol(self) -> dict:
        return {"shots": self.shots, "query": self.query}


@dataclass(frozen=True)
class SinusoidOptions(TaskOptions):
    """Sinusoid regression tasks (MAML's: K support points, 10 query points, 25 tasks per meta-batch).

    Args:
        shots: support points per task (K).
        query: query points per meta-training task.
        eval_query: query points per validation and test task (None: query).
    """

    shots: int = 10
    query: int = 10
    meta_batch: int = 25


@register_dataset("sinusoid", SinusoidOptions)
def build_sinusoid(options: SinusoidOptions, split: str, seed: int) -> Sinusoid:
    """Sinusoid regression (Finn et al. 2017, §5.1); every split draws from the same family, its own seed."""
    return Sinusoid(shots=options.shots, query=options.query_of(split), batch_size=options.meta_batch,
                    seed=split_seed(seed, split))
