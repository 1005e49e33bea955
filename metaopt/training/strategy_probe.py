"""``strategy="auto"`` in a training run: a short timing probe picks loop, vmap or compiled on this machine.

Which task-batching strategy (:mod:`metaopt.engine.batching`) is fastest depends on the model,
the batch and the machine: on a 2-core CPU the loop beats ``vmap`` for a max-pool Conv4 and loses
to it for a strided one, and the compiled meta-gradient wins by 1.6x for ANIL and by nothing for
a whole max-pool Conv4. So before the first meta-update of a new run whose learner says
``strategy="auto"``, :class:`metaopt.training.trainer.MetaTrainer` times the run's own
meta-gradient (the estimator on the run's first problem batch) under each strategy the learner can
run, and trains with the fastest. The probe changes nothing: parameters, buffers, gradients,
estimator and random states are as they were, and the probed strategies compute the same
meta-gradients to float rounding.

Each strategy is timed :data:`REPEATS` times after one untimed call; its figure is the fastest
(the least disturbed by other load). ``compiled`` is tried only where compiling (from 20 s for
a small MLP to minutes for a whole Conv4, :mod:`metaopt.engine.compiled`) can pay for itself: when
the run, at the best eager speed, is expected to last :data:`COMPILE_PAYBACK` times the compile's
estimated cost (:func:`estimated_compile_s`); it is dropped when it falls back to ``vmap``. A
run shorter than :data:`PROBE_WORTH_FROM` iterations is not probed (the device rule of
:func:`metaopt.engine.batching.resolve_strategy` decides). Several processes are not probed:
they are chosen when the run is launched (``metaopt train --nproc``).

The choice is logged, returned in the run's summary and stored in every checkpoint, so a resumed
run keeps it (a run started before probing existed resumes with the device rule it started with).

Example:
    >>> import torch
    >>> from metaopt.algorithms import MAML
    >>> from metaopt.datasets import Sinusoid
    >>> from metaopt.estimators import Backprop
    >>> from metaopt.models import MLP
    >>> learner = MAML(MLP(1, 1, hidden=(8,)), inner_lr=0.01)
    >>> choice = probe_strategy(learner, Backprop(), Sinusoid(batch_size=4, seed=0), iteration=0,
    ...                         expected_s=lambda seconds: 1.0)
    >>> choice.strategy in ("loop", "vmap"), sorted(choice.seconds), choice.skipped["compiled"][:24]
    (True, ['loop', 'vmap'], 'the run is expected to l')
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from metaopt.engine.compiled import CompileFallbackWarning
from metaopt.engine.meta_learner import MetaLearner
from metaopt.estimators import Estimator
from metaopt.training.checkpoint import capture_rng_state, restore_rng_state

__all__ = ["COMPILE_COST_STEPS", "COMPILE_FLOOR_S", "COMPILE_PAYBACK", "PROBE_WORTH_FROM", "REPEATS", "StrategyChoice",
           "estimated_compile_s", "expected_run_s", "probe_strategy"]

#: Timed meta-gradients per strategy (after one untimed call that warms caches up).
REPEATS = 3

#: Fewest remaining iterations for which a run is probed: the probe costs about ``3 * (REPEATS + 1)`` of them.
PROBE_WORTH_FROM = 100

#: Compiling costs about this many eager ``vmap`` meta-gradients of the same configuration (measured on 2 CPU cores:
#: 180-450 for ANIL, MAML, Meta-SGD and MAML++ on Omniglot's Conv4-64, from 23 s to 325 s), ...
COMPILE_COST_STEPS = 500

#: ... and at least this many seconds (a small MLP's compile: 10-20 s).
COMPILE_FLOOR_S = 20.0

#: Compiling is tried when the run is expected to last this many times the compile's estimated cost, so that a
#: compiled strategy that then loses (or fails its check) costs the run about a tenth at most.
COMPILE_PAYBACK = 10

_EAGER = ("loop", "vmap")


@dataclass(frozen=True)
class StrategyChoice:
    """What the probe chose, from which figures.

    Attributes:
        strategy: the strategy the run trains with.
        seconds: fastest time of one meta-gradient under each strategy measured.
        compile_s: seconds of the compiled strategy's first call (compiling and checking), where it was tried.
        skipped: strategies not measured or not usable, with the reason.
    """

    strategy: str
    seconds: dict[str, float]
    compile_s: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line, e.g. ``strategy auto chose vmap: loop 212.0 ms, vmap 104.3 ms per meta-gradient``."""
        times = ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in self.seconds.items())
        compiled = "" if self.compile_s is None else f" (compiling {self.compile_s:.0f} s)"
        skipped = "".join(f"; {name} not used: {why}" for name, why in self.skipped.items())
        return f"strategy auto chose {self.strategy}: {times} per meta-gradient{compiled}{skipped}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe_strategy(learner: MetaLearner, estimator: Estimator, problems: Any, iteration: int,
                   expected_s: Callable[[float], float], agree: Callable[[Any], Any] = lambda value: value,
                   ) -> StrategyChoice:
    """Time ``estimator.estimate(learner, problems, iteration)`` under each strategy and set the fastest.

    Args:
        learner: a meta-learner whose tasks may be batched (``learner.loop_only`` is ``None``).
        estimator: the run's estimator; its state is restored afterwards.
        problems: the run's training problems.
        iteration: the problem batch to time (the run's next one).
        expected_s: the run's expected training seconds, given the seconds of one meta-gradient.
        agree: maps this process's value to the one every process uses (rank 0's, in a distributed
            run, where every rank probes in step because the estimator communicates).

    Returns:
        The choice; ``learner.strategy`` is set to it.
    """
    if learner.loop_only is not None:
        raise ValueError(f"this learner runs its tasks one after another ({learner.loop_only}); there is no "
                         "strategy to probe")
    before = _Snapshot(learner, estimator)
    seconds: dict[str, float] = {}
    skipped: dict[str, str] = {}
    compile_s = None
    try:
        for name in _EAGER:
            seconds[name] = _time(learner, estimator, problems, iteration, name, before)[1]
        expected, cost = agree((expected_s(min(seconds.values())), estimated_compile_s(seconds["vmap"])))
        if expected < COMPILE_PAYBACK * cost:
            skipped["compiled"] = (f"the run is expected to last {expected:.0f} s, too short to repay compiling "
                                   f"(estimated {cost:.0f} s; tried from {COMPILE_PAYBACK}x that)")
        else:
            compile_s, timed, fallback = _time_compiled(learner, estimator, problems, iteration, before)
            fallback = agree(fallback)
            if fallback is not None:
                skipped["compiled"] = f"it fell back to vmap ({fallback})"
            else:
                seconds["compiled"] = timed
        choice = agree(min(seconds, key=seconds.__getitem__))
    finally:
        before.restore()
        learner.strategy = before.strategy
    learner.strategy = choice
    return StrategyChoice(choice, seconds, compile_s, skipped)


