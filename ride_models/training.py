"""What ``train.py`` does: RIDE's three-stage recipe with timm's flags, exact resume and DDP.

Stages (``--stage``):

1. ``experts`` (default): the experts train jointly with the chosen loss (``ldam_diversity``); SGD with
   Nesterov momentum, warm-up then step decay, the official per-epoch learning rates.
2. ``router``: ``--initial-checkpoint`` from stage 1; only the router trains (everything else frozen, batch
   norm in eval mode), on class-balanced batches, with the routing loss and a 5-epoch cosine schedule.
   The saved model routes by default.
3. ``distill``: a model with fewer experts learns from ``--teacher`` / ``--teacher-checkpoint``.

Defaults come from the official configs of each benchmark (``PRESETS``); explicit flags win. Every epoch
is a function of (seed, epoch, state at its start), so a run killed at any point and restarted with
``--resume`` ends with the same weights. See docs/training.md.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml
from huggingface_hub.utils import LocalEntryNotFoundError
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import ride_models  # noqa: F401  (registers the models)
from ride_models.checkpoint import (
    atomic_write,
    hub_not_cached,
    load_model,
    load_training_state,
    load_weights,
    save_training_state,
    save_weights,
    write_csv,
)
from ride_models.cuda_graph import GraphedTrainStep
from ride_models.data import (
    DEFAULT_DATASET,
    ClassBalancedSampler,
    DeviceDataLoader,
    build_transform,
    create_dataset,
)
from ride_models.data.device_loader import RANK_SEED_STRIDE
from ride_models.data.transforms import SMALL_IMAGE_CONFIGS
from ride_models.engine import RouterTrainStep, make_step, train_one_epoch
from ride_models.flops import count_macs
from ride_models.losses import create_loss, loss_arguments
from ride_models.metrics import EvalResult, evaluate
from ride_models.models.ride_resnet import require_ride_model
from ride_models.plots import plot_training_curves, save_plots
from ride_models.scheduler import lr_at_epoch

__all__ = [
    "PRESETS",
    "build_loss",
    "build_optimizer",
    "build_parser",
    "check_device",
    "epoch_lr",
    "main",
    "parse_args",
    "resolve_defaults",
]

_logger = logging.getLogger("train")

# The official configs' values for each benchmark (stage 1). Places-LT and user folders, which the official
# code has no config for, take the ImageNet-LT values; the embedded digits a short CIFAR-like recipe.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar": dict(
        lr=0.1, weight_decay=5e-4, batch_size=128, epochs=200, decay_epochs=[160, 180], decay_rate=0.01,
        warmup_epochs=5, drw_epoch=160, loss_kwargs=dict(diversity_weight=0.45, temperature_reweight=0.05),
    ),
    "imagenet_lt": dict(
        lr=0.1, weight_decay=2e-4, batch_size=256, epochs=100, decay_epochs=[60, 80], decay_rate=0.1,
        warmup_epochs=5, drw_epoch=80, loss_kwargs=dict(diversity_weight=0.2, temperature_reweight=0.02),
    ),
    "inat2018": dict(
        lr=0.2, weight_decay=2e-4, batch_size=512, epochs=100, decay_epochs=[60, 80], decay_rate=0.1,
        warmup_epochs=5, drw_epoch=80, loss_kwargs=dict(diversity_weight=0.2, temperature_reweight=0.015),
    ),
    "digits": dict(
        lr=0.1, weight_decay=5e-4, batch_size=64, epochs=40, decay_epochs=[32, 36], decay_rate=0.01,
        warmup_epochs=3, drw_epoch=32, loss_kwargs=dict(diversity_weight=0.45, temperature_reweight=0.05),
    ),
}  # fmt: skip
DATASET_PRESETS = {
    "cifar10_lt": "cifar",
    "cifar100_lt": "cifar",
    "digits_lt": "digits",
    "imagenet_lt": "imagenet_lt",
    "places_lt": "imagenet_lt",
    "folder": "imagenet_lt",
    "inat2018": "inat2018",
}
# Stage 2 in every official EA config: 5 epochs, cosine from 0.01, batch 512, weight decay 5e-4.
ROUTER_PRESET = dict(lr=0.01, weight_decay=5e-4, batch_size=512, epochs=5, sched="cosine", warmup_epochs=0)
# The official CIFAR distillation config warms up for 20 epochs instead of 5.
DISTILL_PRESETS = {"cifar": dict(warmup_epochs=20)}
# The training curves, from summary.csv's rows: drawn after the first and the last epoch and, in between,
# after an epoch that ends a minute or more after the last drawing (a drawing takes a few tenths of a second,
# more than a GPU's CIFAR epoch can spare each time).
TRAINING_PLOT, PLOT_EVERY_S = "training_curves.png", 60.0
# Datasets with a validation split distinct from the test split: "best" is chosen on it.
VALIDATION_DATASETS = {"imagenet_lt", "places_lt"}
# Arguments a resumed run may change; every other one must match the interrupted run.
RESUMABLE_CHANGES = {"resume", "epochs", "device", "workers", "log_interval"}
# What a run's args.yaml holds besides its flags: the flags the user set ("explicit": whether --drw-epoch
# applies to a loss without DRW by default, for one), the preset's loss arguments, and what a resume checks
# (the process count, the teacher file's digest).
DERIVED_ARGS = ("explicit", "preset_loss_kwargs", "world_size", "teacher_sha256")


# ------------------------------------------------------------------------------------------------ flags
def build_parser() -> argparse.ArgumentParser:
    """train.py's flags: timm's names where they exist (defaults of None come from the presets)."""
    p = argparse.ArgumentParser(description="Train RIDE models (three stages) on long-tailed data.")
    p.add_argument(
        "-c", "--config", default="", metavar="FILE", help="YAML file of flag defaults (as in timm)"
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ride_resnet32_3e", help="a registered ride_* model")
    g.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    g.add_argument("--initial-checkpoint", default="", help="weights to start from (ours or official)")
    g.add_argument("--resume", default="", help="run folder (or its last_state.pt) to continue")
    g.add_argument("--num-classes", type=int, default=None, help="must equal the dataset's class count")
    g.add_argument("--drop-rate", type=float, default=0.0)
    g.add_argument("--drop-path", type=float, default=0.0)
    g.add_argument(
        "--model-ema", action="store_true", help="keep an exponential moving average of the weights"
    )
    g.add_argument("--model-ema-decay", type=float, default=0.9998)
    g.add_argument("--teacher", default="", help="distill: the teacher model (e.g. ride_resnet32_6e)")
    g.add_argument("--teacher-checkpoint", default="", help="distill: the teacher's weights")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset", default="", help=f"create_dataset name (default: the embedded {DEFAULT_DATASET})"
    )
    g.add_argument("--data-dir", default=None, help="the dataset's root folder")
    g.add_argument(
        "--split-dir", default=None, help="folder of the split files (ImageNet-LT, Places-LT, iNat)"
    )
    g.add_argument("--imb-ratio", type=float, default=None, help="long-tail ratio (CIFAR-LT, folder, digits)")
    g.add_argument("--dataset-download", action="store_true", help="let torchvision download CIFAR")
    g.add_argument("--no-device-loader", action="store_true", help="small images: per-image PIL pipeline")
    g.add_argument("-j", "--workers", type=int, default=2, help="data loading processes (image files)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--stage", default="experts", choices=["experts", "router", "distill"])
    g.add_argument(
        "--loss", default=None, help="ride_models.losses name (default ldam_diversity; router: routing)"
    )
    g.add_argument(
        "--loss-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="extra create_loss arguments"
    )
    g.add_argument(
        "--drw-epoch", type=int, default=None, help="deferred re-weighting starts after this epoch"
    )
    g.add_argument("-b", "--batch-size", type=int, default=None, help="per process")
    g.add_argument("--lr", type=float, default=None, help="for the whole (global) batch; not rescaled")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--sched", default=None, choices=["step", "cosine"])
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--warmup-epochs", type=int, default=None)
    g.add_argument(
        "--decay-epochs", type=int, nargs="+", default=None, help="step milestones (1-based epochs)"
    )
    g.add_argument("--decay-rate", type=float, default=None, help="factor at each milestone")
    g = p.add_argument_group("run")
    g.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    g.add_argument("--channels-last", action="store_true")
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="distributed runs on GPUs: batch norm's statistics over every process (nn.SyncBatchNorm)",
    )
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, help="torch.compile backend")
    g.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each training step as a CUDA graph (stage experts, one CUDA device; --amp: bfloat16)",
    )
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms (exact resume on GPU)"
    )
    g.add_argument("--output", default="output/train", help="parent folder of the run folders")
    g.add_argument("--experiment", default="", help="run folder name (default: date-model-stage)")
    g.add_argument("--log-interval", type=int, default=50, help="steps between progress lines")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags, with defaults from ``-c FILE`` (YAML) first, as timm's train.py does."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default="")
    config, remaining = config_parser.parse_known_args(argv)
    parser = build_parser()
    values: Dict[str, Any] = {}
    explicit_in_file = None
    if config.config:
        with open(config.config) as f:
            values = yaml.safe_load(f) or {}
        explicit_in_file = values.pop("explicit", None)
        for key in DERIVED_ARGS:  # a run's args.yaml given back to -c: derived again, or checked on resume
            values.pop(key, None)
        unknown = sorted(set(values) - set(vars(parser.parse_args([]))))
        if unknown:
            raise ValueError(f"unknown keys in {config.config}: {unknown}; use the flag names ('_' for '-')")
        parser.set_defaults(**values)
    args = parser.parse_args(remaining)
    args.config = config.config
    # What the user set (on the command line or in the file), whatever its value: a flag given with its
    # default value still counts (--resume refuses it where it differs from the run's).
    unset = object()
    given = build_parser().parse_args(remaining, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    from_file = set(values) if explicit_in_file is None else set(explicit_in_file) & set(values)
    args.explicit = sorted({k for k, v in vars(given).items() if v is not unset} | from_file)
    return args


def _preset_name(dataset: str) -> str:
    return DATASET_PRESETS.get(dataset, "imagenet_lt")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left at None from the dataset's preset and the stage."""
    args.dataset = args.dataset or DEFAULT_DATASET
    preset = dict(PRESETS[_preset_name(args.dataset)], sched="step")
    if args.stage == "router":
        preset.update(ROUTER_PRESET)
    elif args.stage == "distill":
        preset.update(DISTILL_PRESETS.get(_preset_name(args.dataset), {}))
    for key in (
        "lr",
        "weight_decay",
        "batch_size",
        "epochs",
        "decay_epochs",
        "decay_rate",
        "warmup_epochs",
        "drw_epoch",
        "sched",
    ):
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key))
    args.preset_loss_kwargs = preset["loss_kwargs"]
    if args.loss is None:
        args.loss = "routing" if args.stage == "router" else "ldam_diversity"
    return args


