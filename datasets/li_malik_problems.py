"""The problem families of Li & Malik's "Learning to Optimize" (2016), as optimizees for learned optimizers.

Li & Malik meta-train an optimizer on three families of small objectives, each a problem drawn on
random data, and test it on problems of the same family it never saw (§4):

===================  ======================================================================================
family               objective of one problem (θ the parameters, n points (x_i, y_i))
===================  ======================================================================================
``logistic``         ℓ2-regularised logistic regression, θ = (w, b):
                     −1/n Σ [y_i log σ(wᵀx_i + b) + (1 − y_i) log(1 − σ(wᵀx_i + b))] + λ/2 ‖w‖²
``robust-linear``    robust linear regression with the Geman–McClure estimator, θ = (w, b), r_i = y_i − wᵀx_i − b:
                     1/n Σ r_i² / (c² + r_i²)
``two-layer-net``    a two-layer ReLU classifier, θ = (W, b, U, c), softmax over 2 classes:
                     −1/n Σ log softmax(U relu(W x_i + b) + c)_{y_i} + λ/2 (‖W‖² + ‖U‖²)
===================  ======================================================================================

The data of a problem (our choices where the paper's are recalled, not read, marked [M]):

* ``logistic``: ``dim`` = 3 [M], ``points`` = 100 [M], half from each of two Gaussians with means
  ~ N(0, 4 I) and covariances ``A Aᵀ / dim + 0.1 I`` (``A`` ~ N(0, 1) entries), one Gaussian labelled
  1, the other 0 ("two-class Gaussian data", §4.1); λ = 5·10⁻⁴ [M].
* ``robust-linear``: ``dim`` = 3 [M], 4 clusters [M] of ``points / 4`` points: centres ~ N(0, 4 I),
  points ~ N(centre, I); each cluster has its own random linear model, y = w_kᵀx + b_k + ε with
  w_k ~ N(0, I), b_k ~ N(0, 1), ε ~ N(0, 1) [M], so one line cannot fit all clusters and the
  robust objective is non-convex, with a local minimum per cluster it can fit; c = 1 [M].
* ``two-layer-net``: inputs of ``dim`` = 2, 4 clusters of ``points / 4`` (centres ~ N(0, 4 I),
  covariances as above), the clusters' labels a random arrangement of two 0s and two 1s (so both
  classes occur), ``hidden`` = 2 ReLU units [M], λ = 5·10⁻⁴ [M].

Every problem starts at θ_0 ~ N(0, I) (every entry), drawn after the data. The objectives are
deterministic: full-batch, ``step`` is ignored. Problem ``seed`` is a pure function of its seed (one
:class:`torch.Generator` seeded with it draws the data, then θ_0); the splits are the disjoint seed
ranges of :func:`metaopt.problems.optimizees.optimizee_stream` (training ``s·10⁶ + i``, validation
``10⁹ + i``, test ``2·10⁹ + i``). Unlike the paper, which meta-trains on a fixed set of about a
hundred objectives per family, the training stream draws a new problem for every run. ``"mixed"``
goes round the three families (problem ``seed`` is of family ``seed % 3``: logistic,
robust-linear, two-layer-net), each at its own default dimension unless ``dim`` is given.

References:
    Li & Malik, 2016. Learning to Optimize. https://arxiv.org/abs/1606.01885 (ICLR 2017)
    Geman & McClure, 1987. Statistical methods for tomographic image reconstruction.

Example:
    >>> family = LiMalikProblems("robust-linear")
    >>> problem = family.sample(seed=0)
    >>> theta = problem.init_params()
    >>> {name: tuple(p.shape) for name, p in theta.items()}, 0 < float(problem.loss(theta, step=0)) < 1
    ({'w': (3,), 'b': ()}, True)
    >>> [LiMalikProblems("mixed").sample(seed).family for seed in range(4)]
    ['logistic', 'robust-linear', 'two-layer-net', 'logistic']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from metaopt.options import ConfigError, Options
from metaopt.problems.optimizees import Optimizee, OptimizeeStream, optimizee_stream
from metaopt.registry import register_dataset

__all__ = ["CLUSTERS", "DEFAULT_DIM", "FAMILIES", "FAMILY_NAMES", "GEMAN_MCCLURE_C", "L2", "LiMalikProblem",
           "LiMalikProblems", "LiMalikProblemsOptions", "LogisticRegression", "RobustLinearRegression", "TwoLayerNet",
           "build_li_malik_problems"]

#: The three families, in the order ``"mixed"`` visits them.
FAMILY_NAMES = ("logistic", "robust-linear", "two-layer-net")
#: Every value of the option ``family``.
FAMILIES = (*FAMILY_NAMES, "mixed")
#: λ of the ℓ2 regulariser of the logistic regression and of the two-layer net's weights.
L2 = 5e-4
#: c of the Geman–McClure estimator r² / (c² + r²).
GEMAN_MCCLURE_C = 1.0
#: Clusters of the robust-linear and two-layer-net data.
CLUSTERS = 4
#: The default input dimension of each family.
DEFAULT_DIM = {"logistic": 3, "robust-linear": 3, "two-layer-net": 2}


def _covariance_factor(dim: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``L`` with ``L Lᵀ = A Aᵀ / dim + 0.1 I`` for a random ``A`` with N(0, 1) entries: a random covariance."""
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return torch.linalg.cholesky(a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)).to(dtype)


