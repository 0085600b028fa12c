"""Long-tailed datasets: ``create_dataset(name, root, split)`` and the two dataset classes behind it.

=============== =========================================================================================
name            data
=============== =========================================================================================
``cifar10_lt``  CIFAR-10 (torchvision's files, or a ``train/<class>/NNNN.jpg`` tree), official LT subset
``cifar100_lt`` CIFAR-100, likewise
``imagenet_lt`` ImageNet-LT: images under ``root``, split files ``ImageNet_LT_{train,val,test}.txt``
``places_lt``   Places-LT: ``Places_LT_{train,val,test}.txt``
``inat2018``    iNaturalist 2018: ``iNaturalist18_{train,val}.txt`` (``test`` is the val list, as in RIDE)
``folder``      an ImageFolder tree ``root/{train,val,test}/<class>/...``, optionally cut to a long tail
``digits_lt``   the embedded default: real handwritten digits shipped in the package (no download)
=============== =========================================================================================

Every dataset holds ``targets`` (list[int]), ``num_classes``, ``classes`` and ``class_counts``: the
*training* split's images per class, on the val/test datasets too, so that many/medium/few-shot
accuracy can be computed from any split (``dataset.shot_splits()``).
"""

from __future__ import annotations

import json
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from ride_models.data.embedded import DIGITS_CLASSES, DIGITS_IMB_RATIO, load_digits
from ride_models.data.sampling import (
    as_labels,
    check_ratio,
    cifar_lt_indices,
    long_tail_counts,
    select_per_class,
    shot_splits,
    whole_count,
)

SPLITS = ("train", "val", "test")
DEFAULT_DATASET = "digits_lt"

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# CIFAR-100's fine label names are in alphabetical order; label i is the i-th name.
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm"
).split()
CIFAR_IMB_RATIO = 100.0  # the official default (imb_factor 0.01)


# ---------------------------------------------------------------------------------------------- datasets


