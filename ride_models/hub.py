"""Publishing RIDE weights in timm's layout: convert official checkpoints, export our runs, push to the Hub.

    python -m ride_models.hub convert OFFICIAL.pth --model ride_resnet32_4e --tag TAG --out DIR
    python -m ride_models.hub export output/train/RUN --results validate.json --out DIR
    python -m ride_models.hub push DIR --repo-id ride-models/ride_resnet32_4e.cifar100_lt_r100_distill

A published folder holds ``model.safetensors`` (our state dict), timm's ``config.json`` and a model card
``README.md``; ``timm.create_model("local-dir:DIR", pretrained=True)`` loads it, and once pushed
``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` or the registered ``name.tag``.

Official checkpoints are the research code's training checkpoints: a dict with ``arch``, ``epoch``,
``state_dict``, ``optimizer``, ``monitor_best``, ``criterion`` and ``config``, the last a pickled object of a
class of the research code. :func:`read_official_checkpoint` reads them without that code and without
executing anything from the file: objects of unknown classes become inert stand-ins holding their pickled
state, and a file that would call a function to build an object is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import yaml
from timm.models import get_pretrained_cfg, save_for_hf
from torch import nn

from ride_models.checkpoint import UnsafeCheckpointError, load_model, safe_torch_load
from ride_models.convert import convert_official_state_dict
from ride_models.data.transforms import SMALL_IMAGE_CONFIGS
from ride_models.flops import count_macs
from ride_models.models.ride_resnet import HUB_ORG, PUBLISHED_CHECKPOINTS, known_tags

__all__ = [
    "UnsafeCheckpointError",
    "convert_official_checkpoint",
    "export_run",
    "main",
    "model_card",
    "push_folder",
    "read_official_checkpoint",
    "write_folder",
]

CITATION = """@inproceedings{wang2021longtailed,
  title={Long-tailed Recognition by Routing Diverse Distribution-Aware Experts},
  author={Xudong Wang and Long Lian and Zhongqi Miao and Ziwei Liu and Stella Yu},
  booktitle={International Conference on Learning Representations},
  year={2021},
  url={https://openreview.net/forum?id=D9I3drBz4UC}
}"""
FOLDER_FILES = ("model.safetensors", "config.json", "README.md")


# ------------------------------------------------------------------------------- reading official files
def read_official_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Read an official RIDE checkpoint (``.pth``) without its research code and without executing code.

    Returns:
        The checkpoint dict; ``state_dict`` holds the tensors, research-code objects (``config``) are
        inert stand-ins whose pickled data is in ``.state`` (:func:`~ride_models.checkpoint.safe_torch_load`).

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file would call a function while loading.
        ValueError: the file is truncated, corrupted, not a PyTorch checkpoint, or has no ``state_dict``.
    """
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        if isinstance(checkpoint, dict):
            keys = sorted(map(str, checkpoint))
            found = f"{len(keys)} keys: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        else:
            found = type(checkpoint).__name__
        raise ValueError(
            f"{path} is not an official RIDE training checkpoint: no 'state_dict' (found {found}); a bare "
            "state dict converts in Python with ride_models.convert.convert_official_state_dict"
        )
    return checkpoint


# --------------------------------------------------------------------------------------- model cards
def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def model_card(
    model: nn.Module,
    repo_name: str,
    *,
    dataset: str,
    recipe: str,
    origin: str,
    rows: Sequence[Dict[str, Any]],
    accuracy_source: str,
) -> str:
    """The README.md of a published folder: metadata, what the model is, accuracy table, usage, citation.

    ``rows``: one dict per routing mode with ``routing``, ``top1``, ``many_top1``, ``medium_top1``,
    ``few_top1`` and optionally ``experts_mean`` and ``gmacs_per_image`` (validate.py's JSON fields).
    """
    macs = count_macs(model)
    params = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("router."))
    router = "trained (routes by default)" if model.router.is_trained else "untrained (all experts are used)"
    cfg = model.pretrained_cfg
    arch, router_params = (
        cfg.get("architecture", repo_name),
        sum(p.numel() for p in model.router.parameters()),
    )
    table = [
        "| routing | top-1 | many | medium | few | experts / image | GMACs / image |",
        "|" + " --- |" * 7,
    ]
    for r in rows:
        gmacs = r.get("gmacs_per_image")
        table.append(
            f"| {r.get('routing', 'all')} | {_fmt(r.get('top1'))} | {_fmt(r.get('many_top1'))} | "
            f"{_fmt(r.get('medium_top1'))} | {_fmt(r.get('few_top1'))} | {_fmt(r.get('experts_mean'), 2)} | "
            f"{_fmt(gmacs, 3) if gmacs is not None else '-'} |"
        )
    accuracy = "\n".join(table) if rows else "Not measured."
    return f"""---
license: mit
library_name: timm
pipeline_tag: image-classification
tags:
- image-classification
- timm
- long-tailed-recognition
- ride
---
# {repo_name}

RIDE (Routing Diverse Distribution-Aware Experts, Wang et al., ICLR 2021) for long-tailed image
classification, in timm's format. The architecture comes with the `ride-models` package: install it and
`import ride_models` before `timm.create_model`.

## Model details

- Architecture: `{arch}`, {model.num_experts} experts, {model.num_classes} classes
- Parameters: {params / 1e6:.2f} M (+ {router_params:,} in the router, {router})
- MACs per image: {macs.all_experts / 1e9:.3f} G with every expert, {macs.per_image(1) / 1e9:.3f} G when the
  router stops after the first
- Dataset: {dataset}
- Training: {recipe}
- Origin: {origin}
- Preprocessing: input {tuple(cfg.get("input_size", ()))}, mean {tuple(cfg.get("mean", ()))}, std \
{tuple(cfg.get("std", ()))}, crop_pct {cfg.get("crop_pct")}, interpolation {cfg.get("interpolation")}

## Accuracy (top-1 %, many / medium / few-shot classes)

{accuracy}

{accuracy_source}

## Usage

```python
import timm, torch, ride_models

model = timm.create_model("hf-hub:{HUB_ORG}/{repo_name}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)
with torch.no_grad():
    logits = model(transform(image).unsqueeze(0))          # routed when the router is trained
    logits, experts = model.forward_routed(transform(image).unsqueeze(0))
```

## Citation

```bibtex
{CITATION}
```
"""


