"""The compiled strategy against the loop (the oracle): same losses, metrics and meta-gradients, or a clear fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metaopt.engine.compiled as compiled_module
from algorithms.metasgd import MetaSGD
from metaopt.engine.compiled import CompileFallbackWarning
from metaopt.engine.meta_learner import MetaLearner
from metaopt.engine.rules import sgd
from metaopt.problems.episode_task import EpisodeTask
from tests.helpers import assert_close_dicts, tiny_convnet, tiny_mlp, toy_classification_batch, toy_regression_batch


class ShiftedBias(nn.Module):
    """An initialiser with a meta-parameter of its own and an extra outer-loss term."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(0.25, dtype=torch.float64))

    def forward(self, params: dict[str, torch.Tensor], task: EpisodeTask) -> tuple[dict, torch.Tensor]:
        return {**params, "2.bias": params["2.bias"] + self.shift * task.support_y.mean()}, self.shift.pow(2)


def outputs_and_grads(learner: MetaLearner, batch, strategy: str, task_weights: torch.Tensor):
    """Per-task outputs and the gradient of a weighted sum of the per-task losses, by parameter name."""
    learner.strategy = strategy
    out = learner.task_outputs(batch, track_steps=True)
    names, params = zip(*learner.named_parameters())
    grads = torch.autograd.grad((task_weights * out.losses).sum(), params)
    return out, dict(zip(names, grads))


def test_second_order_meta_gradients_of_rule_and_initialiser_parameters_equal_the_loop() -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1, learnable=True).double(), inner_steps=2, step_weights=[0.3, 0.7],
                          initialiser=ShiftedBias())
    batch = toy_regression_batch(tasks=3)
    weights = torch.full((3,), 0.7, dtype=torch.float64)
    by_loop, grads_loop = outputs_and_grads(learner, batch, "loop", weights)
    by_compiled, grads_compiled = outputs_and_grads(learner, batch, "compiled", weights)
    assert learner.compile_fallback_reason is None
    torch.testing.assert_close(by_compiled.losses, by_loop.losses)
    torch.testing.assert_close(by_compiled.step_losses, by_loop.step_losses)
    assert_close_dicts(grads_compiled, grads_loop)
    assert grads_loop["rule.lr"].abs() > 0 and grads_loop["initialiser.shift"].abs() > 0
    learner.strategy = "loop"
    (expected,) = torch.autograd.grad(learner.meta_loss(batch)[0], learner.initialiser.shift)
    learner.strategy = "compiled"
    loss, metrics = learner.meta_loss(batch)  # the cached graph again, through the estimators' entry point
    loss.backward()
    torch.testing.assert_close(learner.initialiser.shift.grad, expected)
    assert metrics["loss"] == pytest.approx(by_loop.losses.mean().item())


def test_weighting_the_tasks_unequally_is_an_error_naming_the_strategies_that_can() -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1), inner_steps=1, strategy="compiled")
    out = learner.task_outputs(toy_regression_batch(tasks=2))
    with pytest.raises(RuntimeError, match=r"weights the tasks unequally; use strategy='vmap' \(or 'loop'\)"):
        (out.losses * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum().backward()


def test_first_order_is_compiled_as_its_own_graph() -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1), inner_steps=2, first_order=True)
    batch, weights = toy_regression_batch(tasks=2), torch.ones(2, dtype=torch.float64)
    _, first_loop = outputs_and_grads(learner, batch, "loop", weights)
    _, first_compiled = outputs_and_grads(learner, batch, "compiled", weights)
    assert_close_dicts(first_compiled, first_loop)
    learner.first_order = False
    _, second_loop = outputs_and_grads(learner, batch, "loop", weights)
    _, second_compiled = outputs_and_grads(learner, batch, "compiled", weights)
    assert_close_dicts(second_compiled, second_loop)
    assert not torch.allclose(second_loop["model.0.weight"], first_loop["model.0.weight"])
    assert len(learner._compiled._graphs) == 2


def test_meta_sgd_on_a_convnet_with_batch_norm_equals_the_loop() -> None:
    learner = MetaSGD(tiny_convnet(), init=0.2, inner_steps=1).double()
    batch, weights = toy_classification_batch(), torch.ones(3, dtype=torch.float64)
    by_loop, grads_loop = outputs_and_grads(learner, batch, "loop", weights)
    by_compiled, grads_compiled = outputs_and_grads(learner, batch, "compiled", weights)
    torch.testing.assert_close(by_compiled.accuracy, by_loop.accuracy)
    assert_close_dicts(grads_compiled, grads_loop)
    assert any(name.startswith("rule.") and g.abs().sum() > 0 for name, g in grads_loop.items())


