"""Saving and loading weights and training state, atomically.

* Weights: ``.safetensors`` files of our state dict (``last.safetensors``, ``best.safetensors``), the
  format timm and the Hugging Face Hub load.
* Training state: one ``.pt`` file (``last_state.pt``) with everything ``--resume`` needs (model,
  optimizer, EMA, grad scaler, epoch, best metric, arguments), read with ``torch.load(weights_only=True)``.

Every file is written to a temporary file in the same folder and moved into place with ``os.replace``, so a
crash leaves the previous version intact, never a half-written one.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "UnsafeCheckpointError",
    "atomic_write",
    "load_training_state",
    "load_weights",
    "read_state_dict",
    "safe_torch_load",
    "save_training_state",
    "save_weights",
    "write_csv",
]


def _umask() -> int:
    """The process's umask. Reading it sets it, so it is set back at once (to a stricter mask meanwhile)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one step (same filesystem).

    The file gets the mode of any new file (``0o666`` less the umask), not the ``0o600`` of a temporary file
    (mkstemp's, or safetensors' own), which ``os.replace`` would keep.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header row, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))


def save_weights(
    path: str | Path, state_dict: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None
) -> None:
    """Write a state dict as ``.safetensors`` (contiguous CPU copies; metadata values are strings)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # No metadata rather than an empty one: safetensors writes an unreadable header for no tensors and {}.
    strings = {k: str(v) for k, v in metadata.items()} if metadata else None
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=strings))


def save_training_state(path: str | Path, state: Dict[str, Any]) -> None:
    """Write the training state (tensors, numbers, strings, lists and dicts only) with ``torch.save``."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: str | Path) -> Dict[str, Any]:
    """Read a training state written by :func:`save_training_state` (no code execution).

    Raises:
        FileNotFoundError: no such file, or a folder without ``last_state.pt``.
        ValueError: a weights file (``.safetensors``) instead; a truncated or corrupted file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last_state.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"no training state at {path}: --resume takes a run folder or its last_state.pt"
        )
    resume_takes = "--resume takes the run folder (or its last_state.pt)"
    if _file_format(path) == "safetensors":
        raise ValueError(
            f"{path} holds weights only: {resume_takes}, which also has the optimizer, epoch and arguments; "
            "to start a new run from these weights, use --initial-checkpoint"
        )
    if path.name != "last_state.pt" and path.stat().st_size and _format_by_content(path) is None:
        raise ValueError(f"{path} is not a training state (not a PyTorch file): {resume_takes}")
    state = safe_torch_load(
        path,
        what="a training state",
        fix="the run's last saved state is lost: start the run again, or a new one from its last.safetensors "
        "with --initial-checkpoint",
    )
    if not isinstance(state, dict) or "args" not in state:
        raise ValueError(f"{path} is not a training state written by train.py (no arguments): {resume_takes}")
    return state


# ------------------------------------------------------------------------------- safe unpickling
class UnsafeCheckpointError(ValueError):
    """A checkpoint that would execute code (call a function) while being loaded."""


class _StandIn:
    """What an object of a research-code class becomes: the data it was pickled with, never its code.

    Unpickling may create it (``cls.__new__``) and fill its state (``__setstate__``), both defined here. A
    pickle that calls the class (or a function of that name) with arguments is asking to run code: refused.
    """

    qualified_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsafeCheckpointError(
            f"loading this checkpoint would call {self.qualified_name}(...), i.e. run code named by the file"
        )

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualified_name} (not imported)>"


def _pure_path(cls: type) -> Callable[..., str]:
    def build(*parts: Any) -> str:  # pure paths never touch the filesystem
        return str(cls(*parts))

    return build


def _numpy_scalar() -> Callable:
    core = getattr(np, "_core", None) or np.core
    return core.multiarray.scalar


# Constructors the research code's objects legitimately pickle through REDUCE, mapped to side-effect-free
# equivalents: pathlib paths (ConfigParser keeps its save and log folders as paths) and numpy scalars.
_SAFE_CALLS: Dict[str, Callable[[], Callable]] = {
    **{
        f"pathlib.{module}{cls}": (lambda c=pure: _pure_path(c))
        for module in ("", "_local.")
        for cls, pure in (
            ("PosixPath", PurePosixPath),
            ("PurePosixPath", PurePosixPath),
            ("WindowsPath", PureWindowsPath),
            ("PureWindowsPath", PureWindowsPath),
            ("Path", PurePosixPath),
        )
    },
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.dtype": lambda: np.dtype,
}


def _resolve_global(name: str) -> Any:
    if name in _SAFE_CALLS:
        return _SAFE_CALLS[name]()
    if (
        name.startswith("numpy.dtypes.")
        and hasattr(np, "dtypes")
        and hasattr(np.dtypes, name.rsplit(".", 1)[1])
    ):
        return getattr(np.dtypes, name.rsplit(".", 1)[1])
    module, _, cls = name.rpartition(".")
    return type(
        cls, (_StandIn,), {"qualified_name": name, "__module__": f"ride_models.checkpoint.standin.{module}"}
    )


def _unreadable(
    path: Path, error: Exception, what: str = "a checkpoint", fix: str = "download it again"
) -> ValueError:
    """The error for a truncated or corrupted file. torch's advice to reload with ``weights_only=False`` is
    taken out of its message: meant for files that need code execution, it is wrong for a damaged one."""
    reason = str(error).split("WeightsUnpickler error:")[-1].split("Check the documentation of torch.load")[0]
    reason = re.sub(
        r"Weights only load failed\.|In PyTorch 2\.6, we changed .*?trusted source\.", "", reason, flags=re.S
    )
    return ValueError(
        f"{path} cannot be read as {what} (truncated or corrupted? {path.stat().st_size} bytes): "
        f"{' '.join(reason.split()) or type(error).__name__}; {fix}"
    )


def safe_torch_load(path: str | Path, what: str = "a checkpoint", fix: str = "download it again") -> Any:
    """``torch.load`` of a file written by ``torch.save``, without executing code from it.

    Tensors and containers load as with ``weights_only=True``; objects of classes that are not installed
    (the official RIDE checkpoints' ``config``) become inert stand-ins holding their pickled data in
    ``.state``; pathlib paths and numpy scalars are rebuilt by side-effect-free constructors.

    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file would call a function while loading.
        ValueError: the file is truncated, corrupted or not a PyTorch checkpoint (the message says it cannot
            be read as ``what``, then ``fix``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # An open file, not its name: recent torch hands a name ending in .safetensors to safetensors.
        if not zipfile.is_zipfile(path):  # torch's legacy format: plain weights_only loading only
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        allowed = [(_resolve_global(n), n) for n in names]
        if "numpy.dtype" in names and hasattr(np, "dtypes"):  # a dtype is rebuilt as an instance of these
            allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
        with torch.serialization.safe_globals(allowed), open(path, "rb") as f:
            checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    except (AttributeError, ImportError, NameError):
        raise  # this code against the installed torch, not the file
    except Exception as error:
        # torch re-raises everything as UnpicklingError; our stand-ins' refusal and torch's own blocked
        # modules (os, posix, subprocess, ...) both mean the file asks to run code.
        unsafe = re.search(
            r"(loading this checkpoint would call [^;\n]*|unsupported GLOBAL [^\n]*)", str(error)
        )
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} would execute code when loaded ({unsafe.group(1).rstrip('.')}); refused: only "
                "tensors, containers and objects rebuilt from plain data are read"
            ) from None
        raise _unreadable(path, error, what, fix) from error
    return checkpoint


