"""Small shims over differences between the torch versions the package supports (torch >= 2.6)."""

import torch


def autocast_known(device_type: str) -> bool:
    """Whether autocast knows ``device_type`` (it does not know ``"meta"``, for one).

    Compiled code skips the check: the compiler of torch < 2.7 cannot trace it (a graph break in every
    forward), and what it compiles runs on devices autocast knows.
    """
    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
