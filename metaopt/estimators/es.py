"""Antithetic truncated evolution strategies through a learned optimizer's unroll (Metz et al. 2020, §4).

Each call takes one truncation of ``truncation`` steps of every live run (``tasks`` runs, one
optimizee problem each, the last truncation of a run cut at the run's length as in
:class:`metaopt.estimators.truncated.TruncatedBackprop`: the learner's ``horizon``, or a length drawn
per run, and each task's first run may start partway, :mod:`metaopt.estimators.runs`). For every
antithetic pair ``i`` the meta-parameters φ are perturbed by ε_i = σ z_i, z_i ~ N(0, I) drawn from
the counter-based key ``(seed, iteration, task, i)``
(:func:`metaopt.estimators.perturbations.perturbation`), and φ + ε_i and φ − ε_i each unroll the
truncation from the *same* carried inner state. With L̄± the mean loss
``f(θ_t)`` over the truncation's steps, the estimate is

    ĝ = mean_i ε_i (L̄⁺_i − L̄⁻_i) / (2σ²) = mean_i z_i (L̄⁺_i − L̄⁻_i) / (2σ),

the gradient of the Gaussian-smoothed truncation loss E_z L̄(φ + σz) (the convention of
google/learned_optimization's ``truncated_es.py``; Salimans et al. 2017, eq. 1, antithetic). The
inner state carried to the next call is the positive branch's of pair 0. Like truncated
backpropagation the estimate is biased: it ignores how the rule of a truncation moves the losses of
later ones (the reason for PES, :mod:`metaopt.estimators.pes`).

Guards: a pair whose loss difference is not finite adds nothing (its particles count as zero, as in
the reference) and is counted in ``nonfinite_pairs``; entries of the estimate that are not finite
are set to zero and counted in ``zeroed_grads``; a run whose carried branch is not finite ends, and
the next call starts the next problem of the stream. The loss is the mean of (L̄⁺ + L̄⁻)/2 over the
finite pairs (NaN when none is finite: the trainer then skips the update). With ``max_loss`` the
per-step losses of both branches are clipped before the means are taken (NaN and +inf to
``max_loss``; :meth:`metaopt.estimators.runs.InnerRuns.clip`) and ``clipped_losses`` counts the
clipped steps; whether the carried branch diverged is judged on its unclipped losses.

Particles (the 2·pairs perturbed branches of a task) run without a graph, under :func:`torch.no_grad`,
in one of two ways (:func:`particle_truncations`; both give the same estimate and carried state to
rounding error):

- **in a loop** (the default, ``vmap=False``): one :meth:`OptimizerLearner.truncation` per particle,
  whose inner loop takes the optimizee's gradients with :func:`torch.autograd.grad`. Every rule and
  problem runs this way.
- **batched** (``vmap=True``; the option ``vmap_particles`` of
  :class:`metaopt.estimators.unroll_options.UnrollOptions`): the particles' meta-parameters are
  stacked and all of them take the truncation's steps in one :func:`torch.func.vmap` call of
  :meth:`OptimizerLearner.functional_truncation` (gradients by :func:`torch.func.grad_and_value`),
  fewer and larger kernels. ES's particles start from the one carried θ and rule state, which enter
  unbatched (so the first step's gradient is taken once); a fresh run's rule state, which may depend
  on φ (a learned initial state), is computed per particle outside ``vmap`` and stacked; PES's
  particles each stack their own θ and state. Random draws inside the unroll are made once for
  all particles (``randomness="same"``): the problems here draw their minibatches from generators
  seeded by the problem and the step, so every particle sees the minibatches the loop shows it;
  a problem drawing from torch's global generator would give all particles one draw, unlike the loop.
  A rule or problem that cannot run under ``vmap`` (Python control flow on tensor values, ``.item()``
  or ``.tolist()``, in-place writes into captured tensors, non-tensor rule states) raises an error
  that says so and names the fix, ``vmap=False``; nothing falls back silently.

On several processes (``distribute``) every rank regenerates the same perturbations from their
keys, unrolls its contiguous share of the particles, and the ranks gather the particles' losses,
and the inner states the estimator carries on (ES: the positive branch of pair 0; PES: every
particle's), so every rank computes the single-process estimate and carries the same runs on.
In a loop the particles are computed exactly as on one process, so the estimate is equal bit for
bit; with ``vmap`` each rank batches its share only (equal to rounding error).

References:
    Metz et al., 2020. Tasks, stability, architecture, and compute: training more effective learned
    optimizers, and using them to train themselves. https://arxiv.org/abs/2009.11243
    Salimans et al., 2017. Evolution Strategies as a Scalable Alternative to Reinforcement Learning.
    https://arxiv.org/abs/1703.03864

Example:
    >>> import torch
    >>> from metaopt.datasets import Quadratics
    >>> from metaopt.engine.optimizer_learner import OptimizerLearner
    >>> from metaopt.engine.rules import LearnedRates
    >>> from metaopt.problems.optimizees import optimizee_stream
    >>> learner = OptimizerLearner(LearnedRates({"theta": torch.tensor(0.01)}, per_step=False), horizon=4)
    >>> estimator = TruncatedES(sigma=0.01, pairs=4, truncation=2)
    >>> problems = optimizee_stream(Quadratics(dim=3, batch=2), "train", seed=0)
    >>> estimate = estimator.estimate(learner, problems, iteration=0)
    >>> sorted(estimate.metrics), estimator.state_dict()["runs"][0]["step"]
    (['loss', 'nonfinite_pairs', 'zeroed_grads'], 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from metaopt.engine.functional import Params, map_tensors
from metaopt.engine.inner import Trajectory
from metaopt.engine.optimizer_learner import OptimizerLearner
from metaopt.estimators.base import Estimate, Estimator
from metaopt.estimators.perturbations import Key, perturbation
from metaopt.estimators.runs import InnerRuns
from metaopt.problems.optimizees import Optimizee
from metaopt.training.distributed import World

__all__ = ["Particle", "TruncatedES", "particle_truncations", "perturbed_truncation"]


class _Method(nn.Module):
    """A method of the learner as a module call, so :func:`torch.func.functional_call` can swap φ for it."""

    def __init__(self, learner: OptimizerLearner, method: str) -> None:
        super().__init__()
        self.learner, self.method = learner, method

    def forward(self, *args: Any) -> Any:
        return getattr(self.learner, self.method)(*args)


def _perturbed(learner: OptimizerLearner, phi: Params, method: str, *args: Any) -> Any:
    """``learner.<method>(*args)`` with the meta-parameters ``phi`` (by name) in place of the learner's own."""
    return torch.func.functional_call(_Method(learner, method), {f"learner.{k}": v for k, v in phi.items()}, args)