def write_folder(model: nn.Module, out_dir: str | Path, card: str) -> Path:
    """Check a forward pass, then write ``model.safetensors``, timm's ``config.json`` and ``README.md``.

    The config's ``input_size`` carries the model's input channels, so that timm builds the same stem when it
    loads the folder. The model is left in the mode it was in.
    """
    cfg = dict(model.pretrained_cfg)
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    size = (model.in_chans, *size[1:])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, *size)
            routed = model.num_experts > 1 and model.num_classes > 0
            out = model.forward_routed(x)[0] if routed else model(x)
        expected = (2, model.num_classes if model.num_classes > 0 else model.num_features)
        if out.shape != expected or not torch.isfinite(out).all():
            raise ValueError(f"the model's forward pass gave {tuple(out.shape)} / non-finite outputs")
        out_dir = Path(out_dir)
        model.pretrained_cfg = model.default_cfg = {**cfg, "input_size": size}
        save_for_hf(model, str(out_dir), safe_serialization=True)
    finally:
        model.train(was_training)
    (out_dir / "README.md").write_text(card)
    return out_dir


# ------------------------------------------------------------------------------------------ commands
def _published(model_name: str, tag: Optional[str]) -> Optional[str]:
    """The registered ``name.tag`` (checked), or None without a tag."""
    if tag is None:
        return None
    name_tag = f"{model_name}.{tag}"
    if name_tag not in PUBLISHED_CHECKPOINTS:
        known = known_tags(model_name)
        raise ValueError(f"unknown tag {tag!r} for {model_name}; known tags: {', '.join(known) or 'none'}")
    return name_tag


def _apply_published_cfg(model: nn.Module, name_tag: str) -> None:
    cfg = get_pretrained_cfg(name_tag).to_dict()
    cfg["architecture"] = name_tag.split(".")[0]
    model.pretrained_cfg = model.default_cfg = cfg


# What identifies the zoo entry a model's config defaults to (timm gives a model its first tag's config).
_ZOO_FIELDS = ("tag", "hf_hub_id", "description", "origin_url")


