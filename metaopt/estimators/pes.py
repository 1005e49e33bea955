"""Persistent evolution strategies (PES) through a learned optimizer's unroll (Vicol, Metz & Sohl-Dickstein 2021).

Truncated ES (:mod:`metaopt.estimators.es`) credits a truncation's loss only to that truncation's
perturbation, which biases it. PES keeps, for every antithetic pair ``i`` of every task, *separate*
inner states for the branches φ + ε and φ − ε across truncations, and an accumulator
ξ_i = Σ ε_i^(j) of the perturbations that have shaped the live run so far (Vicol et al. 2021,
Algorithm 2). Each call draws ε_i = σ z_i from the key ``(seed, iteration, task, i)``
(:func:`metaopt.estimators.perturbations.perturbation`), unrolls both branches ``truncation`` steps
from their own states, and estimates

    ĝ = mean_i ξ_i (L̄⁺_i − L̄⁻_i) / (2σ²),    ξ_i ← ξ_i + ε_i before the unroll,

L̄ being the mean loss over the truncation's steps (the convention of
:class:`metaopt.estimators.es.TruncatedES` and of google/learned_optimization's ``truncated_pes.py``).
Summed over the truncations of a run, ĝ is an unbiased estimate of the gradient of the smoothed
loss of the whole run.

Resets (reference §1.3): a truncation keeps its ``truncation`` steps even when the run ends inside
it, at the run's own length (the learner's ``horizon``, or a length drawn per run; each task's first
run may start partway: :mod:`metaopt.estimators.runs`). The steps before the end belong to the old run
and are credited to its accumulator ξ_i + ε_i; the remaining steps start the next problem of the
stream, whose runs have been shaped by ε_i alone, so they are credited to ε_i and the accumulator
restarts from ε_i. A run that ends exactly at the end of a truncation starts its successor with ξ = 0
at the next call. A run shorter than the rest of a truncation (an offset first run) ends inside it
too, and the next run takes the remaining steps, and so on.

Guards: as :class:`~metaopt.estimators.es.TruncatedES`: a pair whose loss difference is not finite adds
nothing and is counted (``nonfinite_pairs``), and its task's runs end; non-finite entries of the
estimate are set to zero (``zeroed_grads``). With ``max_loss`` every branch's per-step losses are
clipped before they are summed (``clipped_losses`` counts them), and a task whose unclipped losses are
not finite ends its runs all the same.

Particles: each segment of a truncation (the steps within one run) runs every pair's two branches,
from their own θ and rule states, in a loop or, with ``vmap=True`` (the option ``vmap_particles``),
stacked in one :func:`torch.func.vmap` call (:func:`metaopt.estimators.es.particle_truncations`);
a truncation straddling a reset is one call per run.

References:
    Vicol, Metz & Sohl-Dickstein, 2021. Unbiased Gradient Estimation in Unrolled Computation Graphs
    with Persistent Evolution Strategies. ICML. https://arxiv.org/abs/2112.13835

Example:
    >>> import torch
    >>> from metaopt.datasets import Quadratics
    >>> from metaopt.engine.optimizer_learner import OptimizerLearner
    >>> from metaopt.engine.rules import LearnedRates
    >>> from metaopt.problems.optimizees import optimizee_stream
    >>> learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=3)
    >>> estimator = PES(sigma=0.01, pairs=2, truncation=2)
    >>> problems = optimizee_stream(Quadratics(dim=3, batch=2), "train", seed=0)
    >>> for iteration in range(2):           # the second truncation straddles the end of problem 0
    ...     estimate = estimator.estimate(learner, problems, iteration)
    >>> run = estimator.state_dict()["runs"][0]
    >>> estimator.started, run["problem"], run["step"], len(run["particles"])
    (2, 1, 1, 2)
"""

from __future__ import annotations

from typing import Any

import torch

from metaopt.engine.functional import Params
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators.base import Estimate
from metaopt.estimators.es import _Antithetic
from metaopt.estimators.perturbations import perturbation

__all__ = ["PES"]


