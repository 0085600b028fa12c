"""The embedded default dataset: real handwritten digits that ship inside the package.

``digits_8x8.npz`` (46 kB, beside this file) holds the 1,797 images of the test set of the UCI "Optical
Recognition of Handwritten Digits" data (Alpaydin & Kaynak, 1998; CC BY 4.0), as scikit-learn ships
them (BSD-3-Clause): 8x8 blocks whose values 0..16 count the ink pixels of a 4x4 block of a 32x32
bitmap. Its ``notice`` entry carries the attribution.

``digits_lt`` turns them into a CIFAR-shaped long-tailed problem that trains offline in seconds:

* images: value ``v`` -> ``v * 255 / 16``, upsampled bilinearly to 32x32, rounded to uint8, repeated to 3
  channels, so every CIFAR model trains on them unchanged;
* test split: the last 30 images of each class in file order (300 images, balanced, like CIFAR's test set);
* train split: the remaining 144..153 images per class, subsampled by the official procedure
  (:func:`~ride_models.data.sampling.select_per_class`, seed 0) to the exponential profile with
  ``img_max`` = the smallest class (144) and ratio 20:
  144, 103, 74, 53, 38, 27, 19, 14, 10, 7 (489 images): 2 many-shot, 4 medium-shot, 4 few-shot classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ride_models.data.sampling import long_tail_counts, select_per_class

DIGITS_FILE = Path(__file__).with_name("digits_8x8.npz")
DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_TEST_PER_CLASS = 30
DIGITS_IMB_RATIO = 20.0
DIGITS_SIZE = 32


def _upsample(blocks: np.ndarray) -> np.ndarray:
    """``[N, 8, 8]`` counts 0..16 -> ``[N, 32, 32, 3]`` uint8 RGB (grey repeated)."""
    x = torch.from_numpy(blocks).float().mul_(255.0 / 16.0).unsqueeze(1)  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)  # [N, 1, 32, 32]
    return x.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous().numpy()


def load_digits(
    split: str = "train", imb_ratio: float = DIGITS_IMB_RATIO, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The embedded digits, long-tailed.

    Args:
        split: ``"train"`` (long-tailed) or ``"test"`` (30 per class).
        imb_ratio: imbalance ratio of the training split (default 20; 1 keeps 144 per class).
        seed: seed of the per-class selection.

    Returns:
        ``images [N, 32, 32, 3]`` uint8, ``labels [N]`` int64, and the training class counts ``[10]``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"the embedded digits have splits 'train' and 'test', got {split!r}")
    with np.load(DIGITS_FILE, allow_pickle=False) as data:
        blocks, labels = data["images"], data["labels"].astype(np.int64)
    is_test = np.zeros(labels.size, dtype=bool)
    for c in range(len(DIGITS_CLASSES)):
        is_test[np.flatnonzero(labels == c)[-DIGITS_TEST_PER_CLASS:]] = True
    train_idx = np.flatnonzero(~is_test)
    train_labels = labels[train_idx]
    img_max = int(np.bincount(train_labels).min())  # every class can give the head count
    counts = long_tail_counts(len(DIGITS_CLASSES), img_max, imb_ratio)
    if split == "train":
        keep = train_idx[select_per_class(train_labels, counts, seed)]
    else:
        keep = np.flatnonzero(is_test)
    return _upsample(blocks[keep]), labels[keep], counts
