"""Tests of ride_models.data: the official CIFAR-LT sampling, datasets, split files, embedded digits.

Expected numbers come from outside the code: the official fixtures (``reference_dir``), the real data and
its README (``shared_data_dir``), or hand computations written out here. Transforms, the balanced sampler
and the device-resident loader are tested in ``test_data_loaders.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ride_models.data import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    ArrayDataset,
    ImageListDataset,
    cifar_lt_indices,
    create_dataset,
    load_class_counts,
    long_tail_counts,
    read_split_file,
    select_per_class,
    shot_splits,
)
from ride_models.data.embedded import DIGITS_FILE
from ride_models.data.transforms import DIGITS_MEAN, DIGITS_STD

# CIFAR-100-LT, ratio 100, from the official code (reference README, "Data sampling").
CIFAR100_LT_R100 = [
    500, 477, 455, 434, 415, 396, 378, 361, 344, 328, 314, 299, 286, 273, 260, 248, 237, 226, 216, 206,
    197, 188, 179, 171, 163, 156, 149, 142, 135, 129, 123, 118, 112, 107, 102, 98, 93, 89, 85, 81, 77, 74,
    70, 67, 64, 61, 58, 56, 53, 51, 48, 46, 44, 42, 40, 38, 36, 35, 33, 32, 30, 29, 27, 26, 25, 24, 23, 22,
    21, 20, 19, 18, 17, 16, 15, 15, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 7, 6, 6, 6, 6, 5,
    5, 5, 5,
]  # fmt: skip
CIFAR10_LT_R100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # the issue; sum 12,406


def official_selection(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """The official procedure as the reference README states it, with numpy's *global* legacy generator."""
    state = np.random.get_state()
    np.random.seed(seed)
    kept = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        kept.append(idx[:n])
    np.random.set_state(state)
    return np.concatenate(kept)


# ------------------------------------------------------------------------------------ counts and selection


def test_long_tail_counts_match_the_official_table(reference_dir: Path) -> None:
    table = json.loads((reference_dir / "cifar_lt_class_counts.json").read_text())
    for dataset, num_classes, img_max in (("cifar100", 100, 500.0), ("cifar10", 10, 5000.0)):
        for key, entry in table[dataset].items():
            ratio = round(1 / entry["imb_factor_arg"])
            assert long_tail_counts(num_classes, img_max, ratio) == entry["counts"], (dataset, key)
            assert sum(entry["counts"]) == entry["sum"]


def test_long_tail_counts_by_hand() -> None:
    assert long_tail_counts(100, 500.0, 100) == CIFAR100_LT_R100
    assert sum(CIFAR100_LT_R100) == 10_847
    assert long_tail_counts(10, 5000.0, 100) == CIFAR10_LT_R100
    # 50 * 0.1 ** (i / 9), truncated: 50, 38.7, 29.97, 23.2, 17.97, 13.9, 10.8, 8.3, 6.5, 5.0
    assert long_tail_counts(10, 50, 10) == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
    assert long_tail_counts(4, 7, 1) == [7, 7, 7, 7]
    assert long_tail_counts(1, 9, 50) == [9]
    with pytest.raises(ValueError, match="img_max 0 gives the head class no image; it must be at least 1"):
        long_tail_counts(1, 0, 1)
    # With several classes too: no ratio can help (it used to advise "a smaller ratio (at most 1)").
    with pytest.raises(ValueError, match="img_max 0.5 gives the head class no image; it must be at least 1"):
        long_tail_counts(3, 0.5, 1)
    with pytest.raises(ValueError, match=r"counts\[0\] is -1: images to keep per class cannot be negative"):
        select_per_class([0, 0, 1], [-1, 1])  # idx[:-1] would have kept one of class 0's two images


@pytest.mark.parametrize("ratio, total", [(100, 10_847), (50, 12_608), (10, 19_573)])
def test_cifar100_lt_indices_equal_the_official_ones(shared_data_dir: Path, ratio: int, total: int) -> None:
    labels = np.load(shared_data_dir / "cifar100" / "train_fine_labels_official_order.npy")
    expected = np.load(shared_data_dir / "cifar100" / f"cifar100_lt_imb{ratio}_train_indices_ldam_seed0.npy")
    got = cifar_lt_indices(labels, ratio)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)  # same images, same order
    counts = np.bincount(labels[got], minlength=100)
    assert counts.sum() == total
    if ratio == 100:
        assert counts.tolist() == CIFAR100_LT_R100
        assert [len(v) for v in shot_splits(counts.tolist()).values()] == [35, 35, 30]


