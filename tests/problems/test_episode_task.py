"""Tests of metaopt/problems/episode_task.py: one task as an inner problem, and the default loss."""

from __future__ import annotations

import re

import pytest
import torch

from metaopt.problems.episode_task import EpisodeTask, check_class_scores, default_loss
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


def test_float_targets_of_another_shape_than_the_prediction_are_named() -> None:
    message = ("the model predicts shape (6, 3) but the targets have shape (6,) (torch.float32): labels must be "
               "integer class ids (torch.long) for classification; float targets mean regression, one target per "
               "model output (shape (6, 3)); convert labels with .long()")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        default_loss(torch.randn(6, 3), torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=re.escape("the model predicts shape (5, 1) but the targets have shape (5,) "
                                                   "(torch.float64)")):
        default_loss(torch.randn(5, 1, dtype=torch.float64), torch.randn(5, dtype=torch.float64))  # would broadcast


def test_a_classifier_needs_one_score_per_class_of_the_task() -> None:
    model, ep = torch.nn.Linear(5, 4), task()
    params = dict(model.named_parameters())
    assert ep.ways == 3
    message = ("the model outputs 4 class scores per example but the episode is 3-way (labels 0..2); build the model "
               "with 3 outputs (e.g. Conv4(num_classes=3) or MLP(in_features, 3)), or sample 4-way episodes")
    problem = EpisodeTask(model, default_loss, *ep.tensors(), ways=3)
    for run in (lambda: problem.inner_loss(params, 0), lambda: problem.outer_loss(params, 0)):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            run()
    unknown = EpisodeTask(model, default_loss, *ep.tensors())  # without ways only the rank is checked
    assert unknown.inner_loss(params, 0).shape == ()
    with pytest.raises(ValueError, match=re.escape("the model outputs shape (6,) for labels of shape (6,); "
                                                   "classification needs one score per class for every example, "
                                                   "shape (6, ways): give the model one output per class")):
        check_class_scores(torch.zeros(6), ep.support_y, None)
    check_class_scores(torch.zeros(6, 3), ep.support_y, 3)


def test_the_checks_compare_shapes_under_vmap() -> None:
    model, ep = torch.nn.Linear(5, 4), task()
    params = dict(model.named_parameters())
    stacked = [torch.stack([t, t]) for t in ep.tensors()]

    def loss(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor, ways: int) -> torch.Tensor:
        return EpisodeTask(model, default_loss, sx, sy, qx, qy, ways=ways).inner_loss(params, 0)

    assert torch.vmap(lambda *t: loss(*t, ways=4))(*stacked).shape == (2,)
    with pytest.raises(ValueError, match="the model outputs 4 class scores per example but the episode is 3-way"):
        torch.vmap(lambda *t: loss(*t, ways=3))(*stacked)
