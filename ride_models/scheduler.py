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
    """Learning rate of the 1-based ``epoch`` (of ``epochs``) for ``schedule`` ``"step"`` or ``"cosine"``."""
    if epoch < 1:
        raise ValueError(f"epochs are numbered from 1, got {epoch}")
    if epochs < 1 or epoch > epochs:
        raise ValueError(f"epoch {epoch} is outside the schedule's epochs 1..{epochs}")
    if base_lr < 0 or min_lr < 0:
        raise ValueError(f"learning rates cannot be negative: base_lr {base_lr}, min_lr {min_lr}")
    if not (isinstance(milestones, Sequence) and all(isinstance(m, int) for m in milestones)):
        raise ValueError(f"milestones must be a list of epochs, e.g. [160, 180]; got {milestones!r}")
    if gamma <= 0:
        raise ValueError(f"gamma (the decay factor at each milestone) must be above 0, e.g. 0.1; got {gamma}")
    if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be a whole number of epochs >= 0; got {warmup_epochs!r}")
    if schedule == "step":
        return step_lr(epoch, base_lr, milestones, gamma, warmup_epochs)
    if schedule == "cosine":
        return cosine_lr(epoch, base_lr, epochs, min_lr)
    raise ValueError(f"unknown schedule {schedule!r}: expected 'step' or 'cosine'")
