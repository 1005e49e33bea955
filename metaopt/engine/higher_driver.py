"""The inner loop driven by ``higher``: any ``torch.optim`` optimizer as the inner update rule.

:class:`HigherLoop` runs the same unrolled inner loop as :class:`metaopt.inner.InnerLoop`, but
each step is taken by ``higher``'s differentiable copy of a ``torch.optim`` optimizer (SGD, Adam,
RMSprop, ...). Hyper-parameters given as ``override`` tensors, such as a learnable learning rate,
receive meta-gradients. With SGD the meta-gradients equal those of the torch.func driver.

Three choices matter (checked against the source of higher 0.2.1):

* ``copy_initial_weights=False``: the patched model starts from the model's own weights rather
  than from detached copies, so meta-gradients reach them.
* First-order detaches the inner gradients in ``grad_callback``. ``track_higher_grads=False``
  would detach the *parameters* after every step and cut the meta-gradient entirely; it is used
  only when gradients are disabled (evaluation), where it frees each step's graph at once.
* Only the adapted parameters are handed to the optimizer; the others enter the loss but are
  never stepped (ANIL).

``higher`` cannot be batched with ``vmap``: tasks run one after another. Its differentiable
RMSprop warns that its gradients can be wrong (where a second moment is exactly zero); the
warning is passed on, not silenced.

References:
    Grefenstette et al., 2019. Generalized Inner Loop Meta-Learning.
    https://arxiv.org/abs/1910.01727

Example:
    >>> import torch
    >>> model = torch.nn.Linear(1, 1)
    >>> loop = HigherLoop(model, lambda params: torch.optim.Adam(params, lr=0.1), torch.nn.functional.mse_loss)
    >>> x = torch.randn(3, 10, 1)
    >>> out = loop.run_tasks(dict(model.named_parameters()), x, 2 * x, x, 2 * x, steps=2)
    >>> out.losses.shape
    torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Sequence

import higher
import torch
from torch import nn

from metaopt.batchnorm import inner_step
from metaopt.functional import Params
from metaopt.inner import LossFn, TaskOutputs, resolve_weights, score_path, stack_tasks
from metaopt.rules import HyperParameters, OptimizerFactory

__all__ = ["HigherLoop"]


class HigherLoop:
    """K steps of a ``torch.optim`` optimizer on the support loss, unrolled by ``higher``.

    Args:
        model: the network; ``higher`` patches a functional copy per task, ``model`` is never
            mutated.
        make_optimizer: builds the inner optimizer over the parameters to adapt, e.g.
            ``lambda params: torch.optim.Adam(params, lr=1e-2)``; any type ``higher`` supports.
        loss_fn: ``loss_fn(prediction, target) -> scalar``, used for inner and outer loss.
        adapted: names of the parameters the optimizer updates (default: all of ``params``).
        first_order: treat inner gradients as constants (first-order meta-gradients).
        override: the optimizer's hyper-parameters at inner step ``t`` as tensors,
            ``t -> {"lr": [lr]}`` (one value for every parameter group, or one per group);
            meta-gradients reach those that require grad. It is called at every step, so hold
            the tensors as parameters of a module (as :class:`metaopt.MetaLearner` does) so that
            ``.to()`` and checkpoints see them.
    """

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, loss_fn: LossFn,
                 adapted: Sequence[str] | None = None, first_order: bool = False,
                 override: HyperParameters | None = None) -> None:
        self.model = model
        self.make_optimizer = make_optimizer
        self.loss_fn = loss_fn
        self.adapted = None if adapted is None else tuple(adapted)
        self.first_order = first_order
        self.override = override or (lambda t: {})
        probe = self._optimizer([name for name, p in model.named_parameters() if p.requires_grad])
        unknown = sorted(set(self.override(0)) - set(probe.defaults))
        if unknown:
            raise ValueError(f"override names {unknown}, which {type(probe).__name__} does not have; its "
                             f"hyper-parameters are {sorted(probe.defaults)}")

    def _optimizer(self, names: Sequence[str]) -> torch.optim.Optimizer:
        keep = set(names) if self.adapted is None else set(names) & set(self.adapted)
        optimizer = self.make_optimizer([p for name, p in self.model.named_parameters() if name in keep])
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"make_optimizer must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer

    def adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[Params]:
        """Run ``steps`` optimizer steps on ``(x, y)`` for one task; the parameters at steps 0..K.

        ``params`` holds θ_0 by name (parameters of ``model`` missing from it are used as they
        are). With gradients enabled the result is differentiable with respect to θ_0 and the
        ``override`` tensors; under :func:`torch.no_grad` it is detached.
        """
        tracking = torch.is_grad_enabled()
        fast = [name for name in params if self.adapted is None or name in self.adapted]
        if not tracking:
            params = {k: v.detach().requires_grad_(k in fast) for k, v in params.items()}
        names = [name for name, _ in self.model.named_parameters()]
        position = {name: i for i, name in enumerate(names)}
        flat = [params.get(name, p) for name, p in self.model.named_parameters()]

        def checked(gradients: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
            for name in fast:
                if gradients[position[name]] is None:
                    raise ValueError(f"parameter {name!r} received no gradient from the inner loss; leave it out "
                                     "of the adapted set (adapt=...) or make the loss depend on it")
            if self.first_order:
                return [None if g is None else g.detach() for g in gradients]
            return list(gradients)

        context = higher.innerloop_ctx(self.model, self._optimizer(fast), copy_initial_weights=False,
                                       track_higher_grads=tracking)
        path = [params]
        with torch.enable_grad(), context as (fmodel, diffopt):
            for t in range(steps):
                with inner_step(t):
                    loss = self.loss_fn(fmodel(x, params=flat), y)
                flat = diffopt.step(loss, params=flat, override=self.override(t), grad_callback=checked)
                path.append({name: flat[position[name]] for name in params})
        if not tracking:
            path = [{k: v.detach() for k, v in theta.items()} for theta in path]
        return path

    def task_outputs(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                     query_x: torch.Tensor, query_y: torch.Tensor, steps: int, weights: Sequence[float],
                     track: bool) -> tuple[torch.Tensor, ...]:
        """Outer loss, per-step query losses and accuracy of one task."""
        path = self.adapt(params, support_x, support_y, steps)
        return score_path(self.model, self.loss_fn, path, query_x, query_y, weights, track)

    def run_tasks(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                  query_y: torch.Tensor, steps: int, weights: Sequence[float] | None = None,
                  strategy: str = "loop", track: bool = False) -> TaskOutputs:
        """The inner loop on a batch of ``T`` tasks, one after another.

        Same arguments and results as :meth:`metaopt.inner.InnerLoop.run_tasks`; ``strategy``
        must be ``"loop"`` or ``"auto"``.
        """
        if strategy not in ("auto", "loop"):
            raise ValueError(f"the higher driver runs tasks one after another; strategy {strategy!r} is not "
                             "available (use 'loop' or 'auto', or driver='func' for vmap)")
        weights = resolve_weights(steps, weights)
        per_task = [self.task_outputs(params, *task, steps, weights, track)
                    for task in zip(support_x, support_y, query_x, query_y)]
        loss, tracked, accuracy = stack_tasks(per_task)
        classification = not query_y.is_floating_point()
        return TaskOutputs(loss, tracked if track else None, accuracy if classification else None)