def _parse_loss_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--loss-kwargs takes KEY=VALUE pairs, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


# ------------------------------------------------------------------------------------ distributed / seeds
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def check_device(device: str) -> None:
    """Refuse a ``--device`` this machine cannot run on (torch's own errors name no flag): a name torch does
    not know (``gpu``), ``cuda`` without a CUDA device, or a CUDA index past the last device."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )


def setup_distributed(device: str) -> Dist:
    """DDP when launched by torchrun (NCCL on GPUs, gloo on CPU); otherwise one process."""
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, dev)


def sync_batch_norm(model: nn.Module, d: Dist) -> nn.Module:
    """``--sync-bn``, as timm's train.py: every batch norm takes its batch statistics over all processes
    (``nn.SyncBatchNorm``; the state dict keeps its keys). The experts then run one by one in training: the
    fused pass would compute each process's own statistics."""
    if d.world_size == 1:
        _logger.warning("warning: --sync-bn does nothing in a single process; batch norm stays as it is")
        return model
    if d.device.type != "cuda":
        raise ValueError(
            f"--sync-bn: nn.SyncBatchNorm runs on CUDA devices only, and this run is on {d.device}; "
            "drop --sync-bn, or run on GPUs"
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed every generator from (seed, epoch, rank): each epoch replays exactly, whatever came before."""
    value = (seed * 1_000_003 + epoch * 7_919 + rank) % 2**31
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


# ------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    train_loader: Any
    eval_loaders: Dict[str, Any]  # split name -> loader; "val" only where it differs from "test"
    class_counts: List[int]
    num_classes: int
    sampler: Any = None
    generator: Optional[torch.Generator] = None
    rank: int = 0

    def set_epoch(self, seed: int, epoch: int) -> None:
        if self.generator is not None:  # the workers' seeds (their augmentation), and the shuffle
            self.generator.manual_seed(seed * 1_000_003 + epoch + self.rank * RANK_SEED_STRIDE)
        # DeviceDataLoader passes the epoch on to its sampler; a DataLoader's sampler gets it here.
        target = self.train_loader if hasattr(self.train_loader, "set_epoch") else self.sampler
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)


def _has_validation(args: argparse.Namespace) -> bool:
    if args.dataset == "folder":
        root = Path(args.data_dir or ".").expanduser()
        return any((root / name).is_dir() for name in ("val", "validation"))
    return args.dataset in VALIDATION_DATASETS


def build_data(args: argparse.Namespace, d: Dist, model: Optional[nn.Module] = None) -> Data:
    """Datasets and loaders: the device-resident path for small images, DataLoaders with workers otherwise."""
    options: Dict[str, Any] = dict(seed=0)
    if args.imb_ratio is not None:
        options["imb_ratio"] = args.imb_ratio
    if args.split_dir:
        options["split_dir"] = args.split_dir
    if args.dataset_download:
        options["download"] = True
    eval_splits = ["val", "test"] if _has_validation(args) else ["test"]
    small = args.dataset in SMALL_IMAGE_CONFIGS and not args.no_device_loader
    transform_model = None if args.dataset in SMALL_IMAGE_CONFIGS else model
    train_set = create_dataset(
        args.dataset,
        args.data_dir,
        "train",
        transform=None if small else build_transform(args.dataset, True, model=transform_model),
        **options,
    )
    eval_options = {k: v for k, v in options.items() if k != "download"}
    eval_sets = {
        split: create_dataset(
            args.dataset,
            args.data_dir,
            split,
            transform=None if small else build_transform(args.dataset, False, model=transform_model),
            **eval_options,
        )
        for split in eval_splits
    }
    if args.stage == "router":  # the official stage 2 draws a class uniformly, then its next image
        sampler = ClassBalancedSampler(
            train_set.targets, num_replicas=d.world_size, rank=d.rank, seed=args.seed
        )
    elif d.world_size > 1:
        sampler = DistributedSampler(
            range(len(train_set)), d.world_size, d.rank, shuffle=True, seed=args.seed
        )
    else:
        sampler = None
    generator = None
    if small:
        train_loader = DeviceDataLoader.from_dataset(
            train_set,
            args.batch_size,
            device=d.device,
            train=True,
            sampler=sampler,
            seed=args.seed,
            rank=d.rank,
        )
        eval_loaders = {
            s: DeviceDataLoader.from_dataset(ds, args.batch_size, device=d.device, train=False)
            for s, ds in eval_sets.items()
        }
    else:
        generator = torch.Generator()
        loader_kwargs = dict(num_workers=args.workers, pin_memory=d.device.type == "cuda")
        train_loader = DataLoader(
            train_set,
            args.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=False,
            generator=generator,
            # Workers start afresh each epoch, seeded from the epoch's generator: persistent ones would
            # carry their random state over, and a resumed run would augment differently.
            persistent_workers=False,
            **loader_kwargs,
        )
        eval_loaders = {
            s: DataLoader(ds, args.batch_size, shuffle=False, **loader_kwargs) for s, ds in eval_sets.items()
        }
    return Data(
        train_loader,
        eval_loaders,
        list(train_set.class_counts),
        train_set.num_classes,
        sampler,
        generator,
        rank=d.rank,
    )


# ----------------------------------------------------------------------------------------------- models
def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if args.num_classes is not None and args.num_classes != num_classes:
        raise ValueError(
            f"--num-classes {args.num_classes} does not match the dataset ({args.dataset}), which has "
            f"{num_classes} classes; leave --num-classes out to use the dataset's"
        )
    try:
        model = timm.create_model(
            args.model,
            pretrained=args.pretrained and not args.resume,  # a resumed run's weights are in its state
            num_classes=num_classes,
            drop_rate=args.drop_rate,
            drop_path_rate=args.drop_path,
        )
    except RuntimeError as error:  # the pretrained weights are not on this machine
        raise ValueError(f"--model {args.model} --pretrained: {error}") from error
    require_ride_model(model, args.model)
    if args.stage == "router" and model.num_experts < 2:
        raise ValueError(f"--stage router: {args.model} has one expert, so no routing decision to train")
    if args.initial_checkpoint and not args.resume:  # a resumed run's weights are in its state
        try:
            load_weights(model, args.initial_checkpoint)
        except RuntimeError as error:  # the state dict does not fit (the message lists what differs)
            raise ValueError(f"--initial-checkpoint {args.initial_checkpoint}: {error}") from error
    elif args.stage == "router" and not args.pretrained and not args.resume:
        raise ValueError("--stage router trains the router of a stage-1 model: give --initial-checkpoint")
    return model


def build_teacher(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    if not args.teacher or not args.teacher_checkpoint:
        raise ValueError(
            "--stage distill needs --teacher NAME and --teacher-checkpoint PATH (a trained teacher)"
        )
    try:
        teacher = load_model(args.teacher, checkpoint=args.teacher_checkpoint, num_classes=num_classes)
    except ValueError as error:  # another class count than the dataset's, a checkpoint of another model
        raise ValueError(
            f"--teacher {args.teacher} --teacher-checkpoint {args.teacher_checkpoint}: the teacher must be "
            f"trained on this dataset ({args.dataset}, {num_classes} classes): {error}"
        ) from None
    teacher.set_routing("all")
    teacher.requires_grad_(False)
    teacher = teacher.eval().to(device)
    return teacher.to(memory_format=torch.channels_last) if args.channels_last else teacher


def build_loss(args: argparse.Namespace, class_counts: Sequence[int]) -> nn.Module:
    """The stage's loss, with the preset's arguments where the loss takes them; --loss-kwargs win."""
    if args.stage == "router":
        if args.loss != "routing":
            raise ValueError(f"--stage router trains with the routing loss, not {args.loss!r}")
        return create_loss("routing", **_parse_loss_kwargs(args.loss_kwargs))
    accepted = loss_arguments(args.loss)
    kwargs = {k: v for k, v in args.preset_loss_kwargs.items() if k in accepted}
    # DRW at the preset's epoch for the losses that re-weight by default; at --drw-epoch for any that can.
    if "drw_epoch" in accepted and (accepted["drw_epoch"] is not None or "drw_epoch" in args.explicit):
        kwargs["drw_epoch"] = args.drw_epoch
    kwargs.update(_parse_loss_kwargs(args.loss_kwargs))
    try:
        if args.stage == "distill":
            own = {k: kwargs.pop(k) for k in list(kwargs) if k in loss_arguments("distill")}
            return create_loss("distill", class_counts, base=args.loss, **own, **kwargs)
        return create_loss(args.loss, class_counts, **kwargs)
    except TypeError as error:  # an argument the loss does not take
        raise ValueError(f"--loss {args.loss} --loss-kwargs {' '.join(args.loss_kwargs)}: {error}") from error


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.SGD:
    """The official optimizer of every RIDE stage: SGD with Nesterov momentum on the trainable parameters
    (weight decay on all of them, as the official configs)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)


