"""MAML++ epoch schedules: multi-step loss weights against the official formula, cosine lr against torch."""

from __future__ import annotations

import math

import pytest
import torch

from metaopt.training.schedules import cosine_meta_lr, multi_step_loss_weights


def official_msl_weights(n: int, epoch: int, msl_epochs: int) -> list[float]:
    """``get_per_step_loss_importance_vector`` of HowToTrainYourMAMLPytorch, written out step by step."""
    weights = [1.0 / n] * n
    decay = 1.0 / n / msl_epochs
    floor = 0.03 / n
    for i in range(n - 1):
        weights[i] = max(weights[i] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
    return weights


@pytest.mark.parametrize(("steps", "epoch", "msl_epochs"),
                         [(5, 0, 10), (5, 1, 10), (5, 5, 10), (5, 9, 10), (3, 7, 15), (2, 1, 3), (5, 1, 2)])
def test_msl_weights_follow_the_official_formula(steps: int, epoch: int, msl_epochs: int) -> None:
    weights = multi_step_loss_weights(steps, epoch, msl_epochs)
    assert weights == pytest.approx(official_msl_weights(steps, epoch, msl_epochs), rel=1e-12, abs=1e-15)
    assert len(weights) == steps


def test_msl_weights_by_hand() -> None:
    # N=5, E=10, epoch=5: decay 1/50; early 0.2 - 0.1 = 0.1, final 0.2 + 5 * 4 / 50 = 0.6
    assert multi_step_loss_weights(5, 5, 10) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6])
    # N=5, E=2, epoch=1: decay 0.1; early 0.1 (above the floor 0.006), final 0.2 + 0.4 = 0.6
    assert multi_step_loss_weights(5, 1, 2) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6])


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_msl_weights_are_uniform_at_epoch_zero(steps: int) -> None:
    assert multi_step_loss_weights(steps, 0, 10) == pytest.approx([1.0 / steps] * steps)


@pytest.mark.parametrize("epoch", [10, 11, 1000])
def test_only_the_final_step_counts_from_msl_epochs_on(epoch: int) -> None:
    assert multi_step_loss_weights(5, epoch, 10) == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_msl_floor_and_cap_bind_near_the_end() -> None:
    # N=5, E=100, epoch=99: 0.2 - 99/500 = 0.002 < floor 0.006; 0.2 + 99*4/500 = 0.992 > cap 1 - 4*0.006 = 0.976
    weights = multi_step_loss_weights(5, 99, 100)
    assert weights == pytest.approx([0.006] * 4 + [0.976])
    assert weights == pytest.approx(official_msl_weights(5, 99, 100))
    assert sum(weights) == pytest.approx(1.0)


def test_msl_weights_sum_to_one_while_annealing() -> None:
    for epoch in range(10):
        assert sum(multi_step_loss_weights(5, epoch, 10)) == pytest.approx(1.0)


def test_msl_with_one_step() -> None:
    assert multi_step_loss_weights(1, 0, 10) == pytest.approx([1.0])
    assert multi_step_loss_weights(1, 3, 10) == pytest.approx([1.0])
    assert multi_step_loss_weights(1, 10, 10) == [1.0]


@pytest.mark.parametrize(("steps", "epoch", "msl_epochs"), [(0, 0, 10), (5, -1, 10), (5, 0, 0), (-2, 3, 10)])
def test_msl_rejects_invalid_arguments(steps: int, epoch: int, msl_epochs: int) -> None:
    with pytest.raises(ValueError, match="steps >= 1"):
        multi_step_loss_weights(steps, epoch, msl_epochs)


@pytest.mark.parametrize(("base", "minimum", "epochs"), [(1e-3, 1e-5, 100), (1.0, 0.0, 7), (0.5, 0.1, 1)])
def test_cosine_meta_lr_equals_torch_cosine_annealing(base: float, minimum: float, epochs: int) -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=minimum)
    for epoch in range(epochs + 1):
        expected = optimizer.param_groups[0]["lr"]
        assert cosine_meta_lr(base, minimum, epoch, epochs) == pytest.approx(expected, rel=1e-9, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_cosine_meta_lr_endpoints_and_plateau() -> None:
    assert cosine_meta_lr(1e-3, 1e-5, 0, 100) == pytest.approx(1e-3)
    assert cosine_meta_lr(1e-3, 1e-5, 50, 100) == pytest.approx(0.000505)
    assert cosine_meta_lr(1e-3, 1e-5, 25, 100) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.sqrt(0.5)) / 2)
    for epoch in (100, 101, 150, 200, 10_000):  # torch's schedule would rise again; this one stays at the minimum
        assert cosine_meta_lr(1e-3, 1e-5, epoch, 100) == pytest.approx(1e-5, rel=1e-12)


@pytest.mark.parametrize("epochs", [0, -1])
def test_cosine_meta_lr_needs_an_epoch(epochs: int) -> None:
    with pytest.raises(ValueError, match="epochs >= 1"):
        cosine_meta_lr(1e-3, 1e-5, 0, epochs)
