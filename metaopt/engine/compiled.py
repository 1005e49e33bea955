"""The ``"compiled"`` task-batching strategy: each task's whole meta-gradient as one ``torch.compile`` graph.

``torch.compile`` cannot differentiate twice through a compiled model ("aot_autograd does not
currently support double backward"), so the compiled unit is not the model but the meta-gradient
itself: ``grad`` of the summed outer losses of the ``vmap``-ed tasks with respect to every
meta-parameter, the inner :func:`torch.func.grad` steps inside (``fullgraph=True``). The graph
holds the forward pass, the inner steps and the meta-backward at once, which lets the compiler
fuse across them. The meta-gradient comes back attached to the per-task losses
(:class:`_WithMetaGradients`), so ``losses.mean().backward()`` leaves exactly the meta-gradient
autograd would, and estimators, gradient clipping and distributed all-reduce work unchanged.

Compiling takes time once per configuration (10-30 s for MAML's sinusoid MLP or ANIL's Conv4, up
to a few minutes for a whole Conv4 on a 2-core CPU); the graphs are cached per configuration
(inner steps, step weights, order, ways; at most :data:`MAX_GRAPHS`) and, by torch's guards, per
shape. Evaluation (no gradient) runs the eager ``vmap`` path, and so do the per-step query losses
a training run logs (:meth:`metaopt.engine.meta_learner.MetaLearner.task_outputs` with
``track_steps``: an eager pass without gradients), so that logging never compiles another graph.
A new graph's first meta-gradient is checked against eager ``vmap``'s on the same batch (within
:data:`AGREEMENT`): on an Intel CPU, torch 2.14's inductor gives the second-order meta-gradient of
a whole strided Conv4 over 32 tasks 2% away from eager (8 tasks: 2e-7; float64: exact), and such
a graph is not used. Where ``torch.compile`` cannot handle a configuration (no C++ compiler, an
operator it cannot trace) or its graph fails the check, :class:`CompiledMetaGradient` warns once,
naming the reason, and runs ``vmap``, which gives the same results as the loop.

Example:
    >>> import torch
    >>> from metaopt.engine.meta_learner import MetaLearner
    >>> from metaopt.engine.rules import sgd
    >>> from metaopt.problems.episode import Episode
    >>> x = torch.randn(2, 5, 1)
    >>> batch = Episode(x, 2 * x, x, 2 * x, batched=True)
    >>> learner = MetaLearner(torch.nn.Linear(1, 1), sgd(0.1), strategy="compiled")
    >>> loss, _ = learner.meta_loss(batch)
    >>> loss.backward()
    >>> compiled = learner.model.weight.grad.clone()
    >>> learner.zero_grad()
    >>> learner.strategy = "loop"
    >>> learner.meta_loss(batch)[0].backward()
    >>> torch.allclose(compiled, learner.model.weight.grad, atol=1e-6)
    True
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from metaopt.engine.batching import map_tasks
from metaopt.engine.functional import Params

__all__ = ["AGREEMENT", "MAX_GRAPHS", "CompileFallbackWarning", "CompiledMetaGradient"]

_MODEL = "model."

#: Configurations compiled per learner before it runs ``vmap`` instead of compiling yet another.
MAX_GRAPHS = 4

#: Graphs torch keeps for the one function every learner compiles (torch's default, 8, would make the ninth learner
#: of a process, a notebook's or a test session's, fall back to vmap; each learner compiles at most MAX_GRAPHS).
RECOMPILE_LIMIT = 64

#: Largest difference from eager ``vmap``'s meta-gradient, relative to its largest entry, that a freshly compiled
#: graph may show on its first batch; beyond it the learner runs ``vmap`` (float32 rounding: about 1e-6).
AGREEMENT = 1e-3


def _relative_gap(actual: Params, expected: Params) -> float:
    """``max |a - e|`` over every entry, relative to the largest ``|e|`` (0 where everything is zero).

    Relative to the whole meta-gradient's scale, not each tensor's: a tensor whose exact gradient
    is zero (a convolution's bias before batch norm) holds rounding noise only.
    """
    pairs = [(actual[name], e) for name, e in expected.items() if e.numel()]
    gap = max((float((a - e).abs().max()) for a, e in pairs), default=0.0)
    scale = max((float(e.abs().max()) for _, e in pairs), default=0.0)
    return gap / scale if scale > 0 else (0.0 if gap == 0 else float("inf"))


class CompileFallbackWarning(UserWarning):
    """``strategy="compiled"`` could not compile a configuration and runs ``"vmap"`` instead."""


class _TaskCall(nn.Module):
    """Calls ``learner._task`` as a forward pass, so that :func:`torch.func.functional_call` can swap the
    learner's non-model meta-parameters (a rule's step sizes, an initialiser's weights)."""

    def __init__(self, learner: nn.Module) -> None:
        super().__init__()
        self.learner = learner

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return self.learner._task(*args, **kwargs)


class _WithMetaGradients(torch.autograd.Function):
    """Per-task losses whose backward is the precomputed meta-gradient of their sum, ``Σ_t g_t``.

    That is the exact backward of any loss that weights the tasks equally (their mean, their sum);
    weighting them unequally needs per-task meta-gradients, which cost a per-task weight gradient in
    every layer, so it is an error that points to ``strategy="vmap"``.
    """

    @staticmethod
    def forward(ctx: Any, losses: torch.Tensor, count: int, *grads_and_params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*grads_and_params[:count])
        return losses.detach().clone()

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if upstream.numel() > 1 and not bool((upstream == upstream[0]).all()):
            raise RuntimeError("strategy='compiled' computes the meta-gradient of the tasks' mean (or sum) loss, but "
                               "this backward weights the tasks unequally; use strategy='vmap' (or 'loop') for a "
                               "weighted sum of per-task losses")
        weight = upstream.reshape(-1)[0]
        grads = [weight * g for g in ctx.saved_tensors]
        return (None, None, *(None for _ in grads), *grads)


class CompiledMetaGradient:
    """Per-task losses of a meta-batch, carrying meta-gradients computed by one compiled graph.

    Owned by a :class:`metaopt.engine.meta_learner.MetaLearner` with ``strategy="compiled"``.
    """

    def __init__(self, learner: nn.Module) -> None:
        self._call = _TaskCall(learner)
        self._learner = learner
        self._graphs: dict[Hashable, Callable[..., Any]] = {}
        self.fallback_reason: str | None = None

    def task_outputs(self, steps: int, weights: list[float], ways: int | None,
                     tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(losses, accuracy)`` per task, or ``None`` where this configuration fell back to vmap."""
        if self.fallback_reason is not None:
            return None
        trainable = {name: p for name, p in self._learner.named_parameters() if p.requires_grad}
        key = (steps, tuple(weights), ways, self._learner.first_order)
        graph = self._graphs.get(key)
        if graph is None and len(self._graphs) >= MAX_GRAPHS:
            self._fall_back(f"{len(self._graphs)} configurations (inner steps, step weights, order, ways) are "
                            "compiled already and this is another: the configuration keeps changing (as "
                            "MAML++'s annealed step weights do), and every change would compile again")
            return None
        new = graph is None
        if new:
            graph = self._graphs[key] = torch.compile(functools.partial(self._meta_gradients, steps, weights, ways),
                                                      fullgraph=True, dynamic=False)
        # detached inputs: the graph is the whole meta-gradient, so nothing differentiates through it
        inputs = ({n: p.detach() for n, p in trainable.items()}, *(t.detach() for t in tensors))
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                grads, (losses, _, accuracy) = graph(*inputs)
        except Exception as error:  # noqa: BLE001 - any failure inside torch.compile means: run eagerly
            message = str(error).strip()
            self._fall_back(f"{type(error).__name__}: {message.splitlines()[0] if message else ''}")
            return None
        if new:
            gap = _relative_gap(grads, self._meta_gradients(steps, weights, ways, *inputs)[0])
            if gap > AGREEMENT:
                self._fall_back(f"its meta-gradient differs from eager vmap's on the first batch by {gap:.1e} of its "
                                f"largest entry (tolerance {AGREEMENT:g}); torch.compile generated code that "
                                "loses precision here")
                return None
        names = list(trainable)
        losses = _WithMetaGradients.apply(losses, len(names), *(grads[n] for n in names), *trainable.values())
        return losses, accuracy

    def _meta_gradients(self, steps: int, weights: list[float], ways: int | None, trainable: Params,
                        *tensors: torch.Tensor) -> tuple[Params, tuple[torch.Tensor, ...]]:
        def one_task(params: Params, *slices: torch.Tensor) -> tuple[torch.Tensor, ...]:
            model = {name[len(_MODEL):]: p for name, p in params.items() if name.startswith(_MODEL)}
            others = {f"learner.{name}": p for name, p in params.items() if not name.startswith(_MODEL)}
            return torch.func.functional_call(self._call, others, (model, steps, weights, False, ways, *slices),
                                              {"functional": True}, strict=False)

        def summed(params: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            outputs = map_tasks(lambda *slices, functional: one_task(params, *slices), tensors, "vmap")
            return outputs[0].sum(), outputs

        return torch.func.grad(summed, has_aux=True)(trainable)

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        warnings.warn(f"strategy='compiled' could not compile this meta-gradient ({reason}); running strategy='vmap' "
                      "instead, which gives the same results at eager speed. Pass strategy='vmap' to skip the "
                      "attempt, or see torch.compile's troubleshooting page (TORCHDYNAMO_VERBOSE=1) for the cause",
                      CompileFallbackWarning, stacklevel=4)