def perturbed_truncation(learner: OptimizerLearner, phi: Params, problem: Optimizee, params: Params, state: Any,
                         start: int, steps: int) -> tuple[torch.Tensor, Trajectory]:
    """``steps`` steps of ``learner``'s rule with meta-parameters ``phi`` (by name), without a graph.

    The learner's own parameters are untouched. Returns the losses ``f(θ_{start+1}), ...,
    f(θ_{start+steps})`` and the trajectory (its last parameters and rule state carry the run on).
    """
    with torch.no_grad():
        score, trajectory = _perturbed(learner, phi, "truncation", problem, params, state, start, steps)
    return score.step_losses[1:], trajectory


@dataclass(frozen=True)
class Particle:
    """What one perturbed branch of a truncation gives: its losses and where it leaves its inner run.

    Attributes:
        losses: ``f(θ_{start+1}), ..., f(θ_{start+steps})`` (unclipped), ``[steps]``.
        params: the last parameters θ_{start+steps}, detached.
        state: the rule's state after the last step, detached.
    """

    losses: torch.Tensor
    params: Params
    state: Any


def particle_truncations(learner: OptimizerLearner, phis: Sequence[Params], problem: Optimizee,
                         starts: Sequence[tuple[Params, Any]], start: int, steps: int,
                         vmap: bool = False) -> list[Particle]:
    """``steps`` steps from step ``start`` of every particle ``i``: meta-parameters ``phis[i]``, from ``starts[i]``.

    ``starts[i]`` is the particle's θ and rule state (``None``: a fresh state, :meth:`OptimizerLearner.init_state`
    under ``phis[i]``). With ``vmap`` all particles run in one :func:`torch.func.vmap` call (module docs); a θ or
    state that is one and the same object for every particle enters it unbatched. Nothing is differentiable.

    Raises:
        RuntimeError: with ``vmap``, the rule or the problem cannot run under :func:`torch.func.vmap` (the
            message quotes the error and names the fix, ``vmap=False``).
    """
    if not vmap:
        particles = []
        for phi, (params, state) in zip(phis, starts):
            losses, trajectory = perturbed_truncation(learner, phi, problem, params, state, start, steps)
            particles.append(Particle(losses, *map_tensors(torch.Tensor.detach,
                                                           (trajectory.params[-1], trajectory.state))))
        return particles
    with torch.no_grad():
        states = [_perturbed(learner, phi, "init_state", params) if state is None else state
                  for phi, (params, state) in zip(phis, starts)]
        inputs, in_dims = zip((_stacked(phis), 0), _batched([params for params, _ in starts]), _batched(states))

        def particle(phi: Params, params: Params, state: Any) -> tuple[torch.Tensor, Params, Any]:
            return _perturbed(learner, phi, "functional_truncation", problem, params, state, start, steps)

        try:
            losses, params, state = torch.func.vmap(particle, in_dims=in_dims, randomness="same")(*inputs)
        except (RuntimeError, TypeError, ValueError) as error:
            raise RuntimeError(
                f"the particles of {type(learner.rule).__name__} on {type(problem).__name__} could not be batched "
                f"with torch.func.vmap ({type(error).__name__}: {error}). A rule or problem that branches in Python "
                "on tensor values, calls .item() or .tolist(), writes in place into tensors it did not create, or "
                "keeps non-tensor values in its state cannot run under vmap: build the estimator with vmap=False "
                "(the option vmap_particles=False) to run the particles in a loop") from error
    return [Particle(*map_tensors(lambda t, i=i: t[i].clone(memory_format=torch.contiguous_format),
                                  (losses, params, state)))
            for i in range(len(phis))]


