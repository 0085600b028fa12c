"""Conversion of the official RIDE state dicts to the layout of our models.

The official code (``frank-xwang/RIDE-LongTailRecognition``) wraps its networks as ``backbone`` (and, when
trained on several GPUs, DataParallel adds ``module.``), keeps each expert's stages in lists
(``layer2s.{e}``, ``layer3s.{e}`` / ``layer3s.{e}``, ``layer4s.{e}``), stores its normalised classifier
weights transposed (``linears.{e}.weight`` is ``[D, C]``), and names the router of its EA models
``expert_help_pred_hidden_fcs.{i}`` / ``expert_help_pred_fc``. This module maps all of that onto our keys::

    [module.][backbone.]conv1 / bn1 / layer1 / layer2      ->  conv1 / bn1 / layer1 / layer2
    layer{k}s.{e}.REST                                      ->  experts.{e}.layer{k}.REST
    linears.{e}.weight [D, C] (normalised)                  ->  heads.{e}.weight [C, D]
    linears.{e}.weight / .bias (nn.Linear, use_norm=False)  ->  heads.{e}.weight / .bias
    expert_help_pred_hidden_fcs.{i}.REST                    ->  router.hidden.{i}.REST
    expert_help_pred_fc.REST                                ->  router.fc.REST

A state dict with the router (an EA checkpoint, stage 2) is marked ``router.trained = True``, so the model
routes by default once loaded. One without it (stage 1) gets a freshly initialised, untrained router, so
that ``load_state_dict(..., strict=True)`` works either way.
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import timm
import torch

from ride_models.models.ride_resnet import RIDEResNet, _list_keys, architecture_differences, key_differences
from ride_models.router import ExpertRouter

__all__ = [
    "convert_official_state_dict",
    "convert_to_model",
    "is_official_state_dict",
    "official_to_our_keys",
    "rename_official_keys",
]

_PREFIXES = ("module.", "backbone.")
_RULES = (
    (re.compile(r"^layer(\d+)s\.(\d+)\.(.+)$"), lambda m: f"experts.{m[2]}.layer{m[1]}.{m[3]}"),
    (re.compile(r"^linears\.(\d+)\.(weight|bias)$"), lambda m: f"heads.{m[1]}.{m[2]}"),
    (
        re.compile(r"^expert_help_pred_hidden_fcs\.(\d+)\.(weight|bias)$"),
        lambda m: f"router.hidden.{m[1]}.{m[2]}",
    ),
    (re.compile(r"^expert_help_pred_fc\.(weight|bias)$"), lambda m: f"router.fc.{m[1]}"),
    (re.compile(r"^((?:conv1|bn1|layer\d+)\..+)$"), lambda m: m[1]),
)


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def is_official_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is in the official RIDE layout (prefixed, or with per-expert lists)."""
    return any(
        k.startswith(_PREFIXES) or re.match(r"(layer\d+s|linears|expert_help_pred)", k) for k in state_dict
    )


def rename_official_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename official keys to ours (and transpose normalised classifier weights); no completeness check.

    Raises:
        ValueError: listing the keys that have no counterpart in our layout.
    """
    mapped: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        short = _strip_prefixes(key)
        for pattern, rename in _RULES:
            m = pattern.match(short)
            if m:
                mapped[rename(m)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        hint = ""
        if any("expert_help_pred_fcs" in k for k in unknown):
            hint = " (one router output layer per decision, share_expert_help_pred_fc=False, is unsupported)"
        raise ValueError(f"unknown keys in the official state dict{hint}: {_list_keys(unknown)}")
    # NormedLinear stores [D, C]; nn.Linear (use_norm=False, with a bias) already stores [C, D].
    for key in [k for k in mapped if re.match(r"heads\.\d+\.weight$", k)]:
        if key[: -len("weight")] + "bias" not in mapped:
            mapped[key] = mapped[key].t().contiguous()
    return mapped


def _fresh_router(model: RIDEResNet) -> Dict[str, torch.Tensor]:
    r = model.router
    router = ExpertRouter(model.num_experts, r.feature_dim, r.top_k, r.hidden_dim)
    return {f"router.{k}": v for k, v in router.state_dict().items()}


def official_to_our_keys(state_dict: Dict[str, torch.Tensor], model: RIDEResNet) -> Dict[str, torch.Tensor]:
    """Rename an official state dict to our keys with the router marked trained (an EA checkpoint) or, when
    it has none, ``model``'s untrained one; no check against ``model``. For timm's pretrained loading when
    it will adapt the first convolution or drop the classifiers (other ``in_chans`` / ``num_classes``);
    :func:`convert_to_model` checks the whole file."""
    mapped = rename_official_keys(state_dict)
    if any(k.startswith("router.") for k in mapped):
        mapped["router.trained"] = torch.ones((), dtype=torch.bool)
    else:
        mapped.update(_fresh_router(model))
    return mapped


def convert_to_model(state_dict: Dict[str, torch.Tensor], model: RIDEResNet) -> Dict[str, torch.Tensor]:
    """Convert an official state dict for a given model instance (used by timm's pretrained loading).

    Raises:
        ValueError: the state dict is for another family, expert count or class count than ``model``, or
            has keys that are unknown, missing or of the wrong shape; the message lists them.
    """
    mapped = official_to_our_keys(state_dict, model)
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    expected = model.state_dict()
    for label, given, wanted in architecture_differences(mapped, expected):
        hint = f"; create the model with num_classes={given}" if label == "classes" else ""
        raise ValueError(
            f"the official state dict does not fit {name}: {label}: {given} in the checkpoint, "
            f"{wanted} in the model{hint}"
        )
    problems = key_differences(mapped, expected)
    if problems:
        if any(line.startswith("  shape mismatches") and "router.fc" in line for line in problems):
            problems.append(
                f"  the router sees the top {model.router.top_k} logits; pass router_top_k to match"
            )
        raise ValueError(
            "\n".join([f"the official state dict does not fit {name} (keys in our names):", *problems])
        )
    return {k: mapped[k] for k in expected}


def convert_official_state_dict(
    state_dict: Dict[str, torch.Tensor], model_name: str, num_classes: Optional[int] = None, **model_kwargs
) -> Dict[str, torch.Tensor]:
    """Map an official RIDE or EA state dict to the layout of ``timm.create_model(model_name, ...)``.

    Args:
        state_dict: The official state dict (``checkpoint["state_dict"]``), keys with or without the
            ``module.`` / ``backbone.`` prefixes.
        model_name: A registered ``ride_*`` model name.
        num_classes: The class count the state dict must have (by default, whatever its classifiers say).
        model_kwargs: Further model arguments to check against (for example ``router_top_k``).

    Returns:
        A complete state dict for ``timm.create_model(model_name, num_classes=C, use_norm=...)``, where
        C and use_norm are those of the checkpoint; it loads with ``strict=True``.
    """
    mapped = rename_official_keys(state_dict)
    head = mapped.get("heads.0.weight")
    if head is None:
        raise ValueError("the official state dict has no classifier (linears.0.weight); is it a RIDE model?")
    ckpt_classes = int(head.shape[0])
    if num_classes is not None and num_classes != ckpt_classes:
        raise ValueError(
            f"the official state dict has {ckpt_classes} classes, expected num_classes={num_classes}"
        )
    use_norm = "heads.0.bias" not in mapped
    with torch.device("meta"):
        template = timm.create_model(model_name, num_classes=ckpt_classes, use_norm=use_norm, **model_kwargs)
    # The template lives on the meta device; a missing router is initialised for real by convert_to_model.
    return convert_to_model(state_dict, template)
