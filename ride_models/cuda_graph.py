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

:class:`GraphedRouting` does the same for routed inference, whose later experts see a number of samples
known only once the router has decided: each expert is recorded for a few fixed batch sizes ("buckets"),
and the samples that go on are padded up to the next bucket.
"""

from __future__ import annotations

from collections.abc import Hashable
from contextlib import nullcontext
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ride_models.models.fused_experts import cudnn_epilogue, forget_folded_weights
from ride_models.models.ride_resnet import RoutedOutput, _check_threshold, _rows

__all__ = ["GraphedRouting", "GraphedTrainStep"]

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
        return _recordable_autocast(device.type, self.amp_dtype)

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
        forget_folded_weights()  # the replay moved the weights without moving their version counters
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


def _recordable_autocast(device_type: str, dtype: Optional[torch.dtype]):
    """Autocast to ``dtype`` (or nothing for None) in a form a CUDA graph can record."""
    if dtype is None:
        return nullcontext()
    # The autocast weight cache would hold casts made during recording: off, as CUDA graphs require.
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


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


class GraphedRouting:
    """``model.route(x)`` (routed inference) as CUDA-graph replays, one host synchronisation per decision.

    Routed inference runs each later expert only on the samples the router sends on. Eagerly, that is one
    kernel launch per layer per expert on a batch of data-dependent size: for the CIFAR models, launches
    cost more than the convolutions they skip, and routing is slower than running every expert. Here the
    cascade runs as recorded graphs on fixed buffers:

    * the trunk, expert 0, its head and decision 0 on the whole batch: one graph;
    * expert ``i`` (``i >= 1``), its head and decision ``i`` on the first ``b`` samples of the batch put in
      "still routed first" order, for every bucket size ``b`` (multiples of ``granularity``): one graph per
      bucket. The host reads how many samples go on (the one synchronisation of a decision), rounds up to a
      bucket and replays that graph. Padded rows (samples that have stopped) are computed and discarded;
      in eval mode every layer works per sample, so they do not change the others.

    The result equals ``model.route(x, threshold)`` (up to the convolution algorithms cuDNN picks for each
    batch size). The graphs of an input shape are all recorded on its first call (after one eager warm-up
    pass per bucket); they share one memory pool, since their results live in buffers outside it, and
    a new input shape replaces them. The graphs read the parameters where they were recorded: load new
    weights in place (``load_state_dict`` does), or build a new ``GraphedRouting``.

    Args:
        model: a RIDE model (:class:`~ride_models.models.RIDEResNet`) in eval mode.
        threshold: routing threshold (default: the model's ``routing_threshold``).
        granularity: bucket step in samples (default: an eighth of the batch, at least 1).
        amp_dtype: autocast dtype for the cascade (``torch.bfloat16``) or None.
        record: record CUDA graphs (default: on CUDA). ``False`` runs the same bucketed cascade eagerly,
            which works on any device (and is how the CPU tests check the bookkeeping).
    """

    def __init__(
        self,
        model: nn.Module,
        threshold: Optional[float] = None,
        granularity: Optional[int] = None,
        amp_dtype: Optional[torch.dtype] = None,
        record: Optional[bool] = None,
    ) -> None:
        if not hasattr(model, "route") or not hasattr(model, "router"):
            raise TypeError(f"GraphedRouting needs a RIDE model with a router, got {type(model).__name__}")
        if model.num_classes <= 0:
            raise RuntimeError("routed inference needs classifiers; this model has num_classes=0")
        if granularity is not None and granularity < 1:
            raise ValueError(f"granularity must be at least 1, got {granularity}")
        self.model = model
        self.threshold = (
            model.routing_threshold if threshold is None else _check_threshold(threshold, closed=True)
        )
        self.granularity = granularity
        self.amp_dtype = amp_dtype
        self.record = record
        self._state: Dict[Tuple, _Cascade] = {}
        self.recordings = 0  # graphs recorded so far

    def __call__(self, x: torch.Tensor) -> RoutedOutput:
        if self.model.training:
            raise RuntimeError(
                "routed inference runs the model in eval mode (batch norm's running statistics); call "
                "model.eval() first"
            )
        record = x.is_cuda if self.record is None else self.record
        if record and not x.is_cuda:
            raise RuntimeError("CUDA graphs need a CUDA device; use record=False on this machine")
        key = (tuple(x.shape), x.dtype, tuple(x.stride()), x.device, record)
        # Without cuDNN's fused epilogue: graph capture turns it off (its operators have not been checked
        # under capture), and the eager mode (record=False) computes alike. So on CUDA the experts, run one
        # by one here, keep their batch norms as modules (fused_experts.folding_pays).
        with torch.inference_mode(), cudnn_epilogue(False):
            cascade = self._state.get(key)
            if cascade is None:
                self._state.clear()  # one input shape at a time: free the graphs of the previous one
                granularity = self.granularity or max(1, x.shape[0] // 8)
                cascade = _Cascade(self.model, x, self.threshold, granularity, self._autocast(x), record)
                self._state[key] = cascade
                self.recordings += cascade.recordings
            return cascade.run(x)

    def _autocast(self, x: torch.Tensor):
        return lambda: _recordable_autocast(x.device.type, self.amp_dtype)


class _Cascade:
    """The buffers and graphs of :class:`GraphedRouting` for one input shape."""

    def __init__(self, model, x: torch.Tensor, threshold: float, granularity: int, autocast, record: bool):
        self.model, self.threshold, self.autocast = model, threshold, autocast
        self.num_experts = model.num_experts
        batch = x.shape[0]
        self.buckets = sorted({min(batch, k * granularity) for k in range(1, -(-batch // granularity) + 1)})
        self.x = x.clone()  # the input buffer (clone keeps the memory format)
        with self.autocast():  # one eager pass for the shapes and dtypes of the buffers
            shared = model.forward_shared(self.x)
            self.fold = model._fold_experts(shared, self.num_experts)  # batch norm folded or not, as in route
            logits = model.heads[0](model.global_pool(model._run_expert(0, shared, self.fold)))
        self.shared = torch.empty_like(shared)
        self.running_sum = torch.empty_like(logits)  # [B, C]: sum of the logits of the experts used
        self.logit_sum = torch.empty_like(logits)
        self.num_used = torch.empty(batch, dtype=torch.long, device=x.device)
        self.router_logits = logits.new_empty(batch, self.num_experts - 1)
        self.active = torch.empty(batch, dtype=torch.bool, device=x.device)
        self.order = torch.empty(batch, dtype=torch.long, device=x.device)  # routed samples first
        self.count = torch.empty((), dtype=torch.long, device=x.device)  # how many are routed on
        self.positions = torch.arange(batch, device=x.device)
        self.recordings = 0
        self.first: Callable[[], None] = self._first
        self.later: Dict[Tuple[int, int], Callable[[], None]] = {
            (i, b): (lambda i=i, b=b: self._later(i, b))
            for i in range(1, self.num_experts)
            for b in self.buckets
        }
        if record:
            self._record_all()

    # The two kinds of step; each reads and writes only the buffers above.
    def _first(self) -> None:
        model = self.model
        with self.autocast():
            self.shared.copy_(model.forward_shared(self.x))
            features = model.global_pool(model._run_expert(0, self.shared, self.fold))
            logits = model.heads[0](features)
            self.running_sum.copy_(logits)
            self.logit_sum.copy_(logits)
            self.num_used.fill_(1)
            self.router_logits.fill_(float("nan"))
            if self.num_experts > 1:
                self._decide(0, features, logits, self.positions, None)

    def _later(self, i: int, bucket: int) -> None:
        model = self.model
        idx = self.order[:bucket]  # the routed samples, then padding
        valid = self.positions[:bucket] < self.count  # [b]: rows that are routed samples
        with self.autocast():
            features = model.global_pool(model._run_expert(i, _rows(self.shared, idx), self.fold))
            running_sum = self.running_sum.index_select(0, idx) + model.heads[i](features)
            # Padded rows have stopped: their running sums are never read again, their results are kept.
            self.running_sum.index_copy_(0, idx, running_sum)
            kept = self.logit_sum.index_select(0, idx)
            self.logit_sum.index_copy_(0, idx, torch.where(valid[:, None], running_sum.to(kept.dtype), kept))
            self.num_used.index_add_(0, idx, valid.long())
            if i < self.num_experts - 1:
                self._decide(i, features, running_sum / (i + 1), idx, valid)

    def _decide(
        self, i: int, features, mean_logits, idx: torch.Tensor, valid: Optional[torch.Tensor]
    ) -> None:
        z = self.model.router.decision(i, features, mean_logits).to(self.router_logits.dtype)  # [b]
        go = torch.sigmoid(z) > self.threshold
        column = self.router_logits[:, i]
        if valid is None:  # the first decision sees the whole batch
            column.copy_(z)
            self.active.copy_(go)
        else:
            column.index_copy_(0, idx, torch.where(valid, z, column.index_select(0, idx)))
            self.active.zero_()
            self.active.index_copy_(0, idx, go & valid)
        # Routed samples first, each group in batch order (as the eager cascade's index lists).
        self.order.copy_(torch.argsort((~self.active).to(torch.uint8), stable=True))
        self.count.copy_(self.active.sum())

    def _record_all(self) -> None:
        steps = [self.first, *self.later.values()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: cuDNN picks its algorithms for every bucket size
            self.count.fill_(self.x.shape[0])
            self.order.copy_(self.positions)
            for step in steps:
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        graphs = []
        for step in steps:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step()
            graphs.append(graph)
        self.recordings = len(graphs)
        self.first = graphs[0].replay
        self.later = {key: graph.replay for key, graph in zip(self.later, graphs[1:])}

    def run(self, x: torch.Tensor) -> RoutedOutput:
        self.x.copy_(x)
        self.first()
        for i in range(1, self.num_experts):
            n = int(self.count)  # the decision's one host synchronisation
            if n == 0:
                break
            bucket = next(b for b in self.buckets if b >= n)
            self.later[(i, bucket)]()
        logits = self.logit_sum / self.num_used.unsqueeze(1).to(self.logit_sum.dtype)
        return RoutedOutput(logits, self.num_used.clone(), self.router_logits.clone())
