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

Where the C library is glibc, the first side-by-side pass of a process limits its allocator to one arena
(``mallopt(M_ARENA_MAX, 1)``, what ``MALLOC_ARENA_MAX=1`` does at start-up), unless ``MALLOC_ARENA_MAX``
or a ``glibc.malloc.arena_max`` tunable is set. Otherwise each worker allocates its expert's maps from
an arena of its own, and glibc gives such an arena's freed memory back to the system at once: on a 2-core
machine ``ride_resnet32_4e``'s step took 68,000 to 98,000 page faults (230 to 350 ms of the kernel's
time) to fetch it again, and the experts side by side ran 0.94x to 1.06x the speed of the experts in turn;
with one arena set at start-up, about 10,000 faults and 1.07x to 1.16x, and set by the first pass, 19,000
to 37,000 faults and 1.07x to 1.14x. The main thread allocates from glibc's main arena either way, so
code that runs there (the experts in turn, the official implementation) is not affected.
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


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
_arenas_limited = False


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where there is no glibc or it refuses."""
    try:
        return bool(ctypes.CDLL(None).mallopt(param, value))
    except (OSError, AttributeError):
        return False


def _limit_malloc_arenas() -> None:
    """Once per process, before the first workers start: one malloc arena for all threads, where the C
    library is glibc and the user has not chosen a count (see the module's docstring)."""
    global _arenas_limited
    if _arenas_limited:
        return
    _arenas_limited = True
    if "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        _mallopt(M_ARENA_MAX, 1)


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

        _limit_malloc_arenas()
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