def _apply_own_cfg(model: nn.Module, dataset: Optional[str] = None) -> None:
    """Weights that are not a zoo entry: the config keeps the architecture's fields but none of the zoo
    entry's, and takes the normalisation and size of the small-image dataset it trained on (train.py
    normalises those with the dataset's own statistics, not the config's)."""
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _ZOO_FIELDS}
    small = SMALL_IMAGE_CONFIGS.get(dataset or "")
    if small is not None:
        size = (cfg.get("input_size", (3,))[0], small.size, small.size)
        cfg.update(mean=tuple(small.mean), std=tuple(small.std), input_size=size, crop_pct=1.0)
    model.pretrained_cfg = model.default_cfg = cfg


def _check_fits_tag(model: nn.Module, name_tag: str, checkpoint: str | Path) -> None:
    """Refuse a checkpoint that is not the zoo entry ``name_tag`` describes (its card would be false)."""
    cfg, zoo = get_pretrained_cfg(name_tag), PUBLISHED_CHECKPOINTS[name_tag]
    problems = []
    if model.num_classes != cfg.num_classes:
        problems.append(f"{model.num_classes} classes, the tag's dataset has {cfg.num_classes}")
    if model.router.is_trained != zoo.routed:
        has = "a trained router (an EA checkpoint)" if model.router.is_trained else "no router weights"
        problems.append(f"{has}, where the tag's checkpoint has {'one' if zoo.routed else 'none'}")
    if problems:
        raise ValueError(
            f"{checkpoint} is not the checkpoint of {name_tag}: it has {'; '.join(problems)}. Check the "
            "file, or convert without --tag"
        )


def convert_official_checkpoint(
    checkpoint: str | Path, model_name: str, out_dir: str | Path, *, tag: Optional[str] = None
) -> Path:
    """Convert an official RIDE checkpoint into a published folder (weights, config.json, model card)."""
    if model_name not in timm.list_models("ride_*"):
        raise ValueError(
            f"--model {model_name}: not a RIDE model; the RIDE models: timm.list_models('ride_*')"
        )
    name_tag = _published(model_name, tag)
    raw = read_official_checkpoint(checkpoint)
    state_dict = convert_official_state_dict(raw["state_dict"], model_name)
    model = load_model(model_name, checkpoint=state_dict)
    if name_tag is not None:
        _check_fits_tag(model, name_tag, checkpoint)
        _apply_published_cfg(model, name_tag)
        zoo = PUBLISHED_CHECKPOINTS[name_tag]
        rows = [
            dict(
                routing="router" if zoo.routed else "all",
                top1=zoo.top1,
                many_top1=zoo.many,
                medium_top1=zoo.medium,
                few_top1=zoo.few,
            )
        ]
        dataset, recipe, origin = zoo.dataset, f"{zoo.recipe}, by the RIDE authors", zoo.origin_url
        source = "As reported by the official RIDE model zoo (MODEL_ZOO.md) for this checkpoint."
    else:
        known = known_tags(model_name)
        warnings.warn(
            f"converting {checkpoint} without --tag: its model card names no dataset and no accuracy. If "
            f"it is a checkpoint of the official model zoo, give its tag (for {model_name}: "
            f"{', '.join(known) or 'none registered'})",
            stacklevel=2,
        )
        _apply_own_cfg(model)
        rows, dataset, recipe = [], "(not given)", "by the RIDE authors"
        origin, source = f"official RIDE checkpoint {Path(checkpoint).name}", ""
    card = model_card(
        model,
        name_tag or model_name,
        dataset=dataset,
        recipe=recipe,
        origin=origin,
        rows=rows,
        accuracy_source=source
        + f" Converted with `python -m ride_models.hub convert` (epoch {raw.get('epoch')}).",
    )
    return write_folder(model, out_dir, card)


