"""Per-epoch learning rates of the official RIDE recipes.

The official trainer sets the learning rate once per epoch. Stage 1 (experts) and stage 3 (distillation)
use a step schedule with a linear warm-up (the official ``CustomLR``); stage 2 (the router) uses cosine
annealing. Both are pure functions of the 1-based epoch, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["cosine_lr", "lr_at_epoch", "step_lr"]


def step_lr(
    epoch: int, base_lr: float, milestones: Sequence[int], gamma: float, warmup_epochs: int = 0
) -> float:
    """The official ``CustomLR``: warm-up, then a factor ``gamma`` at every milestone passed.

    The official trainer steps a ``LambdaLR`` at the end of each 1-based epoch, so epoch ``e`` uses factor
    ``f(e - 1)``: ``gamma ** (number of milestones m with e - 1 >= m)``, times ``e / warmup_epochs`` while
    ``e <= warmup_epochs``. CIFAR (lr 0.1, milestones 160/180, gamma 0.01, warm-up 5): epochs 1..5 give
    0.02 .. 0.1, then 0.1 through epoch 160, 0.001 for 161..180, 1e-5 after.
    """
    k = epoch - 1
    factor = gamma ** sum(k >= m for m in milestones)
    if k < warmup_epochs:
        factor *= (k + 1) / warmup_epochs
    return base_lr * factor


def cosine_lr(epoch: int, base_lr: float, epochs: int, min_lr: float = 0.0) -> float:
    """Cosine annealing over ``epochs`` epochs (``CosineAnnealingLR(T_max=epochs)`` stepped per epoch)."""
    k = epoch - 1
    return min_lr + (base_lr - min_lr) * (1.0 + math.cos(math.pi * k / epochs)) / 2.0


def lr_at_epoch(
    epoch: int,
    *,
    schedule: str,
    base_lr: float,
    epochs: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    min_lr: float = 0.0,
) -> float:
    """Learning rate of the 1-based ``epoch`` for ``schedule`` ``"step"`` or ``"cosine"``."""
    if epoch < 1:
        raise ValueError(f"epochs are numbered from 1, got {epoch}")
    if schedule == "step":
        return step_lr(epoch, base_lr, milestones, gamma, warmup_epochs)
    if schedule == "cosine":
        return cosine_lr(epoch, base_lr, epochs, min_lr)
    raise ValueError(f"unknown schedule {schedule!r}: expected 'step' or 'cosine'")
