#!/usr/bin/env python3
"""Evaluate RIDE models: accuracy overall and by shot split, calibration, experts used, realized MACs.

    python validate.py --model ride_resnet32_3e --checkpoint output/train/RUN/best.safetensors \\
        --dataset cifar100_lt --data-dir ~/data --routing all router --results-file results.json

Models are timm names (``ride_resnet32_3e``), ``hf-hub:ORG/NAME`` or ``local-dir:PATH`` (resolved by
``timm.create_model``), with ``--pretrained`` and/or ``--checkpoint`` weights (ours or the official RIDE
layout). Without ``--dataset`` the embedded default (``digits_lt``) is used. The measurements live in
``ride_models.metrics`` and the plots in ``ride_models.plots``; see docs/validate.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader

import ride_models  # noqa: F401  (registers the models)
from ride_models.checkpoint import load_model, write_csv
from ride_models.data import (
    DATASET_NAMES,
    DEFAULT_DATASET,
    SPLIT_FILE_DATASETS,
    LongTailDataset,
    build_transform,
    create_dataset,
    load_class_counts,
)
from ride_models.data.datasets import CLASS_COUNTS_DATASETS
from ride_models.data.transforms import SMALL_IMAGE_CONFIGS
from ride_models.flops import count_macs
from ride_models.metrics import EvalResult, evaluate, format_table, parse_routing
from ride_models.training import check_device

__all__ = ["build_parser", "main", "parse_class_counts"]

_WEIGHTS_HELP = (
    "a .safetensors file of our state dict (train.py writes RUN/best.safetensors and RUN/last.safetensors) "
    "or a .pth/.pt file holding a state dict, ours or the official RIDE one"
)


def _routing_arg(value: str) -> Union[str, int]:
    try:
        return parse_routing(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_class_counts(value: str) -> Union[List[int], Path]:
    """``--class-counts``: a JSON file holding a list of training images per class, or the list itself
    (``500,477,455,...``)."""
    if Path(value).expanduser().is_file():
        return Path(value).expanduser()
    if re.fullmatch(r"\s*\[?\s*\d+(\s*,\s*\d+)*\s*\]?\s*", value):
        return [int(n) for n in re.findall(r"\d+", value)]
    raise FileNotFoundError(
        f"--class-counts {value}: no such file, and not a list of numbers; give a JSON file holding the "
        "training images of every class in class order ([500, 477, ...]) or the list itself (500,477,...)"
    )


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none to show (None, [None], "") or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [None], "") or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate a RIDE model: top-1/top-5, many/medium/few, ECE, experts used, realized MACs.",
        formatter_class=_DefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default="ride_resnet32_3e", help="a ride_* model name, hf-hub:ORG/NAME or local-dir:PATH"
    )
    g.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights")
    g.add_argument("--checkpoint", default="", help=f"weights to evaluate: {_WEIGHTS_HELP}")
    g.add_argument(
        "--num-classes", type=int, default=None, help="class count (default: the checkpoint's or dataset's)"
    )
    g.add_argument(
        "--routing",
        nargs="+",
        type=_routing_arg,
        default=[None],
        help="one or more of all, router, K (the first K experts); one result row each "
        "(default: the model's own: router once trained, else all)",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=DEFAULT_DATASET, choices=DATASET_NAMES)
    g.add_argument("--data-dir", default=None, help="the dataset's root folder")
    g.add_argument("--split", default="test", choices=["train", "val", "test"])
    g.add_argument("--imb-ratio", type=float, default=None, help="long-tail ratio (CIFAR-LT, folder, digits)")
    g.add_argument("--split-dir", default=None, help="ImageNet-LT / Places-LT / iNat: folder of split files")
    g.add_argument(
        "--class-counts",
        type=str,
        default=None,
        help="training images per class for many/medium/few, when the dataset cannot know them: "
        "a JSON file of a list, or the list (500,477,...)",
    )
    g.add_argument("--dataset-download", action="store_true", help="let torchvision download CIFAR")
    g.add_argument("-b", "--batch-size", type=int, default=256)
    g.add_argument("-j", "--workers", type=int, default=2, help="data loading processes")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", action="store_true", help="mixed precision (autocast)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    g.add_argument("--channels-last", action="store_true")
    g = p.add_argument_group("output")
    g.add_argument(
        "--results-file", default="",
        help="the summary: JSON (one object, or a list for several --routing) or CSV (one row per routing)",
    )  # fmt: skip
    g.add_argument(
        "--results-format", choices=["json", "csv"], default=None,
        help="format of --results-file (default: csv for a .csv name, json otherwise)",
    )  # fmt: skip
    g.add_argument("--per-class-csv", default="", help="CSV: one row per class (and routing mode)")
    g.add_argument("--plot-dir", default="", help="folder for per_class_accuracy.png, experts_per_split.png")
    return p


def _build_dataset(args: argparse.Namespace) -> LongTailDataset:
    counts = parse_class_counts(args.class_counts) if args.class_counts else None
    split_file = args.dataset in SPLIT_FILE_DATASETS
    takes_counts = args.dataset in CLASS_COUNTS_DATASETS
    try:
        dataset = create_dataset(
            args.dataset,
            args.data_dir,
            args.split,
            imb_ratio=args.imb_ratio,
            download=args.dataset_download,
            split_dir=args.split_dir if split_file else None,
            class_counts=counts if takes_counts else None,
        )
        # CIFAR and the digits know their training counts; --class-counts replaces them.
        if counts is not None and not takes_counts:
            dataset.class_counts = load_class_counts(counts, dataset.num_classes)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(
            f"{error}\n(validate.py flags: root is --data-dir, split_dir is --split-dir, class_counts is "
            "--class-counts FILE_OR_LIST, download is --dataset-download)"
        ) from error
    return dataset


def _check_classes(model: nn.Module, dataset: LongTailDataset, args: argparse.Namespace) -> None:
    if model.num_classes == dataset.num_classes:
        return
    source = (
        f"the checkpoint {args.checkpoint}"
        if args.checkpoint
        else f"{args.model}'s pretrained weights"
        if args.pretrained
        else f"--model {args.model} with --num-classes {args.num_classes}"
    )
    raise ValueError(
        f"{source} has {model.num_classes} classes, but the dataset {args.dataset} ({args.split} split) has "
        f"{dataset.num_classes}; evaluate on the dataset the weights were trained on (--dataset, "
        f"--data-dir), or give weights for {dataset.num_classes} classes"
    )


def _write_outputs(
    results: Sequence[EvalResult], args: argparse.Namespace, class_names: Sequence[str]
) -> None:
    if args.results_file:
        rows: List[Dict] = [
            {**r.to_dict(), "split": args.split, "checkpoint": args.checkpoint} for r in results
        ]
        path = Path(args.results_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        if _results_format(args) == "csv":
            write_csv(path, [_flat(row) for row in rows])
        else:
            path.write_text(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) + "\n")
    if args.per_class_csv:  # write_csv makes the folder
        write_csv(args.per_class_csv, [row for r in results for row in r.per_class_rows(class_names)])
    if args.plot_dir:
        from ride_models.plots import save_plots

        for path in save_plots(results, args.plot_dir):
            print(f"wrote {path}")


def _results_format(args: argparse.Namespace) -> str:
    return args.results_format or ("csv" if args.results_file.lower().endswith(".csv") else "json")


def _flat(row: Dict[str, Any]) -> Dict[str, Any]:
    """A results row as CSV columns: nested dicts as ``key_subkey``, lists space-separated, None empty."""
    flat: Dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update(_flat({f"{key}_{k}": v for k, v in value.items()}))
        elif isinstance(value, (list, tuple)):
            flat[key] = " ".join(str(v) for v in value)
        else:
            flat[key] = "" if value is None else value
    return flat


def _check_output_paths(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written, before anything is evaluated."""
    for flag, value, kind in (
        ("--results-file", args.results_file, "file"),
        ("--per-class-csv", args.per_class_csv, "file"),
        ("--plot-dir", args.plot_dir, "folder"),
    ):
        if not value:
            continue
        path = Path(value)
        if kind == "file" and path.is_dir():
            raise ValueError(f"{flag} {value} is a folder; give a file name")
        if kind == "folder" and path.exists() and not path.is_dir():
            raise ValueError(f"{flag} {value} is a file; give a folder")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"{flag} {value}: {parent} is a file, so nothing can be made in it")
                break


