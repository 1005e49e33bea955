"""The unrolled inner loop and the strategies that batch it over the tasks of a meta-batch.

For one task, starting from θ_0 the loop takes K steps of an update rule on the support loss,

    θ_{t+1}, s_{t+1} = rule.step(θ_t, ∇ L_in(θ_t), s_t, t)        t = 0..K-1

and scores the outer objective Σ_t w_t · L_out(θ_t) on the query set (MAML: ``w`` = last step
only; Finn et al. 2017, Algorithm 2). Only the parameters named in ``adapted`` move; the others
are used as they are (ANIL adapts the head only). ``first_order`` treats the inner gradients
as constants; it is the only difference between MAML and first-order MAML.

Two strategies run a meta-batch of ``T`` tasks and agree to rounding error:

* ``"loop"``: one task after another with :func:`torch.autograd.grad` (fastest on CPU);
* ``"vmap"``: one batched inner loop through :func:`torch.func.vmap` and :func:`torch.func.grad`
  (few, large kernels: the GPU path).

``"auto"`` picks ``loop`` on CPU and ``vmap`` on CUDA.

Second-order memory grows with ``K``: every step keeps the activations of its inner forward and
backward pass for the meta-backward. With ``checkpoint_steps`` each step keeps only the parameters
(and rule state) it starts from and recomputes its inner loss, gradients and update when the
meta-backward reaches it (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant), so memory is
that of one step plus ``K`` copies of the adapted parameters. The meta-gradients are the same
(recomputation repeats the same operations); each step costs two more inner forward passes and
one more inner backward pass (torch recomputes the forward once when the step takes its inner
gradient, and the whole step in the meta-backward).

Example:
    >>> import torch
    >>> from metaopt.rules import sgd
    >>> model = torch.nn.Linear(1, 1)
    >>> loop = InnerLoop(model, sgd(0.1), torch.nn.functional.mse_loss)
    >>> x = torch.randn(3, 10, 1)
    >>> out = loop.run_tasks(dict(model.named_parameters()), x, 2 * x, x, 2 * x, steps=1, strategy="loop")
    >>> out.losses.shape
    torch.Size([3])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from metaopt.batchnorm import composite_batch_norm, inner_step, query_pass
from metaopt.functional import Params, grads, model_call, select
from metaopt.rules import UpdateRule

__all__ = ["STRATEGIES", "InnerLoop", "LossFn", "TaskInit", "TaskOutputs", "resolve_strategy", "resolve_weights",
           "score_path", "stack_tasks"]

STRATEGIES = ("auto", "loop", "vmap")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(θ_0, support_x, support_y) -> (θ_0 of this task, extra outer loss)``: a per-task initialisation (ARML).
TaskInit = Callable[[Params, torch.Tensor, torch.Tensor], tuple[Params, torch.Tensor]]
_GradFn = Callable[[Params, Params, torch.Tensor, torch.Tensor], tuple[Params, torch.Tensor]]  # gradients, loss


def resolve_strategy(strategy: str, device: torch.device, checkpoint_steps: bool = False) -> str:
    """Map ``"auto"`` to ``"vmap"`` on CUDA and ``"loop"`` elsewhere; check the name.

    With ``checkpoint_steps`` (recomputed inner steps, see :class:`InnerLoop`) ``"auto"`` is
    ``"loop"`` everywhere and ``"vmap"`` is an error.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown task-batching strategy {strategy!r}; choose one of {STRATEGIES}")
    if checkpoint_steps and strategy == "vmap":
        raise ValueError("checkpoint_steps needs strategy='loop' (or 'auto'): torch.func transforms (vmap, grad) "
                         "do not support the saved-tensor hooks that recomputing the inner steps relies on")
    if strategy == "auto":
        return "vmap" if device.type == "cuda" and not checkpoint_steps else "loop"
    return strategy


def resolve_weights(steps: int, weights: Sequence[float] | None) -> list[float]:
    """The outer-loss weights of steps 1..K: ``weights`` checked, or the last step only when ``None``."""
    weights = [0.0] * (steps - 1) + [1.0] if weights is None else list(weights)
    if len(weights) != steps:
        raise ValueError(f"{len(weights)} step weights given for {steps} inner steps")
    return weights


def score_path(model: nn.Module, loss_fn: LossFn, path: Sequence[Params], query_x: torch.Tensor,
               query_y: torch.Tensor, weights: Sequence[float], track: bool) -> tuple[torch.Tensor, ...]:
    """Score the parameters θ_0..θ_K of one task's inner loop on its query set.

    Returns:
        The weighted outer loss Σ_t w_t L_out(θ_t) (differentiable), the detached query losses
        after steps 0..K (empty unless ``track``) and the detached query accuracy at θ_K (zero
        for regression).
    """
    steps = len(path) - 1
    loss = query_x.new_zeros(())
    step_losses = []
    for t, theta in enumerate(path):
        w = weights[t - 1] if t > 0 else 0.0
        if not (w or track or t == steps):
            continue
        with inner_step(max(t - 1, 0)), query_pass():  # the query pass on θ_t belongs to the step that produced it
            out = model_call(model, theta, query_x)
        step_loss = loss_fn(out, query_y)
        if w:
            loss = loss + w * step_loss
        step_losses.append(step_loss.detach())
    accuracy = (out.argmax(-1) == query_y).float().mean() if not query_y.is_floating_point() else loss.new_zeros(())
    tracked = torch.stack(step_losses) if track else loss.new_zeros(0)
    return loss, tracked, accuracy.detach()


