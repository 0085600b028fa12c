"""The fast path for small images: the whole training set on the training device, augmented as tensors.

A CIFAR-LT training set is 10-20 thousand 32x32 images: 30-60 MB as uint8, nothing for a GPU. Kept there
as one ``[N, 3, H, W]`` uint8 tensor, a batch is an index, and its augmentation (pad-and-crop, flip,
rotation) is a few batched tensor ops, so the GPU is not left waiting on per-image PIL work in
DataLoader workers (the idea of Keller Jordan's airbench). The same code runs on CPU (tests) and CUDA.

The augmentation is the one of :class:`~ride_models.data.transforms.SmallImageConfig`, which the PIL
pipeline follows too: random crop from the zero-padded image, horizontal flip, rotation (nearest
neighbour, zero fill), then ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from ride_models.data.datasets import ArrayDataset, ImageListDataset, LongTailDataset
from ride_models.data.transforms import SMALL_IMAGE_CONFIGS, SmallImageConfig


def batch_crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image, zero-padded by ``padding`` on every side, back to its size at ``(top, left)``.

    Args:
        images: ``[B, C, H, W]`` (any dtype).
        top, left: ``[B]`` int64 corner of each crop in the padded image, in ``[0, 2 * padding]``.

    Returns:
        ``[B, C, H, W]``; ``top = left = padding`` returns the image unchanged.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # zero, as RandomCrop(padding=...)
    device = images.device
    rows = (top[:, None] + torch.arange(h, device=device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (left[:, None] + torch.arange(w, device=device))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def batch_rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image counter-clockwise about its centre (nearest neighbour, zero fill).

    The semantics of torchvision's ``rotate`` / ``RandomRotation`` (no expansion).

    Args:
        images: ``[B, C, H, W]`` float.
        degrees: ``[B]`` angles in degrees.
    """
    b, _, h, w = images.shape
    angle = degrees.to(images.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps each output pixel to the input pixel it samples, in coordinates normalised to
    # [-1, 1] per axis; a counter-clockwise turn on screen (y down) samples the input at
    # (x cos - y sin, x sin + y cos) in pixels, rescaled here for a non-square image.
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), torch.zeros_like(cos)], dim=1),
            torch.stack([sin * (w / h), cos, torch.zeros_like(cos)], dim=1),
        ],
        dim=1,
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def augment_batch(images: torch.Tensor, config: SmallImageConfig, generator: torch.Generator) -> torch.Tensor:
    """The training augmentation of ``config`` on a batch: crop, flip, rotate; returns float pixels 0..255.

    Args:
        images: ``[B, 3, H, W]`` uint8 on the generator's device.
        generator: source of every random choice (offsets, flips, angles).

    Returns:
        ``[B, 3, H, W]`` float32, not yet normalised.
    """
    b = images.shape[0]
    device = images.device
    if config.padding:
        top, left = torch.randint(2 * config.padding + 1, (2, b), device=device, generator=generator)
        images = batch_crop(images, top, left, config.padding)
    if config.hflip:
        flip = torch.rand(b, device=device, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    x = images.float()
    if config.rotation:
        degrees = (torch.rand(b, device=device, generator=generator) * 2 - 1) * config.rotation
        x = batch_rotate(x, degrees)
    return x


# Added per rank to an epoch's seed: above any epoch count, so no two (epoch, rank) pairs share a stream.
RANK_SEED_STRIDE = 104_729


class DeviceDataLoader:
    """Batches of a small-image dataset held on ``device`` as one uint8 tensor.

    Iterating yields ``(x [B, 3, H, W] float32 normalised, y [B] int64)``, both on ``device``. Order: the
    ``sampler``'s if given (e.g. :class:`~ride_models.data.ClassBalancedSampler`, or
    ``DistributedSampler(range(N), ...)`` for plain distributed training), else a shuffle (``shuffle``)
    or the dataset order. Call :meth:`set_epoch` every epoch: order and augmentation are functions of
    ``(seed, epoch, rank)`` only, so an epoch replays exactly (resume).

    Args:
        images: ``[N, H, W, 3]`` uint8 array (torchvision's CIFAR layout) or ``[N, 3, H, W]`` uint8 tensor.
        targets: ``[N]`` class indices.
        batch_size: images per batch.
        config: normalisation and augmentation.
        device: where images, batches and the random generator live (default: that of ``images``).
        train: augment (True) or only normalise (False).
        shuffle: shuffle each epoch when there is no sampler (default: ``train``).
        drop_last: drop the last, smaller batch.
        sampler: the order of indices; must have ``__len__``; its ``set_epoch`` is called by ours.
        seed: base seed of shuffle and augmentation.
        rank: the process's rank in distributed training: each rank draws its own augmentation.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        targets: Sequence[int] | torch.Tensor,
        batch_size: int,
        config: SmallImageConfig,
        *,
        device: torch.device | str | None = None,
        train: bool = True,
        shuffle: bool | None = None,
        drop_last: bool = False,
        sampler: Sampler[int] | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images).permute(0, 3, 1, 2)  # [N, H, W, 3] -> [N, 3, H, W]
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [N, 3, H, W] (or a [N, H, W, 3] array), got {images.dtype} "
                f"{list(images.shape)}"
            )
        if len(targets) != len(images):
            raise ValueError(f"{len(targets)} targets for {len(images)} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device).contiguous()  # [N, 3, H, W] uint8
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(self.device)  # [N]
        self.batch_size = batch_size
        self.config = config
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = drop_last
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        # Normalising as (x / 255 - mean) / std, the order of ToTensor + Normalize, gives the same floats.
        self._mean = torch.tensor(config.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(config.std, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_dataset(
        cls,
        dataset: LongTailDataset,
        batch_size: int,
        config: SmallImageConfig | None = None,
        **kwargs,
    ) -> DeviceDataLoader:
        """A loader over a :func:`~ride_models.data.create_dataset` dataset (image files are decoded once).

        ``config`` defaults to the dataset's standard one (CIFAR-LT, digits); ``kwargs`` as the constructor.
        """
        if config is None:
            if dataset.name not in SMALL_IMAGE_CONFIGS:
                raise ValueError(
                    f"{dataset.name} has no standard small-image config (only "
                    f"{sorted(SMALL_IMAGE_CONFIGS)} have); pass config=SmallImageConfig(mean, std, ...)"
                )
            config = SMALL_IMAGE_CONFIGS[dataset.name]
        return cls(dataset_images(dataset), dataset.targets, batch_size, config, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Use the order and augmentation of epoch ``epoch`` on the next iteration."""
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def _num_samples(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.images)

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> torch.Tensor:
        """``[num_samples]`` int64 indices of this epoch, on the CPU."""
        if self.sampler is not None:
            return torch.as_tensor(list(self.sampler), dtype=torch.long)
        if self.shuffle:
            return torch.randperm(
                len(self.images), generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
        return torch.arange(len(self.images))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.device)
        generator = torch.Generator(device=self.device)
        # Distinct from the shuffle's stream (seed + epoch), yet a function of (seed, epoch, rank) only.
        generator.manual_seed((self.seed + 1) * 1_000_003 + self.epoch + self.rank * RANK_SEED_STRIDE)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]  # [B, 3, H, W] uint8
            x = augment_batch(x, self.config, generator) if self.train else x.float()
            yield x.div_(255.0).sub_(self._mean).div_(self._std), self.targets[idx]


