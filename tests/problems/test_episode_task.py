"""Tests of metaopt/problems/episode_task.py: one task as an inner problem, and the default loss."""

from __future__ import annotations

import torch

from metaopt.problems.episode_task import EpisodeTask, default_loss
from metaopt.problems.problem import Problem
from tests.problems.test_episode import task


def test_default_loss_is_cross_entropy_for_labels_and_mse_for_targets() -> None:
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(default_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    prediction, target = torch.randn(5, 1), torch.randn(5, 1)
    torch.testing.assert_close(default_loss(prediction, target), ((prediction - target) ** 2).mean())


def test_an_episode_task_descends_its_support_loss_and_is_scored_on_its_query_set() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    ep = task()
    problem = EpisodeTask(model, default_loss, *ep.tensors())
    assert isinstance(problem, Problem) and not problem.outer_is_inner
    params = {name: p.detach() + 0.1 for name, p in model.named_parameters()}  # run on these, not on the model's
    weight, bias = params["weight"], params["bias"]
    torch.testing.assert_close(problem.inner_loss(params, step=3),
                               torch.nn.functional.cross_entropy(ep.support_x @ weight.T + bias, ep.support_y))
    loss, accuracy = problem.outer_loss(params, step=3)
    logits = ep.query_x @ weight.T + bias
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, ep.query_y))
    assert accuracy == (logits.argmax(-1) == ep.query_y).float().mean() and not accuracy.requires_grad
    x = torch.linspace(-1, 1, 6).unsqueeze(1)
    regression = EpisodeTask(torch.nn.Linear(1, 1), default_loss, x[:3], 2 * x[:3], x[3:], 2 * x[3:])
    assert regression.outer_loss(dict(regression.model.named_parameters()), 0)[1] is None
