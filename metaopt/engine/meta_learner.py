"""The few-shot meta-learner: initial parameters + update rule + inner/outer loss, as one ``nn.Module``.

Every gradient-based few-shot algorithm (MAML, ANIL, Meta-SGD, MT-net, ARML, ...) is a
:class:`MetaLearner` that says which parts it plugs in: the update rule, the parameters the inner
loop adapts, an optional per-task initialiser (:mod:`metaopt.engine.initialisers`) and the
batch-norm policy. Its ``parameters()`` are the meta-parameters φ: the model's initial weights,
the rule's and the initialiser's own parameters. Each task of a meta-batch is an
:class:`metaopt.problems.episode.EpisodeTask` unrolled by :class:`metaopt.engine.inner.InnerLoop`
(or, for a :class:`metaopt.engine.higher_driver.HigherRule`, by ``higher``), and the tasks are
batched by :mod:`metaopt.engine.batching`.

Mistakes are caught where they are made, with a message that names the value and the fix: when
the learner is built (a model without trainable parameters, ``adapt`` naming no parameter,
non-finite ``step_weights``), and at every :meth:`MetaLearner.meta_loss` or
:meth:`MetaLearner.adapt` before any inner step (an episode of another dtype than the model's;
in the first forward pass, a classifier with more or fewer outputs than the episode's ways,
:mod:`metaopt.problems.episode_task`). None costs more per inner step than a shape comparison.

Example:
    >>> import torch
    >>> from metaopt.engine.rules import sgd
    >>> from metaopt.problems.episode import Episode
    >>> learner = MetaLearner(torch.nn.Linear(4, 3), sgd(0.5), inner_steps=1)
    >>> ep = Episode(torch.randn(6, 4), torch.arange(3).repeat(2), torch.randn(9, 4), torch.arange(3).repeat(3))
    >>> loss, metrics = learner.meta_loss(Episode.stack([ep, ep]))
    >>> sorted(metrics)
    ['accuracy', 'loss']

    Adam as the inner optimizer, with a meta-learned learning rate:

    >>> from metaopt.engine.higher_driver import HigherRule
    >>> rule = HigherRule(lambda params: torch.optim.Adam(params, lr=0.01), override={"lr": 0.01})
    >>> learner = MetaLearner(torch.nn.Linear(4, 3), rule)
    >>> loss, metrics = learner.meta_loss(Episode.stack([ep, ep]))
    >>> loss.backward()
    >>> learner.rule.override.lr.grad is not None
    True
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metaopt.engine.batching import map_tasks, resolve_strategy
from metaopt.engine.batchnorm import BatchNormPolicy, batchnorm_policy
from metaopt.engine.compiled import CompiledMetaGradient
from metaopt.engine.functional import Params, model_call, named_params
from metaopt.engine.higher_driver import HigherLoop, HigherRule
from metaopt.engine.initialisers import Initialiser
from metaopt.engine.inner import InnerLoop, resolve_weights
from metaopt.engine.learner import Evaluation, Learner
from metaopt.engine.rules import UpdateRule
from metaopt.problems.episode import Episode
from metaopt.problems.episode_task import EpisodeTask, LossFn, default_loss

__all__ = ["AdaptedModel", "MetaLearner", "TaskOutputs", "adapted_parameter_names", "check_model",
           "head_parameter_names"]


def check_model(model: nn.Module) -> nn.Module:
    """``model``, checked to have trainable parameters (what a meta-learner adapts and meta-learns).

    Algorithms call it first, before they build rules from the model's parameters.

    Raises:
        ValueError: the model has no parameters, or none with ``requires_grad=True``.

    Example:
        >>> check_model(torch.nn.ReLU())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: the model (ReLU) has no trainable parameters; ... (e.g. metaopt.models.MLP or Conv4)
    """
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        frozen = f" (its {len(params)} parameters all have requires_grad=False)" if params else ""
        fix = ", or unfreeze them: model.requires_grad_(True)" if params else " (e.g. metaopt.models.MLP or Conv4)"
        raise ValueError(f"the model ({type(model).__name__}) has no trainable parameters{frozen}; a meta-learner "
                         f"adapts the model's parameters and meta-learns their initial values: give it a model with "
                         f"parameters{fix}")
    return model


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _check_inputs(model: nn.Module, x: torch.Tensor) -> None:
    """The episode's inputs are of the model's dtype (else torch fails in the first layer, naming neither)."""
    dtype = _floating_dtype(model)
    if dtype is not None and x.dtype != dtype:
        convert = {torch.float64: ".double()", torch.float32: ".float()", torch.float16: ".half()",
                   torch.bfloat16: ".bfloat16()"}
        raise ValueError(f"the episode's inputs are {x.dtype} but the model's parameters are {dtype}; convert the "
                         f"learner to the episode's dtype (learner{convert.get(x.dtype, f'.to({x.dtype})')}, which "
                         f"converts the model and the rule) or the episode's inputs to the model's (support_x"
                         f"{convert.get(dtype, f'.to({dtype})')} and query_x{convert.get(dtype, f'.to({dtype})')})")


def _check_step_weights(weights: Sequence[float]) -> list[float]:
    values = list(weights)
    bad = [w for w in values if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"step_weights must be finite numbers, got {values} ({bad[0]!r} is not); give one finite "
                         "weight per inner step, e.g. [0.0, 0.0, 1.0] for the last of three steps only")
    return [float(w) for w in values]


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
        adapt: ``"all"``, ``"head"`` (ANIL: :func:`head_parameter_names`) or parameter names (a list,
            or one comma-separated string).
    """
    names = [n for n, _ in model.named_parameters()]
    if adapt == "all":
        return None
    if adapt == "head":
        return head_parameter_names(model)
    given = adapt
    if isinstance(adapt, str):
        adapt = [name.strip() for name in adapt.split(",") if name.strip()]
    if not adapt:
        raise ValueError(f"adapt={given!r} names no parameters, so the inner loop would adapt nothing; pass 'all', "
                         f"'head' (ANIL) or names of the model's parameters {names}")
    unknown = sorted(set(adapt) - set(names))
    if unknown:
        raise ValueError(f"adapt names unknown parameters {unknown}; the model has {names}")
    return list(adapt)


