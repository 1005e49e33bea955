"""MetaLearner: what it meta-learns, what it leaves alone, its options and its three entry points."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.algorithms import MAML
from metaopt.datasets import Sinusoid
from metaopt.engine.batchnorm import batchnorm_policy
from metaopt.engine.functional import Params, model_call, named_params
from metaopt.engine.higher_driver import HigherLoop, HigherRule
from metaopt.engine.initialisers import Initialiser
from metaopt.engine.inner import InnerLoop, resolve_weights
from metaopt.engine.learner import Evaluation
from metaopt.engine.meta_learner import AdaptedModel, MetaLearner, adapted_parameter_names, head_parameter_names
from metaopt.engine.rules import UpdateRule, sgd
from metaopt.models import MLP, Conv4
from metaopt.problems.episode import Episode, EpisodeError
from metaopt.problems.episode_task import EpisodeTask
from tests.helpers import (
    assert_close_dicts,
    meta_grads,
    tiny_convnet,
    tiny_mlp,
    toy_classification_batch,
    toy_regression_batch,
)


def trained_convnet() -> nn.Module:
    """The tiny conv net with non-trivial running statistics (as after some ordinary training)."""
    model = tiny_convnet().train()
    with torch.no_grad():
        for seed in range(3):
            model(toy_classification_batch(seed=seed).support_x[0] * 2 + 1)
    return model


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=f"{k} changed")


@pytest.mark.parametrize("bn_policy", ["batch", "frozen"])
@pytest.mark.parametrize("driver", ["func", "higher"])
def test_model_is_never_mutated(driver: str, bn_policy: str) -> None:
    model = trained_convnet()
    rule = sgd(0.5)
    learner = MetaLearner(model, HigherRule(rule) if driver == "higher" else rule, inner_steps=2, bn_policy=bn_policy)
    before, batch = snapshot(model), toy_classification_batch()
    loss, _ = learner.meta_loss(batch)
    loss.backward()
    learner.adapt(batch[0])(batch.query_x[0])
    learner.evaluate(batch)
    assert_unchanged(model, before)
    assert model.training and all(m.training for m in model.modules())


def test_parameters_are_the_model_the_rule_and_the_override() -> None:
    model = nn.Linear(2, 2)
    assert [n for n, _ in MetaLearner(model, sgd(0.1, learnable=True)).named_parameters()] == [
        "model.weight", "model.bias", "rule.lr"]
    adam = MetaLearner(model, HigherRule(lambda p: torch.optim.Adam(p, lr=0.1),
                                         override={"lr": 0.1, "eps": torch.tensor(1e-3)}))
    assert [n for n, _ in adam.named_parameters()] == ["model.weight", "model.bias", "rule.override.eps",
                                                       "rule.override.lr"]
    assert adam.rule.override.lr.item() == pytest.approx(0.1) and adam.rule.override.lr.requires_grad
    shared = nn.Parameter(torch.tensor(0.2))
    assert MetaLearner(model, HigherRule(lambda p: torch.optim.SGD(p, lr=0.2),
                                         override={"lr": shared})).rule.override.lr is shared


def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.1)


def learner(**kwargs: object) -> Callable[[], MetaLearner]:
    return lambda: MetaLearner(nn.Linear(2, 2), **kwargs)


INVALID = {
    "no inner steps": (learner(rule=sgd(0.1), inner_steps=0), "the inner loop needs at least one step, got steps=0"),
    "no eval steps": (learner(rule=sgd(0.1), eval_inner_steps=-1), "at least one step, got steps=-1"),
    "zero eval steps": (learner(rule=sgd(0.1), eval_inner_steps=0), "at least one step, got steps=0"),
    "step weights": (learner(rule=sgd(0.1), inner_steps=2, step_weights=[1.0]),
                     "1 step weights given for 2 inner steps"),
    "adapt string": (learner(rule=sgd(0.1), adapt="body"), r"adapt names unknown parameters \['body'\]"),
    "adapt names": (learner(rule=sgd(0.1), adapt=["weight", "gain"]), r"unknown parameters \['gain'\]"),
    "adapt names string": (learner(rule=sgd(0.1), adapt="weight, gain"), r"unknown parameters \['gain'\]"),
    "strategy": (learner(rule=sgd(0.1), strategy="pmap"), "unknown task-batching strategy 'pmap'"),
    "bn policy": (learner(rule=sgd(0.1), bn_policy="transductive"),
                  r"unknown batch-norm policy 'transductive'; choose one of \('batch', "),
    "running bn under vmap": (learner(rule=sgd(0.1), bn_policy="running", strategy="vmap"),
                              "strategy='vmap' is not available: batch-norm policy 'running' writes statistics "
                              "shared by the tasks"),
    "support bn under vmap": (learner(rule=sgd(0.1), bn_policy="support", strategy="vmap"),
                              "batch-norm policy 'support' writes statistics shared by the tasks"),
    "higher with vmap": (learner(rule=HigherRule(sgd(0.1)), strategy="vmap"), "one after another"),
    "higher rule override": (lambda: HigherRule(sgd(0.1), override={"lr": 0.1}),
                             "a rule's meta-parameters are its own"),
    "override name": (learner(rule=HigherRule(adam, override={"learning_rate": 0.1})),
                      r"override names \['learning_rate'\], which Adam does not have; its hyper-parameters are"),
    "checkpoint with vmap": (learner(rule=sgd(0.1), strategy="vmap", checkpoint_steps=True),
                             "strategy='vmap' is not available: checkpoint_steps relies on saved-tensor hooks"),
    "checkpoint with higher": (learner(rule=HigherRule(sgd(0.1)), checkpoint_steps=True),
                               "checkpoint_steps recomputes torch.func inner steps; the higher driver cannot"),
}


@pytest.mark.parametrize("build, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_options_raise_clear_errors(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_rule_without_torch_optimizer_cannot_drive_higher() -> None:
    class Halve(UpdateRule):
        def step(self, params: dict, grads: dict, state: tuple, info: object) -> tuple[dict, tuple]:
            return {k: v / 2 for k, v in params.items()}, state

    with pytest.raises(NotImplementedError, match="Halve has no torch.optim counterpart"):
        MetaLearner(nn.Linear(2, 2), HigherRule(Halve()))


def test_driver_choice() -> None:
    assert isinstance(MetaLearner(nn.Linear(2, 2), sgd(0.1)).inner, InnerLoop)
    learner = MetaLearner(nn.Linear(2, 2), HigherRule(sgd(0.1)), first_order=True)
    assert isinstance(learner.inner, HigherLoop) and learner.inner.first_order
    learner.first_order = False
    assert not learner.inner.first_order and not learner.first_order


def test_adapted_parameters() -> None:
    model = tiny_convnet()
    assert adapted_parameter_names(model, "all") is None
    assert adapted_parameter_names(model, "head") == head_parameter_names(model) == ["3.weight", "3.bias"]
    assert adapted_parameter_names(model, ["3.bias", "0.0.weight"]) == ["3.bias", "0.0.weight"]
    assert adapted_parameter_names(model, " 3.bias, 0.0.weight ,") == ["3.bias", "0.0.weight"]  # a config string
    by_string = MetaLearner(model, sgd(0.1), adapt="3.weight,3.bias").inner.adapted
    assert by_string == MetaLearner(model, sgd(0.1), adapt="head").inner.adapted == ("3.weight", "3.bias")


def test_meta_loss_metrics_and_single_tasks() -> None:
    learner = MetaLearner(tiny_convnet(), sgd(0.5), inner_steps=2)
    batch = toy_classification_batch()
    loss, metrics = learner.meta_loss(batch, track_steps=True)
    assert sorted(metrics) == ["accuracy", "loss", "query_loss_step0", "query_loss_step1", "query_loss_step2"]
    assert metrics["loss"] == pytest.approx(loss.item()) == pytest.approx(metrics["query_loss_step2"])
    single, _ = learner.meta_loss(batch[1])
    torch.testing.assert_close(single, learner.task_outputs(batch).losses[1])
    _, regression = MetaLearner(MLP(1, 1, hidden=(8,)).double(), sgd(0.1)).meta_loss(toy_regression_batch())
    assert sorted(regression) == ["loss"]


def test_regression_has_no_accuracy_and_untracked_has_no_step_losses() -> None:
    out = MetaLearner(tiny_mlp(), sgd(0.1)).task_outputs(toy_regression_batch())
    assert out.accuracy is None and out.step_losses is None and out.losses.shape == (3,)
    tracked = MetaLearner(tiny_convnet(), sgd(0.1), inner_steps=2).task_outputs(toy_classification_batch(),
                                                                              track_steps=True)
    assert tracked.accuracy.shape == (3,) and tracked.step_losses.shape == (3, 3)


def test_step_weights_apply_at_the_training_steps_only() -> None:
    learner = MetaLearner(tiny_convnet(), sgd(0.5), inner_steps=2, step_weights=[0.5, 0.5])
    batch = toy_classification_batch()
    out = learner.task_outputs(batch, track_steps=True)
    torch.testing.assert_close(out.losses, out.step_losses[:, 1:].mean(1))
    final = learner.task_outputs(batch, final_step_only=True, track_steps=True)
    torch.testing.assert_close(final.losses, final.step_losses[:, 2])
    three = learner.task_outputs(batch, steps=3, track_steps=True)
    torch.testing.assert_close(three.losses, three.step_losses[:, 3])


def test_evaluate_uses_eval_steps_without_a_graph() -> None:
    learner = MetaLearner(tiny_convnet(), sgd(0.5), inner_steps=1, eval_inner_steps=3)
    batch = toy_classification_batch()
    assert learner.eval_steps == 3
    out = learner.evaluate(batch)
    assert isinstance(out, Evaluation) and out.metric == "accuracy" and not out.values.requires_grad
    torch.testing.assert_close(out.values, learner.task_outputs(batch, steps=3).accuracy)
    torch.testing.assert_close(learner.evaluate(batch, steps=1).values, learner.task_outputs(batch).accuracy)
    # the same for the losses: regression tasks are scored by their query loss after the steps
    regression, tasks = MetaLearner(tiny_mlp(), sgd(0.1), inner_steps=1, eval_inner_steps=3), toy_regression_batch()
    out = regression.evaluate(tasks)
    assert out.metric == "mse" and not out.values.requires_grad
    torch.testing.assert_close(out.values, regression.task_outputs(tasks, steps=3).losses.detach())
    torch.testing.assert_close(regression.evaluate(tasks, steps=1).values,
                               regression.task_outputs(tasks).losses.detach())
    assert not torch.allclose(out.values, regression.evaluate(tasks, steps=1).values)
    assert MetaLearner(tiny_mlp(), sgd(0.1), loss_fn=F.l1_loss).evaluate(tasks).metric == "loss"  # not the mse


def test_adapt_returns_a_predictor_on_the_adapted_params() -> None:
    model = tiny_convnet()
    learner = MetaLearner(model, sgd(0.5), inner_steps=1, eval_inner_steps=2)
    task = toy_classification_batch()[0]
    adapted = learner.adapt(task)
    assert isinstance(adapted, AdaptedModel) and list(adapted.state_dict()) == []
    problem = EpisodeTask(model, learner.loss_fn, *task.tensors())
    expected = learner.inner.unroll(problem, dict(model.named_parameters()), 2).params[-1]
    torch.testing.assert_close(adapted.params["3.weight"], expected["3.weight"])
    with batchnorm_policy("batch").meta_batch(model, training=False):
        torch.testing.assert_close(adapted(task.query_x), model_call(model, adapted.params, task.query_x))
    assert adapted(task.query_x).requires_grad  # differentiable w.r.t. the meta-parameters
    support_loss = F.cross_entropy(adapted(task.support_x), task.support_y)
    assert support_loss < F.cross_entropy(model(task.support_x), task.support_y)
    with torch.no_grad():
        assert not learner.adapt(task).params["3.weight"].requires_grad
    with pytest.raises(ValueError, match="adapt takes a single-task episode"):
        learner.adapt(toy_classification_batch())


def test_frozen_policy_normalises_with_running_statistics() -> None:
    model = trained_convnet()
    task = toy_classification_batch()[0]
    frozen = MetaLearner(model, sgd(0.5), bn_policy="frozen").adapt(task, steps=1)
    batch = MetaLearner(model, sgd(0.5), bn_policy="batch").adapt(task, steps=1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(task.query_x), model_call(model, frozen.params, task.query_x))
        assert not torch.allclose(batch(task.query_x), model_call(model, batch.params, task.query_x))


def test_bn_policy_is_an_object_recorded_by_name() -> None:
    for name in ("batch", "frozen", "running", "support"):
        learner = MetaLearner(tiny_convnet(), sgd(0.5), bn_policy=name)
        assert learner.bn_policy == batchnorm_policy(name) and learner.protocol() == {"bn_policy": name}
    assert learner.device == torch.device("cpu")


def test_support_policy_adapts_with_the_support_statistics_and_predicts_with_them_frozen() -> None:
    model = trained_convnet()
    before, task = snapshot(model), toy_classification_batch()[0]
    learner = MetaLearner(model, sgd(0.5), bn_policy="support")
    adapted = learner.adapt(task, steps=1)
    assert adapted.bn_policy == batchnorm_policy("frozen")
    assert {"0.1.running_mean", "0.1.running_var", "1.1.running_mean"} <= adapted.params.keys()
    assert not torch.allclose(adapted.params["0.1.running_mean"], before["0.1.running_mean"])  # the support's own
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(adapted(task.query_x), model_call(model, adapted.params, task.query_x))
        model.train()
    loss, _ = learner.meta_loss(toy_classification_batch())
    loss.backward()
    assert_unchanged(model, before)


class ShiftedBias(Initialiser):
    """A task's θ_0: the output bias shifted by a learned amount times the task's mean support target, and a penalty."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(0.25, dtype=torch.float64))

    def forward(self, params: Params, task: EpisodeTask) -> tuple[Params, torch.Tensor]:
        return {**params, "2.bias": params["2.bias"] + self.shift * task.support_y.mean()}, self.shift.pow(2)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_an_initialiser_gives_each_task_its_start_and_an_extra_loss(strategy: str) -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1), inner_steps=2, initialiser=ShiftedBias(), strategy=strategy)
    assert [n for n, _ in learner.named_parameters()][-1] == "initialiser.shift"
    batch, params = toy_regression_batch(), named_params(learner.model)
    out = learner.task_outputs(batch)
    tasks = [EpisodeTask(learner.model, learner.loss_fn, *episode.tensors()) for episode in batch.unbind()]
    paths = [learner.inner.unroll(task, {**params, "2.bias": params["2.bias"] + 0.25 * task.support_y.mean()}, 2)
             for task in tasks]  # by hand, task by task
    expected = [learner.inner.score(task, path, resolve_weights(2, None), track=False).loss + 0.25 ** 2
                for task, path in zip(tasks, paths)]
    torch.testing.assert_close(out.losses, torch.stack(expected))
    (shift_grad,) = torch.autograd.grad(out.losses.mean(), learner.initialiser.shift)
    assert shift_grad.abs() > 0
    torch.testing.assert_close(learner.adapt(batch[0]).params["2.bias"], paths[0].params[-1]["2.bias"])


