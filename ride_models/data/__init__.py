"""Long-tailed data for RIDE: datasets, the official CIFAR-LT sampling, transforms, samplers, loaders.

::

    from ride_models.data import create_dataset, build_transform, DeviceDataLoader

    train = create_dataset("cifar100_lt", "~/data", "train", imb_ratio=100)   # 10,847 images
    train.class_counts, train.shot_splits()                                   # 500 .. 5; 35 / 35 / 30
    loader = DeviceDataLoader.from_dataset(train, 128, device="cuda")         # data on the GPU

See docs/data.md.
"""

from ride_models.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASET_NAMES,
    DEFAULT_DATASET,
    SPLIT_FILE_DATASETS,
    ArrayDataset,
    ImageListDataset,
    LongTailDataset,
    create_dataset,
    load_class_counts,
    read_split_file,
    scan_image_folder,
)
from ride_models.data.device_loader import (
    DeviceDataLoader,
    augment_batch,
    batch_crop,
    batch_rotate,
    dataset_images,
)
from ride_models.data.embedded import load_digits
from ride_models.data.samplers import ClassBalancedSampler, class_balanced_order
from ride_models.data.sampling import (
    FEW_SHOT_MAX,
    MANY_SHOT_MIN,
    cifar_lt_indices,
    long_tail_counts,
    select_per_class,
    shot_splits,
)
from ride_models.data.transforms import (
    CIFAR_CONFIG,
    CIFAR_MEAN,
    CIFAR_STD,
    DIGITS_CONFIG,
    SMALL_IMAGE_CONFIGS,
    SmallImageConfig,
    build_transform,
    small_image_transform,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR100_CLASSES",
    "CIFAR_CONFIG",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DATASET_NAMES",
    "DEFAULT_DATASET",
    "DIGITS_CONFIG",
    "FEW_SHOT_MAX",
    "MANY_SHOT_MIN",
    "SMALL_IMAGE_CONFIGS",
    "SPLIT_FILE_DATASETS",
    "ArrayDataset",
    "ClassBalancedSampler",
    "DeviceDataLoader",
    "ImageListDataset",
    "LongTailDataset",
    "SmallImageConfig",
    "augment_batch",
    "batch_crop",
    "batch_rotate",
    "build_transform",
    "cifar_lt_indices",
    "class_balanced_order",
    "create_dataset",
    "dataset_images",
    "load_class_counts",
    "load_digits",
    "long_tail_counts",
    "read_split_file",
    "scan_image_folder",
    "select_per_class",
    "shot_splits",
    "small_image_transform",
]