def stack_tasks(per_task: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack the per-task results of :func:`score_path` along a leading task dimension."""
    return tuple(torch.stack(parts) for parts in zip(*per_task))


class _ModuleState:
    """Re-enterable context that puts ``model`` back as it was at construction: training flags and buffers.

    A checkpointed step is recomputed during the meta-backward, usually after the batch-norm
    policy of the forward pass (:func:`metaopt.batchnorm.batchnorm_policy`) has been exited.
    Inside this context the recomputation sees the modules as the forward did (train/eval mode,
    running statistics or their absence), so it repeats the same operations and leaves the
    model's buffers alone. Torch may enter it more than once (a gradient taken inside the step
    recomputes it during the forward pass too).
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved = self._state(model)
        self._outer: list[list[tuple[nn.Module, bool, dict[str, torch.Tensor | None]]]] = []

    @staticmethod
    def _state(model: nn.Module) -> list[tuple[nn.Module, bool, dict[str, torch.Tensor | None]]]:
        return [(m, m.training, dict(m._buffers)) for m in model.modules()]

    @staticmethod
    def _apply(state: list[tuple[nn.Module, bool, dict[str, torch.Tensor | None]]]) -> None:
        for module, training, buffers in state:
            module.training = training
            module._buffers.update(buffers)

    def __enter__(self) -> None:
        self._outer.append(self._state(self._saved[0][0]))
        self._apply(self._saved)

    def __exit__(self, *exc_info: object) -> None:
        self._apply(self._outer.pop())


def _recomputed(model: nn.Module, step: Callable[..., Any], *args: Any) -> Any:
    """``step(*args)`` keeping only its inputs and outputs; the rest is recomputed in the backward pass."""
    state = _ModuleState(model)
    return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False,
                                             context_fn=lambda: (contextlib.nullcontext(), state))


@dataclass(frozen=True)
class TaskOutputs:
    """Per-task results of a batched inner loop (leading dimension ``T``).

    Attributes:
        losses: weighted outer loss Σ_t w_t L_out(θ_t) of each task (differentiable).
        step_losses: query loss after each inner step ``0..K`` (``[T, K + 1]``, detached), or
            ``None`` when not tracked.
        accuracy: query accuracy after the last step (classification), else ``None``.
    """

    losses: torch.Tensor
    step_losses: torch.Tensor | None
    accuracy: torch.Tensor | None


