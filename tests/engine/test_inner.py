"""The unrolled inner loop: meta-gradients against finite differences and first-order formulas, trajectories, scores."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metaopt.engine.batchnorm import batchnorm_policy
from metaopt.engine.functional import Params, model_call, named_params
from metaopt.engine.inner import InnerLoop, resolve_weights
from metaopt.engine.rules import StepInfo, UpdateRule, per_step_sgd, sgd
from metaopt.engine.step_context import current_inner_step, in_outer_pass
from metaopt.problems.episode import Episode
from metaopt.problems.episode_task import EpisodeTask
from metaopt.problems.problem import Problem
from tests.engine.common import run_tasks
from tests.helpers import assert_close_dicts, tiny_convnet, tiny_mlp, toy_classification_batch, toy_regression_batch


def mse_loop(first_order: bool = False, rule: UpdateRule | None = None) -> tuple[InnerLoop, nn.Module]:
    return InnerLoop(rule or sgd(0.1), first_order=first_order), tiny_mlp()


def meta_loss_at(loop: InnerLoop, model: nn.Module, batch: Episode, params: Params, steps: int) -> torch.Tensor:
    return run_tasks(loop, model, F.mse_loss, batch, params, steps).losses.mean()


def task(model: nn.Module, batch: Episode, i: int, loss_fn: Any = F.mse_loss) -> EpisodeTask:
    return EpisodeTask(model, loss_fn, *(t[i] for t in batch.tensors()))


def test_second_order_meta_gradient_matches_central_differences() -> None:
    (loop, model), batch, steps, eps = mse_loop(rule=sgd(0.1, learnable=True).double()), toy_regression_batch(), 2, 1e-6
    params = named_params(model)
    loss = meta_loss_at(loop, model, batch, params, steps)
    analytic = dict(zip([*params, "lr"], torch.autograd.grad(loss, [*params.values(), loop.rule.lr])))
    numeric = {}
    with torch.no_grad():
        for name, p in [*params.items(), ("lr", loop.rule.lr)]:
            numeric[name] = torch.zeros_like(p)
            for i in range(p.numel()):
                values = []
                for sign in (1, -1):
                    p.view(-1)[i] += sign * eps
                    with torch.enable_grad():
                        values.append(meta_loss_at(loop, model, batch, params, steps).item())
                    p.view(-1)[i] -= sign * eps
                numeric[name].view(-1)[i] = (values[0] - values[1]) / (2 * eps)
    assert_close_dicts(analytic, numeric, rtol=1e-6, atol=1e-8)
    first_order, first_order_model = mse_loop(first_order=True)
    (fo_weight, *_) = torch.autograd.grad(meta_loss_at(first_order, first_order_model, batch, params, steps),
                                          list(params.values()))
    assert not torch.allclose(fo_weight, analytic["0.weight"], rtol=1e-3), "second-order terms must matter here"


def sgd_path(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> list[Params]:
    """θ_0..θ_K of plain gradient descent, each θ_t a fresh leaf (so gradients stop there)."""
    path = [{k: v.detach().requires_grad_() for k, v in params.items()}]
    for _ in range(steps):
        theta = path[-1]
        gradients = torch.autograd.grad(F.mse_loss(model_call(model, theta, x), y), list(theta.values()))
        path.append({k: (v - lr * g).detach().requires_grad_() for (k, v), g in zip(theta.items(), gradients)})
    return path


@pytest.mark.parametrize("steps, weights", [(1, None), (3, None), (3, [0.2, 0.3, 0.5])],
                         ids=["1-step", "3-steps", "3-steps-weighted"])
def test_first_order_meta_gradient_is_the_query_gradient_at_adapted_params(steps: int, weights: list | None) -> None:
    """FOMAML: d meta-loss / d θ_0 = mean over tasks of Σ_t w_t ∇_{θ_t} L_query(θ_t) (∇ at θ_K for MAML's weights)."""
    (loop, model), batch = mse_loop(first_order=True), toy_regression_batch()
    params = named_params(model)
    out = run_tasks(loop, model, F.mse_loss, batch, params, steps, weights)
    actual = dict(zip(params, torch.autograd.grad(out.losses.mean(), list(params.values()))))
    weights = weights or [0.0] * (steps - 1) + [1.0]
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for sx, sy, qx, qy in zip(*batch.tensors()):
        path = sgd_path(model, params, sx, sy, lr=0.1, steps=steps)
        for w, theta in zip(weights, path[1:]):
            gradients = torch.autograd.grad(F.mse_loss(model_call(model, theta, qx), qy), list(theta.values()))
            for k, g in zip(theta, gradients):
                expected[k] += w * g / len(batch)
    assert_close_dicts(actual, expected)


def test_tracked_step_losses_and_accuracy() -> None:
    model, loop = tiny_convnet(), InnerLoop(sgd(0.5))
    batch = toy_classification_batch()
    params = named_params(model)
    with batchnorm_policy("batch").meta_batch(model, training=False):
        out = run_tasks(loop, model, F.cross_entropy, batch, params, steps=3, track=True)
        assert out.losses.shape == (3,) and out.step_losses.shape == (3, 4) and out.accuracy.shape == (3,)
        torch.testing.assert_close(out.step_losses[:, -1], out.losses.detach())
        for i, (sx, sy, qx, qy) in enumerate(zip(*batch.tensors())):
            torch.testing.assert_close(out.step_losses[i, 0], F.cross_entropy(model_call(model, params, qx), qy))
            adapted = loop.unroll(EpisodeTask(model, F.cross_entropy, sx, sy, qx, qy), params, steps=3).params[-1]
            hits = (model_call(model, adapted, qx).argmax(-1) == qy).float().mean()
            torch.testing.assert_close(out.accuracy[i], hits)


def test_regression_has_no_accuracy_and_untracked_has_no_step_losses() -> None:
    (loop, model), batch = mse_loop(), toy_regression_batch()
    problem = task(model, batch, 0)
    trajectory = loop.unroll(problem, named_params(model), steps=1)
    score = loop.score(problem, trajectory, resolve_weights(1, None), track=False)
    assert score.accuracy is None and score.step_losses.shape == (0,) and score.loss.shape == ()
    torch.testing.assert_close(score.loss, F.mse_loss(model_call(model, trajectory.params[-1], problem.query_x),
                                                      problem.query_y))


def test_only_the_adapted_parameters_move() -> None:
    model = tiny_convnet()
    loop = InnerLoop(sgd(0.5), adapted=["3.weight", "3.bias"])
    params = named_params(model)
    batch = toy_classification_batch()
    with batchnorm_policy("batch").meta_batch(model, training=False):
        path = loop.unroll(task(model, batch, 0, F.cross_entropy), params, steps=2).params
    assert len(path) == 3 and list(path[-1]) == list(params)
    for name, p in path[-1].items():
        assert (p is params[name]) is (name not in ("3.weight", "3.bias")), name


def test_adapt_without_gradients_is_detached_and_equal() -> None:
    (loop, model), batch = mse_loop(), toy_regression_batch()
    params = named_params(model)
    with_graph = loop.unroll(task(model, batch, 0), params, steps=2).params[-1]
    with torch.no_grad():
        detached = loop.unroll(task(model, batch, 0), params, steps=2).params[-1]
    assert with_graph["0.weight"].requires_grad and not detached["0.weight"].requires_grad
    assert_close_dicts(detached, {k: v.detach() for k, v in with_graph.items()})


def test_weights_are_checked() -> None:
    assert resolve_weights(3, None) == [0.0, 0.0, 1.0]
    assert resolve_weights(2, (0.25, 0.75)) == [0.25, 0.75]
    with pytest.raises(ValueError, match="3 step weights given for 2 inner steps"):
        resolve_weights(2, [1, 1, 1])
    (loop, model), batch = mse_loop(), toy_regression_batch()
    with pytest.raises(ValueError, match="3 step weights given for 2 inner steps"):
        run_tasks(loop, model, F.mse_loss, batch, steps=2, weights=[1, 1, 1])


# --- trajectories: truncated unrolls, step marks, problems scored on their inner loss -----------------------------

class Momentum(UpdateRule):
    """Heavy-ball momentum, a rule with a state: ``v ← μ v + g``, ``θ ← θ - lr v``."""

    def __init__(self, lr: float, mu: float) -> None:
        super().__init__()
        self.lr, self.mu = lr, mu

    def init(self, params: Params) -> Params:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: Params, state: Params, info: StepInfo) -> tuple[Params, Params]:
        velocity = {k: self.mu * state[k] + grads[k] for k in params}
        return {k: p - self.lr * velocity[k] for k, p in params.items()}, velocity


