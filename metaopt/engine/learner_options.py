"""Option sets of the few-shot learner's engine settings, for algorithms to compose their options from.

An algorithm's options (a dataclass beside its code) inherit the sets whose settings it takes,
so that an option it does not take is refused instead of being ignored: MAML takes all three,
the Ravi & Larochelle meta-learner (always first-order) not :class:`SecondOrderOptions`, MT-net
(which adapts its layers' weights, never a chosen set) not :class:`AdaptOptions`. The names are
those of :class:`metaopt.engine.meta_learner.MetaLearner`'s arguments.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class ToyOptions(InnerLoopOptions, AdaptOptions):
    ...     '''A toy.'''
    >>> ToyOptions(inner_steps=3, adapt="head").to_dict()
    {'adapt': 'head', 'inner_steps': 3, 'eval_inner_steps': None, 'strategy': 'auto', 'bn_policy': 'batch'}
"""

from __future__ import annotations

from dataclasses import dataclass

from metaopt.engine.batching import STRATEGIES
from metaopt.engine.batchnorm import POLICIES
from metaopt.options import ConfigError, Options

__all__ = ["AdaptOptions", "InnerLoopOptions", "SecondOrderOptions"]


@dataclass(frozen=True)
class InnerLoopOptions(Options):
    """How many inner steps, how tasks are batched, and how batch norm behaves.

    Args:
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at evaluation (None: inner_steps).
        strategy: task batching: "auto" (in a run of 100 iterations or more: the fastest on the first
            batch, timed and recorded; else vmap on CUDA, loop elsewhere), "loop", "vmap" or "compiled"
            (the whole meta-gradient as one torch.compile graph; compiles once per configuration).
        bn_policy: batch-norm policy: "batch" (MAML's: statistics of the batch at hand), "frozen",
            "running" (torch's train/eval) or "support" (Ravi & Larochelle's per-task statistics).
    """

    positive = ("inner_steps", "eval_inner_steps")
    choices = {"strategy": STRATEGIES, "bn_policy": tuple(POLICIES)}
    inner_steps: int = 1
    eval_inner_steps: int | None = None
    strategy: str = "auto"
    bn_policy: str = "batch"


@dataclass(frozen=True)
class SecondOrderOptions(Options):
    """Second-order meta-gradients and their memory.

    Args:
        first_order: drop second-order terms of the meta-gradient (first-order MAML).
        checkpoint_steps: recompute each second-order inner step in the meta-backward instead of
            storing its activations (memory no longer grows with the inner steps; loop strategy).
    """

    first_order: bool = False
    checkpoint_steps: bool = False

    def check(self) -> None:
        super().check()
        if self.first_order and self.checkpoint_steps:
            raise ConfigError("option 'checkpoint_steps' recomputes second-order steps; first-order steps store "
                              "nothing to recompute, so it does nothing with first_order=True: drop one")


@dataclass(frozen=True)
class AdaptOptions(Options):
    """Which parameters the inner loop moves.

    Args:
        adapt: "all", "head" (ANIL: the classifier head only) or comma-separated parameter names.
    """

    adapt: str = "all"

    def check(self) -> None:
        super().check()
        if not self.adapt.strip():
            raise ConfigError("option 'adapt' must not be empty; use 'all', 'head' or parameter names")