class LongTailDataset(torch.utils.data.Dataset):
    """Images with class labels and the training split's class counts.

    Attributes:
        name: the :func:`create_dataset` name (selects the standard transform).
        split: ``"train"``, ``"val"`` or ``"test"``.
        targets: ``[N]`` class index of every image.
        num_classes: ``C``.
        classes: ``C`` class names.
        class_counts: ``[C]`` images per class in the **training** split (after long-tail subsampling).
        transform: applied to the PIL image in ``__getitem__`` (None returns the PIL image).
    """

    def __init__(
        self,
        targets: Sequence[int],
        class_counts: Sequence[int],
        classes: Sequence[str],
        *,
        name: str,
        split: str,
        transform: Callable | None = None,
    ) -> None:
        self.num_classes = len(classes)
        self.targets = as_labels(targets, self.num_classes).tolist()
        self.class_counts = [int(n) for n in class_counts]
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.transform = transform
        if len(self.class_counts) != self.num_classes:
            raise ValueError(f"{name}: {len(self.class_counts)} class counts for {self.num_classes} classes")
        empty = [c for c, n in enumerate(self.class_counts) if n < 1]
        if empty:
            raise ValueError(
                f"{name}: classes {empty[:10]} have no training image ({len(empty)} in all); every class "
                "needs at least one (check the training split or the class counts given; for a tree of "
                "your own, remove the empty class or lower the imbalance ratio)"
            )

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        """The ``index``-th image as an RGB PIL image, before any transform."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[object, int]:
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def shot_splits(self) -> dict[str, list[int]]:
        """Many / medium / few-shot class indices from ``class_counts`` (> 100, 20..100, < 20)."""
        return shot_splits(self.class_counts)

    def __repr__(self) -> str:
        s = self.shot_splits()
        return (
            f"{type(self).__name__}({self.name!r}, split={self.split!r}, images={len(self)}, "
            f"classes={self.num_classes}, train counts {max(self.class_counts)}..{min(self.class_counts)}, "
            f"many/medium/few {len(s['many'])}/{len(s['medium'])}/{len(s['few'])})"
        )


class ImageListDataset(LongTailDataset):
    """Images read from files: ImageNet-LT, Places-LT, iNaturalist, folders, CIFAR as a JPEG tree.

    ``paths[i]`` is the file of image ``i``; the other arguments as :class:`LongTailDataset`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: Sequence[int],
        class_counts: Sequence[int],
        classes: Sequence[str],
        **kwargs,
    ) -> None:
        super().__init__(targets, class_counts, classes, **kwargs)
        if len(paths) != len(self.targets):
            raise ValueError(f"{len(paths)} paths for {len(self.targets)} targets")
        self.paths = [str(p) for p in paths]

    def load_image(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return _to_rgb(img, path)
        except FileNotFoundError:
            raise  # names the file already
        except (OSError, SyntaxError) as error:  # Pillow: truncated, corrupted, or not an image
            raise ValueError(f"cannot read image {path}: {error}; remove or replace the file") from error


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Formats whose mode "I" (32-bit integer) holds 16-bit pixels: Pillow opens a PGM with maxval > 255 as
# "I" rescaled to 0..65535, and (before it had "I;16" for PNG) 16-bit PNGs as "I".
_SIXTEEN_BIT_I_FORMATS = ("PPM", "PNG")


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """``img`` as 8-bit RGB, as timm and torchvision read it (``convert("RGB")``) where that keeps the pixel
    values; ``convert`` clips integer pixels to 0..255, so 16-bit grayscale is scaled to 8 bits first (else
    almost every pixel turns white), and 32-bit integer pixels beyond 0..255, whose scale no file declares,
    are refused rather than clipped."""
    if img.mode in _SIXTEEN_BIT_MODES or (img.mode == "I" and img.format in _SIXTEEN_BIT_I_FORMATS):
        img = Image.fromarray(np.rint(np.asarray(img) / 257).astype(np.uint8))  # 0..65535 -> 0..255
    elif img.mode == "I":  # a 32-bit TIFF, say: 0..255 read as timm reads them, anything else refused
        low, high = img.getextrema()
        if low < 0 or high > 255:
            raise ValueError(
                f"image {path} has 32-bit integer pixels ({low}..{high}) of unknown scale (only 0..255 is "
                "read, as 8-bit values); save it with 8 or 16 bits per channel (e.g. a 16-bit PNG)"
            )
    elif img.mode == "F":
        raise ValueError(
            f"image {path} has floating-point pixels (mode F) of unknown range; save it with 8 or 16 bits "
            "per channel"
        )
    return img.convert("RGB")


class ArrayDataset(LongTailDataset):
    """Images held in memory as one uint8 array: CIFAR from torchvision's files, the embedded digits.

    ``images`` is ``[N, H, W, 3]`` uint8 (torchvision's CIFAR layout); the other arguments as
    :class:`LongTailDataset`.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int],
        class_counts: Sequence[int],
        classes: Sequence[str],
        **kwargs,
    ) -> None:
        super().__init__(targets, class_counts, classes, **kwargs)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        if len(images) != len(self.targets):
            raise ValueError(f"{len(images)} images for {len(self.targets)} targets")
        self.images = images

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


# ------------------------------------------------------------------------------------------ create_dataset


def create_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    *,
    imb_ratio: float | None = None,
    seed: int = 0,
    transform: Callable | None = None,
    download: bool = False,
    split_dir: str | Path | None = None,
    class_counts: Sequence[int] | str | Path | None = None,
    check_files: bool = True,
) -> LongTailDataset:
    """Build a long-tailed dataset split.

    Args:
        name: ``cifar10_lt``, ``cifar100_lt``, ``imagenet_lt``, ``places_lt``, ``inat2018``, ``folder`` or
            ``digits_lt`` (:data:`DEFAULT_DATASET`, needs no ``root``).
        root: the data folder (train.py ``--data-dir``): CIFAR: holds torchvision's
            ``cifar-10-batches-py`` / ``cifar-100-python`` or a JPEG tree ``train/<class>/NNNN.jpg`` +
            ``test/<class>/...``; split-file datasets: the folder the paths in the split files are relative
            to; ``folder``: holds ``train/<class>/...`` (and ``val/`` or ``test/``).
        split: ``"train"``, ``"val"`` or ``"test"`` (CIFAR and digits: val and test are the test set).
        imb_ratio: long-tail ratio (train.py ``--imb-ratio``): CIFAR (default 100), digits (default 20),
            ``folder`` (default None: no subsampling); not accepted by the split-file datasets.
        seed: seed of the long-tail selection (the official ``rand_number``, 0).
        transform: applied to each PIL image (see :func:`~ride_models.data.build_transform`).
        download: CIFAR only: let torchvision download the files into ``root`` if missing.
        split_dir: split-file datasets: folder of the split files (default ``root``).
        class_counts: training counts per class (a list, or a JSON file holding one). Split-file
            datasets, val/test: when the training split file is not at hand. ``folder``: they replace
            the counts of ``train/`` (e.g. a tree holding part of the training images), and are needed
            for val/test without ``train/``.
        check_files: split-file datasets: check that every listed image exists and is not empty.

    Returns:
        An :class:`ImageListDataset` or :class:`ArrayDataset`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in SPLIT_FILE_DATASETS and split_dir is not None:
        raise ValueError(f"split_dir is an option of {sorted(SPLIT_FILE_DATASETS)}, not of {name}")
    if name not in CLASS_COUNTS_DATASETS and class_counts is not None:
        raise ValueError(f"class_counts is an option of {sorted(CLASS_COUNTS_DATASETS)}, not of {name}")
    if download and name not in _CIFAR:
        raise ValueError(f"download is an option of {sorted(_CIFAR)}, not of {name}")
    if name in _CIFAR:
        return _create_cifar_lt(
            name, root, split, _ratio_or(imb_ratio, CIFAR_IMB_RATIO), seed, transform, download
        )
    if name in SPLIT_FILE_DATASETS:
        if imb_ratio is not None:
            raise ValueError(f"{name} is long-tailed by its split files; imb_ratio does not apply to it")
        return _create_split_file_dataset(
            name,
            root,
            split,
            transform,
            split_dir=split_dir,
            class_counts=class_counts,
            check_files=check_files,
        )
    if name == "folder":
        return _create_folder_dataset(root, split, imb_ratio, seed, transform, class_counts)
    if name == "digits_lt":
        digits_split = "train" if split == "train" else "test"
        images, labels, counts = load_digits(digits_split, _ratio_or(imb_ratio, DIGITS_IMB_RATIO), seed)
        return ArrayDataset(
            images, labels, counts, DIGITS_CLASSES, name=name, split=split, transform=transform
        )
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")


def _ratio_or(imb_ratio: float | None, default: float) -> float:
    return check_ratio(default if imb_ratio is None else imb_ratio)


def _existing_root(name: str, root: str | Path | None, what: str) -> Path:
    if root is None:
        raise ValueError(f"{name} needs a data root (train.py: --data-dir): {what}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data root {root} does not exist; it should be {what}")
    return root


# ------------------------------------------------------------------------------------------------ CIFAR-LT

_CIFAR: dict[str, tuple[type[torchvision.datasets.CIFAR10], list[str]]] = {
    "cifar10_lt": (torchvision.datasets.CIFAR10, CIFAR10_CLASSES),
    "cifar100_lt": (torchvision.datasets.CIFAR100, CIFAR100_CLASSES),
}


def _torchvision_cifar(name: str, tv_class: type, root: Path, train: bool, download: bool) -> Any:
    """torchvision's CIFAR split; a failed download is one ConnectionError naming the dataset and the way out
    (torchvision's own is a urllib traceback)."""
    try:
        return tv_class(str(root), train=train, download=download)
    except URLError as error:
        raise ConnectionError(
            f"{name}: torchvision could not download {tv_class.url} into {root} ({error.reason}). Without "
            f"a network, put {tv_class.filename} there (torchvision then only extracts it) or its extracted "
            f"{tv_class.base_folder}/"
        ) from error


def _create_cifar_lt(
    name: str,
    root: str | Path | None,
    split: str,
    ratio: float,
    seed: int,
    transform: Callable | None,
    download: bool,
) -> LongTailDataset:
    """Official CIFAR-LT from torchvision's files, or from a ``train/<class>/NNNN.jpg`` tree."""
    tv_class, classes = _CIFAR[name]
    what = (
        f"the folder that holds torchvision's {tv_class.base_folder}/ or a JPEG tree train/<class>/NNNN.jpg"
    )
    if download and root is not None:
        Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    root = _existing_root(name, root, what)
    if download or (root / tv_class.base_folder).is_dir():
        train = _torchvision_cifar(name, tv_class, root, True, download)
        keep = cifar_lt_indices(train.targets, ratio, seed)
        counts = np.bincount(np.asarray(train.targets)[keep], minlength=len(classes))
        if split == "train":
            images, targets = train.data[keep], np.asarray(train.targets)[keep]
        else:
            test = _torchvision_cifar(name, tv_class, root, False, download)
            images, targets = test.data, test.targets
        return ArrayDataset(images, targets, counts, classes, name=name, split=split, transform=transform)
    if (root / "train").is_dir():
        return _create_cifar_lt_from_jpeg_tree(name, root, split, classes, ratio, seed, transform)
    raise FileNotFoundError(
        f"{name}: no CIFAR data in {root} (looked for {root / tv_class.base_folder}, torchvision's files, "
        f"and {root / 'train'}, a JPEG tree train/<class>/NNNN.jpg); pass download=True (train.py: "
        "--dataset-download) to let torchvision fetch it, or point root (--data-dir) at one of these"
    )


def _create_cifar_lt_from_jpeg_tree(
    name: str, root: Path, split: str, classes: list[str], ratio: float, seed: int, transform: Callable | None
) -> ImageListDataset:
    """CIFAR-LT from ``root/train/<class>/NNNN.jpg``, where ``NNNN`` is the image's rank within its class.

    The official selection shuffles each class's indices in full, with one random stream, class after
    class; the permutation class c receives depends only on the sizes of classes 0..c (all equal in CIFAR),
    not on where in the official array its images lie. So running it on the class-sorted, rank-ordered
    labels of the tree keeps the same ranks, in the same order, as on the official array: the k-th
    training image of class c in the official array is ``train/<c>/k.jpg``.
    """
    train_paths, train_targets, found = scan_image_folder(root / "train")
    if found != classes:
        raise ValueError(
            f"{name}: the class folders of {root / 'train'} are not CIFAR's: expected {len(classes)} "
            f"folders {classes[:4]}..., found {len(found)} {found[:4]}...; use --dataset folder for other "
            "trees"
        )
    counts = np.bincount(train_targets, minlength=len(classes))
    # scan_image_folder lists class by class, files sorted by name: position within the class = rank.
    starts = np.concatenate([[0], np.cumsum(counts)])
    ranks_ok = all(
        Path(p).stem.isdigit() and int(Path(p).stem) == i - starts[c]
        for i, (p, c) in enumerate(zip(train_paths, train_targets))
    )
    if len(set(counts.tolist())) != 1 or not ranks_ok:
        raise ValueError(
            f"{name}: {root / 'train'} is not CIFAR's training set in official order: every class "
            "must hold the same number of images named 0000.jpg, 0001.jpg, ... (the k-th image of the class "
            "in the official array is k.jpg); use --dataset folder with --imb-ratio for other trees"
        )
    keep = cifar_lt_indices(train_targets, ratio, seed)
    lt_counts = np.bincount(np.asarray(train_targets)[keep], minlength=len(classes))
    if split == "train":
        paths, targets = [train_paths[i] for i in keep], [train_targets[i] for i in keep]
    else:
        paths, targets, _ = scan_image_folder(_find_split_dir(name, root, split), classes)
    return ImageListDataset(paths, targets, lt_counts, classes, name=name, split=split, transform=transform)


# ---------------------------------------------------------------------------------------- image folders


def scan_image_folder(
    directory: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[int], list[str]]:
    """List an ImageFolder tree ``directory/<class>/<image>`` (files sorted by name within a class).

    Args:
        directory: the tree's root.
        classes: the class names (and order) to expect, e.g. those of the training tree for a val tree;
            default: the sorted sub-folder names, every one of which must hold an image.

    Returns:
        ``paths [N]``, ``targets [N]`` (class index), and the class names.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} does not exist")
    found = _class_folders(directory)
    every_class_needed = classes is None  # a training tree: an empty class is an error
    if classes is None:
        if not found:
            raise ValueError(f"{directory} has no class sub-folders; expected {directory}/<class>/<image>")
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{directory} has class folders {unknown[:5]} that the training split does not have; "
                "every split must use the training split's class names"
            )
    paths: list[str] = []
    targets: list[int] = []
    for c, cls in enumerate(classes):
        class_dir = directory / cls
        files = _image_files(class_dir) if class_dir.is_dir() else []
        if not files and every_class_needed:
            raise ValueError(
                f"class folder {class_dir} holds no image (looked for files ending {IMG_EXTENSIONS})"
            )
        paths += files
        targets += [c] * len(files)
    return paths, targets, list(classes)


def _class_folders(directory: Path) -> list[str]:
    """The class names of an ImageFolder tree: its sub-folders, hidden ones skipped, sorted."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """The image files under ``folder`` at any depth, as torchvision's ImageFolder finds them, sorted; hidden
    files and folders (``.ipynb_checkpoints``, macOS's ``._name.jpg``) and broken links are skipped, and a
    folder reached twice through links is read once."""
    files, empty = [], []
    visited: set[str] = set()
    for parent, folders, names in os.walk(folder, followlinks=True):
        # A link to a folder above (``up -> ..``) would list the same images again at every depth os.walk
        # reaches (torchvision's ImageFolder does), inflating the class's count.
        real = os.path.realpath(parent)
        if real in visited:
            folders[:] = []
            continue
        visited.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
                path = os.path.join(parent, name)
                size = _regular_file_size(path)
                if size is not None:  # None: a broken link
                    (files if size else empty).append(path)
    if empty:
        raise _empty_files_error(sorted(empty), f"under {folder}")
    return sorted(files)


def _regular_file_size(path: str | Path) -> int | None:
    """The size of a regular file (links followed); None if ``path`` is anything else or missing."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


def _empty_files_error(empty: Sequence[str | Path], where: str) -> ValueError:
    """Zero-byte image files are refused when the dataset is built: each would stop training when loaded."""
    return ValueError(
        f"{len(empty)} image files {where} are empty (0 bytes), e.g. {empty[0]}, as an interrupted copy or "
        "download leaves them; replace them, or remove them (and their split-file lines)"
    )


_SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("val", "validation", "test"), "test": ("test", "val")}


def _find_split_dir(name: str, root: Path, split: str) -> Path:
    for candidate in _SPLIT_FOLDER_NAMES[split]:
        if (root / candidate).is_dir():
            return root / candidate
    looked = ", ".join(str(root / c) for c in _SPLIT_FOLDER_NAMES[split])
    raise FileNotFoundError(f"{name}: no {split} folder in {root} (looked at {looked})")


def _create_folder_dataset(
    root: str | Path | None,
    split: str,
    imb_ratio: float | None,
    seed: int,
    transform: Callable | None,
    class_counts: Sequence[int] | str | Path | None,
) -> ImageListDataset:
    """A user's ImageFolder tree; with ``imb_ratio``, the training split is cut to the exponential profile.

    The profile's head count is the smallest class's size (every class can give its share), classes
    in sorted-name order (class 0 the head); selection as the official CIFAR-LT one. ``class_counts``
    replace the training counts; without ``train/`` they are needed, and the classes are the class
    folders of the val/test tree.
    """
    root = _existing_root("folder", root, "an ImageFolder tree train/<class>/<image> (+ val/ or test/)")
    if imb_ratio is not None and class_counts is not None:
        raise ValueError("folder: imb_ratio and class_counts both give the training counts; pass one of them")
    # A bare tree of class folders (no train/ sub-folder) is the training split, as in timm.
    train_dir = root / "train" if (root / "train").is_dir() or split != "train" else root
    if not train_dir.is_dir():
        return _create_folder_split_without_train(root, split, imb_ratio, transform, class_counts)
    train_paths, train_targets, classes = scan_image_folder(train_dir)
    counts = np.bincount(train_targets, minlength=len(classes)).tolist()
    if imb_ratio is not None:
        counts = long_tail_counts(len(classes), min(counts), check_ratio(imb_ratio))
    paths, targets = train_paths, train_targets
    if split != "train":
        paths, targets, _ = scan_image_folder(_find_split_dir("folder", root, split), classes)
    elif imb_ratio is not None:
        keep = select_per_class(train_targets, counts, seed)
        paths, targets = [train_paths[i] for i in keep], [train_targets[i] for i in keep]
    if class_counts is not None:
        counts = load_class_counts(class_counts, len(classes))
    return ImageListDataset(paths, targets, counts, classes, name="folder", split=split, transform=transform)


def _create_folder_split_without_train(
    root: Path,
    split: str,
    imb_ratio: float | None,
    transform: Callable | None,
    class_counts: Sequence[int] | str | Path | None,
) -> ImageListDataset:
    """A val/test tree alone: its class folders (sorted) are the classes, ``class_counts`` the counts.

    A class missing from the tree would shift the index of every class after it, so the number of class
    folders must equal the number of counts (a class without images keeps an empty folder).
    """
    if class_counts is None or imb_ratio is not None:
        raise FileNotFoundError(
            f"folder: no training tree at {root / 'train'}; it gives the classes and the training counts "
            f"(for many/medium/few) of every split. Without it, pass class_counts= (validate.py: "
            f"--class-counts) with the training images of every class: the {split} tree's class folders "
            "are then the classes, in sorted order"
        )
    split_dir = _find_split_dir("folder", root, split)
    classes = _class_folders(split_dir)
    counts = load_class_counts(class_counts, None)
    if len(counts) != len(classes):
        raise ValueError(
            f"folder: {split_dir} has {len(classes)} class folders but the class counts give {len(counts)} "
            f"classes; without {root / 'train'}, the class folders of {split_dir} are the classes (sorted), "
            "so every class needs a folder there, empty if it has no image"
        )
    paths, targets, _ = scan_image_folder(split_dir, classes)
    return ImageListDataset(paths, targets, counts, classes, name="folder", split=split, transform=transform)


# ----------------------------------------------------------------------------------- split-file datasets


@dataclass(frozen=True)
class SplitFileSpec:
    """A dataset given by split files ``{prefix}_{split}.txt`` of ``relative/path label`` lines."""

    prefix: str
    num_classes: int
    files: dict[str, str]  # split -> the published file's split name

    def filename(self, split: str) -> str:
        return f"{self.prefix}_{self.files[split]}.txt"


_THREE_SPLITS = {"train": "train", "val": "val", "test": "test"}
SPLIT_FILE_DATASETS: dict[str, SplitFileSpec] = {
    "imagenet_lt": SplitFileSpec("ImageNet_LT", 1000, _THREE_SPLITS),
    "places_lt": SplitFileSpec("Places_LT", 365, _THREE_SPLITS),
    # iNaturalist 2018 publishes train and val only; RIDE (like OLTR and others) reports on val.
    "inat2018": SplitFileSpec("iNaturalist18", 8142, {"train": "train", "val": "val", "test": "val"}),
}
DATASET_NAMES = ("cifar10_lt", "cifar100_lt", *SPLIT_FILE_DATASETS, "folder", "digits_lt")
CLASS_COUNTS_DATASETS = (*SPLIT_FILE_DATASETS, "folder")  # those taking create_dataset(class_counts=...)


def read_split_file(path: str | Path, num_classes: int) -> tuple[list[str], list[int]]:
    """Parse a split file: one ``relative/path label`` pair per line (OLTR / iNaturalist format).

    Returns:
        the relative paths and the labels, in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line without two fields, a label that is not an integer or not in ``[0, num_classes)``,
            an image listed again with another label.

    An image listed again with the same label is kept, as the official loaders keep every line (it counts
    twice), with a warning naming the lines: published split files of other datasets have had repeats.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path.name} not found (looked at {path})")
    paths: list[str] = []
    labels: list[int] = []
    first_seen: dict[str, tuple[int, int]] = {}  # path -> (the line first listing it, its label there)
    repeats: list[tuple[int, str]] = []  # (line, path) of each repeat with the same label
    with open(path, "rb") as f:  # decoded line by line, so that a line not in UTF-8 is named
        for line_no, raw in enumerate(f, 1):
            try:  # -sig: a byte-order mark is not part of the first path
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{line_no}: not UTF-8 text ({error.reason} at byte {error.start} of the line: "
                    f"{raw.strip()!r}); save the split file as UTF-8"
                ) from None
            if not line.strip():
                continue
            # The label is the last field; a path may hold spaces. strip() first: rsplit with maxsplit keeps
            # leading white space in the path (an indented line would name " train/...").
            fields = line.strip().rsplit(maxsplit=1)
            if len(fields) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'relative/path label', got {line.strip()!r}")
            rel, label = fields
            try:
                label = int(label)
            except ValueError:
                raise ValueError(
                    f"{path}:{line_no}: label {label!r} is not an integer (line {line.strip()!r})"
                ) from None
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"{path}:{line_no}: label {label} is outside [0, {num_classes}) (line {line.strip()!r})"
                )
            if rel in first_seen:
                first, first_label = first_seen[rel]
                if first_label != label:  # one image trained towards two classes
                    raise ValueError(
                        f"{path}:{line_no}: {rel} is listed with label {first_label} on line {first} and "
                        f"with label {label} here; give every image one label"
                    )
                repeats.append((line_no, rel))
            else:
                first_seen[rel] = line_no, label
            paths.append(rel)
            labels.append(label)
    if not paths:
        raise ValueError(f"split file {path} lists no image")
    if repeats:
        line_no, rel = repeats[0]
        warnings.warn(
            f"{path}: {len(repeats)} lines repeat an image listed before, with the same label (e.g. line "
            f"{line_no}: {rel}, first on line {first_seen[rel][0]}); each line counts as one image, as in "
            "the official loaders: remove the repeated lines if that is not meant",
            stacklevel=2,
        )
    return paths, labels


def load_class_counts(source: Sequence[int] | str | Path, num_classes: int | None) -> list[int]:
    """Training class counts from a list, or a JSON file holding one (``ImageNet_LT_train_cls_freq.json``);
    ``num_classes`` None accepts any number of classes."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class counts file {path} not found")
        source = json.loads(path.read_text())
    else:
        path = "the class counts"
    counts = None if isinstance(source, (str, bytes, dict)) else [whole_count(n) for n in source]
    if counts is None or None in counts:
        raise ValueError(
            f"{path} must be a list of training images per class (whole numbers, >= 0), "
            f"e.g. [500, 477, ...]; got {str(source)[:80]}"
        )
    if num_classes is not None and len(counts) != num_classes:
        raise ValueError(f"class counts have {len(counts)} entries, expected one per class ({num_classes})")
    return counts