def _gaussian(mean: torch.Tensor, factor: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` points ``[count, dim]`` of N(mean, factor factorᵀ)."""
    return mean + torch.randn(count, len(mean), generator=g, dtype=mean.dtype) @ factor.T


class LiMalikProblem(Optimizee):
    """One problem of a family: data ``x`` ``[n, dim]`` and targets ``y`` ``[n]``, θ_0, and the family's objective."""

    family: ClassVar[str]

    def __init__(self, seed: int, x: torch.Tensor, y: torch.Tensor, theta0: dict[str, torch.Tensor]) -> None:
        self.seed, self.x, self.y, self.theta0 = seed, x, y, theta0

    def init_params(self) -> dict[str, torch.Tensor]:
        return {name: p.clone() for name, p in self.theta0.items()}

    def to(self, device: torch.device | str) -> LiMalikProblem:
        return type(self)(self.seed, self.x.to(device), self.y.to(device),
                          {name: p.to(device) for name, p in self.theta0.items()})

    def describe(self) -> dict[str, Any]:
        """Family, seed and sizes, for reports."""
        return {"family": self.family, "seed": self.seed, "dim": self.x.shape[1], "points": self.x.shape[0]}


class LogisticRegression(LiMalikProblem):
    """ℓ2-regularised logistic regression (module docs); θ = ``{"w": [dim], "b": []}``, labels ``y`` in {0, 1}."""

    family = "logistic"

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        del step  # full batch
        logits = self.x @ params["w"] + params["b"]
        return F.binary_cross_entropy_with_logits(logits, self.y) + 0.5 * L2 * params["w"].square().sum()


class RobustLinearRegression(LiMalikProblem):
    """Linear regression under the Geman–McClure estimator (module docs); θ = ``{"w": [dim], "b": []}``."""

    family = "robust-linear"

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        del step
        r2 = (self.y - self.x @ params["w"] - params["b"]).square()
        return (r2 / (GEMAN_MCCLURE_C**2 + r2)).mean()


class TwoLayerNet(LiMalikProblem):
    """A ``dim``-hidden-2 ReLU classifier (module docs); θ = ``{"W": [hidden, dim], "b", "U": [2, hidden], "c"}``."""

    family = "two-layer-net"

    def loss(self, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        del step
        hidden = torch.relu(self.x @ params["W"].T + params["b"])
        logits = hidden @ params["U"].T + params["c"]
        decay = 0.5 * L2 * (params["W"].square().sum() + params["U"].square().sum())
        return F.cross_entropy(logits, self.y) + decay


class LiMalikProblems:
    """Problems of one family of Li & Malik (2016, §4), or ``"mixed"``; ``sample(seed)`` is a pure function of ``seed``.

    Args:
        family: ``"logistic"``, ``"robust-linear"``, ``"two-layer-net"`` or ``"mixed"`` (module docs).
        dim: input dimension (None: the family's default, 3, 3 and 2).
        points: data points per problem (divisible by 2 for logistic regression, by 4 otherwise).
        hidden: hidden ReLU units of the two-layer net.
        dtype: floating type of the data and parameters.
    """

    def __init__(self, family: str = "logistic", dim: int | None = None, points: int = 100, hidden: int = 2,
                 dtype: torch.dtype = torch.float32) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown Li & Malik family {family!r}; choose one of {FAMILIES}")
        if (dim is not None and dim < 1) or points < 4 or points % 4 or hidden < 1:
            raise ValueError(f"dim and hidden must be >= 1 and points a positive multiple of 4, got dim={dim}, "
                             f"points={points}, hidden={hidden}")
        self.family, self.dim, self.points, self.hidden, self.dtype = family, dim, points, hidden, dtype

    def sample(self, seed: int) -> LiMalikProblem:
        """Problem ``seed`` (a non-negative integer): its data, then θ_0, from one generator seeded with ``seed``."""
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        family = FAMILY_NAMES[seed % 3] if self.family == "mixed" else self.family
        dim = DEFAULT_DIM[family] if self.dim is None else self.dim
        g = torch.Generator().manual_seed(seed)
        if family == "logistic":
            x = torch.cat([_gaussian(2 * torch.randn(dim, generator=g, dtype=self.dtype),
                                     _covariance_factor(dim, g, self.dtype), self.points // 2, g) for _ in range(2)])
            y = torch.arange(self.points, dtype=self.dtype).ge(self.points // 2).to(self.dtype)
            return LogisticRegression(seed, x, y, self._theta0({"w": (dim,), "b": ()}, g))
        size = self.points // CLUSTERS
        centres = 2 * torch.randn(CLUSTERS, dim, generator=g, dtype=self.dtype)
        if family == "robust-linear":
            x = torch.cat([c + torch.randn(size, dim, generator=g, dtype=self.dtype) for c in centres])
            w, b = torch.randn(CLUSTERS, dim, generator=g, dtype=self.dtype), torch.randn(CLUSTERS, generator=g,
                                                                                          dtype=self.dtype)
            cluster = torch.arange(self.points) // size
            noise = torch.randn(self.points, generator=g, dtype=self.dtype)
            y = (x * w[cluster]).sum(1) + b[cluster] + noise
            return RobustLinearRegression(seed, x, y, self._theta0({"w": (dim,), "b": ()}, g))
        x = torch.cat([_gaussian(c, _covariance_factor(dim, g, self.dtype), size, g) for c in centres])
        labels = torch.tensor([0, 0, 1, 1])[torch.randperm(CLUSTERS, generator=g)]
        y = labels.repeat_interleave(size)
        shapes = {"W": (self.hidden, dim), "b": (self.hidden,), "U": (2, self.hidden), "c": (2,)}
        return TwoLayerNet(seed, x, y, self._theta0(shapes, g))

    def _theta0(self, shapes: dict[str, tuple[int, ...]], g: torch.Generator) -> dict[str, torch.Tensor]:
        return {name: torch.randn(shape, generator=g, dtype=self.dtype) for name, shape in shapes.items()}


@dataclass(frozen=True)
class LiMalikProblemsOptions(Options):
    """The Li & Malik problem family of a run.

    Args:
        family: "logistic" (l2-regularised logistic regression), "robust-linear" (Geman-McClure robust
            regression), "two-layer-net" (a small ReLU classifier) or "mixed" (the three in turn).
        dim: input dimension (None: the family's default: 3 for logistic and robust-linear, 2 for two-layer-net).
        points: data points per problem, a multiple of 4.
        hidden: hidden units of the two-layer net (families two-layer-net and mixed only).
    """

    positive = ("dim", "points", "hidden")
    family: Literal["logistic", "robust-linear", "two-layer-net", "mixed"] = "logistic"
    dim: int | None = None
    points: int = 100
    hidden: int = 2

    def check(self) -> None:
        super().check()
        if self.points % 4:
            raise ConfigError(f"option 'points' must be a multiple of 4 (4 clusters, 2 classes), got {self.points}")
        if self.hidden != 2 and self.family not in ("two-layer-net", "mixed"):
            raise ConfigError(f"option 'hidden' sizes the two-layer net; family={self.family!r} has none: drop it, "
                              "or pass family='two-layer-net'")


@register_dataset("li-malik", LiMalikProblemsOptions, problems="optimizees")
def build_li_malik_problems(options: LiMalikProblemsOptions, split: str, seed: int) -> OptimizeeStream:
    """Li & Malik's (2016) logistic / robust linear regression / two-layer-net problems on random data."""
    family = LiMalikProblems(options.family, options.dim, options.points, options.hidden)
    return optimizee_stream(family, split, seed, {"family": options.family, "points": options.points})
