"""Random quadratics of Andrychowicz et al. 2016 (§3.1), an optimizee family for learned optimizers.

``f(θ) = ||W θ - y||²`` with 10×10 ``W`` and 10-d ``y``, in one of two conventions that give
losses orders of magnitude apart, so results must name theirs:

* ``"gaussian"`` (the paper's): ``W``, ``y`` and ``θ_0`` drawn from N(0, 1);
* ``"uniform"`` (google-deepmind/learning-to-learn ``problems.py``): ``W``, ``y`` from U[0, 1],
  ``θ_0`` from N(0, 0.01²).

A problem is a batch of ``batch`` independent functions (128 in the reference code) whose
parameters are separate coordinates; its loss is their *sum*, so that every coordinate sees the
gradient of its own function, whatever the batch: a batch of B functions optimized coordinate-wise
(SGD, Adam, the LSTM) is exactly B independent runs, and learning rates tuned on batches hold for
single functions. Test problems hold one function each (``test_batch``), so that results are
per function.

Example:
    >>> family = Quadratics(dim=10, batch=4, convention="gaussian")
    >>> problem = family.sample(seed=0)
    >>> theta = problem.init_params()
    >>> tuple(theta["theta"].shape), problem.loss(theta, step=0).shape
    ((4, 10), torch.Size([]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from metaopt.options import Options
from metaopt.problems.optimizees import Optimizee, OptimizeeStream, optimizee_stream
from metaopt.registry import register_dataset

__all__ = ["CONVENTIONS", "Quadratic", "Quadratics", "QuadraticsOptions", "build_quadratics"]

CONVENTIONS = ("gaussian", "uniform")


class Quadratic(Optimizee):
    """A batch of quadratics ``f_b(θ_b) = ||W_b θ_b - y_b||²``; the loss is their sum over ``b``."""

    def __init__(self, w: torch.Tensor, y: torch.Tensor, theta0: torch.Tensor) -> None:
        self.w, self.y, self.theta0 = w, y, theta0

    def init_params(self) -> dict[str, torch.Tensor]:
        return {"theta": self.theta0.clone()}

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        del step
        return self.losses(params).sum()

    def losses(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of every function of the batch, ``[batch]``."""
        residual = torch.einsum("bij,bj->bi", self.w, params["theta"]) - self.y
        return residual.square().sum(-1)

    def to(self, device: torch.device | str) -> Quadratic:
        return Quadratic(self.w.to(device), self.y.to(device), self.theta0.to(device))


class Quadratics:
    """Random quadratics of Andrychowicz et al. 2016 (§3.1) in a named convention.

    Args:
        dim: dimension of θ and y (10 in the paper).
        batch: functions per problem.
        convention: ``"gaussian"`` (paper) or ``"uniform"`` (reference code), see the module docs.
        dtype: floating type of the problems.
    """

    def __init__(self, dim: int = 10, batch: int = 128, convention: str = "gaussian",
                 dtype: torch.dtype = torch.float32) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown quadratic convention {convention!r}; choose one of {CONVENTIONS}")
        if dim < 1 or batch < 1:
            raise ValueError(f"dim and batch must be >= 1, got dim={dim}, batch={batch}")
        self.dim, self.batch, self.convention, self.dtype = dim, batch, convention, dtype

    def sample(self, seed: int) -> Quadratic:
        g = torch.Generator().manual_seed(seed)
        shape_w, shape_y = (self.batch, self.dim, self.dim), (self.batch, self.dim)
        if self.convention == "gaussian":
            w, y = torch.randn(shape_w, generator=g), torch.randn(shape_y, generator=g)
            theta0 = torch.randn(shape_y, generator=g)
        else:
            w, y = torch.rand(shape_w, generator=g), torch.rand(shape_y, generator=g)
            theta0 = 0.01 * torch.randn(shape_y, generator=g)
        return Quadratic(w.to(self.dtype), y.to(self.dtype), theta0.to(self.dtype))


@dataclass(frozen=True)
class QuadraticsOptions(Options):
    """The quadratic family of a run.

    Args:
        dim: dimension of θ and y (the paper: 10).
        batch: functions per training and validation problem (the reference code: 128).
        test_batch: functions per test problem (1: results are per function).
        convention: "gaussian" (the paper's N(0, 1) draws) or "uniform" (the reference code's).
    """

    positive = ("dim", "batch", "test_batch")
    dim: int = 10
    batch: int = 128
    test_batch: int = 1
    convention: Literal["gaussian", "uniform"] = "gaussian"


@register_dataset("quadratics", QuadraticsOptions, problems="optimizees")
def build_quadratics(options: QuadraticsOptions, split: str, seed: int) -> OptimizeeStream:
    """Random 10-d quadratics ||Wθ - y||² (Andrychowicz et al. 2016, §3.1); test problems of one function each."""
    batch = options.test_batch if split == "test" else options.batch
    family = Quadratics(options.dim, batch, options.convention)
    return optimizee_stream(family, split, seed, {"functions": batch, "convention": options.convention})
