"""The non-meta-learned baseline of the MAML paper: pretrain one network on all tasks, then fine-tune.

Finn et al. (2017, §5.1, Figure 2) compare MAML with "pretrained": a network trained by plain
regression on the pooled data of many tasks, then fine-tuned by gradient descent on the K
support points of a new task. Fine-tuning is exactly MAML's inner loop started from the
pretrained weights, so it is evaluated with the same engine (see ``scripts/sinusoid_figure2.py``).

Example:
    >>> import torch
    >>> from metaopt.datasets import Sinusoid
    >>> from metaopt.models import MLP
    >>> model = MLP(1, 1, hidden=(8,))
    >>> losses = pretrain(model, Sinusoid(shots=5, batch_size=4), iterations=3)
    >>> len(losses)
    3
"""

from __future__ import annotations

import torch
from torch import nn

from metaopt.problems.episode_task import default_loss
from metaopt.problems.sampling import TaskSampler

__all__ = ["pretrain"]


def pretrain(model: nn.Module, tasks: TaskSampler, iterations: int, lr: float = 1e-3) -> list[float]:
    """Train ``model`` with Adam on the pooled support and query data of ``tasks``' batches.

    Batch ``i`` of the sampler is used at iteration ``i``, so the baseline sees exactly the
    tasks a meta-learner trained on the same sampler sees.

    Returns:
        The training loss of every iteration.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    device = next(model.parameters()).device
    losses = []
    for index in range(tasks.start, tasks.start + iterations):
        batch = tasks.batch(index).to(device)
        x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        y = torch.cat([batch.support_y.flatten(0, 1), batch.query_y.flatten(0, 1)])
        loss = default_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