@pytest.mark.parametrize("bn_policy", ["batch", "frozen"])
def test_checkpointed_steps_give_the_same_meta_gradients(bn_policy: str) -> None:
    batch, results = toy_classification_batch(), []
    for checkpoint_steps in (False, True):
        model = trained_convnet()
        before = snapshot(model)
        learner = MAML(model, inner_lr=0.3, inner_steps=3, learn_inner_lr=True, bn_policy=bn_policy,
                       checkpoint_steps=checkpoint_steps)
        results.append(meta_grads(learner, batch))
        assert_unchanged(model, before)
    assert learner.inner.checkpoint_steps
    (loss, gradients), (recomputed_loss, recomputed) = results
    torch.testing.assert_close(recomputed_loss, loss)
    assert_close_dicts(recomputed, gradients)


def test_head_parameter_names() -> None:
    assert head_parameter_names(Conv4(hidden=8)) == ["5.weight", "5.bias"]
    assert head_parameter_names(MLP(1, 1, hidden=(4, 4))) == ["4.weight", "4.bias"]
    assert head_parameter_names(nn.Linear(2, 2)) == ["weight", "bias"]
    with pytest.raises(ValueError, match="the model has no parameters"):
        head_parameter_names(nn.ReLU())


def test_hand_built_regression_episode() -> None:
    x = torch.linspace(-3, 3, 12).unsqueeze(1)
    task = Episode(x[::2], torch.sin(x[::2]), x[1::2], torch.sin(x[1::2]))
    learner = MetaLearner(MLP(1, 1, hidden=(8,)), sgd(0.05))
    loss, metrics = learner.meta_loss(task)
    loss.backward()
    assert metrics.keys() == {"loss"} and learner.model[0].weight.grad is not None