class InnerLoop:
    """K functional steps of ``rule`` on the support loss of ``model``, for one task or a batch.

    Args:
        model: the network; run with :func:`torch.func.functional_call`, never mutated.
        rule: the update rule (owns its meta-parameters).
        loss_fn: ``loss_fn(prediction, target) -> scalar``, used for inner and outer loss.
        adapted: names of the parameters the inner loop updates (default: all of ``params``).
        first_order: treat inner gradients as constants (first-order meta-gradients).
        checkpoint_steps: recompute each second-order inner step during the meta-backward instead
            of storing its activations (memory of one step instead of ``K``; same meta-gradients,
            more time). Needs the ``"loop"`` strategy (``"auto"`` then means ``"loop"``).
            First-order steps store no activations, so it has no effect on them. A forward pass
            that writes to the model's buffers (batch norm in training mode with running
            statistics, outside :func:`metaopt.batchnorm.batchnorm_policy`) writes again when
            recomputed.

    Attributes:
        task_init: ``None``, or a :data:`TaskInit` that turns the shared θ_0 into each task's
            starting point from its support set and adds a term to its outer loss (ARML's
            gated initialisation); it runs inside the vmapped function, so per task.
        task_context: ``None``, or a factory of a context manager that each task runs inside
            (:func:`metaopt.batchnorm.episode_statistics` for the ``"support"`` batch-norm policy).
    """

    def __init__(self, model: nn.Module, rule: UpdateRule, loss_fn: LossFn, adapted: Sequence[str] | None = None,
                 first_order: bool = False, checkpoint_steps: bool = False) -> None:
        self.model = model
        self.rule = rule
        self.loss_fn = loss_fn
        self.adapted = None if adapted is None else tuple(adapted)
        self.first_order = first_order
        self.checkpoint_steps = checkpoint_steps
        self.task_init: TaskInit | None = None
        self.task_context: Callable[[], contextlib.AbstractContextManager] | None = None

    def _split(self, params: Params) -> tuple[Params, Params]:
        fast = params if self.adapted is None else select(params, self.adapted)
        return fast, {k: v for k, v in params.items() if k not in fast}

    def adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[Params]:
        """Run ``steps`` inner steps on ``(x, y)`` for one task; the full parameters at steps 0..K.

        With gradients enabled the result is differentiable with respect to the meta-parameters
        (to second order unless ``first_order``), and each step is recomputed in the
        meta-backward if ``checkpoint_steps``. Under :func:`torch.no_grad` it is detached and
        each step's memory is freed at once (evaluation).
        """
        if torch.is_grad_enabled():
            recompute = self.checkpoint_steps and not self.first_order
            return self._unroll(params, x, y, steps, self._autograd_grads, recompute)
        return self._unroll({k: v.detach() for k, v in params.items()}, x, y, steps, self._detached_grads)

    def _unroll(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, grad_fn: _GradFn,
                recompute: bool = False) -> list[Params]:
        fast, fixed = self._split(params)
        state = self.rule.init(fast)
        path = [params]
        for t in range(steps):
            if recompute:
                fast, state = _recomputed(self.model, self._step, fast, fixed, state, t, x, y, grad_fn)
            else:
                fast, state = self._step(fast, fixed, state, t, x, y, grad_fn)
            path.append({**fixed, **fast})
        return path

    def _step(self, fast: Params, fixed: Params, state: Any, t: int, x: torch.Tensor, y: torch.Tensor,
              grad_fn: _GradFn) -> tuple[Params, Any]:
        with inner_step(t):
            gradients, loss = grad_fn(fast, fixed, x, y)
        if self.rule.needs_loss:
            return self.rule.step(fast, gradients, state, t, loss=loss.detach())
        return self.rule.step(fast, gradients, state, t)

    def _inner_loss(self, fast: Params, fixed: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(model_call(self.model, {**fixed, **fast}, x), y)

    def _autograd_grads(self, fast: Params, fixed: Params, x: torch.Tensor, y: torch.Tensor,
                        ) -> tuple[Params, torch.Tensor]:
        loss = self._inner_loss(fast, fixed, x, y)
        return grads(loss, fast, create_graph=not self.first_order), loss

    def _detached_grads(self, fast: Params, fixed: Params, x: torch.Tensor, y: torch.Tensor,
                        ) -> tuple[Params, torch.Tensor]:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in fast.items()}
            loss = self._inner_loss(leaves, fixed, x, y)
            return grads(loss, leaves, create_graph=False), loss.detach()

    def _func_grads(self, fast: Params, fixed: Params, x: torch.Tensor, y: torch.Tensor,
                    ) -> tuple[Params, torch.Tensor]:
        g, loss = torch.func.grad_and_value(lambda p: self._inner_loss(p, fixed, x, y))(fast)
        return ({k: v.detach() for k, v in g.items()} if self.first_order else g), loss

    def task_outputs(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                     query_x: torch.Tensor, query_y: torch.Tensor, steps: int, weights: Sequence[float],
                     track: bool, grad_fn: _GradFn | None = None) -> tuple[torch.Tensor, ...]:
        """Outer loss, per-step query losses and accuracy of one task (tensors, vmap-friendly)."""
        with self.task_context() if self.task_context is not None else contextlib.nullcontext():
            return self._task_outputs(params, support_x, support_y, query_x, query_y, steps, weights, track,
                                      grad_fn)

    def _task_outputs(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                      query_x: torch.Tensor, query_y: torch.Tensor, steps: int, weights: Sequence[float],
                      track: bool, grad_fn: _GradFn | None) -> tuple[torch.Tensor, ...]:
        extra = None
        if self.task_init is not None:
            params, extra = self.task_init(params, support_x, support_y)
        if grad_fn is None:
            path = self.adapt(params, support_x, support_y, steps)
        else:
            path = self._unroll(params, support_x, support_y, steps, grad_fn)
        loss, tracked, accuracy = score_path(self.model, self.loss_fn, path, query_x, query_y, weights, track)
        return (loss if extra is None else loss + extra), tracked, accuracy

    def run_tasks(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                  query_y: torch.Tensor, steps: int, weights: Sequence[float] | None = None,
                  strategy: str = "auto", track: bool = False) -> TaskOutputs:
        """The inner loop on a batch of ``T`` tasks (tensors with a leading task dimension).

        Args:
            params: initial parameters θ_0, shared by all tasks.
            steps: number of inner steps K.
            weights: outer-loss weights of the query loss after steps 1..K (default: last only).
            strategy: ``"loop"``, ``"vmap"`` or ``"auto"`` (``"vmap"`` is an error with ``checkpoint_steps``).
            track: also return the query loss after every step (for logging).
        """
        weights = resolve_weights(steps, weights)
        strategy = resolve_strategy(strategy, support_x.device, self.checkpoint_steps)
        if strategy == "loop":
            per_task = [self.task_outputs(params, *task, steps, weights, track)
                        for task in zip(support_x, support_y, query_x, query_y)]
            loss, tracked, accuracy = stack_tasks(per_task)
        else:
            def one_task(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> tuple:
                return self.task_outputs(params, sx, sy, qx, qy, steps, weights, track, self._func_grads)

            with composite_batch_norm():
                loss, tracked, accuracy = torch.func.vmap(one_task, randomness="different")(
                    support_x, support_y, query_x, query_y)
        classification = not query_y.is_floating_point()
        return TaskOutputs(loss, tracked if track else None, accuracy if classification else None)