def expected_run_s(iterations: float, time_budget_min: float | None) -> Callable[[float], float]:
    """A run's expected training seconds from one meta-gradient's: ``iterations`` of them, capped by the budget.

    Example:
        >>> expected_run_s(1000, time_budget_min=1)(0.1), expected_run_s(math.inf, None)(0.1)
        (60, inf)
    """
    budget_s = math.inf if time_budget_min is None else 60 * time_budget_min
    return lambda seconds: min(seconds * iterations, budget_s)


def estimated_compile_s(vmap_seconds: float) -> float:
    """Seconds compiling a configuration whose eager ``vmap`` meta-gradient takes ``vmap_seconds`` will likely take."""
    return max(COMPILE_FLOOR_S, COMPILE_COST_STEPS * vmap_seconds)


def _time(learner: MetaLearner, estimator: Estimator, problems: Any, iteration: int, strategy: str,
          before: _Snapshot) -> tuple[float, float]:
    """Seconds of the first call and the fastest of :data:`REPEATS` more under ``strategy``."""
    learner.strategy = strategy
    times = []
    for _ in range(REPEATS + 1):
        start = time.perf_counter()
        estimator.estimate(learner, problems, iteration)
        if learner.device.type == "cuda":
            torch.cuda.synchronize(learner.device)
        times.append(time.perf_counter() - start)
        before.restore()
    return times[0], min(times[1:])


def _time_compiled(learner: MetaLearner, estimator: Estimator, problems: Any, iteration: int,
                   before: _Snapshot) -> tuple[float, float, str | None]:
    """The compiled strategy's first-call and steady seconds, and why it fell back (``None``: it did not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompileFallbackWarning)
        first, steady = _time(learner, estimator, problems, iteration, "compiled", before)
    return first, steady, learner.compile_fallback_reason


class _Snapshot:
    """The state a meta-gradient changes (gradients, buffers, estimator, random generators), to put back."""

    def __init__(self, learner: MetaLearner, estimator: Estimator) -> None:
        self.learner, self.estimator = learner, estimator
        self.strategy = learner.strategy
        self.grads = {name: None if p.grad is None else p.grad.clone() for name, p in learner.named_parameters()}
        self.buffers = {name: b.clone() for name, b in learner.named_buffers()}
        self.estimator_state = estimator.state_dict()
        self.rng = capture_rng_state()

    def restore(self) -> None:
        for name, p in self.learner.named_parameters():
            p.grad = None if self.grads[name] is None else self.grads[name].clone()
        buffers = dict(self.learner.named_buffers())
        with torch.no_grad():
            for name, value in self.buffers.items():
                buffers[name].copy_(value)
        self.estimator.load_state_dict(self.estimator_state)
        restore_rng_state(self.rng)
