"""Epoch schedules of MAML++ (Antoniou et al. 2019, §4): multi-step loss weights and cosine meta learning rate.

An *epoch* is a fixed number of meta-iterations (``TrainerConfig.epoch_length``; 500 in the
official MAML++ configs). The formulas are those of the official code
(AntreasAntoniou/HowToTrainYourMAMLPytorch, ``few_shot_learning_system.py``).

Example:
    >>> [round(w, 4) for w in multi_step_loss_weights(steps=5, epoch=0, msl_epochs=10)]
    [0.2, 0.2, 0.2, 0.2, 0.2]
    >>> multi_step_loss_weights(steps=5, epoch=10, msl_epochs=10)
    [0.0, 0.0, 0.0, 0.0, 1.0]
    >>> cosine_meta_lr(1e-3, 1e-5, epoch=50, epochs=100)
    0.000505
"""

from __future__ import annotations

import math

__all__ = ["cosine_meta_lr", "multi_step_loss_weights"]


def multi_step_loss_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """Outer-loss weights of the query loss after inner steps 1..N at ``epoch`` (MSL).

    With ``decay = 1 / (N · E)`` and ``floor = 0.03 / N``, the non-final weights are
    ``max(1/N - epoch · decay, floor)`` and the final one ``min(1/N + epoch · (N - 1) · decay,
    1 - (N - 1) · floor)``. From epoch ``E = msl_epochs`` on, only the final step counts.

    Args:
        steps: inner steps N.
        epoch: the current epoch (from 0).
        msl_epochs: E, the epochs over which the weights anneal (10 Omniglot, 15 miniImageNet).
    """
    if steps < 1 or msl_epochs < 1 or epoch < 0:
        raise ValueError(f"need steps >= 1, msl_epochs >= 1 and epoch >= 0; got steps={steps}, "
                         f"msl_epochs={msl_epochs}, epoch={epoch}")
    if epoch >= msl_epochs:
        return [0.0] * (steps - 1) + [1.0]
    decay = 1.0 / (steps * msl_epochs)
    floor = 0.03 / steps
    early = max(1.0 / steps - epoch * decay, floor)
    final = min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [early] * (steps - 1) + [final]


def cosine_meta_lr(base: float, minimum: float, epoch: int, epochs: int) -> float:
    """The meta learning rate at ``epoch`` of cosine annealing from ``base`` to ``minimum`` over ``epochs`` (CA).

    ``minimum + (base - minimum) · (1 + cos(π · epoch / epochs)) / 2``, as
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=epochs, eta_min=minimum)`` stepped once
    per epoch; it stays at ``minimum`` after ``epochs``.
    """
    if epochs < 1:
        raise ValueError(f"cosine annealing needs epochs >= 1, got {epochs}")
    progress = min(epoch, epochs) / epochs
    return minimum + (base - minimum) * (1 + math.cos(math.pi * progress)) / 2