class PES(_Antithetic):
    """Persistent evolution strategies: separate ± inner states and an accumulated perturbation ξ (module docs).

    Args:
        sigma: standard deviation σ of the perturbation ε = σ z (the reference: 0.01).
        pairs: antithetic pairs per task; each pair keeps its own two inner states and ξ.
        truncation: optimizee steps per call (the reference: 10), across the end of a run.
        tasks: runs unrolled side by side, each its own problem of the stream.
        seed: first entry of every perturbation key ``(seed, iteration, task, pair)`` and run-draw key
            ``(seed, task, run)``.
        min_horizon: draw each run's length log-uniformly in [min_horizon, horizon] (None: the horizon).
        random_offset: start each task's first run at a uniform step of its length (:mod:`metaopt.estimators.runs`).
        max_loss: clip the per-step losses of the estimate to this value (None: no clip).
        vmap: run a task's 2·pairs branches in one :func:`torch.func.vmap` call per run instead of a loop
            (:mod:`metaopt.estimators.es`).
    """

    def __init__(self, sigma: float = 0.01, pairs: int = 8, truncation: int = 10, tasks: int = 1,
                 seed: int = 0, min_horizon: int | None = None, random_offset: bool = False,
                 max_loss: float | None = None, vmap: bool = False) -> None:
        super().__init__(sigma, pairs, truncation, tasks, seed, min_horizon, random_offset, max_loss, vmap)

    _carries_every_particle = True

    def estimate(self, learner: OptimizerLearner, problems: Any, iteration: int,
                 track_steps: bool = False) -> Estimate:
        del track_steps
        phi, total = self._meta_parameters(learner)
        losses, dropped, clipped = [], 0, 0
        for task in range(self.tasks):
            keys = self._keys(iteration, task)
            eps = [{k: self.sigma * v for k, v in perturbation(key, phi).items()} for key in keys]
            grads = [{k: torch.zeros_like(v) for k, v in phi.items()} for _ in eps]
            sums = torch.zeros(self.pairs, 2, dtype=torch.float64)  # Σ_t f⁺_t, Σ_t f⁻_t of each pair (clipped)
            diverged = torch.zeros(self.pairs, dtype=torch.bool)  # an unclipped loss of the pair was not finite
            remaining = self.truncation
            while remaining:
                run = self._live(task, problems, learner)
                length = min(remaining, run["length"] - run["step"])
                clipped += self._segment(learner, problems, run, phi, eps, grads, sums, diverged, length)
                remaining -= length
                if run["step"] == run["length"]:
                    self._end(task)
            finite = torch.isfinite(sums[:, 0] - sums[:, 1])
            dropped += int((~finite).sum())
            for pair in torch.nonzero(finite).flatten().tolist():
                losses.append(sums[pair].mean().item() / self.truncation)
                for k in total:
                    total[k] += grads[pair][k]
            if not bool(finite.all()) or bool(diverged.any()):
                self._end(task)
        return self._finish(learner, total, losses, dropped, clipped)

    def _segment(self, learner: OptimizerLearner, problems: Any, run: dict[str, Any], phi: Params,
                 eps: list[Params], grads: list[Params], sums: torch.Tensor, diverged: torch.Tensor,
                 length: int) -> int:
        """``length`` steps of every pair's two branches within one run; credits their loss to ξ + ε, in place.

        Returns the number of per-step losses clipped.
        """
        problem = self._problem(problems, run["problem"], learner)
        starts = [(particle[branch]["params"], particle[branch]["state"])
                  for particle in run["particles"] for branch in ("plus", "minus")]
        branches = self._pairs(learner, problem, phi, eps, starts, run["step"], length)
        clipped = 0
        for pair, (particle, e, ends) in enumerate(zip(run["particles"], eps, branches)):
            xi = {k: particle["xi"][k] + e[k] for k in phi}
            delta = 0.0
            for sign, branch, end in ((1, "plus", ends[0]), (-1, "minus", ends[1])):
                particle[branch] = {"params": end.params, "state": end.state}
                step_losses, marked = self.runs.clip(end.losses)
                clipped += int(marked.sum())
                diverged[pair] |= not bool(torch.isfinite(end.losses).all())
                sums[pair, (1 - sign) // 2] += step_losses.sum().item()
                delta += sign * step_losses.sum().item() / self.truncation
            particle["xi"] = xi
            for k in phi:
                grads[pair][k] += xi[k] * (delta / (2 * self.sigma**2))
        run["step"] += length
        return clipped

    def _live(self, task: int, problems: Any, learner: OptimizerLearner) -> dict[str, Any]:
        """``task``'s live run: every pair's ± states and ξ; a fresh run of the next problem when it has none."""
        run = self._runs[task]
        if run is None:
            run, problem = self._start(problems, learner, task)
            phi = dict(learner.named_parameters())
            run = {**run, "particles": [{"plus": {"params": problem.init_params(), "state": None},
                                         "minus": {"params": problem.init_params(), "state": None},
                                         "xi": {k: torch.zeros_like(p.detach()) for k, p in phi.items()}}
                                        for _ in range(self.pairs)]}
        else:
            run = self._resumed(run, learner)
        self._runs[task] = run
        return run
