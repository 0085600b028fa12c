"""What the work after a convolution costs: bias, ReLU, residual add, separately or fused into cuDNN's kernel.

Batch norm folded into a convolution (inference) leaves a per-channel bias to add, then usually a ReLU and,
at the end of a residual block, the shortcut. Run as separate PyTorch operators these are passes over the
whole map; cuDNN can apply them in the convolution's own epilogue (``torch.cudnn_convolution_relu``,
``torch.cudnn_convolution_add_relu``). This script times each option on the convolution shapes of a
ResNet-50 at batch 256, and checks the fused results against a float32 reference.

    python benchmarks/conv_epilogue.py                      # CUDA, bf16 and fp32, channels-last
    python benchmarks/conv_epilogue.py --batch-size 16 --device cpu --precision fp32

On the CPU the cuDNN rows are absent (those operators need CUDA).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

# (input channels, output channels, map size, kernel): 1x1 and 3x3 convolutions of ResNet-50's stages.
SHAPES: List[Tuple[int, int, int, int]] = [
    (64, 256, 56, 1),
    (64, 64, 56, 3),
    (128, 512, 28, 1),
    (1024, 256, 14, 1),
    (512, 2048, 7, 1),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 5) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters * 1e3


def measure(shape, dtype: torch.dtype, batch: int, device: torch.device, iters: int) -> Dict[str, float]:
    c_in, c_out, size, k = shape
    cl = torch.channels_last
    x = torch.randn(batch, c_in, size, size, device=device, dtype=dtype).to(memory_format=cl)
    w = (torch.randn(c_out, c_in, k, k, device=device, dtype=dtype) * 0.05).to(memory_format=cl)
    b = torch.randn(c_out, device=device, dtype=dtype)
    z = torch.randn(batch, c_out, size, size, device=device, dtype=dtype).to(memory_format=cl)
    pad = k // 2
    y = F.conv2d(x, w, None, 1, pad)
    zero, one = torch.zeros(c_out, device=device, dtype=dtype), torch.ones(c_out, device=device, dtype=dtype)
    ops: Dict[str, Callable[[], object]] = {
        "conv": lambda: F.conv2d(x, w, None, 1, pad),
        "conv with bias": lambda: F.conv2d(x, w, b, 1, pad),
        "bias add_": lambda: y.add_(b.view(1, -1, 1, 1)),
        # Eval-mode batch norm with mean 0, variance 1 and eps 0 adds its bias exactly (its own kernel).
        "bias as batch_norm": lambda: torch.batch_norm(y, None, b, zero, one, False, 0.0, 0.0, True),
        "relu_": lambda: y.relu_(),
        "residual add_": lambda: y.add_(z),
    }
    if device.type == "cuda":
        geometry = ((1, 1), (pad, pad), (1, 1), 1)  # stride, padding, dilation, groups
        ops["cudnn conv+bias+relu"] = lambda: torch.cudnn_convolution_relu(x, w, b, *geometry)
        ops["cudnn conv+bias+add+relu"] = lambda: torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, *geometry)
    row = {name: _time_ms(fn, device, iters) for name, fn in ops.items()}
    if device.type == "cuda":
        conv = F.conv2d(x.float(), w.float(), None, 1, pad)
        ref = torch.relu(conv + b.float().view(1, -1, 1, 1))
        fused = torch.cudnn_convolution_relu(x, w, b, *geometry)
        row["conv+bias+relu error"] = (fused.float() - ref).abs().max().item()
        ref = torch.relu(conv + z.float() + b.float().view(1, -1, 1, 1))
        fused = torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, *geometry)
        row["conv+bias+add+relu error"] = (fused.float() - ref).abs().max().item()
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here; use --device cpu")
        torch.backends.cudnn.benchmark = True
    print(f"ms per call, batch {args.batch_size}, channels-last, {device}")
    for name in args.precision:
        for shape in SHAPES:
            row = measure(shape, DTYPES[name], args.batch_size, device, args.iters)
            cells = ", ".join(f"{k} {v:.3g}" for k, v in row.items())
            print(f"{name} {shape}: {cells}", flush=True)


if __name__ == "__main__":
    main()
