"""Saving and loading weights and training state, atomically.

* Weights: ``.safetensors`` files of our state dict (``last.safetensors``, ``best.safetensors``), the
  format timm and the Hugging Face Hub load.
* Training state: one ``.pt`` file (``last_state.pt``) with everything ``--resume`` needs (model,
  optimizer, EMA, grad scaler, epoch, best metric, arguments), read with ``torch.load(weights_only=True)``.

Every file is written to a temporary file in the same folder and moved into place with ``os.replace``, so a
crash leaves the previous version intact, never a half-written one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "atomic_write",
    "load_training_state",
    "load_weights",
    "read_state_dict",
    "save_training_state",
    "save_weights",
]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one step (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights(
    path: str | Path, state_dict: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None
) -> None:
    """Write a state dict as ``.safetensors`` (contiguous CPU copies; metadata values are strings)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(
        path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    )


def save_training_state(path: str | Path, state: Dict[str, Any]) -> None:
    """Write the training state (tensors, numbers, strings, lists and dicts only) with ``torch.save``."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> Dict[str, Any]:
    """Read a training state written by :func:`save_training_state` (no code execution)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last_state.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"no training state at {path}: --resume takes a run folder or its last_state.pt"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """The state dict in a weights file: ``.safetensors``, or a ``.pth``/``.pt``/``.bin`` file holding a state
    dict directly or under ``state_dict`` / ``model`` (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled objects other than tensors and containers are refused
        raise ValueError(
            f"{path} cannot be read without executing code from it ({type(error).__name__}); "
            "save the state dict alone (torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from error
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                return checkpoint[key]
        return checkpoint
    raise ValueError(f"{path} does not hold a state dict (found {type(checkpoint).__name__})")


def _load_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
    from ride_models.convert import convert_to_model, is_official_state_dict

    if is_official_state_dict(state_dict):
        state_dict = convert_to_model(state_dict, model)
    model.load_state_dict(state_dict, strict=strict)


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load a weights file into a RIDE model; official RIDE state dicts are converted on the way."""
    _load_state_dict(model, read_state_dict(path), strict=strict)


def load_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | Dict[str, torch.Tensor] | None = None,
    num_classes: Optional[int] = None,
) -> nn.Module:
    """Create a RIDE model with timm, sized for its checkpoint, and load the weights.

    Args:
        name: a ``ride_*`` name, ``hf-hub:...`` or ``local-dir:...``.
        pretrained: load the pretrained weights (timm) first.
        checkpoint: a weights file, or a state dict (ours or official RIDE), loaded after the pretrained
            weights.
        num_classes: the class count; None takes the checkpoint's (or the pretrained config's).

    Raises:
        FileNotFoundError: no checkpoint at that path.
        ValueError: ``num_classes`` differs from the checkpoint's; the checkpoint does not fit the model;
            the model is not a RIDE model.
    """
    import timm

    from ride_models.convert import is_official_state_dict, rename_official_keys
    from ride_models.models.ride_resnet import summarize_state_dict

    state_dict, kwargs = None, {}
    if isinstance(checkpoint, dict):
        state_dict, checkpoint = checkpoint, "(state dict)"
    elif checkpoint:
        state_dict = read_state_dict(checkpoint)
    if state_dict is not None:
        ours = rename_official_keys(state_dict) if is_official_state_dict(state_dict) else state_dict
        ckpt_classes = summarize_state_dict(ours)["num_classes"]
        if ckpt_classes is None:
            raise ValueError(f"checkpoint {checkpoint} has no classifier (heads.0.weight): not a RIDE model")
        if num_classes is not None and num_classes != ckpt_classes:
            raise ValueError(
                f"num_classes is {num_classes}, but the checkpoint {checkpoint} has {ckpt_classes} classes; "
                "leave the class count out to use the checkpoint's"
            )
        num_classes = ckpt_classes
        if "heads.0.bias" in ours:  # plain nn.Linear heads (use_norm=False) carry a bias
            kwargs["use_norm"] = False
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except RuntimeError as error:  # timm: unknown model, no pretrained weights for it
        raise ValueError(f"model {name}: {error}") from error
    if not hasattr(model, "num_experts"):
        raise ValueError(f"{name} is not a RIDE model; choose one of timm.list_models('ride_*')")
    if state_dict is not None:
        try:
            _load_state_dict(model, state_dict)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"checkpoint {checkpoint} does not fit model {name}:\n{error}") from error
    return model