def _batched(trees: Sequence[Any]) -> tuple[Any, int | None]:
    """One ``vmap`` input made of the per-particle ``trees``, and its ``in_dims``.

    The tree itself, unbatched (``None``), when every particle holds the same object; else the
    trees' tensors stacked along a new leading dimension (``0``).
    """
    return (trees[0], None) if all(tree is trees[0] for tree in trees) else (_stacked(trees), 0)


def _stacked(trees: Sequence[Any]) -> Any:
    """The tensors of ``trees`` (of one structure) stacked along a new leading dimension, in one tree."""
    return pytree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


class _Antithetic(Estimator):
    """What antithetic ES and PES share: settings, the live runs' problems and layout, guarded gradient writing."""

    def __init__(self, sigma: float, pairs: int, truncation: int, tasks: int, seed: int, min_horizon: int | None,
                 random_offset: bool, max_loss: float | None, vmap: bool) -> None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
        if not isinstance(vmap, bool):
            raise ValueError(f"vmap must be True or False (batch the particles with torch.func.vmap), got {vmap!r}")
        for name, value in (("pairs", pairs), ("truncation", truncation), ("tasks", tasks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.sigma, self.pairs, self.truncation, self.tasks, self.seed = sigma, pairs, truncation, tasks, seed
        self.vmap = vmap
        self.runs = InnerRuns(min_horizon, random_offset, max_loss)
        self.started = 0  # problems of the training stream started so far
        self._runs: list[dict[str, Any] | None] = [None] * tasks  # the carried state of each task's live run
        self._task_runs = [0] * tasks  # runs each task has started: the run index of its draws
        self._problems: dict[int, Optimizee] = {}  # live problems by stream index (rebuilt after a resume)

    def _problem(self, problems: Any, index: int, learner: OptimizerLearner) -> Optimizee:
        if index not in self._problems:
            self._problems[index] = problems.batch(index).to(learner.device)
        return self._problems[index]

    def _start(self, problems: Any, learner: OptimizerLearner, task: int) -> tuple[dict[str, Any], Optimizee]:
        """A new run of ``task`` on the next problem of the stream, now live: its index, first step and length."""
        step, length = self.runs.begin(learner.horizon, self.seed, task, self._task_runs[task])
        index, self.started = self.started, self.started + 1
        self._task_runs[task] += 1
        return {"problem": index, "step": step, "length": length}, self._problem(problems, index, learner)

    @staticmethod
    def _resumed(run: dict[str, Any], learner: OptimizerLearner) -> dict[str, Any]:
        """A carried run on the learner's device; states saved before lengths were drawn last the horizon."""
        return {"length": learner.horizon, **map_tensors(lambda t: t.to(learner.device), run)}

    def _end(self, task: int) -> None:
        run = self._runs[task]
        if run is not None:
            self._problems.pop(run["problem"], None)
        self._runs[task] = None

    #: Whether every particle's inner state is carried on (PES), else only the first (ES: pair 0's positive branch).
    _carries_every_particle = False

    def distribute(self, world: World) -> None:
        self.world = world

    def _keys(self, iteration: int, task: int) -> list[Key]:
        return [(self.seed, iteration, task, pair) for pair in range(self.pairs)]

    def _pairs(self, learner: OptimizerLearner, problem: Optimizee, phi: Params, eps: Sequence[Params],
               starts: Sequence[tuple[Params, Any]], start: int, steps: int) -> list[tuple[Particle, Particle]]:
        """The branches φ + ε_i and φ − ε_i of every pair ``i``, from ``starts[2i]`` and ``starts[2i + 1]``."""
        phis = [{k: phi[k] + sign * e[k] for k in phi} for e in eps for sign in (1, -1)]
        mine = self.world.share(len(phis))
        particles = particle_truncations(learner, phis[mine.start:mine.stop], problem, starts[mine.start:mine.stop],
                                         start, steps, self.vmap)
        if self.world.active:
            particles = self._gathered(learner, mine, particles)
        return list(zip(particles[0::2], particles[1::2]))

    def _gathered(self, learner: OptimizerLearner, mine: range, particles: list[Particle]) -> list[Particle]:
        """Every rank's particles, in order: their losses, and the inner states the estimator carries on."""
        def sent(index: int, particle: Particle) -> tuple[torch.Tensor, Any, Any]:
            carried = self._carries_every_particle or index == 0
            return map_tensors(torch.Tensor.cpu, (particle.losses, *((particle.params, particle.state) if carried
                                                                      else (None, None))))

        shares = self.world.gather([sent(index, p) for index, p in zip(mine, particles)])
        return [Particle(*map_tensors(lambda t: t.to(learner.device), particle)) for share in shares
                for particle in share]

    @staticmethod
    def _write(learner: OptimizerLearner, grads: Params) -> int:
        """Add ``grads`` to the ``.grad`` of ``learner``'s parameters, non-finite entries set to zero; their count."""
        zeroed = 0
        for name, p in learner.named_parameters():
            finite = torch.isfinite(grads[name])
            zeroed += int((~finite).sum())
            g = torch.where(finite, grads[name], torch.zeros_like(grads[name])).to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g
        return zeroed

    @staticmethod
    def _meta_parameters(learner: OptimizerLearner) -> tuple[Params, Params]:
        """φ (detached) and a zero estimate of its shapes, by name."""
        phi = {name: p.detach() for name, p in learner.named_parameters()}
        return phi, {name: torch.zeros_like(p) for name, p in phi.items()}

    def _finish(self, learner: OptimizerLearner, total: Params, losses: list[float], dropped: int,
                clipped: int) -> Estimate:
        """Write the mean of ``total`` over tasks and pairs as the gradient; the mean loss of the finite pairs."""
        zeroed = self._write(learner, {k: v / (self.tasks * self.pairs) for k, v in total.items()})
        loss = sum(losses) / len(losses) if losses else math.nan
        return Estimate(loss, {"loss": loss, "nonfinite_pairs": float(dropped), "zeroed_grads": float(zeroed),
                               **self.runs.metrics(clipped)})

    def settings(self) -> dict[str, Any]:
        # vmap only when on: the settings of runs that predate it (and of loop runs) stay as they were
        return {"sigma": self.sigma, "pairs": self.pairs, "truncation": self.truncation, "tasks": self.tasks,
                "seed": self.seed, **self.runs.settings(), **({"vmap": True} if self.vmap else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started, "runs": list(self._runs), "task_runs": list(self._task_runs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["runs"]) != self.tasks:
            raise ValueError(f"the state holds {len(state['runs'])} runs, but this estimator has tasks={self.tasks}")
        self.started, self._runs, self._problems = int(state["started"]), list(state["runs"]), {}
        # states saved before runs were counted per task: their runs drew nothing, so the counts are never read
        self._task_runs = [int(n) for n in state.get("task_runs", [0] * self.tasks)]


class TruncatedES(_Antithetic):
    """Antithetic truncated ES: one truncation of every live run per call (see the module docs).

    Args:
        sigma: standard deviation σ of the perturbation ε = σ z (the reference: 0.01).
        pairs: antithetic pairs per task, all from the task's carried inner state.
        truncation: optimizee steps per call (the reference: 20); a run's last truncation is cut at its length.
        tasks: runs unrolled side by side, each its own problem of the stream.
        seed: first entry of every perturbation key ``(seed, iteration, task, pair)`` and run-draw key
            ``(seed, task, run)``.
        min_horizon: draw each run's length log-uniformly in [min_horizon, horizon] (None: the horizon).
        random_offset: start each task's first run at a uniform step of its length (:mod:`metaopt.estimators.runs`).
        max_loss: clip the per-step losses of the estimate to this value (None: no clip).
        vmap: run a task's 2·pairs particles in one :func:`torch.func.vmap` call instead of a loop (module docs).
    """

    def __init__(self, sigma: float = 0.01, pairs: int = 8, truncation: int = 20, tasks: int = 1,
                 seed: int = 0, min_horizon: int | None = None, random_offset: bool = False,
                 max_loss: float | None = None, vmap: bool = False) -> None:
        super().__init__(sigma, pairs, truncation, tasks, seed, min_horizon, random_offset, max_loss, vmap)

    def estimate(self, learner: OptimizerLearner, problems: Any, iteration: int,
                 track_steps: bool = False) -> Estimate:
        del track_steps
        phi, total = self._meta_parameters(learner)
        losses, dropped, clipped = [], 0, 0
        for task in range(self.tasks):
            run = self._live(task, problems, learner)
            problem = self._problem(problems, run["problem"], learner)
            length = min(self.truncation, run["length"] - run["step"])
            zs = [perturbation(key, phi) for key in self._keys(iteration, task)]
            eps = [{k: self.sigma * z[k] for k in phi} for z in zs]
            starts = [(run["params"], run["state"])] * (2 * self.pairs)  # every branch from the carried state
            branches = self._pairs(learner, problem, phi, eps, starts, run["step"], length)
            for z, (plus, minus) in zip(zs, branches):
                (plus, plus_clipped), (minus, minus_clipped) = self.runs.clip(plus.losses), self.runs.clip(minus.losses)
                clipped += int(plus_clipped.sum() + minus_clipped.sum())
                delta = (plus.mean() - minus.mean()).item()
                if not math.isfinite(delta):
                    dropped += 1
                    continue
                losses.append((plus.mean() + minus.mean()).item() / 2)
                for k in total:
                    total[k] += z[k] * (delta / (2 * self.sigma))
            carried = branches[0][0]  # the positive branch of pair 0
            if bool(torch.isfinite(carried.losses).all()) and run["step"] + length < run["length"]:
                self._runs[task] = {**run, "step": run["step"] + length, "params": carried.params,
                                    "state": carried.state}
            else:
                self._end(task)
        return self._finish(learner, total, losses, dropped, clipped)

    def _live(self, task: int, problems: Any, learner: OptimizerLearner) -> dict[str, Any]:
        """The carried state of ``task``'s run: a fresh run of the next problem when it has none."""
        run = self._runs[task]
        if run is None:
            run, problem = self._start(problems, learner, task)
            run = {**run, "params": problem.init_params(), "state": None}
        else:
            run = self._resumed(run, learner)
        self._runs[task] = run
        return run