def dataset_images(dataset: LongTailDataset) -> np.ndarray:
    """All images of a dataset as one ``[N, H, W, 3]`` uint8 array (decoding image files in threads)."""
    if isinstance(dataset, ArrayDataset):
        return dataset.images
    if not isinstance(dataset, ImageListDataset):
        raise TypeError(f"expected an ArrayDataset or ImageListDataset, got {type(dataset).__name__}")
    # One contiguous share of the files per thread: a task per image spent more time handing out tasks and
    # waiting for the GIL than decoding (PIL releases it only while it decodes; CIFAR's 10,000 test JPEGs
    # took 3.1 s that way, 2.0 to 2.4 s in shares, 2-core CPU).
    count, workers = len(dataset), os.cpu_count() or 1
    share = -(-count // workers)

    def decode(start: int) -> list[np.ndarray]:
        return [np.asarray(dataset.load_image(i)) for i in range(start, min(start + share, count))]

    with ThreadPoolExecutor(workers) as pool:
        arrays = [array for part in pool.map(decode, range(0, count, share or 1)) for array in part]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(
            f"{dataset.name}: images of different sizes {sorted(sizes)[:3]}; the device-resident loader "
            "needs one size (resize the files, or use a DataLoader with build_transform)"
        )
    return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), dtype=np.uint8)