@pytest.mark.parametrize("make_rule", [lambda params: Momentum(0.1, 0.9), lambda params: per_step_sgd(params, 4, 0.1)],
                         ids=["momentum-state", "per-step-rates"])
def test_a_truncated_unroll_continues_where_the_previous_one_stopped(make_rule: Any) -> None:
    (_, model), batch = mse_loop(), toy_regression_batch()
    params = named_params(model)
    rule = make_rule(params)
    if isinstance(rule, nn.Module) and list(rule.parameters()):
        with torch.no_grad():  # per-step rates that differ from step to step, so that the step index matters
            for rates in rule.parameters():
                rates.copy_(torch.tensor([0.1, 0.05, 0.2, 0.15], dtype=rates.dtype))
    loop, problem = InnerLoop(rule), task(model, batch, 1)
    whole = loop.unroll(problem, params, steps=4)
    first = loop.unroll(problem, params, steps=2)
    second = loop.unroll(problem, first.params[-1], steps=2, start=2, state=first.state)
    assert (whole.start, whole.end, first.end, second.start, second.end) == (0, 4, 2, 2, 4)
    assert len(second.params) == 3 and second.params[0] is first.params[-1]
    for theta, expected in zip(first.params + second.params[1:], whole.params):
        assert_close_dicts(theta, expected)
    # the score of the second piece: weights for steps 3 and 4
    weights = [0.0, 0.0, 0.4, 0.6]
    full = loop.score(problem, whole, weights, track=True)
    part = loop.score(problem, second, weights[2:], track=True)
    torch.testing.assert_close(part.loss, full.loss)
    torch.testing.assert_close(part.step_losses, full.step_losses[2:])


