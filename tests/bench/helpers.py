"""What the benchmark tests share: a tiny workload, the methods that run here, and exact meta-gradients."""

from __future__ import annotations

import torch

from metaopt.bench.workloads import METHODS, Workload, build_meta_loss, learn2learn_unavailable

TINY = Workload(tasks=2, query=1, hidden=4)
AVAILABLE = [m for m in METHODS if m != "learn2learn" or learn2learn_unavailable() is None]


def meta_gradients(method: str, workload: Workload) -> list[torch.Tensor]:
    model, meta_loss = build_meta_loss(method, workload)
    return list(torch.autograd.grad(meta_loss(), list(model.parameters())))
