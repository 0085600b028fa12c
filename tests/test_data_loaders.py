"""Tests of the transforms, the class-balanced sampler and the device-resident loader of ride_models.data.

References from outside the code: torchvision's own ops (pad, crop, flip, rotate, ToTensor, Normalize),
PIL's rotation, timm's transforms, and counts worked out by hand.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DistributedSampler
from torchvision import transforms as T

from ride_models.data import (
    CIFAR_CONFIG,
    ClassBalancedSampler,
    DeviceDataLoader,
    SmallImageConfig,
    batch_crop,
    batch_rotate,
    build_transform,
    create_dataset,
    small_image_transform,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def _random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


# ---------------------------------------------------------------------------------------------- transforms


def test_cifar_transforms_are_the_official_recipe() -> None:
    train = build_transform("cifar100_lt", is_training=True)
    kinds = [type(t) for t in train.transforms]
    assert kinds == [T.RandomCrop, T.RandomHorizontalFlip, T.RandomRotation, T.ToTensor, T.Normalize]
    crop, rotation = train.transforms[0], train.transforms[2]
    assert crop.size == (32, 32) and crop.padding == 4 and crop.fill == 0
    assert rotation.degrees == [-15.0, 15.0]
    # CIFAR-10 statistics for CIFAR-100 too (the official loader's quirk).
    assert train.transforms[-1].mean == (0.4914, 0.4822, 0.4465)
    assert train.transforms[-1].std == (0.2023, 0.1994, 0.2010)
    no_rotation = build_transform("cifar10_lt", is_training=True, rotation=0)
    assert [type(t) for t in no_rotation.transforms][:3] == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor]
    # Evaluation: a white pixel becomes (1 - mean) / std, a black one -mean / std.
    evaluate = build_transform("cifar10_lt", is_training=False)
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    img.putpixel((0, 0), (0, 0, 0))
    x = evaluate(img)
    assert x.shape == (3, 32, 32)
    assert x[:, 1, 1].tolist() == pytest.approx([2.5141, 2.5968, 2.7537], abs=1e-4)  # 0.5086 / 0.2023, ...
    assert x[:, 0, 0].tolist() == pytest.approx([-2.4291, -2.4183, -2.2214], abs=1e-4)


def test_digits_transform_does_not_flip() -> None:
    kinds = [type(t) for t in build_transform("digits_lt", is_training=True).transforms]
    assert T.RandomHorizontalFlip not in kinds and kinds[0] is T.RandomCrop


def test_imagenet_style_transforms_come_from_timm() -> None:
    from timm.data.transforms import RandomResizedCropAndInterpolation

    train = build_transform("imagenet_lt", is_training=True)
    assert isinstance(train.transforms[0], RandomResizedCropAndInterpolation)
    evaluate = build_transform("places_lt", is_training=False)
    x = evaluate(Image.new("RGB", (400, 300)))
    assert x.shape == (3, 224, 224)
    resize, center = evaluate.transforms[:2]
    assert resize.size == 256 and center.size == (224, 224)  # crop_pct 0.875, as the official eval
    assert build_transform("inat2018", False, input_size=160)(Image.new("RGB", (300, 200))).shape == (
        3,
        160,
        160,
    )
    with pytest.raises(ValueError, match="small-image datasets"):
        build_transform("imagenet_lt", True, rotation=10)
    with pytest.raises(ValueError, match="ImageNet-style"):
        build_transform("cifar10_lt", True, input_size=64)


# ------------------------------------------------------------------------------------- balanced sampler


def test_balanced_sampler_draws_classes_uniformly_and_cycles_each_class() -> None:
    targets = [0] * 8 + [1] + [2]  # counts 8, 1, 1
    sampler = ClassBalancedSampler(targets, num_samples=30_000, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) == 30_000
    freq = Counter(targets[i] for i in order)
    for c in range(3):  # each class about 1/3 (binomial sd 0.0027)
        assert freq[c] / 30_000 == pytest.approx(1 / 3, abs=0.02)
    # Class 0's draws, in blocks of 8, are each a permutation of its 8 images (reshuffled when used up).
    draws = [i for i in order if targets[i] == 0]
    blocks = [draws[k : k + 8] for k in range(0, len(draws) - 7, 8)]
    assert all(sorted(b) == list(range(8)) for b in blocks)
    assert len({tuple(b) for b in blocks}) > 1  # reshuffled, not repeated
    # The default epoch length is the dataset size.
    assert len(ClassBalancedSampler(targets)) == 10


def test_balanced_sampler_is_deterministic_per_epoch_and_splits_across_ranks() -> None:
    targets = [c for c in range(5) for _ in range(2 ** (5 - c))]  # 32, 16, 8, 4, 2: 62 images
    a, b = ClassBalancedSampler(targets, seed=3), ClassBalancedSampler(targets, seed=3)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    b.set_epoch(1)
    assert list(a) == list(b)
    # 4 ranks: ceil(62 / 4) = 16 each; together they are the 64-draw order of one process, interleaved.
    ranks = [ClassBalancedSampler(targets, num_replicas=4, rank=r, seed=3) for r in range(4)]
    for s in ranks:
        s.set_epoch(2)
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [16] * 4
    whole = ClassBalancedSampler(targets, num_samples=64, seed=3)
    whole.set_epoch(2)
    assert [i for step in zip(*shares) for i in step] == list(whole)


def test_balanced_sampler_errors() -> None:
    with pytest.raises(ValueError, match=r"classes \[1\] have no image"):
        ClassBalancedSampler([0, 0, 2])
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedSampler([0, 1], num_replicas=2, rank=2)
    for bad in (-3, 2.5):
        with pytest.raises(ValueError, match=rf"num_samples must be a whole number of draws >= 0, got {bad}"):
            ClassBalancedSampler([0, 1], num_samples=bad)


# --------------------------------------------------------------------------------- batched tensor ops


def test_batch_crop_equals_torchvision_pad_and_crop() -> None:
    images = _random_images(6)
    top, left = torch.tensor([0, 8, 4, 3, 8, 1]), torch.tensor([8, 0, 4, 7, 8, 2])
    got = batch_crop(images, top, left, padding=4)
    for i in range(6):
        expected = TF.crop(TF.pad(images[i], [4], fill=0), int(top[i]), int(left[i]), 32, 32)
        assert torch.equal(got[i], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_batch_rotate_matches_pil_and_torchvision(device: str) -> None:
    images = _random_images(2).float().to(device)
    # 90 degrees with nearest neighbour is exact: compare with PIL's rotation (counter-clockwise).
    got = batch_rotate(images, torch.tensor([90.0, -90.0], device=device)).cpu()
    for img, angle, out in zip(images.cpu().to(torch.uint8), (90, -90), got):
        expected = np.array(TF.to_pil_image(img).rotate(angle, resample=Image.NEAREST))
        assert torch.equal(out.to(torch.uint8).permute(1, 2, 0), torch.from_numpy(expected))
    # Other angles: as PIL (the official RandomRotation on PIL images) and torchvision's tensor rotate,
    # allowing for rare nearest-neighbour ties (none on CPU for these angles).
    got = batch_rotate(images, torch.tensor([15.0, -7.3], device=device)).cpu()
    for img, angle, out in zip(images.cpu(), (15.0, -7.3), got):
        pil = np.array(TF.to_pil_image(img.to(torch.uint8)).rotate(angle, resample=Image.NEAREST))
        assert (out != torch.from_numpy(pil).permute(2, 0, 1)).float().mean() < 1e-3
        expected = TF.rotate(img, angle, interpolation=T.InterpolationMode.NEAREST)
        assert (out != expected).float().mean() < 1e-3
        assert (out[:, 0, 0] == 0).all()  # the corner comes from outside the image: zero fill


# ---------------------------------------------------------------------------------- device data loader


@pytest.mark.parametrize("device", DEVICES)
def test_eval_batches_equal_the_pil_pipeline(device: str) -> None:
    test = create_dataset("digits_lt", split="test")
    loader = DeviceDataLoader.from_dataset(test, batch_size=64, device=device, train=False)
    reference = create_dataset("digits_lt", split="test", transform=build_transform("digits_lt", False))
    xs, ys = zip(*loader)
    x, y = torch.cat(xs).cpu(), torch.cat(ys).cpu()
    assert len(loader) == 5 and x.shape == (300, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == test.targets  # dataset order
    expected = torch.stack([reference[i][0] for i in range(len(reference))])
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


def _index_images(n: int) -> torch.Tensor:
    """Image i is constant (i % 251) + 2: crop, flip and rotation leave its centre pixel alone."""
    return ((torch.arange(n) % 251) + 2).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()


@pytest.mark.parametrize("device", DEVICES)
def test_train_batches_pair_images_with_labels_and_replay_per_epoch(device: str) -> None:
    n = 250
    targets = [i % 7 for i in range(n)]
    config = SmallImageConfig((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    loader = DeviceDataLoader(_index_images(n), targets, 32, config, device=device, seed=5)
    assert len(loader) == 8  # ceil(250 / 32)

    def epoch() -> tuple[list[int], list[int], torch.Tensor]:
        seen, labels, batches = [], [], []
        for x, y in loader:
            assert x.device.type == device and x.dtype == torch.float32
            seen += (x[:, 0, 16, 16] * 255).round().long().sub(2).tolist()
            labels += y.tolist()
            batches.append(x.cpu())
        return seen, labels, torch.cat(batches)

    seen, labels, x0 = epoch()
    assert sorted(seen) == list(range(n))  # a permutation of the dataset
    assert labels == [targets[i] for i in seen]  # each image comes with its own label
    assert torch.equal(epoch()[2], x0)  # same epoch, same batches
    loader.set_epoch(1)
    seen1, _, x1 = epoch()
    assert seen1 != seen and not torch.equal(x1, x0)
    loader.set_epoch(0)
    assert torch.equal(epoch()[2], x0)  # replays epoch 0 (resume)
    drop = DeviceDataLoader(_index_images(n), targets, 32, config, device=device, drop_last=True)
    assert len(drop) == 7 and sum(len(y) for _, y in drop) == 224


def test_crop_offsets_and_flips_are_uniform() -> None:
    # A white image padded with zeros: the crop's black rows and columns give its offset (top = 4 - black
    # rows at the top, or 4 + black rows at the bottom); offsets must cover 0..8 uniformly.
    n = 2700
    config = SmallImageConfig((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), hflip=False, rotation=0.0)
    white = torch.full((n, 3, 32, 32), 255, dtype=torch.uint8)
    x, _ = next(iter(DeviceDataLoader(white, [0] * n, n, config)))
    rows = x[:, 0, :, 16] > 0.5  # [n, 32]: white rows
    first, last = rows.float().argmax(1), 31 - rows.flip(1).float().argmax(1)
    top = torch.where(first > 0, 4 - first, 4 + (31 - last))
    freq = torch.bincount(top, minlength=9).float() / n
    assert freq.shape == (9,) and (freq - 1 / 9).abs().max() < 0.04
    # Flips: an image dark on its left half is dark on its right half after a flip.
    half = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    half[..., 16:] = 255
    config = SmallImageConfig((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), padding=0, rotation=0.0)
    x, _ = next(iter(DeviceDataLoader(half, [0] * n, n, config)))
    flipped = (x[:, 0, 16, 0] > 0.5).float().mean()
    assert flipped == pytest.approx(0.5, abs=0.04)


def test_device_loader_with_samplers() -> None:
    train = create_dataset("digits_lt")  # 144 .. 7 images per class
    sampler = ClassBalancedSampler(train.targets, seed=0)
    loader = DeviceDataLoader.from_dataset(train, 100, sampler=sampler)
    loader.set_epoch(3)
    assert sampler.epoch == 3 and len(loader) == math.ceil(489 / 100)
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == 489
    assert torch.bincount(labels, minlength=10).min() >= 20  # balanced: about 49 each, the tail included
    # Plain distributed training: torch's DistributedSampler over the indices.
    shares = []
    for rank in range(2):
        ds = DistributedSampler(range(len(train)), num_replicas=2, rank=rank, shuffle=True, seed=0)
        shares.append(torch.cat([y for _, y in DeviceDataLoader.from_dataset(train, 64, sampler=ds)]))
    assert [len(s) for s in shares] == [245, 245]


def test_device_loader_decodes_image_files(tmp_path) -> None:
    for c, name in enumerate(["a", "b"]):
        (tmp_path / "train" / name).mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (32, 32), (40 * c, k, 9)).save(tmp_path / "train" / name / f"{k}.png")
    folder = create_dataset("folder", tmp_path)
    loader = DeviceDataLoader.from_dataset(folder, 4, CIFAR_CONFIG, train=False)
    assert torch.equal(
        loader.images[:, :, 0, 0],
        torch.tensor([[0, k, 9] for k in range(3)] + [[40, k, 9] for k in range(3)], dtype=torch.uint8),
    )
    expected = small_image_transform(CIFAR_CONFIG, False)(folder.load_image(4))
    torch.testing.assert_close(torch.cat([x for x, _ in loader])[4], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no standard small-image config"):
        DeviceDataLoader.from_dataset(folder, 4)
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "a" / "3.png")
    with pytest.raises(ValueError, match="different sizes"):
        DeviceDataLoader.from_dataset(create_dataset("folder", tmp_path), 4, CIFAR_CONFIG)
