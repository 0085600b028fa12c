"""The experts side by side on the CPU's cores: each expert's forward and backward in its own thread.

On a CPU the experts' layers are small (a CIFAR ResNet-32 expert is 24 to 48 channels on 16 x 16 and
8 x 8 maps), and one operator spread over the cores gains little: on a 2-core development machine
``ride_resnet32_4e``'s training step ran about 1.4x faster on 2 threads than on 1. The experts are independent
between the shared maps and the classifiers, so E experts can instead run on the cores side by side, one
thread each. :func:`parallel_expert_maps` does that for a training forward: the experts run in worker
threads (each building its own autograd graph from a detached copy of the shared maps), and in the
backward pass each worker computes its experts' gradients from its own graph. The shared maps' gradient
is the sum of the experts' in a fixed order, so a step is deterministic. Each expert computes what it
computes in the loop, with the same operators; only the kernels' thread count differs, which can change
the summation order inside a kernel (rounding).

The intra-op thread count (``torch.set_num_threads``) is split between the workers while they run and
restored after. Worker threads live for one pass (no thread pool outlives a step, so forked data-loader
workers find no stray threads).
"""

from __future__ import annotations

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


def _groups(num_experts: int, workers: int) -> List[List[int]]:
    """Expert indices per worker: contiguous, as even as can be (4 experts on 2 workers: [0, 1], [2, 3])."""
    size, extra = divmod(num_experts, workers)
    groups, start = [], 0
    for w in range(workers):
        end = start + size + (w < extra)
        groups.append(list(range(start, end)))
        start = end
    return groups


class _ParallelExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, shared: torch.Tensor, experts: Sequence[nn.Module], *params: torch.Tensor
    ) -> torch.Tensor:
        # ``params``: the experts' parameters, inputs of this node so that backward hands autograd their
        # gradients (accumulated in the caller's thread, hooks and DDP included); the workers read them
        # through the modules.
        threads = torch.get_num_threads()
        workers = min(threads, len(experts))
        threads_each = max(1, threads // workers)
        groups = _groups(len(experts), workers)
        inputs = [shared.detach().requires_grad_(shared.requires_grad) for _ in groups]

        def expert_pass(w: int) -> Callable[[], List[torch.Tensor]]:
            return lambda: [experts[e](inputs[w]) for e in groups[w]]

        with torch.enable_grad():  # autograd does not record inside a Function's forward; the workers do
            outputs = _run_threads([expert_pass(w) for w in range(workers)], threads_each)
        ctx.groups, ctx.inputs, ctx.outputs, ctx.threads_each = groups, inputs, outputs, threads_each
        ctx.params = [[p for e in group for p in experts[e].parameters()] for group in groups]
        return torch.cat([o.detach() for group in outputs for o in group], dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if ctx.outputs is None:
            raise RuntimeError(
                "a second backward through the experts' side-by-side pass, whose first backward freed their "
                "graphs; for retain_graph=True, call model.set_parallel_experts(False) before the forward"
            )
        width = ctx.outputs[0][0].shape[1]
        grads = grad.split(width, dim=1)

        def expert_backward(w: int) -> Callable[[], Tuple[Optional[torch.Tensor], ...]]:
            def run() -> Tuple[Optional[torch.Tensor], ...]:
                outputs = ctx.outputs[w]
                wanted = [ctx.inputs[w]] if ctx.inputs[w].requires_grad else []
                wanted += [p for p in ctx.params[w] if p.requires_grad]
                if not wanted:
                    return ()
                return torch.autograd.grad(
                    outputs, wanted, [grads[e] for e in ctx.groups[w]], allow_unused=True
                )

            return run

        results = _run_threads([expert_backward(w) for w in range(len(ctx.groups))], ctx.threads_each)
        grad_shared = None
        param_grads: List[Optional[torch.Tensor]] = []
        for w, result in enumerate(results):
            result = list(result)
            if ctx.inputs[w].requires_grad:
                g = result.pop(0)
                if g is not None:
                    grad_shared = g if grad_shared is None else grad_shared + g
            for p in ctx.params[w]:
                param_grads.append(result.pop(0) if p.requires_grad else None)
        ctx.outputs = ctx.inputs = None  # the workers' graphs: freed with this step
        return (grad_shared, None, *param_grads)


def parallel_expert_maps(shared: torch.Tensor, experts: Sequence[nn.Module]) -> torch.Tensor:
    """``torch.cat([expert(shared) for expert in experts], dim=1)``, the experts run side by side in worker
    threads (forward and backward); see the module's docstring."""
    params = [p for expert in experts for p in expert.parameters()]
    return _ParallelExperts.apply(shared, list(experts), *params)