def test_cifar_lt_indices_follow_the_official_permutations(
    reference_dir: Path, shared_data_dir: Path
) -> None:
    # The fixture's per-class permutations hold for every ratio, e.g. 200 (no stored index list for it).
    perms = np.load(reference_dir / "cifar_lt_sampling_permutations.npz")
    for labels, perm, img_max in (
        (
            np.load(shared_data_dir / "cifar100" / "train_fine_labels_official_order.npy"),
            perms["cifar100_perm"],
            500,
        ),
        (
            np.load(shared_data_dir / "cifar10" / "train_labels_official_order.npy"),
            perms["cifar10_perm"],
            5000,
        ),
    ):
        counts = long_tail_counts(len(perm), img_max, 200)
        expected = np.concatenate([np.flatnonzero(labels == c)[perm[c, :n]] for c, n in enumerate(counts)])
        np.testing.assert_array_equal(cifar_lt_indices(labels, 200), expected)


def test_selection_equals_the_global_numpy_procedure_and_leaves_numpy_alone() -> None:
    labels = np.random.RandomState(3).randint(0, 7, size=700)
    counts = [int(n) for n in np.bincount(labels) // 2]
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    got = select_per_class(labels, counts, seed=5)
    assert np.random.random() == before  # the global generator was not touched
    np.testing.assert_array_equal(got, official_selection(labels, counts, seed=5))


def test_shot_splits_thresholds() -> None:
    # many: > 100; medium: 20..100 inclusive; few: < 20.
    assert shot_splits([101, 100, 20, 19, 500, 1]) == {"many": [0, 4], "medium": [1, 2], "few": [3, 5]}
    assert shot_splits([0, 150.0]) == {"many": [1], "medium": [], "few": [0]}  # no training image: few
    for bad in (-5, float("nan"), 2.5):  # each used to be filed under a split (NaN under "medium")
        with pytest.raises(ValueError, match=r"class_counts\[1\] is .*: the training images of a class are"):
            shot_splits([200, bad])


# ------------------------------------------------------------------------------------- CIFAR-10 JPEG tree


@pytest.fixture(scope="session")
def cifar10_jpeg_root(shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shared CIFAR-10 JPEG zips extracted once per session: root/train, root/test (60,000 files).

    Into RAM (/dev/shm) where there is room: creating 60,000 small files there takes about 1 s, against
    3 to 30 s on a busy disk. Removed at the end of the session either way.
    """
    shm = Path("/dev/shm")
    in_ram = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2**30
    root = (
        Path(tempfile.mkdtemp(prefix="ride_cifar10_jpeg_", dir=shm))
        if in_ram
        else tmp_path_factory.mktemp("c10")
    )
    try:
        for name in ("cifar10_train_jpeg.zip", "cifar10_test_jpeg.zip"):
            with zipfile.ZipFile(shared_data_dir / "cifar10" / name) as z:
                z.extractall(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def cifar10_official_labels(shared_data_dir: Path) -> np.ndarray:
    return np.load(shared_data_dir / "cifar10" / "train_labels_official_order.npy")


def test_cifar10_jpeg_tree_loads_through_folder(cifar10_jpeg_root: Path, cifar10_official_labels) -> None:
    train = create_dataset("folder", cifar10_jpeg_root, "train")
    assert isinstance(train, ImageListDataset) and len(train) == 50_000
    # Sorted folder names give the README's label order.
    assert train.classes == CIFAR10_CLASSES == sorted(CIFAR10_CLASSES)
    assert train.class_counts == [5000] * 10 == np.bincount(cifar10_official_labels).tolist()
    assert all(Path(p).parent.name == train.classes[t] for p, t in zip(train.paths, train.targets))
    img, target = train[0]
    assert img.size == (32, 32) and img.mode == "RGB" and target == 0
    test = create_dataset("folder", cifar10_jpeg_root, "val")  # no val/ folder: falls back to test/
    assert len(test) == 10_000 and test.class_counts == [5000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10


def test_official_cifar10_lt_from_the_jpeg_tree(cifar10_jpeg_root: Path, cifar10_official_labels) -> None:
    labels = cifar10_official_labels
    lt = create_dataset("cifar10_lt", cifar10_jpeg_root, "train", imb_ratio=100)
    assert len(lt) == 12_406 and lt.class_counts == CIFAR10_LT_R100
    assert [len(v) for v in lt.shot_splits().values()] == [8, 2, 0]
    # The README: official index i of class c is train/<c>/<rank>.jpg, rank = (labels[:i] == c).sum().
    official = official_selection(labels, CIFAR10_LT_R100)
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for c in range(10):
        rank_in_class[labels == c] = np.arange(5000)
    expected = [f"{CIFAR10_CLASSES[labels[i]]}/{rank_in_class[i]:04d}.jpg" for i in official]
    assert [str(Path(p).relative_to(cifar10_jpeg_root / "train")) for p in lt.paths] == expected
    assert lt.targets == labels[official].tolist()
    # The general folder path with the same ratio keeps the same images in the same order.
    assert create_dataset("folder", cifar10_jpeg_root, "train", imb_ratio=100).paths == lt.paths
    test = create_dataset("cifar10_lt", cifar10_jpeg_root, "test")  # default ratio: the official 100
    assert len(test) == 10_000 and test.class_counts == CIFAR10_LT_R100


def test_cifar_jpeg_tree_must_be_in_official_order(tmp_path: Path) -> None:
    for c in CIFAR10_CLASSES:
        (tmp_path / "train" / c).mkdir(parents=True)
        for k in (0, 1, 3):  # rank 2 missing: the files are not the official ranks 0..n-1
            Image.new("RGB", (32, 32)).save(tmp_path / "train" / c / f"{k:04d}.png")
    with pytest.raises(ValueError, match="official order"):
        create_dataset("cifar10_lt", tmp_path)
    with pytest.raises(ValueError, match="not CIFAR's"):
        create_dataset("cifar100_lt", tmp_path)


# ------------------------------------------------------------------------ torchvision's CIFAR files (fake)


def _write_fake_cifar(root: Path, num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    """Pickled batches in torchvision's on-disk layout; image i has pixel (0, 0) = (i % 256, i // 256, 7)."""
    rng = np.random.RandomState(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    data[:, 0, 0, 0] = np.arange(len(labels)) % 256
    data[:, 1, 0, 0] = np.arange(len(labels)) // 256
    data[:, 2, 0, 0] = 7
    test_labels = np.arange(3 * num_classes) % num_classes
    test_data = np.full((len(test_labels), 3, 32, 32), 9, dtype=np.uint8)
    if num_classes == 10:
        folder, key, meta = root / "cifar-10-batches-py", "labels", ("batches.meta", "label_names")
        chunks = np.array_split(np.arange(len(labels)), 5)
        files = {f"data_batch_{k + 1}": chunk for k, chunk in enumerate(chunks)}
        test_file, names = "test_batch", CIFAR10_CLASSES
    else:
        folder, key, meta = root / "cifar-100-python", "fine_labels", ("meta", "fine_label_names")
        files, test_file, names = {"train": np.arange(len(labels))}, "test", CIFAR100_CLASSES
    folder.mkdir(parents=True)
    for name, idx in files.items():
        entry = {"data": data[idx].reshape(len(idx), -1), key: labels[idx].tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / test_file).write_bytes(
        pickle.dumps({"data": test_data.reshape(len(test_labels), -1), key: test_labels.tolist()})
    )
    (folder / meta[0]).write_bytes(pickle.dumps({meta[1]: names}))
    return labels


@pytest.fixture
def no_md5_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks the real files' MD5 sums, which fakes cannot match."""
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("name, num_classes", [("cifar10_lt", 10), ("cifar100_lt", 100)])
def test_cifar_lt_from_torchvision_files(tmp_path: Path, no_md5_check, name: str, num_classes: int) -> None:
    labels = _write_fake_cifar(tmp_path, num_classes, per_class=50)
    train = create_dataset(name, tmp_path, "train", imb_ratio=10)
    assert isinstance(train, ArrayDataset)
    counts = [50, 38, 29, 23, 17, 13, 10, 8, 6, 5] if num_classes == 10 else long_tail_counts(100, 50, 10)
    assert train.class_counts == counts and len(train) == sum(counts)
    expected = official_selection(labels, counts)
    pixel = train.images[:, 0, 0].astype(np.int64)  # [N, 3]
    got = pixel[:, 0] + 256 * pixel[:, 1]  # pixel (0, 0) -> the official index
    np.testing.assert_array_equal(got, expected)
    assert (train.images[:, 0, 0, 2] == 7).all() and train.targets == labels[expected].tolist()
    assert train.classes == (CIFAR10_CLASSES if num_classes == 10 else CIFAR100_CLASSES)
    test = create_dataset(name, tmp_path, "test", imb_ratio=10)
    assert len(test) == 3 * num_classes and test.class_counts == counts
    img, target = test[1]
    assert img.size == (32, 32) and target == 1 and img.getpixel((5, 5)) == (9, 9, 9)


def test_cifar_lt_missing_data_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        create_dataset("cifar100_lt", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python") in msg and str(tmp_path / "train") in msg and "download" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_dataset("cifar10_lt", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--data-dir"):
        create_dataset("cifar10_lt")


def test_cifar100_class_names_are_the_official_ones(shared_data_dir: Path) -> None:
    names = (shared_data_dir / "cifar100" / "fine_label_names.txt").read_text().split()
    assert CIFAR100_CLASSES == names


# ----------------------------------------------------------------------------------------- split files


@pytest.fixture(scope="session")
def splits_dir(shared_data_dir: Path) -> Path:
    return shared_data_dir / "splits"


def test_imagenet_lt_split_files_and_counts(splits_dir: Path, tmp_path: Path) -> None:
    folder = splits_dir / "ImageNet_LT"
    counts_json = folder / "derived_counts" / "ImageNet_LT_train_cls_freq.json"
    for split, lines, per_class in (("val", 20_000, 20), ("test", 50_000, 50)):
        ds = create_dataset(
            "imagenet_lt", tmp_path, split, split_dir=folder, class_counts=counts_json, check_files=False
        )
        assert len(ds) == lines and ds.num_classes == 1000
        assert np.bincount(ds.targets).tolist() == [per_class] * 1000
    assert sum(ds.class_counts) == 115_846 and max(ds.class_counts) == 1280 and min(ds.class_counts) == 5
    splits = ds.shot_splits()
    assert [len(splits[k]) for k in ("many", "medium", "few")] == [385, 479, 136]
    sade = np.load(folder / "derived_counts" / "SADE_imagenet_lt_shot_list.npy")  # bool [3, 1000]
    for row, key in enumerate(("many", "medium", "few")):
        assert np.flatnonzero(sade[row]).tolist() == splits[key]
    for key, name in (("many", "many"), ("medium", "median"), ("few", "few")):
        listed = (folder / "derived_counts" / f"imagenet_lt_{name}_train.txt").read_text().splitlines()
        assert sorted(int(line.split()[0]) for line in listed) == splits[key]
    assert ds.paths[0] == str(tmp_path / "val/n01440764/ILSVRC2012_val_00029930.JPEG")


def test_places_lt_counts_come_from_its_training_list(splits_dir: Path, tmp_path: Path) -> None:
    folder = splits_dir / "Places_LT"
    train = create_dataset("places_lt", tmp_path, "train", split_dir=folder, check_files=False)
    assert len(train) == 62_500 and train.num_classes == 365
    assert max(train.class_counts) == 4980 and min(train.class_counts) == 5
    assert [len(v) for v in train.shot_splits().values()] == [131, 163, 71]
    for split, lines in (("val", 7_300), ("test", 36_500)):
        ds = create_dataset("places_lt", tmp_path, split, split_dir=folder, check_files=False)
        assert len(ds) == lines and ds.class_counts == train.class_counts  # counts of the training list


def test_inaturalist_val_list_parses(splits_dir: Path, tmp_path: Path) -> None:
    val_file = splits_dir / "iNaturalist18" / "iNaturalist18_val.txt"
    paths, labels = read_split_file(val_file, num_classes=8142)
    assert len(paths) == 24_426 and np.bincount(labels, minlength=8142).tolist() == [3] * 8142
    assert paths[0].startswith("train_val2018/")
    # Without the training list the counts are unknown, and the error says which file and where.
    with pytest.raises(FileNotFoundError) as err:
        create_dataset("inat2018", tmp_path, "test", split_dir=val_file.parent, check_files=False)
    msg = str(err.value)
    assert "iNaturalist18_train.txt" in msg and str(val_file.parent / "iNaturalist18_train.txt") in msg
    assert "class_counts" in msg
    ds = create_dataset(
        "inat2018", tmp_path, "test", split_dir=val_file.parent, class_counts=[60] * 8142, check_files=False
    )
    assert len(ds) == 24_426  # test is the val list


def _write_places_like(root: Path) -> list[int]:
    """A Places-LT-shaped tree: 365 classes of 1..3 tiny images, split files in root/splits."""
    per_class = [1 + c % 3 for c in range(365)]
    lines = []
    for c, n in enumerate(per_class):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for k in range(n):
            rel = f"train/class{c}/{k}.png"
            Image.new("RGB", (6, 4), (c % 256, k, 0)).save(root / rel)
            lines.append(f"{rel} {c}")
    (root / "splits").mkdir()
    (root / "splits" / "Places_LT_train.txt").write_text("\n".join(lines) + "\n")
    (root / "splits" / "Places_LT_val.txt").write_text("\n".join(lines[:5]) + "\n")
    return per_class


def test_split_file_dataset_loads_images(tmp_path: Path) -> None:
    per_class = _write_places_like(tmp_path)
    train = create_dataset("places_lt", tmp_path, "train", split_dir=tmp_path / "splits")
    assert train.class_counts == per_class and len(train) == sum(per_class)
    img, target = train[3]  # class 2's first image (classes 0, 1, 2 have 1, 2, 3 images)
    assert target == 2 and img.size == (6, 4) and img.getpixel((0, 0)) == (2, 0, 0)
    val = create_dataset("places_lt", tmp_path, "val", split_dir=tmp_path / "splits", transform=np.asarray)
    assert len(val) == 5 and val.class_counts == per_class and val[0][0].shape == (4, 6, 3)


def test_split_file_errors(tmp_path: Path) -> None:
    _write_places_like(tmp_path)
    splits = tmp_path / "splits"
    with pytest.raises(FileNotFoundError) as err:
        create_dataset("places_lt", tmp_path, "train")  # the split files are not in root
    msg = str(err.value)
    assert "Places_LT_train.txt not found in" in msg and str(tmp_path / "Places_LT_train.txt") in msg
    assert "split_dir" in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_dataset("imagenet_lt", tmp_path / "missing")
    (tmp_path / "train" / "class8" / "2.png").write_bytes(b"")  # an interrupted copy
    with pytest.raises(
        ValueError, match=r"1 image files listed in .*Places_LT_train.txt are empty .*class8/2.png"
    ):
        create_dataset("places_lt", tmp_path, "train", split_dir=splits)
    (tmp_path / "train" / "class7" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 729 images listed .* missing .*class7/0.png"):
        create_dataset("places_lt", tmp_path, "train", split_dir=splits)
    lines = (splits / "Places_LT_train.txt").read_text().splitlines()
    for bad, pattern in (
        ("train/class0/0.png 365", r"Places_LT_train.txt:3: label 365 is outside \[0, 365\)"),
        ("train/class0/0.png x1", r"Places_LT_train.txt:3: label 'x1' is not an integer"),
        ("train/class0/0.png", r"Places_LT_train.txt:3: expected 'relative/path label'"),
        # line 3 repeats line 1 (class 0's only image) with another label
        (
            "train/class0/0.png 5",
            r"Places_LT_train.txt:3: train/class0/0.png is listed with label 0 on line 1 and with label 5",
        ),
    ):
        (splits / "Places_LT_train.txt").write_text("\n".join(lines[:2] + [bad] + lines[3:]))
        with pytest.raises(ValueError, match=pattern):
            create_dataset("places_lt", tmp_path, "train", split_dir=splits, check_files=False)
    # A class with no training image.
    (splits / "Places_LT_train.txt").write_text("\n".join(line for line in lines if not line.endswith(" 9")))
    with pytest.raises(ValueError, match=r"classes \[9\] have no training image"):
        create_dataset("places_lt", tmp_path, "train", split_dir=splits, check_files=False)
    with pytest.raises(ValueError, match="imb_ratio does not apply"):
        create_dataset("places_lt", tmp_path, imb_ratio=10)
    with pytest.raises(ValueError, match="one per class"):
        create_dataset("places_lt", tmp_path, "val", split_dir=splits, class_counts=[1, 2])


# ------------------------------------------------------------------------------------------ user folders


def _write_folder(root: Path, counts: dict[str, int]) -> None:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (5, 5), (k, 0, 0)).save(root / cls / f"{k:02d}.png")


def test_folder_dataset_and_long_tail_subsampling(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"cat": 6, "ant": 10, "dog": 4})
    _write_folder(tmp_path / "val", {"ant": 2, "dog": 1})  # a val class may be absent
    full = create_dataset("folder", tmp_path)
    assert full.classes == ["ant", "cat", "dog"] and full.class_counts == [10, 6, 4]
    # Head count = the smallest class (4); ratio 4 over 3 classes: 4 * 0.25 ** (i / 2) = 4, 2, 1.
    lt = create_dataset("folder", tmp_path, "train", imb_ratio=4)
    assert lt.class_counts == [4, 2, 1] and np.bincount(lt.targets).tolist() == [4, 2, 1]
    assert set(lt.paths) <= set(full.paths)
    val = create_dataset("folder", tmp_path, "val", imb_ratio=4)
    assert val.targets == [0, 0, 2] and val.class_counts == [4, 2, 1]
    assert create_dataset("folder", tmp_path, "test").paths == val.paths  # no test/: falls back to val/
    _write_folder(tmp_path / "only_train" / "train", {"a": 1})
    with pytest.raises(FileNotFoundError, match=r"no val folder in .*only_train \(looked at .*validation"):
        create_dataset("folder", tmp_path / "only_train", "val")
    with pytest.raises(FileNotFoundError, match="no training tree"):
        create_dataset("folder", tmp_path / "train", "val")
    bare = create_dataset("folder", tmp_path / "train")  # class folders directly under root: the train split
    assert bare.class_counts == [10, 6, 4]


def test_a_folder_split_without_its_training_tree(tmp_path: Path) -> None:
    """Without train/, class_counts give the training counts and the test tree's folders the classes."""
    _write_folder(tmp_path / "test", {"dog": 1, "ant": 2})
    (tmp_path / "test" / "cat").mkdir()  # a class without test images keeps its folder
    with pytest.raises(FileNotFoundError, match=r"no training tree at .*train(.|\n)*pass class_counts="):
        create_dataset("folder", tmp_path, "test")
    test = create_dataset("folder", tmp_path, "test", class_counts=[300, 30, 3])
    assert test.classes == ["ant", "cat", "dog"] and test.targets == [0, 0, 2]  # cat: index 1, no image
    assert test.class_counts == [300, 30, 3]  # > 100 many, 20..100 medium, < 20 few
    assert test.shot_splits() == {"many": [0], "medium": [1], "few": [2]}
    # Two folders for three counts: a class is missing, which would shift the labels after it.
    (tmp_path / "test" / "cat").rmdir()
    with pytest.raises(ValueError, match=r"has 2 class folders but the class counts give 3 classes"):
        create_dataset("folder", tmp_path, "test", class_counts=[300, 30, 3])
    # With train/, class_counts replace its counts; imb_ratio as well is refused.
    _write_folder(tmp_path / "train", {"ant": 2, "dog": 1})
    assert create_dataset("folder", tmp_path, "test", class_counts=[7, 5]).class_counts == [7, 5]
    with pytest.raises(ValueError, match="imb_ratio and class_counts both"):
        create_dataset("folder", tmp_path, "test", class_counts=[7, 5], imb_ratio=2)


def test_folder_errors(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", {"a": 3, "b": 2})
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*empty holds no image"):
        create_dataset("folder", tmp_path)
    (tmp_path / "train" / "empty").rmdir()
    (tmp_path / "train" / "b" / "zero.jpg").write_bytes(b"")  # would stop training when loaded
    with pytest.raises(
        ValueError, match=r"1 image files under .*train/b are empty \(0 bytes\), e.g. .*zero.jpg"
    ):
        create_dataset("folder", tmp_path)
    (tmp_path / "train" / "b" / "zero.jpg").unlink()
    _write_folder(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(ValueError, match=r"class folders \['zebra'\] that the training split does not have"):
        create_dataset("folder", tmp_path, "val")
    with pytest.raises(ValueError, match="imbalance ratio must be >= 1"):
        create_dataset("folder", tmp_path, imb_ratio=0.5)
    with pytest.raises(ValueError, match="no image"):
        create_dataset("folder", tmp_path, imb_ratio=3)  # 2 * (1/3) ** 1 = 0.67 -> the last class is empty
    with pytest.raises(ValueError, match="split_dir is an option of"):
        create_dataset("folder", tmp_path, split_dir=tmp_path)
    with pytest.raises(ValueError, match="class_counts is an option of"):
        create_dataset("digits_lt", class_counts=[1] * 10)
    with pytest.raises(ValueError, match="download is an option"):
        create_dataset("digits_lt", download=True)
    with pytest.raises(ValueError, match="unknown dataset"):
        create_dataset("cifar1000_lt", tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        create_dataset("folder", tmp_path, "training")


def test_a_failed_cifar_download_names_the_file_to_copy(tmp_path, monkeypatch):
    """Offline, --dataset-download fails in urllib inside torchvision: one error says what to copy where."""
    from urllib.error import URLError

    def offline(self):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    expected = (
        "cifar100_lt: torchvision could not download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
        f" into {tmp_path} ([Errno -2] Name or service not known). Without a network, put "
        "cifar-100-python.tar.gz there (torchvision then only extracts it) or its extracted cifar-100-python/"
    )
    with pytest.raises(ConnectionError, match=re.escape(expected)):
        create_dataset("cifar100_lt", tmp_path, download=True)


# ------------------------------------------------------------------------------------------- image files


def _image_list(paths: list[Path]) -> ImageListDataset:
    return ImageListDataset(paths, [0] * len(paths), [len(paths)], ["any"], name="files", split="train")


def _gray(*values: int) -> list[tuple[int, int, int]]:
    return [(v, v, v) for v in values]


def test_image_files_of_every_mode_load_as_8_bit_rgb(tmp_path: Path) -> None:
    # 16-bit gray v becomes round(v / 257): 25700 -> 100, 32896 -> 128, 1000 -> 3.89 -> 4, 65535 -> 255.
    sixteen, eight = np.array([[0, 25700, 32896, 1000, 65535]]), _gray(0, 100, 128, 4, 255)
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putdata([0, 1])
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)])  # white, cyan, black
    cases = {  # file: (image, the modes Pillow may open it in, the expected RGB pixels)
        "gray16.png": (Image.fromarray(sixteen.astype(np.uint16)), {"I;16", "I"}, eight),
        "gray16b.tif": (Image.fromarray(sixteen.astype(">u2")), {"I;16B"}, eight),
        # Pillow opens a 16-bit PGM as "I", rescaled to 0..65535.
        "gray16.pgm": (Image.fromarray(sixteen.astype(np.uint16)), {"I"}, eight),
        # A 32-bit TIFF declares no scale: 0..255 is read as timm and torchvision read it (convert("RGB")).
        "int32.tif": (Image.fromarray(np.array([[0, 100, 255]], np.int32)), {"I"}, _gray(0, 100, 255)),
        "gray.png": (Image.fromarray(np.array([[0, 100, 255]], np.uint8)), {"L"}, _gray(0, 100, 255)),
        "rgba.png": (Image.new("RGBA", (1, 1), (10, 20, 30, 40)), {"RGBA"}, [(10, 20, 30)]),
        "palette.png": (palette, {"P"}, [(255, 0, 0), (0, 0, 255)]),
        "bits.png": (Image.fromarray(np.array([[False, True]])), {"1"}, _gray(0, 255)),
        "cmyk.tif": (cmyk, {"CMYK"}, [(255, 255, 255), (0, 255, 255), (0, 0, 0)]),
    }
    for name, (image, _, _) in cases.items():
        image.save(tmp_path / name)
    # A 12-bit PGM (maxval 4095): 1365 is a third of 4095, so 85 (a third of 255); 4095 is white.
    (tmp_path / "gray12.pgm").write_bytes(b"P2\n3 1\n4095\n0 1365 4095\n")
    cases["gray12.pgm"] = (None, {"I"}, _gray(0, 85, 255))
    dataset = _image_list([tmp_path / name for name in cases])
    for i, (name, (_, modes, pixels)) in enumerate(cases.items()):
        with Image.open(tmp_path / name) as opened:
            assert opened.mode in modes, name  # the file tests the mode it is meant to
        loaded = dataset.load_image(i)
        assert loaded.mode == "RGB" and np.asarray(loaded)[0].tolist() == [list(p) for p in pixels], name


def test_unreadable_image_files_are_named(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg")
    Image.fromarray(noise).save(tmp_path / "full.png")
    jpeg, png = (tmp_path / "full.jpg").read_bytes(), (tmp_path / "full.png").read_bytes()
    files = {
        "half.jpg": jpeg[: len(jpeg) // 2],
        "tail.jpg": jpeg[:-80],
        "header.jpg": jpeg[:100],
        "half.png": png[: len(png) // 2],
        "text.jpg": b"not an image",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    dataset = _image_list([tmp_path / name for name in files])
    for i, name in enumerate(files):
        with pytest.raises(ValueError, match="remove or replace the file") as error:
            dataset.load_image(i)
        assert str(error.value).startswith(f"cannot read image {tmp_path / name}: "), name
    # Pixels whose range is unknown are refused, not clipped.
    Image.fromarray(np.array([[0.0, 0.5]], np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.array([[0, 70000]], np.int32)).save(tmp_path / "int32.tif")
    Image.fromarray(np.array([[0, 256]], np.int32)).save(tmp_path / "int32_256.tif")  # 8-bit? 16-bit?
    dataset = _image_list([tmp_path / name for name in ("float.tif", "int32.tif", "int32_256.tif")])
    with pytest.raises(ValueError, match=r"float\.tif has floating-point pixels \(mode F\) of unknown range"):
        dataset.load_image(0)
    for i, values in ((1, "0..70000"), (2, "0..256")):
        with pytest.raises(ValueError, match=rf"int32\S*\.tif has 32-bit integer pixels \({values}\) of"):
            dataset.load_image(i)


# ------------------------------------------------------------------------------------ embedded default


def test_embedded_digits_default() -> None:
    train = create_dataset("digits_lt")
    # 30 test images per class leave 144..153 per class; profile 144 * (1/20) ** (i / 9), truncated.
    assert train.class_counts == [144, 103, 74, 53, 38, 27, 19, 14, 10, 7]
    assert len(train) == 489 and np.bincount(train.targets).tolist() == train.class_counts
    assert train.shot_splits() == {"many": [0, 1], "medium": [2, 3, 4, 5], "few": [6, 7, 8, 9]}
    assert train.images.shape == (489, 32, 32, 3) and train.images.dtype == np.uint8
    assert (train.images[..., 0] == train.images[..., 2]).all()  # grey in 3 channels
    pixels = train.images[..., 0] / 255.0
    assert pixels.mean() == pytest.approx(DIGITS_MEAN[0], abs=1e-3)
    assert pixels.std() == pytest.approx(DIGITS_STD[0], abs=1e-3)
    test = create_dataset("digits_lt", split="test")
    assert len(test) == 300 and np.bincount(test.targets).tolist() == [30] * 10
    assert test.class_counts == train.class_counts
    assert create_dataset("digits_lt", imb_ratio=1).class_counts == [144] * 10


def test_embedded_digits_file_is_the_real_data() -> None:
    assert DIGITS_FILE.stat().st_size < 100_000
    with np.load(DIGITS_FILE) as data:
        blocks, labels, notice = data["images"], data["labels"], str(data["notice"])
    assert blocks.shape == (1797, 8, 8) and blocks.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # First and last rows of scikit-learn's digits.csv.gz (labels 0 and 8).
    assert blocks[0, :2].ravel().tolist() == [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0]
    assert blocks[-1, -1].tolist() == [0, 1, 8, 12, 14, 12, 1, 0] and labels[-1] == 8 and labels[0] == 0
    assert "CC BY 4.0" in notice and "BSD-3-Clause" in notice


def test_labels_outside_range_and_bad_ratios() -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        select_per_class([0, 1, 2, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="outside"):
        cifar_lt_indices(np.array([0, 1, -1, 1]), 10)
    with pytest.raises(ValueError, match="integers"):
        cifar_lt_indices(np.array([0.0, 1.0]), 10)
    with pytest.raises(ValueError, match="imbalance ratio must be >= 1"):
        long_tail_counts(10, 500, 0.5)
    with pytest.raises(ValueError, match="imbalance ratio must be >= 1"):
        create_dataset("digits_lt", imb_ratio=0)
    with pytest.raises(ValueError, match="has 2 images but the long-tail profile asks for 3"):
        select_per_class([0, 0, 0, 1, 1], [3, 3])
    assert torch.tensor(create_dataset("digits_lt").targets).max() == 9


def test_folder_trees_are_read_as_imagefolder_reads_them(tmp_path: Path) -> None:
    """Images in nested folders count, as with torchvision's ImageFolder; hidden files and folders (macOS's
    ._name.jpg, .ipynb_checkpoints) do not."""
    _write_folder(tmp_path / "train", {"a": 3, "b": 2})
    _write_folder(tmp_path / "train" / "b" / "nested", {"deeper": 2})
    (tmp_path / "train" / "a" / "._00.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _write_folder(tmp_path / "train" / ".ipynb_checkpoints", {"x": 1})
    _write_folder(tmp_path / "train" / "a" / ".cache", {"y": 1})
    dataset = create_dataset("folder", tmp_path)
    reference = torchvision.datasets.ImageFolder(str(tmp_path / "train"))
    assert dataset.classes == ["a", "b"] and dataset.class_counts == [3, 4]
    assert sorted(dataset.paths) == sorted(p for p, _ in reference.samples if "/." not in p)
    assert all("/." not in p for p in dataset.paths)


def test_a_folder_linked_to_from_below_is_read_once(tmp_path: Path) -> None:
    """A link back up the tree (a/sub/back -> ..) made os.walk, and so torchvision's ImageFolder, list
    a/00.png and a/sub/00.png again at every depth until the path grew too long; class a has 2 images."""
    _write_folder(tmp_path / "train", {"a": 1, "b": 1})
    _write_folder(tmp_path / "train" / "a", {"sub": 1})
    (tmp_path / "train" / "a" / "sub" / "back").symlink_to("..")
    (tmp_path / "train" / "b" / "also_a").symlink_to(tmp_path / "train" / "a")  # another class's: counted
    dataset = create_dataset("folder", tmp_path)
    assert dataset.class_counts == [2, 3]
    assert dataset.paths[:2] == [str(tmp_path / "train" / "a" / p) for p in ("00.png", "sub/00.png")]


def test_the_ratio_advised_for_a_too_steep_tail_works() -> None:
    for img_max in (49, 98, 103, 107, 161, 50, 500):
        with pytest.raises(ValueError) as err:
            long_tail_counts(10, img_max, img_max * 2)
        advised = float(re.search(r"at most ([\d.]+)", str(err.value)).group(1))
        assert (
            long_tail_counts(10, img_max, advised)[-1] >= 1
        )  # the advice works, and is the largest whole one
        with pytest.raises(ValueError, match="no image"):
            long_tail_counts(10, img_max, advised + 1)


def test_class_counts_must_be_whole_numbers(tmp_path: Path) -> None:
    assert load_class_counts(np.array([3, 2]), 2) == [3, 2] and load_class_counts([3.0, 2], 2) == [3, 2]
    path = tmp_path / "counts.json"
    for bad in ('{"a": 1}', "[2.9, 1]", "[-1, 2]", '["a", 1]'):
        path.write_text(bad)
        with pytest.raises(ValueError, match=r"counts.json must be a list of training images per class"):
            load_class_counts(path, 2)


def test_a_split_file_not_in_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "split.txt"
    path.write_bytes("train/a/0.png 0\ntrain/café/0.png 1\n".encode("latin-1"))  # é is byte 0xE9
    with pytest.raises(ValueError, match=r"split.txt:2: not UTF-8 text .*save the split file as UTF-8"):
        read_split_file(path, num_classes=2)


def test_split_file_lines_with_white_space_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "split.txt"
    path.write_bytes(b"  train/a/0.png 0\r\n\r\n\ttrain/my cat/1.png\t 1  \r\n   \r\n")
    paths, labels = read_split_file(path, num_classes=2)
    assert paths == ["train/a/0.png", "train/my cat/1.png"] and labels == [0, 1]


def test_a_split_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "split.txt"
    path.write_text("train/a/0.png 0\ntrain/b/0.png 1\n", encoding="utf-8-sig")
    paths, labels = read_split_file(path, num_classes=2)
    assert paths[0] == "train/a/0.png" and list(labels) == [0, 1]


def test_a_split_file_repeating_an_image_with_its_label_warns_and_keeps_it(tmp_path: Path) -> None:
    # As the official loaders read every line, the image counts twice; published split files of other
    # datasets have had such repeats, so they are kept, with a warning naming the lines.
    split = tmp_path / "list.txt"
    split.write_text("a.png 0\nb.png 1\na.png 0\nc.png 1\nb.png 1\n")
    with pytest.warns(UserWarning, match=r"list.txt: 2 lines repeat .* line 3: a.png, first on line 1"):
        paths, labels = read_split_file(split, num_classes=2)
    assert paths == ["a.png", "b.png", "a.png", "c.png", "b.png"] and labels == [0, 1, 0, 1, 1]