def test_zero_steps_is_an_error_not_the_default() -> None:
    learner = MAML(MLP(1, 1, hidden=(4,)), inner_lr=0.01)
    batch = Sinusoid(shots=3, query=3, batch_size=2).batch(0)
    with pytest.raises(ValueError, match="at least one step"):
        learner.task_outputs(batch, steps=0)
    with pytest.raises(ValueError, match="at least one step"):
        learner.evaluate(batch, steps=0)
    with pytest.raises(ValueError, match="at least one step"):
        learner.adapt(batch[0], steps=0)



def classification_task(ways: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0) -> Episode:
    """A ``ways``-way task of 4-feature inputs, two support and three query examples per class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(torch.randn(2 * ways, 4, generator=g, dtype=dtype), labels.repeat(2),
                   torch.randn(3 * ways, 4, generator=g, dtype=dtype), labels.repeat(3))


def entry_points(learner: MetaLearner, task: Episode) -> list[Callable[[], object]]:
    """Every way into the inner loop: meta_loss, evaluate, adapt and adapt_to."""
    return [lambda: learner.meta_loss(task), lambda: learner.evaluate(Episode.stack([task])),
            lambda: learner.adapt(task), lambda: learner.adapt_to(task.support_x, task.support_y)]


def test_a_model_without_trainable_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^the model \(ReLU\) has no trainable parameters; a meta-learner adapts "
                                         r"the model's parameters and meta-learns their initial values: give it a "
                                         r"model with parameters \(e\.g\. metaopt\.models\.MLP or Conv4\)$"):
        MetaLearner(nn.ReLU(), sgd(0.1))
    with pytest.raises(ValueError, match=r"^the model \(Linear\) has no trainable parameters \(its 2 parameters all "
                                         r"have requires_grad=False\); a meta-learner adapts the model's parameters "
                                         r"and meta-learns their initial values: give it a model with parameters, or "
                                         r"unfreeze them: model.requires_grad_\(True\)$"):
        MetaLearner(nn.Linear(2, 2).requires_grad_(False), sgd(0.1))
    partly = nn.Linear(2, 2)
    partly.bias.requires_grad_(False)
    assert [n for n, _ in MetaLearner(partly, sgd(0.1)).named_parameters()] == ["model.weight", "model.bias"]


@pytest.mark.parametrize("adapt", [[], "", " , "])
def test_adapting_no_parameter_is_refused(adapt: object) -> None:
    message = (f"adapt={adapt!r} names no parameters, so the inner loop would adapt nothing; pass 'all', 'head' "
               "(ANIL) or names of the model's parameters ['weight', 'bias']")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        MetaLearner(nn.Linear(2, 2), sgd(0.1), adapt=adapt)


@pytest.mark.parametrize("weights, bad", [([0.5, float("nan")], "nan"), ([float("inf"), 1.0], "inf"),
                                          ([0.0, "1"], "'1'"), ([None, 1.0], "None")])
def test_step_weights_must_be_finite_numbers(weights: list, bad: str) -> None:
    message = (f"step_weights must be finite numbers, got {weights} ({bad} is not); give one finite weight per inner "
               "step, e.g. [0.0, 0.0, 1.0] for the last of three steps only")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        MetaLearner(nn.Linear(2, 2), sgd(0.1), inner_steps=2, step_weights=weights)
    learner = MetaLearner(nn.Linear(2, 2), sgd(0.1), inner_steps=2, step_weights=(1, 2))
    assert learner.step_weights == [1.0, 2.0]
    with pytest.raises(ValueError, match=re.escape(message)):  # checked whenever set (MAML++ sets it every epoch)
        learner.step_weights = weights
    with pytest.raises(ValueError, match="3 step weights given for 2 inner steps"):
        learner.step_weights = [0.0, 0.0, 1.0]
    learner.step_weights = None
    assert learner.step_weights is None


@pytest.mark.parametrize("driver", ["loop", "vmap", "higher"])
def test_more_or_fewer_outputs_than_the_episodes_ways_are_named(driver: str) -> None:
    rule = HigherRule(sgd(0.1)) if driver == "higher" else sgd(0.1)
    strategy = "auto" if driver == "higher" else driver
    task = classification_task(ways=3)
    for outputs in (5, 2):
        learner = MetaLearner(nn.Linear(4, outputs), rule, strategy=strategy)
        message = (f"the model outputs {outputs} class scores per example but the episode is 3-way (labels 0..2); "
                   f"build the model with 3 outputs (e.g. Conv4(num_classes=3) or MLP(in_features, 3)), or sample "
                   f"{outputs}-way episodes")
        for run in entry_points(learner, task):
            with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
                run()
    scalar = MetaLearner(nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), sgd(0.1), strategy=strategy)
    with pytest.raises(ValueError, match=re.escape("the model outputs shape (6,) for labels of shape (6,); "
                                                   "classification needs one score per class for every example, "
                                                   "shape (6, 3): give the model one output per class")):
        scalar.meta_loss(task)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_float_labels_for_a_classifier_are_named(strategy: str) -> None:
    task = classification_task(ways=3)
    floats = Episode(task.support_x, task.support_y.float(), task.query_x, task.query_y.float())
    learner = MetaLearner(nn.Linear(4, 3), sgd(0.1), strategy=strategy)
    message = ("the model predicts shape (6, 3) but the targets have shape (6,) (torch.float32): labels must be "
               "integer class ids (torch.long) for classification; float targets mean regression, one target per "
               "model output (shape (6, 3)); convert labels with .long()")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        learner.meta_loss(floats)
    with pytest.raises(ValueError, match=re.escape(message)):
        learner.adapt(floats)
    columns = Episode(task.support_x, task.support_y.float()[:, None], task.query_x, task.query_y.float()[:, None])
    with pytest.raises(ValueError, match=re.escape("the model predicts shape (6, 3) but the targets have shape (6, 1) "
                                                   "(torch.float32): labels must be integer class ids")):
        learner.meta_loss(columns)
    loss, metrics = learner.meta_loss(task)  # the same episode with its labels as they should be
    assert metrics.keys() == {"loss", "accuracy"} and torch.isfinite(loss)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_an_episode_of_another_dtype_than_the_model_is_named(strategy: str) -> None:
    single = MetaLearner(nn.Linear(4, 3), sgd(0.1), strategy=strategy)
    wide = classification_task(dtype=torch.float64)
    message = ("the episode's inputs are torch.float64 but the model's parameters are torch.float32; convert the "
               "learner to the episode's dtype (learner.double(), which converts the model and the rule) or the "
               "episode's inputs to the model's (support_x.float() and query_x.float())")
    for run in entry_points(single, wide):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            run()
    double = MetaLearner(nn.Linear(4, 3).double(), sgd(0.1), strategy=strategy)
    with pytest.raises(ValueError, match=re.escape("the episode's inputs are torch.float32 but the model's parameters "
                                                   "are torch.float64; convert the learner to the episode's dtype "
                                                   "(learner.float(), which converts the model and the rule) or the "
                                                   "episode's inputs to the model's (support_x.double() and "
                                                   "query_x.double())")):
        double.meta_loss(classification_task())
    single.double()  # the first fix
    assert torch.isfinite(single.meta_loss(wide)[0])


@pytest.mark.parametrize("bn_policy", ["batch", "frozen", "running", "support"])
def test_adapting_to_a_support_set_alone_predicts_as_adapting_to_the_episode(bn_policy: str) -> None:
    batch = toy_classification_batch()
    task = batch[0]
    learner = MetaLearner(trained_convnet(), sgd(0.5), eval_inner_steps=2, bn_policy=bn_policy)
    alone, full = learner.adapt_to(task.support_x, task.support_y), learner.adapt(task)
    assert alone.bn_policy == full.bn_policy and alone.params.keys() == full.params.keys()
    for name in full.params:
        assert torch.equal(alone.params[name], full.params[name]), name
    assert torch.equal(alone(task.query_x), full(task.query_x))
    assert torch.equal(learner.adapt_to(task.support_x, task.support_y, steps=1)(task.query_x),
                       learner.adapt(task, steps=1)(task.query_x))
    other = Episode(task.support_x, task.support_y, batch.query_x[1], batch.query_y[1])  # the query set is not read
    assert torch.equal(learner.adapt(other)(task.query_x), full(task.query_x))


def test_adapting_to_a_support_set_alone_with_an_initialiser_and_regression_targets() -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1), inner_steps=2, initialiser=ShiftedBias())
    task = toy_regression_batch()[0]
    alone, full = learner.adapt_to(task.support_x, task.support_y), learner.adapt(task)
    assert torch.equal(alone.params["2.bias"], full.params["2.bias"])
    assert torch.equal(alone(task.query_x), full(task.query_x))


def test_a_support_set_alone_is_checked_as_an_episodes() -> None:
    """The episode's checks (their messages are tests/problems/test_episode.py's), then the model's outputs."""
    learner = MetaLearner(nn.Linear(4, 4), sgd(0.1))
    task = classification_task(ways=3)
    with pytest.raises(EpisodeError, match="support_x"):
        learner.adapt_to(task.support_x, task.support_y[:5])
    with pytest.raises(EpisodeError, match="support_x contains NaN or infinite values"):
        learner.adapt_to(torch.full((6, 4), float("nan")), task.support_y)
    with pytest.raises(ValueError, match="the model outputs 4 class scores per example but the episode is 3-way"):
        learner.adapt_to(task.support_x, task.support_y)
    four = classification_task(ways=4)
    assert learner.adapt_to(four.support_x, four.support_y, ways=4)(four.query_x).shape == (12, 4)
