"""MetaLearner: what it meta-learns, what it leaves alone, its options and its three entry points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.algorithms import MAML
from metaopt.batchnorm import batchnorm_policy
from metaopt.datasets import Sinusoid
from metaopt.episode import Episode
from metaopt.functional import model_call
from metaopt.higher_backend import HigherLoop
from metaopt.inner import InnerLoop
from metaopt.meta_learner import AdaptedModel, MetaLearner, head_parameter_names
from metaopt.models import MLP, Conv4
from metaopt.rules import UpdateRule, sgd
from tests.helpers import assert_close_dicts, meta_grads, tiny_convnet, toy_classification_batch, toy_regression_batch


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
    learner = MetaLearner(model, sgd(0.5).double(), inner_steps=2, driver=driver, bn_policy=bn_policy)
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
    adam = MetaLearner(model, driver="higher", inner_optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
                       override={"lr": 0.1, "eps": torch.tensor(1e-3)})
    assert [n for n, _ in adam.named_parameters()] == ["model.weight", "model.bias", "override.eps", "override.lr"]
    assert adam.override.lr.item() == pytest.approx(0.1) and adam.override.lr.requires_grad
    shared = nn.Parameter(torch.tensor(0.2))
    assert MetaLearner(model, driver="higher", inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.2),
                       override={"lr": shared}).override.lr is shared


def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.1)


INVALID = {
    "no inner steps": ({"rule": sgd(0.1), "inner_steps": 0}, "inner_steps must be >= 1, got 0"),
    "no eval steps": ({"rule": sgd(0.1), "eval_inner_steps": -1}, "eval_inner_steps must be >= 1, got -1"),
    "step weights": ({"rule": sgd(0.1), "inner_steps": 2, "step_weights": [1.0]},
                     "1 step_weights given for inner_steps=2"),
    "adapt string": ({"rule": sgd(0.1), "adapt": "body"}, "adapt must be 'all', 'head' or a list"),
    "adapt names": ({"rule": sgd(0.1), "adapt": ["weight", "gain"]}, r"unknown parameters \['gain'\]"),
    "strategy": ({"rule": sgd(0.1), "strategy": "pmap"}, "unknown task-batching strategy 'pmap'"),
    "bn policy": ({"rule": sgd(0.1), "bn_policy": "transductive"}, "'transductive' is not a valid BatchNormPolicy"),
    "running bn under vmap": ({"rule": sgd(0.1), "bn_policy": "running", "strategy": "vmap"}, "which vmap cannot do"),
    "msl with weights": ({"rule": sgd(0.1), "inner_steps": 2, "step_weights": [0.5, 0.5], "msl_epochs": 3},
                         "replaces step_weights"),
    "annealing first order": ({"rule": sgd(0.1), "first_order": True, "second_order_from_epoch": 2},
                              "cannot be combined with first_order"),
    "driver": ({"rule": sgd(0.1), "driver": "jax"}, r"unknown inner-loop driver 'jax'; choose one of \('func', "),
    "func without rule": ({}, "driver='func' needs an update rule"),
    "func with optimizer": ({"rule": sgd(0.1), "inner_optimizer": adam}, "pass driver='higher'"),
    "func with override": ({"rule": sgd(0.1), "override": {"lr": 0.1}}, "pass driver='higher'"),
    "higher with vmap": ({"rule": sgd(0.1), "driver": "higher", "strategy": "vmap"}, "one after another"),
    "higher with both": ({"rule": sgd(0.1), "driver": "higher", "inner_optimizer": adam}, "exactly one of them"),
    "higher with neither": ({"driver": "higher"}, "exactly one of them"),
    "higher rule override": ({"rule": sgd(0.1), "driver": "higher", "override": {"lr": 0.1}},
                             "a rule's meta-parameters are its own"),
    "override name": ({"driver": "higher", "inner_optimizer": adam, "override": {"learning_rate": 0.1}},
                      r"override names \['learning_rate'\], which Adam does not have; its hyper-parameters are"),
    "checkpoint with vmap": ({"rule": sgd(0.1), "strategy": "vmap", "checkpoint_steps": True},
                             "checkpoint_steps needs strategy='loop'"),
    "checkpoint with higher": ({"rule": sgd(0.1), "driver": "higher", "checkpoint_steps": True},
                               "checkpoint_steps is implemented for the func driver only"),
}


@pytest.mark.parametrize("kwargs, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_options_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetaLearner(nn.Linear(2, 2), **kwargs)


def test_rule_without_torch_optimizer_cannot_drive_higher() -> None:
    class Halve(UpdateRule):
        def step(self, params: dict, grads: dict, state: tuple, t: int) -> tuple[dict, tuple]:
            return {k: v / 2 for k, v in params.items()}, state

    with pytest.raises(NotImplementedError, match="Halve has no torch.optim counterpart"):
        MetaLearner(nn.Linear(2, 2), Halve(), driver="higher")


def test_driver_choice() -> None:
    assert isinstance(MetaLearner(nn.Linear(2, 2), sgd(0.1)).inner, InnerLoop)
    learner = MetaLearner(nn.Linear(2, 2), sgd(0.1), driver="higher", first_order=True)
    assert isinstance(learner.inner, HigherLoop) and learner.inner.first_order
    learner.first_order = False
    assert not learner.inner.first_order and not learner.first_order


def test_meta_loss_metrics_and_single_tasks() -> None:
    learner = MetaLearner(tiny_convnet(), sgd(0.5).double(), inner_steps=2)
    batch = toy_classification_batch()
    loss, metrics = learner.meta_loss(batch, track_steps=True)
    assert sorted(metrics) == ["accuracy", "loss", "query_loss_step0", "query_loss_step1", "query_loss_step2"]
    assert metrics["loss"] == pytest.approx(loss.item()) == pytest.approx(metrics["query_loss_step2"])
    single, _ = learner.meta_loss(batch[1])
    torch.testing.assert_close(single, learner.task_outputs(batch).losses[1])
    _, regression = MetaLearner(MLP(1, 1, hidden=(8,)).double(), sgd(0.1)).meta_loss(toy_regression_batch())
    assert sorted(regression) == ["loss"]


def test_step_weights_apply_at_the_training_steps_only() -> None:
    learner = MetaLearner(tiny_convnet(), sgd(0.5).double(), inner_steps=2, step_weights=[0.5, 0.5])
    batch = toy_classification_batch()
    out = learner.task_outputs(batch, track_steps=True)
    torch.testing.assert_close(out.losses, out.step_losses[:, 1:].mean(1))
    final = learner.task_outputs(batch, final_step_only=True, track_steps=True)
    torch.testing.assert_close(final.losses, final.step_losses[:, 2])
    three = learner.task_outputs(batch, steps=3, track_steps=True)
    torch.testing.assert_close(three.losses, three.step_losses[:, 3])


def test_evaluate_uses_eval_steps_without_a_graph() -> None:
    learner = MetaLearner(tiny_convnet(), sgd(0.5).double(), inner_steps=1, eval_inner_steps=3)
    batch = toy_classification_batch()
    out = learner.evaluate(batch)
    assert not out.losses.requires_grad
    torch.testing.assert_close(out.losses, learner.task_outputs(batch, steps=3).losses.detach())
    torch.testing.assert_close(learner.evaluate(batch, steps=1).losses, learner.task_outputs(batch).losses.detach())


def test_adapt_returns_a_predictor_on_the_adapted_params() -> None:
    model = tiny_convnet()
    learner = MetaLearner(model, sgd(0.5).double(), inner_steps=1, eval_inner_steps=2)
    task = toy_classification_batch()[0]
    adapted = learner.adapt(task)
    assert isinstance(adapted, AdaptedModel) and list(adapted.state_dict()) == []
    expected = learner.inner.adapt(dict(model.named_parameters()), task.support_x, task.support_y, 2)[-1]
    torch.testing.assert_close(adapted.params["3.weight"], expected["3.weight"])
    with batchnorm_policy(model, "batch"):
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
    frozen = MetaLearner(model, sgd(0.5).double(), bn_policy="frozen").adapt(task, steps=1)
    batch = MetaLearner(model, sgd(0.5).double(), bn_policy="batch").adapt(task, steps=1)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(frozen(task.query_x), model_call(model, frozen.params, task.query_x))
        assert not torch.allclose(batch(task.query_x), model_call(model, batch.params, task.query_x))


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
        learner.meta_loss(batch, steps=0)
    with pytest.raises(ValueError, match="at least one step"):
        learner.adapt(batch[0], steps=0)
