"""The meta-learner: initial parameters + update rule + inner/outer loss, as one ``nn.Module``.

Every gradient-based algorithm (MAML, ANIL, Meta-SGD, ...) is a :class:`MetaLearner` that says
which update rule it plugs in; the engine does the rest. Its ``parameters()`` are the
meta-parameters φ: the model's initial weights and the rule's own parameters.

Two drivers run the inner loop: ``"func"`` (:mod:`metaopt.inner`, torch.func, update rules,
vmap over tasks) and ``"higher"`` (:mod:`metaopt.higher_backend`, any ``torch.optim`` optimizer,
with meta-learned hyper-parameters passed to it as ``override``).

Example:
    >>> import torch
    >>> from metaopt.episode import Episode
    >>> from metaopt.rules import sgd
    >>> learner = MetaLearner(torch.nn.Linear(4, 3), sgd(0.5), inner_steps=1)
    >>> ep = Episode(torch.randn(6, 4), torch.arange(3).repeat(2), torch.randn(9, 4), torch.arange(3).repeat(3))
    >>> loss, metrics = learner.meta_loss(Episode.stack([ep, ep]))
    >>> sorted(metrics)
    ['accuracy', 'loss']

    Adam as the inner optimizer, with a meta-learned learning rate:

    >>> learner = MetaLearner(torch.nn.Linear(4, 3), driver="higher", override={"lr": 0.01},
    ...                       inner_optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    >>> loss, metrics = learner.meta_loss(Episode.stack([ep, ep]))
    >>> loss.backward()
    >>> learner.override.lr.grad is not None
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaopt.batchnorm import BatchNormPolicy, batchnorm_policy, episode_statistics
from metaopt.episode import Episode
from metaopt.functional import Params, model_call, named_params
from metaopt.higher_backend import HigherLoop
from metaopt.inner import InnerLoop, TaskOutputs, resolve_strategy
from metaopt.rules import OptimizerFactory, UpdateRule
from metaopt.schedules import multi_step_loss_weights

__all__ = ["DRIVERS", "AdaptedModel", "MetaLearner", "adapted_parameter_names", "head_parameter_names"]

DRIVERS = ("func", "higher")


def head_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the last submodule that owns parameters (the classifier head)."""
    owners = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not owners:
        raise ValueError("the model has no parameters")
    head = owners[-1]
    return [f"{head}.{n}" if head else n for n, _ in model.get_submodule(head).named_parameters(recurse=False)]


def adapted_parameter_names(model: nn.Module, adapt: str | Sequence[str]) -> list[str] | None:
    """The names of the parameters the inner loop updates: ``None`` for ``"all"``, else a checked list.

    Args:
        adapt: ``"all"``, ``"head"`` (ANIL: :func:`head_parameter_names`) or parameter names.
    """
    names = [n for n, _ in model.named_parameters()]
    if adapt == "all":
        return None
    if adapt == "head":
        return head_parameter_names(model)
    if isinstance(adapt, str):
        raise ValueError(f"adapt must be 'all', 'head' or a list of parameter names, got {adapt!r}")
    unknown = sorted(set(adapt) - set(names))
    if unknown:
        raise ValueError(f"adapt names unknown parameters {unknown}; the model has {names}")
    return list(adapt)