class Recording(Problem):
    """A quadratic problem that records which step and pass each of its losses belongs to."""

    def __init__(self, outer_is_inner: bool = False) -> None:
        self.outer_is_inner = outer_is_inner  # type: ignore[misc]
        self.marks: list[tuple[str, int, int, bool]] = []
        self.target = torch.tensor([1.0, -2.0], dtype=torch.float64)

    def inner_loss(self, params: Params, step: int) -> torch.Tensor:
        self.marks.append(("inner", step, current_inner_step(), in_outer_pass()))
        return (params["x"] - self.target).pow(2).sum()

    def outer_loss(self, params: Params, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.marks.append(("outer", step, current_inner_step(), in_outer_pass()))
        return (params["x"] - self.target).pow(2).sum(), None


def test_every_pass_is_marked_with_its_step() -> None:
    """Inner passes belong to the step they take; the outer pass on θ_t to the step that produced it (t - 1)."""
    problem, x = Recording(), torch.zeros(2, dtype=torch.float64, requires_grad=True)
    loop = InnerLoop(sgd(0.1))
    trajectory = loop.unroll(problem, {"x": x}, steps=3)
    loop.score(problem, trajectory, resolve_weights(3, None), track=True)
    assert problem.marks == [("inner", 0, 0, False), ("inner", 1, 1, False), ("inner", 2, 2, False),
                             ("outer", 0, 0, True), ("outer", 1, 0, True), ("outer", 2, 1, True),
                             ("outer", 3, 2, True)]
    problem.marks.clear()
    loop.score(problem, trajectory, resolve_weights(3, None), track=False)
    assert problem.marks == [("outer", 3, 2, True)]  # untracked: only the weighted steps are scored


def test_problems_scored_on_their_inner_loss_reuse_it() -> None:
    problem, x = Recording(outer_is_inner=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)
    loop, weights = InnerLoop(sgd(0.1)), [0.5, 0.25, 1.0]
    trajectory = loop.unroll(problem, {"x": x}, steps=3)
    assert len(trajectory.inner_losses) == 3 and trajectory.inner_losses[0].requires_grad
    score = loop.score(problem, trajectory, weights, track=True)
    assert [mark[:2] for mark in problem.marks] == [("inner", 0), ("inner", 1), ("inner", 2), ("outer", 3)]
    # by hand: θ_t = target (1 - 0.8^t) from 0, so L(θ_t) = 0.64^t |target|^2
    losses = torch.tensor([0.64 ** t * 5.0 for t in range(4)], dtype=torch.float64)
    torch.testing.assert_close(score.step_losses, losses)
    torch.testing.assert_close(score.loss, (torch.tensor(weights, dtype=torch.float64) * losses[1:]).sum())
    (gradient,) = torch.autograd.grad(score.loss, x)  # the reused inner losses carry their graphs
    torch.testing.assert_close(gradient, -2 * problem.target * sum(w * 0.64 ** t for t, w in enumerate(weights, 1)))
    assert not Recording().outer_is_inner and loop.unroll(Recording(), {"x": x}, steps=2).inner_losses == []