def _results_rows(path: Path) -> List[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not JSON ({error}): expected validate.py's --results-file in JSON (a .json name)"
        ) from error
    if isinstance(data, dict) and "test" in data:  # train.py's results.json
        return list(data["test"])
    return data if isinstance(data, list) else [data]  # validate.py: one dict or a list


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    results: Optional[str | Path] = None,
    weights: Optional[str] = None,
    tag: Optional[str] = None,
) -> Path:
    """Export a train.py run folder: its weights, config.json and a card with validate.py's numbers.

    Args:
        run_dir: the run folder (``args.yaml`` and the weights).
        out_dir: the folder to write.
        results: validate.py's ``--results-file`` JSON (default: the run's own ``results.json``).
        weights: the weights file in the run folder (default ``best.safetensors`` if the run chose one on a
            validation split, else ``last.safetensors``).
        tag: a registered tag of the model, whose preprocessing and description the config takes.
    """
    run_dir = Path(run_dir)
    args_file = run_dir / "args.yaml"
    if not args_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a train.py run folder: no args.yaml")
    args = yaml.safe_load(args_file.read_text())
    missing = [
        k
        for k in ("model", "dataset", "stage", "loss", "epochs", "lr", "batch_size", "seed")
        if k not in args
    ]
    if missing:
        raise ValueError(f"{args_file} lacks {', '.join(missing)}: not written by this version of train.py")
    weights = weights or (
        "best.safetensors" if (run_dir / "best.safetensors").is_file() else "last.safetensors"
    )
    results_path = Path(results) if results else run_dir / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(
            f"no results at {results_path}: run validate.py --results-file, or pass --results"
        )
    name_tag = _published(args["model"], tag)
    model = load_model(args["model"], checkpoint=run_dir / weights)
    if name_tag is not None:
        _apply_published_cfg(model, name_tag)
    else:
        _apply_own_cfg(model, args["dataset"])
    recipe = (
        f"ride-models train.py, stage {args['stage']}, loss {args['loss']}, {args['epochs']} epochs, "
        f"lr {args['lr']}, batch {args['batch_size']}, seed {args['seed']}"
    )
    card = model_card(
        model,
        name_tag or args["model"],
        dataset=args["dataset"],
        recipe=recipe,
        origin=f"{run_dir.name}/{weights}",
        rows=_results_rows(results_path),
        accuracy_source=f"Measured by ride-models ({results_path.name}).",
    )
    return write_folder(model, out_dir, card)


def push_folder(
    folder: str | Path, repo_id: str, *, private: bool = False, token: Optional[str] = None
) -> str:
    """Upload a published folder to the Hugging Face Hub (token: ``token`` or ``HF_TOKEN``)."""
    import huggingface_hub

    folder = Path(folder)
    missing = [f for f in FOLDER_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a published folder: missing {', '.join(missing)}")
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise ValueError(
            "no Hugging Face token: set HF_TOKEN (a token with write access to the organisation)"
        )
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="Upload RIDE weights"
        )
    except Exception as error:  # offline, no connection, refused token: huggingface_hub's or httpx's errors
        raise ConnectionError(
            f"uploading {folder} to {repo_id} failed: {type(error).__name__}: {error}"
        ) from error
    return str(getattr(commit, "commit_url", commit))


def main(argv: Optional[Sequence[str]] = None) -> Any:
    parser = argparse.ArgumentParser(prog="python -m ride_models.hub", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="official RIDE checkpoint -> published folder")
    p.add_argument("checkpoint")
    p.add_argument("--model", required=True, help="a ride_* model name")
    p.add_argument(
        "--tag", default=None, help="the registered tag (e.g. cifar100_lt_r100): preprocessing, card"
    )
    p.add_argument("--out", required=True)
    p = sub.add_parser("export", help="train.py run folder -> published folder")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--results", default=None, help="validate.py --results-file JSON (default: the run's)")
    p.add_argument("--weights", default=None, help="file in the run folder (default best, else last)")
    p.add_argument("--tag", default=None)
    p = sub.add_parser("push", help="upload a published folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True, help="ORG/NAME")
    p.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "convert":
        out = convert_official_checkpoint(args.checkpoint, args.model, args.out, tag=args.tag)
    elif args.command == "export":
        out = export_run(args.run_dir, args.out, results=args.results, weights=args.weights, tag=args.tag)
    else:
        out = push_folder(args.folder, args.repo_id, private=args.private)
    print(out)
    return out


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as error:  # FileNotFoundError, ConnectionError (push) included
        sys.exit(f"ride_models.hub: error: {error}")
