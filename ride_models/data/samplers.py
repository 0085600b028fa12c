"""The class-balanced sampler of the router (expert-assignment) stage of the official recipe.

Each draw picks a class uniformly at random, then takes the next index of that class from a shuffled
list of its images; a class's list is reshuffled when used up. An epoch has as many draws as the
dataset has images, so tail images repeat and head images are skipped.

Difference from the official sampler, on purpose: the official one keeps its per-class lists and
positions (and Python's global ``random`` state) from one epoch to the next; this one starts every epoch
from fresh shuffles drawn from ``seed + epoch``, so an epoch is reproducible on its own (exact resume,
identical order on every rank). Within an epoch the two draw from the same distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ride_models.data.sampling import as_labels, whole_count


def class_balanced_order(
    class_indices: Sequence[torch.Tensor], num_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """``num_samples`` dataset indices, each from a uniformly drawn class, cycling through a shuffle of it.

    Args:
        class_indices: ``C`` int64 tensors, the dataset indices of each class (none empty).
        num_samples: draws to make.
        generator: a CPU generator; the result is a function of its state.

    Returns:
        ``[num_samples]`` int64: draw ``t`` is of class ``classes[t]``; the ``k``-th draw of class ``c`` is
        element ``k % n_c`` of that class's ``k // n_c``-th shuffle.
    """
    num_classes = len(class_indices)
    classes = torch.randint(num_classes, (num_samples,), generator=generator)  # [num_samples]
    # Positions of each class's draws, in draw order (stable sort keeps the order within a class).
    positions = torch.sort(classes, stable=True).indices
    draws_per_class = torch.bincount(classes, minlength=num_classes).tolist()
    order = torch.empty(num_samples, dtype=torch.long)
    start = 0
    for idx, m in zip(class_indices, draws_per_class):
        if m:
            shuffles = [
                idx[torch.randperm(len(idx), generator=generator)] for _ in range(math.ceil(m / len(idx)))
            ]
            order[positions[start : start + m]] = torch.cat(shuffles)[:m]
        start += m
    return order


class ClassBalancedSampler(Sampler[int]):
    """Class-balanced sampling (router stage): a uniform class, then the next image of that class.

    Deterministic given ``seed`` and the epoch (call :meth:`set_epoch` at the start of every epoch, as
    with ``DistributedSampler``). Distributed training: every rank builds the same global order of
    ``ceil(num_samples / num_replicas) * num_replicas`` draws and takes every ``num_replicas``-th one
    starting at ``rank``, so the ranks' shares are disjoint slices of one balanced stream.

    Args:
        targets: ``[N]`` class index of every dataset image (``dataset.targets``).
        num_samples: draws per epoch over all ranks (default ``N``, the official epoch length).
        num_replicas: number of distributed processes (world size).
        rank: this process's rank.
        seed: base seed; epoch ``e`` uses ``seed + e``.
    """

    def __init__(
        self,
        targets: Sequence[int],
        num_samples: int | None = None,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        labels = torch.from_numpy(as_labels(targets))
        if labels.numel() == 0:
            raise ValueError("ClassBalancedSampler needs a non-empty dataset")
        counts = torch.bincount(labels)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"classes {empty[:10]} have no image, so a uniformly drawn class could not be served; "
                "relabel the classes to 0..C-1 without gaps"
            )
        if num_samples is not None and whole_count(num_samples) is None:
            # int() would truncate 2.5, and a negative count failed only on iteration, in len()
            raise ValueError(f"num_samples must be a whole number of draws >= 0, got {num_samples!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        # Indices of each class, ascending (a stable sort groups them in one pass, also for 8,142 classes).
        self.class_indices = list(torch.sort(labels, stable=True).indices.split(counts.tolist()))
        self.num_samples = len(labels) if num_samples is None else int(num_samples)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` on the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = class_balanced_order(self.class_indices, len(self) * self.num_replicas, generator)
        return iter(order[self.rank :: self.num_replicas].tolist())