def _format_by_content(path: Path) -> Optional[str]:
    """ "torch" or "safetensors" where a file's first bytes tell, else None (damaged, or another kind)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save: a zip archive, or a legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return "safetensors"
    return None


def _file_format(path: Path) -> str:
    """A weights file's format, safetensors or torch, by its content where it tells (a file may be
    misnamed: a ``.pth`` written by :func:`save_weights`), else by its suffix (a damaged file then gets
    the message of the format its name says)."""
    return _format_by_content(path) or ("safetensors" if path.suffix == ".safetensors" else "torch")


def read_state_dict(path: str | Path) -> Dict[str, torch.Tensor]:
    """The state dict in a weights file: ``.safetensors``, or a ``.pth``/``.pt``/``.bin`` file holding a state
    dict directly or under ``state_dict`` / ``model`` (an official RIDE training checkpoint included), read
    without executing code (:func:`safe_torch_load`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if _file_format(path) == "safetensors":
        try:
            return load_file(path)
        except SafetensorError as error:
            raise _unreadable(path, error) from error
    checkpoint = safe_torch_load(path)
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


def hub_not_cached(name: str) -> FileNotFoundError:
    """The error for an ``hf-hub:`` model that is neither in the local Hugging Face cache nor reachable
    (huggingface_hub's own message names no model and no way out)."""
    repo = name.removeprefix("hf-hub:").split("@")[0]
    return FileNotFoundError(
        f"model {name}: not in this machine's Hugging Face cache, and the Hub cannot be reached. Download "
        f"it where there is a network (huggingface-cli download {repo}) and copy the cache, or copy the "
        "model's folder (config.json, model.safetensors) here and name it local-dir:PATH"
    )


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
    from huggingface_hub.utils import LocalEntryNotFoundError

    from ride_models.convert import is_official_state_dict, rename_official_keys
    from ride_models.models.ride_resnet import require_ride_model, summarize_state_dict

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
    except LocalEntryNotFoundError as error:  # hf-hub: offline, and not in the local cache
        raise hub_not_cached(name) from error
    require_ride_model(model, name)
    if state_dict is not None:
        try:
            _load_state_dict(model, state_dict)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"checkpoint {checkpoint} does not fit model {name}:\n{error}") from error
    return model
