"""The experts side by side on the CPU's cores: each expert's forward and backward in its own thread.

On a CPU the experts' layers are small (a CIFAR ResNet-32 expert is 24 to 48 channels on 16 x 16 and
8 x 8 maps), and one operator spread over the cores gains little: on a 2-core development machine
``ride_resnet32_4e``'s training step ran about 1.4x faster on 2 threads than on 1. The experts are independent
between the shared maps and the classifiers, so they can instead run on the cores side by side.
:func:`parallel_expert_maps` does that for a training forward: each expert runs in its own worker thread
(building its own autograd graph from a detached copy of the shared maps), and in the backward pass each
worker computes its expert's gradients from its own graph. The shared maps' gradient is the sum of the
experts' in a fixed order, so a step is deterministic. Each expert computes what it computes in the loop,
with the same operators; only the kernels' thread count differs, which can change the summation order
inside a kernel (rounding).

The intra-op thread count (``torch.set_num_threads``) is split between the workers while they run (at
least 1 each) and restored after. There is one worker per expert also where the experts outnumber the
threads: on 2 cores, with 3, 4 and 6 experts, one thread per expert trained ``ride_resnet32_{E}e`` 1.02x,
1.10x and 1.05x faster than the experts in turn, and workers sharing them out (2 + 1, 2 + 2, 3 + 3) 0.86x,
1.02x and 1.03x: 3 experts in 2 workers leave one core idle for a third of the pass, and (most likely) a
worker that waits, for the interpreter's lock or for memory, leaves its core to another. Worker threads
live for one pass (no thread pool outlives a step, so forked data-loader workers find no stray threads).

Where the C library is glibc, importing ``ride_models`` sets three of its allocator's settings for the
process (``mallopt``, what ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=268435456`` do at start-up): one arena for all threads, blocks up to 32 MiB from the
heap, and up to 256 MiB of freed memory at the heap's top kept for reuse. With glibc's defaults each
worker allocates its expert's maps from an arena of its own, which gives freed memory back to the system
at once, and the main arena gives back what it frees at its top: the next step page-faults it all in
again. On a 2-core AVX2 machine ``ride_resnet32_4e``'s side-by-side training step took 77,000 page faults
with glibc's defaults and ran 0.99x the speed of the experts in turn; with one arena set by the first
side-by-side pass (this module's earlier way), 39,000 and 44,000 faults and 1.11x and 1.07x in two
processes, as arenas made before, such as the one of torch's second intra-op thread, are still shared with
the workers; with all three set at import, 44 faults and 1.17x to 1.18x. The settings hold for the whole
process: the official implementation measured beside ours in ``benchmarks/throughput.py`` runs under them
too (it took 0 to 7,000 faults a step either way). They are left as they are where the user has chosen
any of them (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` or a ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``) or set
``RIDE_MODELS_TUNE_MALLOC=0``. Where torch ran a parallel operator before ``ride_models`` was imported,
its intra-op threads keep arenas of their own; the variables above set before Python starts avoid that.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ride_models.models.fused_experts import _graphing

__all__ = ["parallel_expert_maps", "parallelizing_pays"]


def parallelizing_pays(x: torch.Tensor, num_experts: int) -> bool:
    """Whether the experts' training pass on ``x`` runs side by side (see the module's docstring): on the
    CPU, with at least 2 intra-op threads and 2 experts, when autograd records, outside compiling, export
    and tracing (a graph runs the modules' operators in turn)."""
    return (
        x.device.type == "cpu"
        and num_experts >= 2
        and torch.get_num_threads() >= 2
        and torch.is_grad_enabled()
        and not _graphing()
    )


# glibc's mallopt parameters (malloc.h) and the values set at import (see the module's docstring)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MALLOC_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20))
_USER_MALLOC_VARIABLES = (
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
_malloc_tuned = False


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where there is no glibc or it refuses."""
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def _tune_malloc() -> None:
    """Once per process, at import: glibc's allocator set for the workers' allocations (one arena, freed
    memory kept; see the module's docstring), where the C library is glibc and the user has chosen none of
    its settings nor ``RIDE_MODELS_TUNE_MALLOC=0``."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if os.environ.get("RIDE_MODELS_TUNE_MALLOC", "1") == "0":
        return
    if any(name in os.environ for name in _USER_MALLOC_VARIABLES):
        return
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        for param, value in MALLOC_SETTINGS:
            _mallopt(param, value)


def _run_threads(work: Sequence[Callable[[], Any]], threads_each: int) -> List[Any]:
    """``[w() for w in work]``, each in its own thread with ``threads_each`` intra-op threads; the calling
    thread's count is restored after. An exception in a worker is raised here, after all have ended."""
    results: List[Any] = [None] * len(work)
    errors: List[Optional[BaseException]] = [None] * len(work)
    saved = torch.get_num_threads()
    grad_mode = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def run(i: int) -> None:
        try:
            torch.set_num_threads(threads_each)
            with torch.set_grad_enabled(grad_mode), torch.autocast("cpu", autocast_dtype, enabled=autocast):
                results[i] = work[i]()
        except BaseException as error:  # re-raised in the calling thread
            errors[i] = error

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(work))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(saved)
    for error in errors:
        if error is not None:
            raise error
    return results


class _ParallelExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, shared: torch.Tensor, experts: Sequence[nn.Module], *params: torch.Tensor
    ) -> torch.Tensor:
        # ``params``: the experts' parameters, inputs of this node so that backward hands autograd their
        # gradients (accumulated in the caller's thread, hooks and DDP included); the workers read them
        # through the modules. One worker per expert, also where the experts outnumber the threads (see
        # the module's docstring).
        threads_each = max(1, torch.get_num_threads() // len(experts))
        inputs = [shared.detach().requires_grad_(shared.requires_grad) for _ in experts]

        def expert_pass(e: int) -> Callable[[], torch.Tensor]:
            return lambda: experts[e](inputs[e])

        with torch.enable_grad():  # autograd does not record inside a Function's forward; the workers do
            outputs = _run_threads([expert_pass(e) for e in range(len(experts))], threads_each)
        ctx.inputs, ctx.outputs, ctx.threads_each = inputs, outputs, threads_each
        ctx.params = [list(expert.parameters()) for expert in experts]
        return torch.cat([o.detach() for o in outputs], dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if ctx.outputs is None:
            raise RuntimeError(
                "a second backward through the experts' side-by-side pass, whose first backward freed their "
                "graphs; for retain_graph=True, call model.set_parallel_experts(False) before the forward"
            )
        grads = grad.split(ctx.outputs[0].shape[1], dim=1)

        def expert_backward(e: int) -> Callable[[], Tuple[Optional[torch.Tensor], ...]]:
            def run() -> Tuple[Optional[torch.Tensor], ...]:
                wanted = [ctx.inputs[e]] if ctx.inputs[e].requires_grad else []
                wanted += [p for p in ctx.params[e] if p.requires_grad]
                if not wanted:
                    return ()
                return torch.autograd.grad(ctx.outputs[e], wanted, grads[e], allow_unused=True)

            return run

        results = _run_threads([expert_backward(e) for e in range(len(ctx.outputs))], ctx.threads_each)
        grad_shared = None
        param_grads: List[Optional[torch.Tensor]] = []
        for e, result in enumerate(results):
            result = list(result)
            if ctx.inputs[e].requires_grad:
                g = result.pop(0)
                if g is not None:
                    grad_shared = g if grad_shared is None else grad_shared + g
            for p in ctx.params[e]:
                param_grads.append(result.pop(0) if p.requires_grad else None)
        ctx.outputs = ctx.inputs = None  # the workers' graphs: freed with this step
        return (grad_shared, None, *param_grads)


def parallel_expert_maps(shared: torch.Tensor, experts: Sequence[nn.Module]) -> torch.Tensor:
    """``torch.cat([expert(shared) for expert in experts], dim=1)``, each expert run in its own worker thread
    (forward and backward); see the module's docstring."""
    params = [p for expert in experts for p in expert.parameters()]
    return _ParallelExperts.apply(shared, list(experts), *params)


_tune_malloc()
