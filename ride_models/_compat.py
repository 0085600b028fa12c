"""Small shims over differences between the torch versions the package supports (torch >= 2.1)."""

import torch


def is_compiling() -> bool:
    """Whether torch.compile is tracing this code (``torch.compiler.is_compiling``, torch >= 2.3)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check and check())