def _check_routings(model: nn.Module, routings: Sequence[Union[str, int]]) -> None:
    """Every --routing value must suit the model (an expert count in range, classifiers for routing),
    checked before the first evaluation."""
    for routing in routings:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrained-router warning comes with its evaluation
            with model.routing_scope(routing):
                pass


def main(argv: Optional[Sequence[str]] = None) -> List[EvalResult]:
    """Run validate.py with ``argv`` (default: the command line); return one result per routing mode."""
    args = build_parser().parse_args(argv)
    _check_output_paths(args)
    check_device(args.device)
    device = torch.device(args.device)
    dataset = _build_dataset(args)
    num_classes = args.num_classes
    if not (args.checkpoint or args.pretrained):
        print(f"warning: no --checkpoint or --pretrained: {args.model} has random weights", file=sys.stderr)
        num_classes = num_classes or dataset.num_classes
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file; expected {_WEIGHTS_HELP}")
    model = load_model(
        args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=num_classes
    )
    _check_classes(model, dataset, args)
    _check_routings(model, args.routing)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    transform_model = None if args.dataset in SMALL_IMAGE_CONFIGS else model  # small images: fixed transform
    dataset.transform = build_transform(args.dataset, is_training=False, model=transform_model)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
    )
    macs = count_macs(model, tuple(dataset[0][0].shape))  # once, at the evaluated input size
    amp_dtype = getattr(torch, args.amp_dtype) if args.amp else None
    results = []
    for routing in args.routing:
        r = evaluate(
            model,
            loader,
            class_counts=dataset.class_counts,
            device=device,
            routing=routing,
            amp_dtype=amp_dtype,
            channels_last=args.channels_last,
            macs=macs,
        )
        r.model, r.dataset = args.model, args.dataset
        results.append(r)
    splits = dataset.shot_splits()
    print(
        f"{args.model} ({args.checkpoint or ('pretrained' if args.pretrained else 'random weights')}) on "
        f"{args.dataset} {args.split}: {len(dataset)} images, {dataset.num_classes} classes "
        f"({len(splits['many'])} many / {len(splits['medium'])} medium / {len(splits['few'])} few by "
        "training images)"
    )
    print(format_table(results))
    _write_outputs(results, args, dataset.classes)
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, ConnectionError, ImportError) as error:
        sys.exit(f"validate.py: error: {error}")