@dataclass(frozen=True)
class TaskOutputs:
    """Per-task results of a meta-batch (leading dimension ``T``).

    Attributes:
        losses: weighted outer loss Σ_t w_t L_out(θ_t) of each task (differentiable).
        step_losses: query loss after each inner step ``0..K`` (``[T, K + 1]``, detached), or
            ``None`` when not tracked.
        accuracy: query accuracy after the last step (classification), else ``None``.
    """

    losses: torch.Tensor
    step_losses: torch.Tensor | None
    accuracy: torch.Tensor | None


class AdaptedModel(nn.Module):
    """A model together with task-adapted parameters; call it like the model.

    Returned by :meth:`MetaLearner.adapt`. It runs ``model`` functionally on the adapted
    parameters under a batch-norm policy and never modifies ``model``.
    """

    def __init__(self, model: nn.Module, params: Params, bn_policy: BatchNormPolicy) -> None:
        super().__init__()
        self._model = (model,)  # a tuple: not registered as a submodule, so no second copy in state_dict
        self.params = params
        self.bn_policy = bn_policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model[0]
        with self.bn_policy.meta_batch(model, training=False):
            return model_call(model, self.params, x)


def _check_steps(steps: int) -> int:
    if steps < 1:
        raise ValueError(f"the inner loop needs at least one step, got steps={steps}")
    return steps