def default_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class labels, mean squared error for regression targets."""
    if target.is_floating_point():
        return F.mse_loss(prediction, target)
    return F.cross_entropy(prediction, target)


def _check_steps(steps: int) -> int:
    if steps < 1:
        raise ValueError(f"the inner loop needs at least one step, got steps={steps}")
    return steps


def _as_parameter(value: float | torch.Tensor) -> nn.Parameter:
    """``value`` as a meta-parameter: an ``nn.Parameter`` is kept, a tensor or float becomes one."""
    if isinstance(value, nn.Parameter):
        return value
    return nn.Parameter(value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value)))


class AdaptedModel(nn.Module):
    """A model together with task-adapted parameters; call it like the model.

    Returned by :meth:`MetaLearner.adapt`. It runs ``model`` functionally on the adapted
    parameters under the learner's batch-norm policy and never modifies ``model``.
    """

    def __init__(self, model: nn.Module, params: Params, bn_policy: BatchNormPolicy) -> None:
        super().__init__()
        self._model = (model,)  # a tuple: not registered as a submodule, so no second copy in state_dict
        self.params = params
        self.bn_policy = bn_policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        with batchnorm_policy(model, self.bn_policy):
            return model_call(model, self.params, x)


class MetaLearner(nn.Module):
    """Learn θ_0 (and the rule's meta-parameters) so that a few inner steps solve a new task.

    Args:
        model: the network whose initial parameters are meta-learned.
        rule: the inner update rule (see :mod:`metaopt.rules`). With ``driver="higher"`` it must
            have a ``torch.optim`` counterpart (:meth:`~metaopt.rules.UpdateRule.torch_optimizer`,
            e.g. ``sgd``); leave it out to give ``inner_optimizer`` instead.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at evaluation (default: ``inner_steps``).
        first_order: drop second-order terms of the meta-gradient.
        adapt: which parameters the inner loop updates: ``"all"``, ``"head"`` (ANIL) or a list
            of parameter names.
        strategy: task batching, ``"auto"`` | ``"loop"`` | ``"vmap"``.
        bn_policy: batch-norm policy, ``"batch"`` (MAML's), ``"frozen"``, ``"running"`` or
            ``"support"`` (Ravi & Larochelle's per-task statistics; :mod:`metaopt.batchnorm`).
            ``"running"`` and ``"support"`` write statistics shared by the tasks, so they need the
            ``"loop"`` strategy, which ``"auto"`` then is.
        loss_fn: inner and outer loss; default cross-entropy for labels, MSE for regression.
        step_weights: outer-loss weights of the query loss after steps 1..K (default: last only).
        msl_epochs: MAML++'s multi-step loss (MSL): the step weights follow
            :func:`metaopt.schedules.multi_step_loss_weights` over this many epochs, then only the
            last step counts. Evaluation always scores the last step.
        second_order_from_epoch: MAML++'s derivative-order annealing (DA): first-order
            meta-gradients before this epoch, second-order from it on (0: second-order from the
            start, as every released MAML++ config; the official flag is this minus one).
        driver: inner-loop driver, ``"func"`` (torch.func, update rules) or ``"higher"``
            (``higher.innerloop_ctx``, ``torch.optim`` optimizers; tasks run as a loop).
        inner_optimizer: ``driver="higher"`` only: builds the inner optimizer over the adapted
            parameters, e.g. ``lambda params: torch.optim.Adam(params, lr=1e-2)``.
        override: ``driver="higher"`` with ``inner_optimizer`` only: hyper-parameters of the
            inner optimizer to meta-learn, e.g. ``{"lr": 0.01}``. Each value becomes an
            ``nn.Parameter`` (a float, a 0-d one) in ``self.override``, so in ``parameters()``, and
            replaces the optimizer's own value in every parameter group.
        checkpoint_steps: ``driver="func"`` only: recompute each second-order inner step during the
            meta-backward instead of storing its activations, so memory no longer grows with the
            inner steps (same meta-gradients; each step costs two more inner forward passes and one
            more backward pass, see :mod:`metaopt.inner`). Tasks then run as a loop: ``strategy="auto"``
            means ``"loop"`` and ``"vmap"`` is an error.
    """

    def __init__(self, model: nn.Module, rule: UpdateRule | None = None, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, first_order: bool = False, adapt: str | Sequence[str] = "all",
                 strategy: str = "auto", bn_policy: BatchNormPolicy | str = BatchNormPolicy.BATCH,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = default_loss,
                 step_weights: Sequence[float] | None = None, driver: str = "func",
                 inner_optimizer: OptimizerFactory | None = None,
                 override: Mapping[str, float | torch.Tensor] | None = None, checkpoint_steps: bool = False,
                 msl_epochs: int | None = None, second_order_from_epoch: int | None = None) -> None:
        super().__init__()
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        if eval_inner_steps is not None and eval_inner_steps < 1:
            raise ValueError(f"eval_inner_steps must be >= 1, got {eval_inner_steps}")
        if step_weights is not None and len(step_weights) != inner_steps:
            raise ValueError(f"{len(step_weights)} step_weights given for inner_steps={inner_steps}; give one "
                             "weight per inner step")
        if msl_epochs is not None and (msl_epochs < 1 or step_weights is not None):
            raise ValueError(f"msl_epochs must be >= 1 and replaces step_weights (give one of them), got "
                             f"msl_epochs={msl_epochs}, step_weights={step_weights}")
        if second_order_from_epoch is not None and (second_order_from_epoch < 0 or first_order):
            raise ValueError("second_order_from_epoch (derivative-order annealing) must be >= 0 and switches to "
                             "second order, so it cannot be combined with first_order=True")
        bn_policy = BatchNormPolicy(bn_policy)
        if bn_policy in (BatchNormPolicy.RUNNING, BatchNormPolicy.SUPPORT):
            if strategy == "vmap":
                raise ValueError(f"bn_policy={bn_policy.value!r} updates the model's running statistics from every "
                                 "task, which vmap cannot do; use strategy='loop' (or 'auto')")
            strategy = "loop"
        resolve_strategy(strategy, torch.device("cpu"), checkpoint_steps)
        self.model = model
        self.rule = rule
        self.override = nn.ParameterDict({k: _as_parameter(v) for k, v in (override or {}).items()})
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps or inner_steps
        self.strategy = strategy
        self.driver = driver
        self.bn_policy = bn_policy
        self.step_weights = None if step_weights is None else list(step_weights)
        self.msl_epochs = msl_epochs
        self.second_order_from_epoch = second_order_from_epoch
        adapted = adapted_parameter_names(model, adapt)
        self.inner = self._driver(loss_fn, adapted, first_order, inner_optimizer, override, checkpoint_steps)
        if bn_policy is BatchNormPolicy.SUPPORT:
            if driver != "func":
                raise ValueError("bn_policy='support' is implemented for the func driver; use driver='func'")
            self.inner.task_context = lambda: episode_statistics(model)
        self.set_epoch(0)

    def _driver(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], adapted: list[str] | None,
                first_order: bool, inner_optimizer: OptimizerFactory | None,
                override: Mapping[str, float | torch.Tensor] | None, checkpoint_steps: bool) -> InnerLoop | HigherLoop:
        """The inner loop of ``self.driver``, after checking that the options given belong to it."""
        if self.driver == "func":
            if inner_optimizer is not None or override is not None:
                raise ValueError("inner_optimizer and override configure the higher driver; pass driver='higher'")
            if self.rule is None:
                raise ValueError("driver='func' needs an update rule, e.g. rule=metaopt.rules.sgd(0.4)")
            return InnerLoop(self.model, self.rule, loss_fn, adapted, first_order, checkpoint_steps)
        if self.driver != "higher":
            raise ValueError(f"unknown inner-loop driver {self.driver!r}; choose one of {DRIVERS}")
        if checkpoint_steps:
            raise ValueError("checkpoint_steps is implemented for the func driver only; use driver='func'")
        if self.strategy == "vmap":
            raise ValueError("driver='higher' runs tasks one after another; use strategy='loop' or 'auto'")
        if (self.rule is None) == (inner_optimizer is None):
            raise ValueError("driver='higher' takes either a rule with a torch.optim counterpart (e.g. sgd) or "
                             "inner_optimizer=..., exactly one of them")
        if self.rule is None:
            return HigherLoop(self.model, inner_optimizer, loss_fn, adapted, first_order,
                              lambda t: {k: [v] for k, v in self.override.items()})
        if override is not None:
            raise ValueError("override sets hyper-parameters of inner_optimizer; a rule's meta-parameters are its "
                             "own (e.g. sgd(lr, learnable=True))")
        make_optimizer, learned = self.rule.torch_optimizer()
        return HigherLoop(self.model, make_optimizer, loss_fn, adapted, first_order, learned)

    def set_epoch(self, epoch: int) -> None:
        """Apply the epoch schedules (MSL weights, derivative order); the trainer calls it before every meta-update."""
        if self.msl_epochs is not None:
            self.step_weights = multi_step_loss_weights(self.inner_steps, epoch, self.msl_epochs)
        if self.second_order_from_epoch is not None:
            self.first_order = epoch < self.second_order_from_epoch

    @property
    def first_order(self) -> bool:
        return self.inner.first_order

    @first_order.setter
    def first_order(self, value: bool) -> None:
        self.inner.first_order = value

    def meta_loss(self, batch: Episode, steps: int | None = None, track_steps: bool = False,
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean outer loss over the tasks of ``batch`` and its metrics.

        Args:
            batch: a batched :class:`Episode` (a single task is treated as a batch of one).
            steps: inner steps (default: ``inner_steps``).
            track_steps: add the query loss after every inner step to the metrics.

        Returns:
            The differentiable meta-loss and a dict of floats: ``loss``, ``accuracy`` (for
            classification) and ``query_loss_step{t}`` when tracked.
        """
        outputs = self.task_outputs(batch, steps, track_steps)
        loss = outputs.losses.mean()
        metrics = {"loss": loss.item()}
        if outputs.accuracy is not None:
            metrics["accuracy"] = outputs.accuracy.mean().item()
        if outputs.step_losses is not None:
            for t, value in enumerate(outputs.step_losses.mean(0).tolist()):
                metrics[f"query_loss_step{t}"] = value
        return loss, metrics

    def task_outputs(self, batch: Episode, steps: int | None = None, track_steps: bool = False,
                     final_step_only: bool = False) -> TaskOutputs:
        """Per-task outer losses and accuracies (:class:`metaopt.inner.TaskOutputs`).

        The outer loss uses ``step_weights`` when ``steps`` equals ``inner_steps``, else (and
        with ``final_step_only``, as in evaluation) the query loss after the last step.
        """
        if not batch.is_batched:
            batch = Episode.stack([batch])
        steps = _check_steps(self.inner_steps if steps is None else steps)
        weights = self.step_weights if steps == self.inner_steps and not final_step_only else None
        with batchnorm_policy(self.model, self.bn_policy, update=self.training and torch.is_grad_enabled()):
            return self.inner.run_tasks(named_params(self.model), *batch.tensors(), steps=steps, weights=weights,
                                        strategy=self.strategy, track=track_steps)

    def adapt(self, episode: Episode, steps: int | None = None) -> AdaptedModel:
        """Adapt to one task's support set; the returned predictor leaves this learner unchanged.

        Under :func:`torch.no_grad` the adapted parameters are detached (evaluation); otherwise
        they stay differentiable with respect to the meta-parameters.
        """
        if episode.is_batched:
            raise ValueError("adapt takes a single-task episode; index the batch (batch[i]) or use meta_loss")
        steps = _check_steps(self.eval_inner_steps if steps is None else steps)
        params = named_params(self.model)
        task_context = getattr(self.inner, "task_context", None)
        with batchnorm_policy(self.model, self.bn_policy), task_context() if task_context else contextlib.nullcontext():
            if getattr(self.inner, "task_init", None) is not None:
                params, _ = self.inner.task_init(params, episode.support_x, episode.support_y)
            path = self.inner.adapt(params, episode.support_x, episode.support_y, steps)
            if self.bn_policy is BatchNormPolicy.SUPPORT:  # the statistics the support set accumulated
                statistics = {name: b.clone() for name, b in self.model.named_buffers()}
                return AdaptedModel(self.model, {**path[-1], **statistics}, BatchNormPolicy.FROZEN)
        return AdaptedModel(self.model, path[-1], self.bn_policy)

    @torch.no_grad()
    def evaluate(self, batch: Episode, steps: int | None = None) -> TaskOutputs:
        """Per-task query losses and accuracies after ``eval_inner_steps`` steps, without meta-gradients."""
        return self.task_outputs(batch, self.eval_inner_steps if steps is None else steps, final_step_only=True)
