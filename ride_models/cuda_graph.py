"""A whole training step (forward, loss, backward, optimizer) recorded once as a CUDA graph and replayed.

A CIFAR RIDE model is a few hundred small kernels per step. Launched one by one from Python, the GPU
waits on the CPU between them; replayed from a CUDA graph, they run back to back. The graph fixes
everything the CPU decided while it was recorded: the tensor shapes, the learning rate (a Python float in
``torch.optim.SGD``), and the loss's Python-level branches (deferred re-weighting on or off). So a graph
is recorded per combination of these, which in the RIDE recipes change a handful of times in a run
(warm-up epochs, the decay milestones, the DRW epoch, the last smaller batch of an epoch), and replayed
for every other step.

What the step needs: no host synchronisation (``.item()``, ``bool(tensor)``, data-dependent shapes)
between forward and optimizer step, and no randomness inside the model (dropout or stochastic depth
would replay the same masks). The RIDE models and losses meet this in stage 1 (``make_step("experts")``).
"""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["GraphedTrainStep"]

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GraphedTrainStep:
    """``step(x, y)`` runs forward, loss, backward and ``optimizer.step()`` as one CUDA graph replay.

    Args:
        step: ``step(x, y) -> loss``, the forward pass and the loss (``ride_models.engine.make_step``).
        optimizer: a ``torch.optim`` optimizer without step counters in its state (SGD; Adam-style
            optimizers need ``capturable=True``).
        model: the model being trained, checked for modules that draw random numbers in training.
        amp_dtype: autocast dtype (``torch.bfloat16``) or None. float16 needs a gradient scaler, whose
            inf check synchronises: not supported here.
        warmup_steps: eager steps (real training steps) on a side stream before the first recording of a
            new input shape: cuDNN picks its algorithms and the optimizer creates its state.
        key_fn: the Python-level state of the loss that the graph bakes in, e.g. the loss's
            ``schedule_state``; a change records a new graph (default: none, the loss has no such state).

    Each call copies ``x`` and ``y`` into the graph's static inputs and returns the graph's loss tensor,
    which the next call overwrites: read it (or add it to an accumulator on the device) before then.
    """

    def __init__(
        self,
        step: StepFn,
        optimizer: torch.optim.Optimizer,
        model: Optional[nn.Module] = None,
        amp_dtype: Optional[torch.dtype] = None,
        warmup_steps: int = 3,
        key_fn: Optional[Callable[[], Hashable]] = None,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; train without --cuda-graph on this machine")
        if amp_dtype == torch.float16:
            raise ValueError(
                "CUDA-graph steps do not support float16 autocast (its gradient scaler synchronises with "
                "the host); use bfloat16"
            )
        if model is not None:
            _check_no_randomness(model)
        self.step_fn, self.optimizer, self.amp_dtype = step, optimizer, amp_dtype
        self.warmup_steps = warmup_steps
        self.key_fn = key_fn or (lambda: None)
        self._warmed: Dict[Tuple, int] = {}  # shape key -> eager steps done
        self._graphs: Dict[
            Hashable, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}
        self._side = torch.cuda.Stream()
        self.recordings = 0  # graphs recorded so far (a count for logs and tests)

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return nullcontext()
        # The autocast weight cache would hold casts made during recording: off, as CUDA graphs require.
        return torch.autocast(device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast(x.device):
            loss = self.step_fn(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape_key = (tuple(x.shape), x.dtype, tuple(x.stride()), tuple(y.shape), y.dtype)
        if self._warmed.get(shape_key, 0) < self.warmup_steps:
            self._warmed[shape_key] = self._warmed.get(shape_key, 0) + 1
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                loss = self._eager(x, y)
            torch.cuda.current_stream().wait_stream(self._side)
            return loss
        lrs = tuple(float(g["lr"]) for g in self.optimizer.param_groups)
        key = (shape_key, lrs, self.key_fn())
        if key not in self._graphs:
            # Graphs of an earlier learning rate or loss phase are not replayed again: free their memory.
            self._graphs = {k: v for k, v in self._graphs.items() if k[1:] == key[1:]}
            self._graphs[key] = self._record(x, y)
        graph, static_x, static_y, static_loss = self._graphs[key]
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return static_loss

    def _record(self, x: torch.Tensor, y: torch.Tensor):
        static_x, static_y = x.clone(), y.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # Gradients are created inside the graph's memory pool and overwritten by every replay.
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            with self._autocast(x.device):
                static_loss = self.step_fn(static_x, static_y)
            static_loss.backward()
            self.optimizer.step()
        self.recordings += 1
        return graph, static_x, static_y, static_loss.detach()


def _check_no_randomness(model: nn.Module) -> None:
    random = [
        name
        for name, m in model.named_modules()
        if (isinstance(m, nn.Dropout) and m.p > 0) or (getattr(m, "drop_prob", 0.0) or 0.0) > 0
    ]
    if random:
        raise ValueError(
            f"a CUDA graph would replay the same random masks every step, and these modules draw them: "
            f"{random[:5]}; train without dropout / stochastic depth, or without CUDA graphs"
        )
