"""The long-tailed profile of LDAM-DRW / RIDE: class counts, the official CIFAR-LT selection, shot splits.

The official selection (see docs/data.md, "The official CIFAR-LT sampling"):

1. class ``i`` of ``C`` keeps ``int(img_max * (1 / ratio) ** (i / (C - 1)))`` images (truncation);
2. numpy's legacy generator is seeded once (``np.random.seed(0)``); classes are visited in ascending
   label order, each class's training indices (ascending) are shuffled in place in full, and the first
   ``n_c`` are kept; the kept indices are concatenated class by class, in shuffled order.

Every class is shuffled in full whatever ``n_c`` is, so the permutation applied to class ``c`` depends
only on the sizes of classes ``0..c`` and not on the ratio or on where the images of a class lie.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# The official test script's thresholds: many-shot has more than 100 training images, few-shot fewer
# than 20, medium-shot the rest (20..100 inclusive).
MANY_SHOT_MIN = 100
FEW_SHOT_MAX = 20


def check_ratio(ratio: float) -> float:
    """Return ``ratio`` as a float, or raise if it is not an imbalance ratio (max count / min count >= 1)."""
    ratio = float(ratio)
    if not ratio >= 1.0:  # also rejects NaN
        raise ValueError(
            f"imbalance ratio must be >= 1 (largest class / smallest class), got {ratio}; "
            "ratio 100 gives the last class 1% of the head class's images, ratio 1 gives every class as many"
        )
    return ratio


def long_tail_counts(num_classes: int, img_max: float, ratio: float) -> list[int]:
    """Per-class image counts of the exponential long-tail profile of LDAM-DRW / RIDE.

    Class ``i`` gets ``int(img_max * (1 / ratio) ** (i / (num_classes - 1)))``: truncation, not rounding,
    as in the official code (CIFAR-100, ``img_max = 500``, ratio 100 gives 500, 477, ..., 5; sum 10,847).

    Args:
        num_classes: number of classes ``C`` (class 0 is the head, class ``C - 1`` the tail).
        img_max: images of the head class; the official code uses (training images) / C, a float.
        ratio: imbalance ratio, head count / tail count (>= 1).

    Returns:
        ``C`` counts, non-increasing.

    Raises:
        ValueError: ``ratio < 1``, ``num_classes < 1``, or a class would get no image at all.
    """
    ratio = check_ratio(ratio)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if int(img_max) < 1:  # no ratio helps: the head class itself gets no image
        raise ValueError(f"img_max {img_max} gives the head class no image; it must be at least 1")
    if num_classes == 1:
        return [int(img_max)]
    imb_factor = 1.0 / ratio  # the official argument is this factor (0.01 for ratio 100), same float
    counts = [int(img_max * imb_factor ** (i / (num_classes - 1.0))) for i in range(num_classes)]
    if counts[-1] < 1:
        empty = sum(n < 1 for n in counts)
        raise ValueError(
            f"imbalance ratio {ratio} with {img_max} images in the head class leaves the last {empty} of "
            f"{num_classes} classes with no image; use a smaller ratio (at most {_largest_ratio(img_max):g})"
        )
    return counts


def _largest_ratio(img_max: float) -> float:
    """The largest whole ratio that leaves the tail class an image: ``img_max`` itself unless float
    rounding of ``img_max * (1 / ratio)`` truncates that to 0 (49 * (1 / 49) is 0.999...)."""
    ratio = max(float(int(img_max)), 1.0)
    while ratio > 1.0 and int(img_max * (1.0 / ratio)) < 1:
        ratio -= 1.0
    return ratio


def as_labels(labels: Sequence[int] | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Labels as a 1-D int64 array, checked to lie in ``[0, num_classes)`` (default: max + 1 classes)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D sequence of class indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers (class indices), got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        bound = int(arr.max()) + 1 if num_classes is None else num_classes
        bad = np.flatnonzero((arr < 0) | (arr >= bound))
        if bad.size:
            raise ValueError(
                f"{bad.size} labels lie outside [0, {bound}), e.g. labels[{bad[0]}] = {arr[bad[0]]}; "
                f"labels must be class indices 0..{bound - 1}"
            )
    return arr


def select_per_class(labels: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """The official per-class selection: keep ``counts[c]`` randomly chosen images of each class ``c``.

    Seeds numpy's legacy generator once (a private ``RandomState``, which gives the same stream as
    ``np.random.seed(seed)`` without touching the global state), then for c = 0, 1, ...: shuffles the
    ascending indices of class c in full and keeps the first ``counts[c]``.

    Args:
        labels: ``[N]`` class index of every image.
        counts: ``[C]`` images to keep per class.
        seed: the official ``rand_number`` (0).

    Returns:
        ``[sum(counts)]`` int64 indices into ``labels``, class by class, in shuffled order.
    """
    labels = as_labels(labels, num_classes=len(counts))
    rng = np.random.RandomState(seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if n < 0:  # idx[:n] would silently keep all but |n| images
            raise ValueError(f"counts[{c}] is {n}: images to keep per class cannot be negative")
        if n > idx.size:
            raise ValueError(
                f"class {c} has {idx.size} images but the long-tail profile asks for {n}; "
                "the head count (img_max) must not exceed any class's size"
            )
        rng.shuffle(idx)
        kept.append(idx[:n])
    return np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)


def cifar_lt_indices(labels: Sequence[int] | np.ndarray, ratio: float, seed: int = 0) -> np.ndarray:
    """The official CIFAR-10-LT / CIFAR-100-LT training subset, bit-for-bit.

    ``img_max`` is (number of training images) / (number of classes), as in the official loader (500.0
    for CIFAR-100, 5000.0 for CIFAR-10); the number of classes is ``max(labels) + 1``.

    Args:
        labels: ``[N]`` training labels in the official order (torchvision's ``targets``).
        ratio: imbalance ratio (100, 50, 10, ...).
        seed: the official ``rand_number`` (0).

    Returns:
        int64 indices into the official training array (10,847 of them for CIFAR-100 at ratio 100).
    """
    labels = as_labels(labels)
    if labels.size == 0:
        raise ValueError("labels is empty: cifar_lt_indices needs the full training labels")
    num_classes = int(labels.max()) + 1
    counts = long_tail_counts(num_classes, labels.size / num_classes, ratio)
    return select_per_class(labels, counts, seed)


def whole_count(n: Any) -> int | None:
    """``n`` as an int if it is a whole number >= 0 (int, numpy or tensor scalar, 500.0), else None."""
    if isinstance(n, bool):
        return None
    try:
        value = float(n)
    except (TypeError, ValueError):
        return None
    return int(value) if value.is_integer() and value >= 0 else None


def shot_splits(class_counts: Sequence[int]) -> dict[str, list[int]]:
    """Many / medium / few-shot classes from the training counts (> 100, 20..100, < 20 images).

    Returns:
        ``{"many": [...], "medium": [...], "few": [...]}``, each a sorted list of class indices.

    Raises:
        ValueError: a count that is not a whole number >= 0 (negative, NaN, fractional).
    """
    splits: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(class_counts):
        if whole_count(n) is None:
            raise ValueError(
                f"class_counts[{c}] is {n!r}: the training images of a class are a whole number >= 0"
            )
        key = "many" if n > MANY_SHOT_MIN else "few" if n < FEW_SHOT_MAX else "medium"
        splits[key].append(c)
    return splits