class MetaLearner(Learner):
    """Learn θ_0 (and the rule's and initialiser's meta-parameters) so that a few inner steps solve a new task.

    Args:
        model: the network whose initial parameters are meta-learned.
        rule: the inner update rule (:mod:`metaopt.engine.rules`), or a
            :class:`metaopt.engine.higher_driver.HigherRule` to run any ``torch.optim`` optimizer
            through ``higher``.
        inner_steps: inner steps during meta-training.
        eval_inner_steps: inner steps at evaluation (default: ``inner_steps``).
        first_order: drop second-order terms of the meta-gradient.
        adapt: which parameters the inner loop updates: ``"all"``, ``"head"`` (ANIL) or parameter
            names (a list or a comma-separated string).
        strategy: task batching, ``"auto"`` | ``"loop"`` | ``"vmap"`` (:mod:`metaopt.engine.batching`) |
            ``"compiled"`` (the meta-gradient as one ``torch.compile`` graph, :mod:`metaopt.engine.compiled`).
        bn_policy: batch-norm policy, ``"batch"`` (MAML's), ``"frozen"``, ``"running"`` or
            ``"support"`` (:mod:`metaopt.engine.batchnorm`).
        loss_fn: inner and outer loss; default cross-entropy for labels, MSE for regression.
        step_weights: outer-loss weights of the query loss after steps 1..K (default: last only).
        initialiser: per-task initial parameters θ_0(φ, task) (default: θ_0 = φ for every task).
        checkpoint_steps: recompute each second-order inner step during the meta-backward instead
            of storing its activations, so memory no longer grows with the inner steps (same
            meta-gradients, see :mod:`metaopt.engine.recompute`); torch.func rules only.

    Tasks must run one after another (``strategy="auto"`` is then ``"loop"``, ``"vmap"`` and
    ``"compiled"`` errors) with a batch-norm policy that writes shared statistics, with ``checkpoint_steps``, and
    with the ``higher`` driver.
    """

    def __init__(self, model: nn.Module, rule: UpdateRule | HigherRule, inner_steps: int = 1,
                 eval_inner_steps: int | None = None, first_order: bool = False, adapt: str | Sequence[str] = "all",
                 strategy: str = "auto", bn_policy: BatchNormPolicy | str = "batch", loss_fn: LossFn = default_loss,
                 step_weights: Sequence[float] | None = None, initialiser: Initialiser | None = None,
                 checkpoint_steps: bool = False) -> None:
        super().__init__()
        self.inner_steps = _check_steps(inner_steps)
        self.eval_steps = _check_steps(inner_steps if eval_inner_steps is None else eval_inner_steps)
        self.step_weights = step_weights
        self.model = check_model(model)
        self.rule = rule
        self.initialiser = initialiser
        self.loss_fn = loss_fn
        self.bn_policy = batchnorm_policy(bn_policy)
        adapted = adapted_parameter_names(model, adapt)
        if isinstance(rule, HigherRule):
            if checkpoint_steps:
                raise ValueError("checkpoint_steps recomputes torch.func inner steps; the higher driver cannot")
            self.inner: InnerLoop | HigherLoop = HigherLoop(model, rule, adapted, first_order)
        else:
            self.inner = InnerLoop(rule, adapted, first_order, checkpoint_steps, model)
        reasons = [(self.bn_policy.shares_statistics, f"batch-norm policy {self.bn_policy.name!r} writes statistics "
                                                      "shared by the tasks"),
                   (checkpoint_steps, "checkpoint_steps relies on saved-tensor hooks, which torch.func transforms "
                                      "do not support"),
                   (isinstance(rule, HigherRule), "the higher driver runs tasks one after another")]
        #: why the tasks must run one after another (``None``: they may be batched)
        self.loop_only: str | None = next((why for applies, why in reasons if applies), None)
        self.strategy = strategy
        resolve_strategy(strategy, torch.device("cpu"), self.loop_only)
        self._compiled = CompiledMetaGradient(self)

    @property
    def compile_fallback_reason(self) -> str | None:
        """Why ``strategy="compiled"`` runs ``vmap`` instead (``None``: it compiles, or has not been tried)."""
        return self._compiled.fallback_reason

    @property
    def step_weights(self) -> list[float] | None:
        """Outer-loss weights of the query loss after steps 1..K (``None``: the last step only); checked when set."""
        return self._step_weights

    @step_weights.setter
    def step_weights(self, weights: Sequence[float] | None) -> None:
        self._step_weights = None if weights is None else resolve_weights(self.inner_steps,
                                                                          _check_step_weights(weights))

    @property
    def first_order(self) -> bool:
        return self.inner.first_order

    @first_order.setter
    def first_order(self, value: bool) -> None:
        self.inner.first_order = value

    def meta_loss(self, batch: Episode, track_steps: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean outer loss over the tasks of ``batch`` and its metrics.

        Args:
            batch: a batched :class:`Episode` (a single task is treated as a batch of one).
            track_steps: add the query loss after every inner step to the metrics.

        Returns:
            The differentiable meta-loss and a dict of floats: ``loss``, ``accuracy`` (for
            classification) and ``query_loss_step{t}`` when tracked.
        """
        outputs = self.task_outputs(batch, track_steps=track_steps)
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
        """Per-task outer losses and accuracies (:class:`TaskOutputs`).

        The outer loss uses ``step_weights`` when ``steps`` equals ``inner_steps``, else (and
        with ``final_step_only``, as in evaluation) the query loss after the last step.
        """
        if not batch.is_batched:
            batch = Episode.stack([batch])
        steps = _check_steps(self.inner_steps if steps is None else steps)
        _check_inputs(self.model, batch.support_x)
        weights = resolve_weights(steps, self.step_weights if steps == self.inner_steps and not final_step_only
                                  else None)
        strategy = resolve_strategy(self.strategy, batch.support_x.device, self.loop_only)

        def eager(track: bool, batching: str) -> tuple[torch.Tensor, ...]:
            task = functools.partial(self._task, named_params(self.model), steps, weights, track, batch.ways)
            return map_tasks(task, batch.tensors(), batching)

        with self.bn_policy.meta_batch(self.model, training=self.training and torch.is_grad_enabled()):
            compiled = None
            if strategy == "compiled" and torch.is_grad_enabled():
                compiled = self._compiled.task_outputs(steps, weights, batch.ways, batch.tensors())
            if compiled is None:
                losses, step_losses, accuracy = eager(track_steps, "vmap" if strategy == "compiled" else strategy)
            else:
                (losses, accuracy), step_losses = compiled, None
                if track_steps:  # eagerly and without gradients: tracking them in the graph would compile another
                    with torch.no_grad():
                        step_losses = eager(True, "vmap")[1]
        return TaskOutputs(losses, step_losses if track_steps else None,
                           None if batch.query_y.is_floating_point() else accuracy)

    def _initial(self, params: Params, task: EpisodeTask) -> tuple[Params, torch.Tensor | None]:
        return (params, None) if self.initialiser is None else self.initialiser(params, task)

    def _task(self, params: Params, steps: int, weights: list[float], track: bool, ways: int | None,
              support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor,
              functional: bool) -> tuple[torch.Tensor, ...]:
        """One task's outer loss, per-step query losses and accuracy (tensors, so that tasks batch under vmap)."""
        task = EpisodeTask(self.model, self.loss_fn, support_x, support_y, query_x, query_y, ways)
        with self.bn_policy.task(self.model):
            params, extra = self._initial(params, task)
            trajectory = self.inner.unroll(task, params, steps, functional=functional)
            score = self.inner.score(task, trajectory, weights, track)
        loss = score.loss if extra is None else score.loss + extra
        return loss, score.step_losses, loss.new_zeros(()) if score.accuracy is None else score.accuracy

    def adapt(self, episode: Episode, steps: int | None = None) -> AdaptedModel:
        """Adapt to one task's support set; the returned predictor leaves this learner unchanged.

        Only the support set is read (:meth:`adapt_to` takes it alone). Under
        :func:`torch.no_grad` the adapted parameters are detached (evaluation); otherwise they
        stay differentiable with respect to the meta-parameters.
        """
        if episode.is_batched:
            raise ValueError("adapt takes a single-task episode; index the batch (batch[i]) or use meta_loss")
        return self._adapt(episode.support_x, episode.support_y, episode.ways, steps)

    def adapt_to(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int | None = None,
                 ways: int | None = None) -> AdaptedModel:
        """Adapt to a support set alone (no query set needed): the predictor :meth:`adapt` returns for it.

        Args:
            support_x: the support inputs of one task, ``[N, ...]``.
            support_y: their labels (``torch.long``) or regression targets.
            steps: inner steps (default: the evaluation's).
            ways: the task's classes (default: inferred from the labels, as :class:`Episode` does).

        Raises:
            metaopt.problems.episode.EpisodeError: the support set is inconsistent (checked as an episode's).

        Example:
            >>> from metaopt.engine.rules import sgd
            >>> learner = MetaLearner(torch.nn.Linear(4, 3), sgd(0.5))
            >>> x, y = torch.randn(6, 4), torch.arange(3).repeat(2)
            >>> learner.adapt_to(x, y, steps=2)(torch.randn(5, 4)).shape
            torch.Size([5, 3])
        """
        checked = Episode(support_x, support_y, support_x[:1], support_y[:1], ways=ways)  # runs the episode's checks
        return self._adapt(support_x, support_y, checked.ways, steps)

    def _adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, ways: int | None,
               steps: int | None) -> AdaptedModel:
        steps = _check_steps(self.eval_steps if steps is None else steps)
        _check_inputs(self.model, support_x)
        # the inner loop reads the support set only: it stands in for the query set, which no step reads
        task = EpisodeTask(self.model, self.loss_fn, support_x, support_y, support_x, support_y, ways)
        with self.bn_policy.meta_batch(self.model, training=False), self.bn_policy.task(self.model):
            params, _ = self._initial(named_params(self.model), task)
            trajectory = self.inner.unroll(task, params, steps)
            params, policy = self.bn_policy.predictor(self.model, trajectory.params[-1])
        return AdaptedModel(self.model, params, policy)

    @torch.no_grad()
    def evaluate(self, batch: Episode, steps: int | None = None) -> Evaluation:
        """Query accuracy (classification) or loss (``"mse"`` for regression) of each task after ``steps`` steps."""
        outputs = self.task_outputs(batch, self.eval_steps if steps is None else steps, final_step_only=True)
        if outputs.accuracy is not None:
            return Evaluation("accuracy", outputs.accuracy)
        return Evaluation("mse" if self.loss_fn is default_loss else "loss", outputs.losses)

    def protocol(self) -> dict[str, Any]:
        return {"bn_policy": self.bn_policy.name}