def _create_split_file_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    transform: Callable | None,
    *,
    split_dir: str | Path | None,
    class_counts: Sequence[int] | str | Path | None,
    check_files: bool,
) -> ImageListDataset:
    spec = SPLIT_FILE_DATASETS[name]
    root = _existing_root(
        name, root, f"the folder that the paths in {spec.filename('train')} are relative to"
    )
    split_dir = root if split_dir is None else Path(split_dir).expanduser()
    split_file = split_dir / spec.filename(split)
    if not split_file.is_file():
        raise FileNotFoundError(
            f"{name}: split file {split_file.name} not found in {split_dir} (looked at {split_file}); pass "
            f"split_dir= (train.py: --split-dir) for the folder that holds {spec.prefix}_*.txt"
        )
    rel_paths, targets = read_split_file(split_file, spec.num_classes)
    if split == "train":
        counts = np.bincount(targets, minlength=spec.num_classes).tolist()
        if class_counts is not None and load_class_counts(class_counts, spec.num_classes) != counts:
            raise ValueError(f"{name}: class_counts differ from the counts of {split_file}")
    elif class_counts is not None:
        counts = load_class_counts(class_counts, spec.num_classes)
    else:
        train_file = split_dir / spec.filename("train")
        if not train_file.is_file():
            raise FileNotFoundError(
                f"{name}: the training split file {train_file.name} gives the class counts of every split "
                f"(for many/medium/few), but it is not in {split_dir} (looked at {train_file}); pass "
                "split_dir= for its folder, or class_counts= (a list, or a JSON file of one) for the counts"
            )
        counts = np.bincount(
            read_split_file(train_file, spec.num_classes)[1], minlength=spec.num_classes
        ).tolist()
    paths = [root / p for p in rel_paths]
    if check_files:
        sizes = [_regular_file_size(p) for p in paths]
        missing = [p for p, size in zip(paths, sizes) if size is None]
        if missing:
            raise FileNotFoundError(
                f"{name}: {len(missing)} of {len(paths)} images listed in {split_file} are missing under "
                f"{root}, e.g. {missing[0]}; root (--data-dir) must be the folder the listed paths are "
                "relative to"
            )
        empty = [p for p, size in zip(paths, sizes) if size == 0]
        if empty:
            raise _empty_files_error(empty, f"listed in {split_file}")
    classes = [str(c) for c in range(spec.num_classes)]
    return ImageListDataset(paths, targets, counts, classes, name=name, split=split, transform=transform)
