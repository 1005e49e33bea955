"""Tiny, seeded fixtures shared by the tests: models, task batches, gradient comparisons."""

from __future__ import annotations

import torch
from torch import nn

from metaopt.engine.learner import Learner
from metaopt.evaluation import EvalResult
from metaopt.problems.episode import Episode

__all__ = [
    "assert_close_dicts",
    "sinusoid_mse_before_and_after",
    "assert_episodes_equal",
    "class_dataset",
    "decode",
    "meta_grads",
    "tiny_convnet",
    "tiny_mlp",
    "toy_classification_batch",
    "toy_regression_batch",
]

IMAGE = 8  # side of the toy images: two 2x2 poolings leave 2x2


def tiny_convnet(ways: int = 3, channels: int = 3, seed: int = 0) -> nn.Sequential:
    """A Conv4-like network in float64: two [conv, batch norm, ReLU, max-pool] blocks and a head."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                            nn.ReLU(), nn.MaxPool2d(2)) for i in range(2)]
    model = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * (IMAGE // 4) ** 2, ways)).double()
    with torch.no_grad():  # non-trivial affine batch-norm parameters, so their gradients are tested too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def tiny_mlp(hidden: int = 8, seed: int = 0) -> nn.Sequential:
    """A 1-hidden-8-1 tanh MLP in float64 (smooth, for finite differences)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()


def toy_classification_batch(tasks: int = 3, ways: int = 3, shots: int = 2, query: int = 2, seed: int = 0,
                             dtype: torch.dtype = torch.float64) -> Episode:
    """A batch of random image tasks (``[T, ways * shots, 1, 8, 8]``), labels class by class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(torch.randn(tasks, ways * shots, 1, IMAGE, IMAGE, generator=g, dtype=dtype),
                   labels.repeat_interleave(shots).repeat(tasks, 1),
                   torch.randn(tasks, ways * query, 1, IMAGE, IMAGE, generator=g, dtype=dtype),
                   labels.repeat_interleave(query).repeat(tasks, 1), batched=True)


def toy_regression_batch(tasks: int = 3, shots: int = 5, query: int = 6, seed: int = 0) -> Episode:
    """A batch of float64 sine regression tasks ``y = a sin(x + b)`` on ``[T, N, 1]`` inputs."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(2, tasks, 1, 1, generator=g, dtype=torch.float64) * 2 + 0.5
    sx, qx = (torch.rand(tasks, n, 1, generator=g, dtype=torch.float64) * 6 - 3 for n in (shots, query))
    return Episode(sx, a * torch.sin(sx + b), qx, a * torch.sin(qx + b), batched=True)


def class_dataset(num_classes: int = 10, per_class: int = 20) -> dict[int, torch.Tensor]:
    """Class ``c`` holds ``per_class`` examples of shape ``[1, 2]``; example ``i`` is ``[c, i]`` (:func:`decode`)."""
    return {c: torch.stack([torch.full((per_class,), float(c)), torch.arange(per_class, dtype=torch.float32)], 1)
            .unsqueeze(1) for c in range(num_classes)}


def decode(x: torch.Tensor) -> list[tuple[int, int]]:
    """The ``(class, index)`` identities of examples drawn from :func:`class_dataset`."""
    return [(int(c), int(i)) for c, i in x.reshape(-1, 2).tolist()]


def meta_grads(learner: Learner, batch: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The meta-loss of ``batch`` and its gradient with respect to every meta-parameter, by name."""
    loss, _ = learner.meta_loss(batch)
    names, params = zip(*learner.named_parameters())
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, params)))


def assert_close_dicts(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], **tolerances: float) -> None:
    """Same keys and, key by key, tensors close within ``torch.testing.assert_close`` tolerances."""
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, name=name: f"{name}: {m}",
                                   **tolerances)


def assert_episodes_equal(a: Episode, b: Episode) -> None:
    """Equal tensors, ``ways`` and ``batched`` flag."""
    assert (a.ways, a.batched) == (b.ways, b.batched)
    for x, y in zip(a.tensors(), b.tensors()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def sinusoid_mse_before_and_after(learner: Learner, iterations: int) -> tuple[EvalResult, EvalResult]:
    """Post-adaptation MSE on 200 held-out K=10 sinusoid tasks, untrained and after ``iterations`` meta-updates.

    MAML's sinusoid setting (Finn et al. 2017, §5.1): 25 tasks per meta-batch, Adam 1e-3.
    """
    from metaopt.datasets import Sinusoid
    from metaopt.evaluation import evaluate

    test = Sinusoid(shots=10, query=10, batch_size=100, seed=123)
    before = evaluate(learner, test, episodes=200)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for batch in Sinusoid(shots=10, query=10, batch_size=25, seed=0, num_batches=iterations):
        loss, _ = learner.meta_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, evaluate(learner, test, episodes=200)
