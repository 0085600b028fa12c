"""The versions of torch and timm the package supports, and small shims over their differences."""

import re
import warnings
from typing import Tuple

import torch

# The bounds of pyproject.toml's dependencies (tests/test_versions.py checks that the two agree). pip enforces
# them on install; this check covers the ways in that bypass pip: torch.hub.load, PYTHONPATH, a copied tree.
MIN_VERSIONS = {"torch": (2, 6), "torchvision": (0, 21), "timm": (1, 0, 26)}
TIMM_BELOW = (1, 1)  # the first timm version not tested


def _release(version: str) -> Tuple[int, ...]:
    """``"2.6.0+cu124"`` -> ``(2, 6, 0)``: the numeric release, without local or pre-release parts."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def _spelled(version: Tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _requirement(name: str) -> str:
    """The pip requirement of ``name`` as pyproject.toml spells it, e.g. ``timm>=1.0.26,<1.1``."""
    spec = f"{name}>={_spelled(MIN_VERSIONS[name])}"
    return f"{spec},<{_spelled(TIMM_BELOW)}" if name == "timm" else spec


def check_versions() -> None:
    """Refuse torch, torchvision or timm older than the package supports, with the command that fixes it;
    warn for a timm newer than the tested range."""
    import timm
    import torchvision

    installed = {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}
    old = {name: v for name, v in installed.items() if _release(v) < MIN_VERSIONS[name]}
    if old:
        found = ", ".join(f"{name} {v}" for name, v in old.items())
        need = " ".join(f"'{_requirement(name)}'" for name in old)
        raise ImportError(
            f"ride-models needs newer packages than this Python has ({found}): pip install -U {need}"
        )
    if _release(installed["timm"]) >= TIMM_BELOW:
        warnings.warn(
            f"ride-models is tested with timm below {_spelled(TIMM_BELOW)}, found timm {installed['timm']}; "
            f"if something fails, pip install 'timm<{_spelled(TIMM_BELOW)}'",
            stacklevel=2,
        )


def autocast_known(device_type: str) -> bool:
    """Whether autocast knows ``device_type`` (it does not know ``"meta"``, for one).

    Compiled code skips the check: the compiler of torch < 2.7 cannot trace it (a graph break in every
    forward), and what it compiles runs on devices autocast knows.
    """
    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)


def is_exporting() -> bool:
    """Whether ``torch.export`` is tracing this call (``torch.compiler.is_exporting``, torch >= 2.7; torch
    2.6 has no public way to tell and gets False)."""
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check()) if check is not None else False