def epoch_lr(args: argparse.Namespace, epoch: int) -> float:
    """The learning rate of the 1-based ``epoch`` under the run's schedule (flags resolved)."""
    return lr_at_epoch(
        epoch,
        schedule=args.sched,
        base_lr=args.lr,
        epochs=args.epochs,
        milestones=args.decay_epochs or (),
        gamma=args.decay_rate,
        warmup_epochs=args.warmup_epochs,
    )


# ------------------------------------------------------------------------------------------ run folder
def _run_dir(args: argparse.Namespace) -> Path:
    name = args.experiment or f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model}-{args.stage}"
    run_dir = Path(args.output) / name
    suffix = 1
    while run_dir.exists():
        run_dir = Path(args.output) / f"{name}-{suffix}"
        suffix += 1
    return run_dir


def _check_new_run(args: argparse.Namespace) -> None:
    """Flags of a new run that cannot work together, refused before anything is built."""
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a file; give a folder (run folders are made inside it)")
    try:
        epoch_lr(args, 1)
    except ValueError as error:  # e.g. a negative --lr or --decay-rate
        raise ValueError(f"the schedule (--lr, --decay-epochs, --decay-rate): {error}") from None
    if args.stage != "distill":
        given = [flag for flag in ("teacher", "teacher_checkpoint") if getattr(args, flag)]
        if given:
            flags = " and ".join("--" + flag.replace("_", "-") for flag in given)
            verb = "apply" if len(given) > 1 else "applies"
            raise ValueError(f"{flags} only {verb} to --stage distill (this is --stage {args.stage})")


