"""Standard transforms: the official CIFAR-LT recipe for small images, timm's for ImageNet-style data.

Small images (CIFAR-LT and the embedded digits) are described by one :class:`SmallImageConfig`, which
both the per-image PIL pipeline here and the device-resident loader
(:class:`~ride_models.data.device_loader.DeviceDataLoader`) follow, so the two paths augment alike.
ImageNet-LT, Places-LT, iNaturalist and user folders use ``timm.data.create_transform``: its defaults
(RandomResizedCrop, flip, colour jitter 0.4; resize to 256 then centre crop 224 for eval) are the official
RIDE ImageNet-LT recipe. Given the model (as train.py and validate.py give it), the interpolation is its
pretrained config's, bilinear as in the official code; without one, timm's default, bicubic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import timm.data
import torch
from torchvision import transforms as T

# The official CIFAR-LT loaders normalise with CIFAR-10 statistics, for CIFAR-100 too (a documented
# quirk of the official code, kept so that official checkpoints see the inputs they were trained on).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
# Pixel mean / std of the embedded digits' long-tailed training split (grey, so equal in the 3 channels).
DIGITS_MEAN = (0.305, 0.305, 0.305)
DIGITS_STD = (0.323, 0.323, 0.323)


@dataclass(frozen=True)
class SmallImageConfig:
    """Normalisation and augmentation of a small-image dataset (CIFAR-sized).

    Training order, as the official CIFAR loader: random ``size`` x ``size`` crop of the image zero-padded
    by ``padding`` on each side, horizontal flip (p = 0.5), rotation by an angle uniform in
    ``[-rotation, rotation]`` degrees (nearest neighbour, zero fill), then ``ToTensor`` and normalisation.
    Evaluation only normalises.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int = 32
    padding: int = 4
    hflip: bool = True
    rotation: float = 15.0  # the official RIDE CIFAR loader's RandomRotation(15); 0 turns it off


CIFAR_CONFIG = SmallImageConfig(CIFAR_MEAN, CIFAR_STD)
# A mirrored digit is another glyph (or none), so the digits are not flipped.
DIGITS_CONFIG = SmallImageConfig(DIGITS_MEAN, DIGITS_STD, hflip=False)
SMALL_IMAGE_CONFIGS: dict[str, SmallImageConfig] = {
    "cifar10_lt": CIFAR_CONFIG,
    "cifar100_lt": CIFAR_CONFIG,
    "digits_lt": DIGITS_CONFIG,
}


def small_image_transform(config: SmallImageConfig, is_training: bool) -> Callable:
    """The per-image (PIL) pipeline for a small-image dataset; returns ``[3, H, W]`` float tensors."""
    steps: list[Callable] = []
    if is_training:
        if config.padding:
            steps.append(T.RandomCrop(config.size, padding=config.padding))
        if config.hflip:
            steps.append(T.RandomHorizontalFlip())
        if config.rotation:
            steps.append(T.RandomRotation(config.rotation))
    steps += [T.ToTensor(), T.Normalize(config.mean, config.std)]
    return T.Compose(steps)


def build_transform(
    dataset: str,
    is_training: bool,
    *,
    model: torch.nn.Module | None = None,
    input_size: int | tuple[int, int, int] | None = None,
    rotation: float | None = None,
    **timm_kwargs,
) -> Callable:
    """The standard transform of a dataset: CIFAR-style for small images, timm's for the others.

    Args:
        dataset: a :func:`~ride_models.data.create_dataset` name.
        is_training: training augmentation (True) or evaluation preprocessing (False).
        model: a timm model whose ``pretrained_cfg`` gives input size, mean, std, crop
            (``timm.data.resolve_data_config``); ImageNet-style datasets only.
        input_size: ImageNet-style datasets: side or ``(3, H, W)`` (default from the model, else 224).
        rotation: small-image datasets: override the rotation range in degrees (0 turns it off).
        **timm_kwargs: passed to ``timm.data.create_transform`` (e.g. ``auto_augment``, ``re_prob``).
    """
    if dataset in SMALL_IMAGE_CONFIGS:
        if model is not None or input_size is not None or timm_kwargs:
            raise ValueError(
                f"{dataset} uses the fixed CIFAR-style transform (SmallImageConfig); model, input_size and "
                "timm options apply to ImageNet-style datasets only"
            )
        config = SMALL_IMAGE_CONFIGS[dataset]
        if rotation is not None:
            config = dataclasses.replace(config, rotation=float(rotation))
        return small_image_transform(config, is_training)
    if rotation is not None:
        raise ValueError(f"rotation is an option of the small-image datasets, not of {dataset}")
    # Without a model, timm's defaults: 224, bicubic, ImageNet mean / std, crop_pct 0.875.
    args = {"input_size": _as_input_size(input_size or 224)} if input_size or model is None else {}
    data_config = timm.data.resolve_data_config(args, model=model)
    return timm.data.create_transform(**data_config, is_training=is_training, **timm_kwargs)


def _as_input_size(input_size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    return tuple(input_size)