def cannot_compile(fn, **kwargs):
    """A stand-in for torch.compile on a machine without a C++ compiler."""
    def fail(*args):
        raise RuntimeError("Compiler: cc not found\nmore detail")
    return fail


def imprecise(fn, **kwargs):
    """A stand-in for torch.compile whose graph loses precision: meta-gradients 1% off."""
    def run(*args):
        grads, outputs = fn(*args)
        return {name: g * (1 + 1e-2) for name, g in grads.items()}, outputs
    return run


@pytest.mark.parametrize(("fake_compile", "message"), [
    (cannot_compile, r"could not compile this meta-gradient \(RuntimeError: Compiler: cc not found\); running "
                     r"strategy='vmap' instead"),
    (imprecise, r"differs from eager vmap's on the first batch by 1\.0e-02 of its largest entry \(tolerance 0\.001\)"),
], ids=["compile-fails", "graph-disagrees"])
def test_a_graph_that_fails_or_disagrees_warns_once_and_runs_vmap(fake_compile, message: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled_module.torch, "compile", fake_compile)
    learner = MetaLearner(tiny_mlp(), sgd(0.1), inner_steps=1, strategy="compiled")
    batch, weights = toy_regression_batch(tasks=2), torch.ones(2, dtype=torch.float64)
    with pytest.warns(CompileFallbackWarning, match=message):
        _, got = outputs_and_grads(learner, batch, "compiled", weights)
    _, expected = outputs_and_grads(learner, batch, "loop", weights)
    assert_close_dicts(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs_and_grads(learner, batch, "compiled", weights)  # decided once: no second attempt, no second warning


def test_a_configuration_that_keeps_changing_stops_compiling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled_module.torch, "compile", lambda fn, **kwargs: fn)  # the same graph, run eagerly
    learner = MetaLearner(tiny_mlp(), sgd(0.1), inner_steps=1, strategy="compiled")
    batch, weights = toy_regression_batch(tasks=2), torch.ones(2, dtype=torch.float64)
    for steps in range(1, compiled_module.MAX_GRAPHS + 1):
        learner.inner_steps = steps
        outputs_and_grads(learner, batch, "compiled", weights)
    assert learner.compile_fallback_reason is None
    learner.inner_steps = compiled_module.MAX_GRAPHS + 1
    with pytest.warns(CompileFallbackWarning, match="the configuration keeps changing"):
        _, got = outputs_and_grads(learner, batch, "compiled", weights)
    _, expected = outputs_and_grads(learner, batch, "loop", weights)
    assert_close_dicts(got, expected)


def test_evaluation_takes_no_gradient_and_compiles_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled_module.torch, "compile", lambda *a, **k: pytest.fail("evaluation compiled a graph"))
    learner = MetaLearner(tiny_convnet(), sgd(0.3), inner_steps=1, strategy="compiled")
    batch = toy_classification_batch()
    learner.strategy = "loop"
    expected = learner.evaluate(batch).values
    learner.strategy = "compiled"
    torch.testing.assert_close(learner.evaluate(batch).values, expected)


def test_tasks_that_must_run_one_after_another_refuse_the_compiled_strategy() -> None:
    with pytest.raises(ValueError, match=r"strategy='compiled' is not available: batch-norm policy 'running' writes "
                                         r"statistics shared by the tasks; use strategy='loop'"):
        MetaLearner(tiny_convnet(), sgd(0.3), bn_policy="running", strategy="compiled")


def test_tracking_the_step_losses_compiles_no_second_graph_and_tracks_what_the_loop_does() -> None:
    learner = MetaLearner(tiny_mlp(), sgd(0.1), inner_steps=3, step_weights=[0.2, 0.3, 0.5])
    batch, weights = toy_regression_batch(tasks=2), torch.ones(2, dtype=torch.float64)
    by_loop, grads_loop = outputs_and_grads(learner, batch, "loop", weights)
    by_compiled, grads_compiled = outputs_and_grads(learner, batch, "compiled", weights)  # tracked
    untracked = learner.task_outputs(batch)
    assert len(learner._compiled._graphs) == 1 and untracked.step_losses is None
    assert by_compiled.step_losses.shape == (2, 4) and not by_compiled.step_losses.requires_grad
    torch.testing.assert_close(by_compiled.step_losses, by_loop.step_losses)
    torch.testing.assert_close(untracked.losses, by_loop.losses)
    assert_close_dicts(grads_compiled, grads_loop)