def _restore_args(args: argparse.Namespace, saved: Dict[str, Any]) -> argparse.Namespace:
    """Resume with the interrupted run's arguments; explicit flags may only change RESUMABLE_CHANGES."""
    conflicts = [
        f"--{k.replace('_', '-')} {getattr(args, k)!r} (the run used {saved[k]!r})"
        for k in args.explicit
        if k in saved and k not in RESUMABLE_CHANGES and getattr(args, k) != saved[k]
    ]
    if conflicts:
        raise ValueError(
            "--resume continues a run with its own arguments; these differ: "
            + "; ".join(conflicts)
            + ". Start a new run instead, or leave these flags out"
        )
    given = set(args.explicit)
    for key, value in saved.items():
        if key not in RESUMABLE_CHANGES or key not in given:
            setattr(args, key, value)
    # What the run's own command set still counts as set (runs saved before "explicit" was kept: nothing).
    args.explicit = sorted(set(saved.get("explicit", [])) | given)
    return args


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _setup_logging(run_dir: Optional[Path], is_main: bool) -> None:
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and is_main:
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(message)s",
        handlers=handlers,
        force=True,
    )


# ------------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run train.py with ``argv``; return the final results (also written to ``results.json``)."""
    args = parse_args(argv)
    d = setup_distributed(args.device)
    state = None
    if args.resume:
        state = load_training_state(args.resume)
        ran_with = state["args"].get("world_size", 1)
        if ran_with != d.world_size:
            how = "python train.py" if ran_with == 1 else f"torchrun --nproc_per_node={ran_with} train.py"
            raise ValueError(
                f"--resume {args.resume}: the run trained in {ran_with} process(es), this is {d.world_size}; "
                f"the global batch and each process's data would change. Resume with {how} --resume ..."
            )
        args = _restore_args(args, state["args"])
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        if args.epochs < state["epoch"]:
            raise ValueError(
                f"--epochs {args.epochs}: the run in {run_dir} has already trained {state['epoch']} epochs; "
                f"give --epochs {state['epoch']} or more (equal: only the final evaluation)"
            )
    else:
        args = resolve_defaults(args)
        _check_new_run(args)
        run_dir = _run_dir(args)
    _setup_logging(None, d.is_main)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.deterministic
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    if args.cuda_graph:
        _check_cuda_graph(args, d, amp_dtype)

    # Data, models and loss first: bad input stops here, before a run folder exists.
    seed_epoch(args.seed, 0)  # the same initial weights on every rank
    try:
        with torch.device("meta"):  # only its pretrained_cfg (input size, mean, std) is needed here
            template = timm.create_model(args.model)
    except RuntimeError as error:  # timm: unknown model
        raise ValueError(
            f"--model {args.model}: {error}; the RIDE models: timm.list_models('ride_*')"
        ) from error
    except LocalEntryNotFoundError as error:  # hf-hub: the config neither cached nor reachable
        raise hub_not_cached(args.model) from error
    data = build_data(args, d, model=template)
    model = build_model(args, data.num_classes)
    teacher = build_teacher(args, data.num_classes, d.device) if args.stage == "distill" else None
    if teacher is not None and teacher.num_experts <= model.num_experts:
        _logger.warning(
            f"warning: the teacher {args.teacher} has {teacher.num_experts} experts and the student "
            f"{args.model} {model.num_experts}; RIDE distils from more experts into fewer"
        )
    loss_fn = build_loss(args, data.class_counts)
    if teacher is not None:  # a resumed distillation must learn from the same teacher
        digest = _sha256(args.teacher_checkpoint)
        if state is not None and state["args"].get("teacher_sha256", digest) != digest:
            raise ValueError(
                f"--resume {args.resume}: the teacher checkpoint {args.teacher_checkpoint} has changed since "
                "the run started (its SHA-256 differs); restore that file, or start a new distillation run"
            )
        args.teacher_sha256 = digest

    if d.world_size > 1:  # every rank writes into rank 0's folder
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    saved_args = {k: v for k, v in vars(args).items() if k != "config"}
    saved_args["world_size"] = d.world_size  # a resume must split the batch the same way
    if d.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            _setup_logging(run_dir, d.is_main)
        except OSError as error:  # read-only file system, no permission
            raise ValueError(
                f"cannot write the run folder {run_dir} ({error.strerror}); give --output a folder this user "
                "can write to"
            ) from None
        text = yaml.safe_dump(saved_args, sort_keys=False)
        atomic_write(run_dir / "args.yaml", lambda tmp: Path(tmp).write_text(text))
        _logger.info(f"run folder: {run_dir}")
    d.barrier()
    if d.world_size > 1:
        _logger.info(
            f"distributed: {d.world_size} processes ({dist.get_backend()}), {args.batch_size} images per "
            f"process, global batch {args.batch_size * d.world_size}; --lr {args.lr} is used as given"
        )
    if args.stage == "router":
        model.set_router_training(True)
        model.router.set_trained(True)  # every stage-2 checkpoint routes by default
    else:
        model.set_expert_training(True)
        if bool(model.router.trained):  # from an --initial-checkpoint of a router-stage run
            _logger.warning(
                "warning: the initial weights carry a trained router; it was fitted to the experts as they "
                f"were, so the model saved by this --stage {args.stage} run routes with all experts. Train "
                "its router again with --stage router"
            )
            model.router.set_trained(False)
    model.to(d.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn:
        model = sync_batch_norm(model, d)
    optimizer = build_optimizer(model, args.lr, args.weight_decay, args.momentum)
    loss_fn = loss_fn.to(d.device)
    ema = timm.utils.ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best, rows = 1, None, []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:  # the data changed since (another class count, for example)
            raise ValueError(
                f"--resume {args.resume}: the run's saved model does not fit the model built from its "
                f"arguments now (has the data changed?): {error}"
            ) from error
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, best, rows = state["epoch"] + 1, state["best"], state["summary"]
        _logger.info(f"resumed from {args.resume} at epoch {start_epoch}")

    train_module: nn.Module = RouterTrainStep(model) if args.stage == "router" else model
    if args.torchcompile:
        train_module = torch.compile(train_module, backend=args.torchcompile)
    if d.world_size > 1:
        device_ids = [d.local_rank] if d.device.type == "cuda" else None
        train_module = DistributedDataParallel(train_module, device_ids=device_ids)
    step = make_step(args.stage, train_module, loss_fn, teacher)
    if args.cuda_graph:
        step = GraphedTrainStep(
            step, optimizer, model=model, amp_dtype=amp_dtype, key_fn=loss_fn.schedule_state
        )
    eval_split = "val" if "val" in data.eval_loaders else "test"
    routing = "router" if args.stage == "router" else "all"
    eval_model = ema.module if ema is not None else model
    checkpoint_meta = dict(
        model=args.model, stage=args.stage, dataset=args.dataset, num_classes=data.num_classes
    )
    best_name = "best.safetensors" if eval_split == "val" else "best_on_test.safetensors"
    macs = count_macs(model)  # MACs per image by part, for the realized cost of each evaluation

    def evaluator(m: nn.Module, split: str, routing: str) -> EvalResult:
        result = evaluate(
            m, data.eval_loaders[split], class_counts=data.class_counts, device=d.device, routing=routing,
            amp_dtype=amp_dtype, channels_last=args.channels_last, macs=macs,
        )  # fmt: skip
        result.model, result.dataset = args.model, args.dataset
        return result

    last_plot = -math.inf
    for epoch in range(start_epoch, args.epochs + 1):
        seed_epoch(args.seed, epoch, d.rank)
        data.set_epoch(args.seed, epoch)
        lr = epoch_lr(args, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_fn.set_epoch(epoch)
        train_module.train()
        start = time.perf_counter()
        train_loss = train_one_epoch(
            step,
            data.train_loader,
            optimizer,
            epoch=epoch,
            device=d.device,
            amp_dtype=amp_dtype,
            scaler=scaler,
            ema=ema,
            model=model,
            channels_last=args.channels_last,
            log_interval=args.log_interval,
            verbose=d.is_main,
        )
        seconds = time.perf_counter() - start
        if d.world_size > 1:  # the mean over every process's batches, not rank 0's alone
            mean = torch.tensor(train_loss, dtype=torch.float64, device=d.device)
            dist.all_reduce(mean)
            train_loss = mean.item() / d.world_size
        if d.is_main:
            result = evaluator(eval_model, eval_split, routing)
            rows.append(_summary_row(epoch, lr, train_loss, eval_split, result, seconds))
            _logger.info(_epoch_line(rows[-1]))
            improved = best is None or result.top1 > best["top1"]
            if improved:
                best = dict(epoch=epoch, top1=result.top1, split=eval_split)
            weights = eval_model.state_dict()
            meta = dict(checkpoint_meta, epoch=epoch, selected_on=eval_split)
            save_weights(run_dir / "last.safetensors", weights, meta)
            if improved:
                save_weights(run_dir / best_name, weights, meta)
            save_training_state(
                run_dir / "last_state.pt",
                dict(
                    epoch=epoch,
                    best=best,
                    summary=rows,
                    args=saved_args,
                    model=model.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict(),
                    ema=ema.state_dict() if ema is not None else None,
                ),
            )
            write_csv(run_dir / "summary.csv", rows)
            if epoch == args.epochs or time.perf_counter() - last_plot >= PLOT_EVERY_S:
                title = f"{args.model}, stage {args.stage}, {args.dataset}"
                plot_training_curves(rows, run_dir / TRAINING_PLOT, title)
                last_plot = time.perf_counter()
        d.barrier()

    results = _final_results(args, eval_model, data, run_dir, best_name, evaluator) if d.is_main else {}
    d.barrier()
    return results


def _check_cuda_graph(args: argparse.Namespace, d: Dist, amp_dtype: Optional[torch.dtype]) -> None:
    problems = []
    if d.device.type != "cuda":
        problems.append(f"it needs a CUDA device (--device is {d.device})")
    if args.stage != "experts":
        problems.append(f"it records stage 1 (--stage experts), not --stage {args.stage}")
    if d.world_size > 1:
        problems.append("DistributedDataParallel's gradient hooks are not recorded: run one process")
    if amp_dtype == torch.float16:
        problems.append("float16's gradient scaler synchronises every step: use --amp-dtype bfloat16")
    if args.drop_rate or args.drop_path:
        problems.append("dropout would replay the same masks: leave --drop-rate and --drop-path at 0")
    if problems:
        raise ValueError("--cuda-graph: " + "; ".join(problems))


def _summary_row(
    epoch: int, lr: float, loss: float, split: str, r: EvalResult, seconds: float
) -> Dict[str, Any]:
    return dict(
        epoch=epoch,
        lr=lr,
        train_loss=round(loss, 6),
        eval_split=split,
        top1=round(r.top1, 4),
        many_top1=_round(r.many_top1),
        medium_top1=_round(r.medium_top1),
        few_top1=_round(r.few_top1),
        experts_mean=round(r.experts_mean, 4),
        epoch_seconds=round(seconds, 2),
    )


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None or value != value else round(value, 4)


def _shown(value: Optional[float]) -> str:
    """A split's accuracy in the log; "-" for a split without eval images (as validate.py's table)."""
    return "-" if value is None else f"{value}"


def _epoch_line(row: Dict[str, Any]) -> str:
    return (
        f"epoch {row['epoch']}: lr {row['lr']:.4g} train loss {row['train_loss']:.4f} | {row['eval_split']} "
        f"top-1 {row['top1']:.2f} (many {_shown(row['many_top1'])} / medium {_shown(row['medium_top1'])} / "
        f"few {_shown(row['few_top1'])}) experts {row['experts_mean']:.2f} | {row['epoch_seconds']:.1f} s"
    )


def _final_results(
    args: argparse.Namespace, model: nn.Module, data: Data, run_dir: Path, best_name: str, evaluator: Callable
) -> Dict[str, Any]:
    """The honest result: with a validation split, the best checkpoint (chosen on it) evaluated once on test;
    without one (CIFAR-LT, iNaturalist, digits), the final epoch on test."""
    if "val" in data.eval_loaders:
        load_weights(model, run_dir / best_name)
        checkpoint = best_name
    else:
        checkpoint = "last.safetensors"
    routings = ["all", "router"] if args.stage == "router" else ["all"]
    results = dict(
        model=args.model, dataset=args.dataset, stage=args.stage, epochs=args.epochs, checkpoint=checkpoint
    )
    results["test"], evaluated = [], []
    for routing in routings:
        r = evaluator(model, "test", routing)
        results["test"].append(r.to_dict())
        evaluated.append(r)
        _logger.info(
            f"final test ({checkpoint}, routing {routing}): top-1 {r.top1:.2f} | many "
            f"{_shown(_round(r.many_top1))} / medium {_shown(_round(r.medium_top1))} / few "
            f"{_shown(_round(r.few_top1))} | experts used {r.experts_mean:.2f}"
        )
    text = json.dumps(results, indent=2)
    atomic_write(run_dir / "results.json", lambda tmp: Path(tmp).write_text(text))
    save_plots(evaluated, run_dir)  # per-class accuracy and experts per split, as validate.py --plot-dir
    return results
