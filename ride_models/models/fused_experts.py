"""All experts in one pass: the experts' convolutions as grouped convolutions over concatenated channels.

E experts of the same shape apply E small convolutions to the same input, then E small convolutions to E
different inputs. Run one by one, that is E kernel launches per layer, each too small to fill a GPU (and
E Python-level module calls). Stacked along the output channels, the first convolution of each expert
stage is one convolution of the shared input; every later one is one grouped convolution with
``groups = E`` (``E * g`` for ResNeXt's grouped 3x3), whose group e is expert e. Batch norm and ReLU act
per channel, so they run once on the concatenated maps, and the option-A shortcut pads each expert's
channel block. The result is expert e's map in channels ``[e * D, (e + 1) * D)``: the same numbers as
the loop, up to the summation order inside the convolution kernels.

The parameters stay in the per-expert modules (``experts.{e}...``), so state dicts, conversion, the
router's per-expert cascade and the optimizer see the usual layout: the stacked weights are built by
``torch.cat`` in each forward (cheap next to the convolutions, and differentiable, so each expert's
gradient lands in its own parameters). Batch norm's running statistics are updated in the concatenated
copies and written back to each expert's buffers in the same step.
"""

import contextlib
import weakref
from typing import Any, Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath
from torch import nn

from ride_models._compat import is_exporting

__all__ = [
    "can_fuse",
    "checkpoint_blocks",
    "cudnn_epilogue",
    "folded_blocks",
    "folded_conv_bn",
    "folding_pays",
    "forget_folded_weights",
    "fused_expert_stages",
    "fusing_pays",
    "kept",
]


def fusing_pays(
    experts: Sequence[nn.Module], device_type: str, training: bool, channels_last: bool = False
) -> bool:
    """Whether the fused pass is the faster one, by what was measured (benchmarks/throughput.py):

    * CUDA, basic-block experts (the CIFAR ResNet-32): fused. One NVIDIA H200, ``ride_resnet32_4e``, batch
      128, bf16, CUDA-graph training step: 7.18 ms fused, 8.15 ms one by one.
    * CUDA, bottleneck experts (ResNet-50, ResNeXt-50): one by one. cuDNN's grouped convolutions are
      slower than E dense ones there: ``ride_resnet50_3e`` bf16 channels-last training ran at 0.82x the
      official per-expert loop when fused.
    * CPU (oneDNN, 2 cores, ``ride_resnet32_4e`` fp32), contiguous (NCHW) maps: fused. Against the official
      code in the same process, fused 1.17x (training, batch 128) and 1.20x (inference, batch 256), one by
      one 1.03x and 1.01x.
    * CPU, channels-last maps: one by one. There oneDNN's grouped convolutions lose their edge while its
      dense ones gain more: against the official code in channels-last, in two runs, fused 0.92x and 0.99x
      (training), 0.98x and 0.99x (inference), one by one 1.01x both (training), 1.02x and 0.99x
      (inference); ``ride_resnet50_3e`` training (batch 16) 0.77x fused, 0.98x one by one. (CPU figures
      move by about 0.05 to 0.1 from run to run on the shared machines.)

    ``training`` is part of the signature because the answer could differ between the two; no measurement
    so far has made it differ.
    """
    if device_type != "cuda":
        return not channels_last
    # Basic-block experts. (A look into _modules: hasattr raises and catches an exception in
    # Module.__getattr__ for each module without the attribute, and this runs in every forward.)
    return not any("conv3" in m._modules for m in experts[0].modules())


# Hooks that ``torch.nn.modules.module.register_module_*_hook`` registers for every module.
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _global_hooks() -> bool:
    return any(getattr(torch.nn.modules.module, name, None) for name in _GLOBAL_HOOKS)


def can_fuse(experts: Sequence[nn.Module], training: bool) -> bool:
    """Whether ``fused_expert_stages`` computes what running ``experts`` one by one computes.

    It needs plain ``nn.BatchNorm2d`` batch norms with a fixed momentum and tracked statistics (the only
    kind these models build), no hooks (forward or backward) inside the experts nor global module hooks (the
    fused pass calls no submodule, so hooks would not fire: ``ride_models.flops`` counts MACs with hooks, for
    example) and, in training, no stochastic depth (its per-expert random draws are not reproduced).
    Other batch-norm kinds swapped in after building compute something else in training: timm's
    ``freeze_batch_norm_2d`` gives ``FrozenBatchNorm2d`` (always the running statistics, never updated) and
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` gives batch statistics over every process; their own forward
    must run. In eval mode SyncBatchNorm normalises with its running statistics, as BatchNorm2d, and folds.
    """
    if _global_hooks():
        return False
    # Every submodule of the experts, walked by hand: it runs in every forward, and Module.modules() (through
    # named_modules, which builds each name) took 4x as long for ride_resnet32_4e's 340 modules.
    stack = list(experts)
    while stack:
        m = stack.pop()
        if m is None:  # a child registered as None
            continue
        stack.extend(m._modules.values())
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
        # Any module with running statistics is a batch norm of some kind (FrozenBatchNorm2d is not an
        # nn.BatchNorm2d, nor is SyncBatchNorm); only the exact nn.BatchNorm2d is what _batch_norm does.
        # (A look into _buffers, not hasattr: for the modules without the attribute, hasattr raises and
        # catches an exception in Module.__getattr__, which made this check cost 0.6 ms per forward.)
        if isinstance(m, nn.modules.batchnorm._NormBase) or "running_mean" in m._buffers:
            # In eval mode SyncBatchNorm normalises with its running statistics, as BatchNorm2d does.
            plain = type(m) is nn.BatchNorm2d or (not training and type(m) is nn.SyncBatchNorm)
            if not plain or m.momentum is None or not m.track_running_stats:
                return False
        if training and isinstance(m, DropPath) and m.drop_prob > 0:
            return False
    return True


def _conv(
    x: torch.Tensor,
    convs: Sequence[nn.Conv2d],
    shared_input: bool,
    folded: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Expert e's ``convs[e]`` on its channel block of ``x`` (or all on ``x`` when it is shared).

    ``folded``: the stacked weights and bias to use instead of the convolutions' own (``_conv_bn`` in eval
    mode: batch norm folded in).
    """
    first = convs[0]
    if folded is not None:
        weight, bias = folded
    else:
        weight = _cat([c.weight for c in convs])  # [E * out, in / groups, k, k]
        bias = None if first.bias is None else _cat([c.bias for c in convs])
    return F.conv2d(x, weight, bias, *_geometry(convs, shared_input))


def _geometry(convs: Sequence[nn.Conv2d], shared_input: bool) -> Tuple[Any, Any, Any, int]:
    """Stride, padding, dilation and groups of the stacked convolution: each expert's groups, times E
    where each expert has its own input channel block."""
    first = convs[0]
    groups = first.groups if shared_input else first.groups * len(convs)
    return first.stride, first.padding, first.dilation, groups


def _fold(convs: Sequence[nn.Conv2d], bns: Sequence[nn.BatchNorm2d]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The stacked convolution weights and bias with each expert's eval-mode batch norm folded in:
    w * gamma / sqrt(var + eps) and beta - mean * gamma / sqrt(var + eps) (plus the scaled conv bias)."""
    scale = _cat([b.weight for b in bns]) * torch.rsqrt(_cat([b.running_var for b in bns]) + bns[0].eps)
    shift = _cat([b.bias for b in bns]) - _cat([b.running_mean for b in bns]) * scale
    weight = _cat([c.weight for c in convs])
    bias = shift if convs[0].bias is None else shift + _cat([c.bias for c in convs]) * scale
    return weight * scale.to(weight.dtype).view(-1, 1, 1, 1), bias.to(weight.dtype)


# Owner module -> {slot: (state key, sources kept alive, what was computed from them)}: the folded weights
# (owner: the first convolution; slot: the number of experts stacked) and the unit-length class vectors of
# the cosine classifiers (owner: the classifier). Weak keys: a model's entries go with it, and nothing is
# added to its state dict or its pickle.
_KEPT: "weakref.WeakKeyDictionary[nn.Module, Dict[Hashable, tuple]]" = weakref.WeakKeyDictionary()


def forget_folded_weights() -> None:
    """Drop every kept folded weight (and normalised classifier weight), freeing its memory: the next eval
    forward of each model computes them again.

    The kept weights follow each source's version counter, which PyTorch moves for every in-place change
    it dispatches (``optimizer.step()``, ``load_state_dict``, a training forward's running statistics). Two
    kinds of change bypass it: writes through ``.data`` (``conv.weight.data.normal_()``) and the replay of
    a CUDA graph that updates the weights or statistics. ``RIDEResNet.train()`` / ``.eval()`` and
    :class:`~ride_models.cuda_graph.GraphedTrainStep` call this; call it after such a change made while a
    model stays in eval mode. It costs one fold per model at its next forward.
    """
    _KEPT.clear()


def kept(
    owner: nn.Module,
    slot: Hashable,
    sources: Sequence[torch.Tensor],
    compute: Callable[[], Any],
    extra: Tuple[Hashable, ...] = (),
) -> Any:
    """``compute()``, a function of the tensors ``sources`` (and of ``extra``), computed once per state of
    the sources when no gradient is recorded for them, and kept with ``owner`` under ``slot``.

    Kept until a source changes: in place (its version counter moves, as in ``optimizer.step()``,
    ``load_state_dict`` or a training forward's running statistics) or by replacement (its address moves;
    the sources are kept alive, so an address is not reused while the entry lives), and after
    :func:`forget_folded_weights` (for changes that bypass the version counter). Computed in every call
    when gradients are recorded for a source (they must reach it), when compiling, exporting or tracing
    (the result must be a function of the live parameters, not a constant) and during CUDA-graph capture
    (a recorded graph must read the live weights).
    """
    if _graphing() or _capturing(sources[0]):
        return compute()
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return compute()
    state: List[Any] = list(extra)
    for t in sources:
        if t.is_inference():  # no version counter to watch
            return compute()
        state += (t.data_ptr(), t._version)
    key = tuple(state)
    entries = _KEPT.setdefault(owner, {})
    entry = entries.get(slot)
    if entry is None or entry[0] != key:
        # Ordinary tensors even under inference_mode: a later forward that records gradients for its input
        # (saliency on a frozen model) must be able to save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            entry = entries[slot] = (key, [t.detach() for t in sources], compute())
    return entry[2]


def _folded_weights(
    convs: Sequence[nn.Conv2d], bns: Sequence[nn.BatchNorm2d]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``_fold``, kept between forwards (:func:`kept`) when no gradient is recorded for the weights.

    The fold is a few small operations per convolution, which at batch 1 cost more time than the batch-norm
    passes they replace.
    """
    sources: List[torch.Tensor] = [_tensor(c, "weight") for c in convs]
    sources += [t for t in (_tensor(c, "bias") for c in convs) if t is not None]
    sources += [_tensor(b, name) for b in bns for name in ("weight", "bias", "running_mean", "running_var")]
    return kept(convs[0], len(convs), sources, lambda: _fold(convs, bns), (bns[0].eps,))


def _tensor(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``getattr(module, name)`` for a parameter or buffer, read from the module's own dicts: a third of
    the time of ``Module.__getattr__``, and ``_folded_weights`` reads 20 of them per convolution of the
    fused pass in every forward. Other attributes (a parametrized weight, computed on access) by getattr."""
    for tensors in (module._parameters, module._buffers):
        if name in tensors:
            return tensors[name]
    return getattr(module, name)


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along dim 0, without the copy for a single tensor (one path: no stacking needed)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def _batch_norm(x: torch.Tensor, bns: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """Each expert's batch norm on its channel block; in training, its running statistics updated too.

    The running means and variances are concatenated in one ``torch.cat`` and written back in one
    ``_foreach_copy_``: on CUDA each of these is a kernel launch per batch norm and training step, for a few
    hundred numbers. (Weights and biases keep a ``torch.cat`` each: slices of one concatenation would cost
    more in the backward pass, a zero-filled gradient and a copy per slice.)
    """
    first = bns[0]
    if len(bns) == 1:  # one expert: its own tensors, nothing to gather or write back
        out = F.batch_norm(
            x, first.running_mean, first.running_var, first.weight, first.bias, first.training,
            first.momentum, first.eps,
        )  # fmt: skip
        if first.training:
            with torch.no_grad():
                first.num_batches_tracked.add_(1)
        return out
    channels = sum(bn.num_features for bn in bns)
    weight, bias = torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns])
    statistics = torch.cat([bn.running_mean for bn in bns] + [bn.running_var for bn in bns])
    mean, var = statistics[:channels], statistics[channels:]
    out = F.batch_norm(x, mean, var, weight, bias, first.training, first.momentum, first.eps)
    if first.training:  # batch_norm updated the running statistics in ``statistics``, in place
        with torch.no_grad():
            buffers = [bn.running_mean for bn in bns] + [bn.running_var for bn in bns]
            torch._foreach_copy_(buffers, list(statistics.split([b.numel() for b in buffers])))
            torch._foreach_add_([bn.num_batches_tracked for bn in bns], 1)
    return out


def _conv_bn(
    x: torch.Tensor,
    convs: Sequence[nn.Conv2d],
    bns: Sequence[nn.BatchNorm2d],
    shared_input: bool,
    fold: bool = True,
    relu: bool = False,
    z: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Convolution then batch norm, per expert; with ``relu``, then ReLU, after adding ``z`` if given.

    In eval mode with ``fold``, the batch norm is folded into the stacked weights (w * gamma / sqrt(var +
    eps), bias beta - mean * gamma / sqrt(var + eps)): one pass over the maps instead of two, equal to the
    two-step computation up to float rounding; with ``relu``, in cuDNN's fused epilogue where it applies
    (:func:`_conv_epilogue`).
    """
    if bns[0].training or not fold:
        out = _batch_norm(_conv(x, convs, shared_input), bns)
    else:
        weight, bias = _folded_weights(convs, bns)
        if relu:
            fused = _conv_epilogue(x, convs, shared_input, weight, bias, z)
            if fused is not None:
                return fused
        out = _conv(x, convs, shared_input, (weight, bias))
    if not relu:
        return out
    # In place: on batch norm's output, which its backward does not need.
    return F.relu(out, inplace=True) if z is None else out.add_(z).relu_()


# cuDNN's fused epilogue: on or off (cudnn_epilogue), and the configurations cuDNN declined.
_EPILOGUE = {"enabled": True}
_EPILOGUE_DECLINED: set = set()
_EPILOGUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def cudnn_epilogue(enabled: bool) -> Iterator[None]:
    """Within the block, run folded convolutions with (``True``, the default) or without cuDNN's fused
    epilogue (see :func:`_conv_epilogue`); for measuring what it gives (``benchmarks/throughput.py``)."""
    saved = _EPILOGUE["enabled"]
    _EPILOGUE["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _EPILOGUE["enabled"] = saved


def _epilogue_dtype(x: torch.Tensor, tensors: Sequence[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype the fused epilogue computes in on ``x``, or None where it does not apply: off the GPU or
    cuDNN, when autograd records (the fused operators have no backward), when compiling, exporting or
    tracing (the compiler fuses on its own; a graph keeps the plain operators), during CUDA-graph capture,
    and for dtypes other than float32, float16 and bfloat16 (or weights of another dtype than the input
    without autocast, which the plain path reports)."""
    if not (_EPILOGUE["enabled"] and _on_cudnn(x)):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
        return None
    if _graphing():
        return None
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    elif any(t.dtype != x.dtype for t in tensors):
        return None
    else:
        dtype = x.dtype
    return dtype if dtype in _EPILOGUE_DTYPES else None


def _on_cudnn(x: torch.Tensor) -> bool:
    """Whether ``x`` is on a CUDA device with cuDNN on (not ROCm's MIOpen), outside CUDA-graph capture."""
    return x.is_cuda and torch.backends.cudnn.enabled and torch.version.hip is None and not _capturing(x)


def folding_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether blocks run one by one on ``x`` (``weight``: one of their convolution weights) are faster
    with batch norm folded into the convolutions, by what was measured (``benchmarks/throughput.py``):

    * CPU: yes. ``ride_resnet50_3e`` inference 1.13x to 1.29x, ``ride_resnet32_4e`` 1.07x (2 cores).
    * CUDA, eager: only where cuDNN's fused epilogue applies (:func:`_epilogue_dtype`). A folded
      convolution leaves a per-channel bias to add, and PyTorch adds it with its generic broadcasting
      kernel, slower than the batch-norm kernel it replaces: one H200, ``ride_resnet50_3e`` bf16
      channels-last at batch 256, 8.7 against 5.3 ms of GPU time per batch; not folded it ran at 11,242
      images/s against 9,711 folded (routed 9,744 against 8,620), and in fp32 the two were even. So
      without the epilogue (CUDA-graph capture, ``GraphedRouting``, gradients recorded, ``cudnn_epilogue(
      False)``) the batch norms run as modules.
    * Compiling or exporting: yes (the fold is computed in the graph, for the compiler or the consumer).

    The experts' fused pass folds wherever ``fold_bn`` allows: there folding also spares the concatenation
    of every batch norm's parameters in each forward.
    """
    if not x.is_cuda or _graphing():
        return True
    return _epilogue_dtype(x, [weight]) is not None


def _graphing() -> bool:
    """Whether this forward is being turned into a graph by ``torch.compile``, ``torch.export`` or
    ``torch.jit.trace``: the graph must compute from the live parameters, with the plain operators."""
    return torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing()


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is recording on the current stream, for work on ``t`` (never off CUDA: the
    query itself needs a CUDA driver)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _conv_epilogue(
    x: torch.Tensor,
    convs: Sequence[nn.Conv2d],
    shared_input: bool,
    weight: torch.Tensor,
    bias: torch.Tensor,
    z: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """``relu(conv(x) + bias)``, or ``relu(conv(x) + bias + z)``, in one cuDNN kernel; None where that does
    not apply (:func:`_epilogue_dtype`) or cuDNN declines the configuration, and the caller computes it
    step by step.

    With batch norm folded, the convolution is followed by a per-channel bias, usually a ReLU and, at the
    end of a block, the shortcut's add: each a pass over the whole map, and the bias add on channels-last
    maps is a slow broadcast. On an H200 (batch 256, bf16, channels-last) cuDNN applies all of them in the
    convolution's epilogue for next to nothing: 0.15 ms against 0.90 ms for a 1x1 64 -> 256 convolution at
    56 x 56 with its bias and ReLU (``benchmarks/conv_epilogue.py``). The result differs from the
    step-by-step one by rounding only (the epilogue adds in float32 before the one rounding to bf16).
    """
    tensors = [weight, bias] if z is None else [weight, bias, z]
    dtype = _epilogue_dtype(x, tensors)
    first = convs[0]
    if dtype is None or isinstance(first.padding, str) or first.padding_mode != "zeros":
        return None
    # The output is channels-last when the input or the weight is (cuDNN's suggested layout).
    channels_last = any(
        t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in (x, weight)
    )
    geometry = _geometry(convs, shared_input)
    key = (x.device, dtype, channels_last, tuple(weight.shape), geometry, z is None)
    if key in _EPILOGUE_DECLINED:
        return None
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    try:
        if z is None:
            return torch.cudnn_convolution_relu(x, weight, bias, *geometry)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        z = z.to(dtype).contiguous(memory_format=layout)  # the shortcut in the output's layout
        return torch.cudnn_convolution_add_relu(x, weight, z, 1.0, bias, *geometry)
    except RuntimeError:  # no cuDNN engine for this configuration: the step-by-step path, from now on
        _EPILOGUE_DECLINED.add(key)
        return None


def _shortcut(x: torch.Tensor, blocks: Sequence[nn.Module], shared_input: bool, fold: bool) -> torch.Tensor:
    downsample = blocks[0].downsample
    num_experts = len(blocks)
    if downsample is None:
        return x.repeat(1, num_experts, 1, 1) if shared_input else x
    if isinstance(downsample, nn.Sequential):  # 1x1 convolution and batch norm (option B)
        convs, bns = [b.downsample[0] for b in blocks], [b.downsample[1] for b in blocks]
        return _conv_bn(x, convs, bns, shared_input, fold)
    # Option A: subsample, then zero-pad each expert's channel block on both sides.
    stride, pad = downsample.stride, downsample.pad
    # In the maps' own layout: for channels-last maps, in NHWC terms, the channels being the last dimension.
    # (Padded as NCHW, the result was NCHW, and the block's shortcut add a mixed-layout one: 4x as slow on
    # the CPU for the first block of ride_resnet32_4e's layer 2 at batch 128.)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    dim = 3 if channels_last else 1  # the channel dimension of `maps`
    maps = x.permute(0, 2, 3, 1) if channels_last else x
    # (No shape unpacking: FX traces this function.)
    blocks = maps.unsqueeze(dim) if shared_input else maps.unflatten(dim, (num_experts, -1))  # E or 1 blocks
    blocks = F.pad(blocks, (0, 0) * (3 - dim) + (pad, pad))  # each block's channels, on both sides
    if shared_input:
        sizes = [-1] * 5
        sizes[dim] = num_experts
        blocks = blocks.expand(*sizes)
    out = blocks.flatten(dim, dim + 1)
    return out.permute(0, 3, 1, 2) if channels_last else out


def _block(
    x: torch.Tensor, blocks: Sequence[nn.Module], shared_input: bool, fold: bool = True
) -> torch.Tensor:
    """One block of every expert: ``BasicBlock`` (conv1, conv2) or ``Bottleneck`` (conv1, conv2, conv3);
    in eval mode with batch norm folded into the convolutions (``fold``)."""
    first = blocks[0]
    names = ["conv1", "conv2", "conv3"] if "conv3" in first._modules else ["conv1", "conv2"]
    out = x
    for i, name in enumerate(names[:-1]):
        convs, bns = [getattr(b, name) for b in blocks], [getattr(b, f"bn{i + 1}") for b in blocks]
        out = _conv_bn(out, convs, bns, shared_input and i == 0, fold, relu=True)
    convs, bns = [getattr(b, names[-1]) for b in blocks], [getattr(b, f"bn{len(names)}") for b in blocks]
    return _conv_bn(out, convs, bns, False, fold, relu=True, z=_shortcut(x, blocks, shared_input, fold))


@contextlib.contextmanager
def _running_statistics_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put the running statistics (and step counters) of the batch norms in ``modules`` back as they were
    on entry. The recomputation of a checkpointed block in the backward pass runs its batch norms in
    training mode a second time; without this they would take two momentum steps (and count two batches)
    for one training step, drifting away from the statistics of the same training without checkpointing."""
    norms = [
        m
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]
    kept = [[t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, kept):
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(count)


def _checkpoint(function, *args, modules: Sequence[nn.Module]) -> torch.Tensor:
    """``function(*args)`` with its activations recomputed in the backward pass instead of kept; the
    recomputation leaves the running statistics of the batch norms in ``modules`` as the forward left them."""
    return torch.utils.checkpoint.checkpoint(
        function,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _running_statistics_kept(modules)),
    )


def checkpoint_blocks(blocks: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The modules ``blocks`` in turn, each checkpointed (timm's ``checkpoint_seq``, one segment per block),
    batch norm's running statistics updated once per training step as without checkpointing (timm's
    helper updates them again when it recomputes a block)."""
    for block in blocks:
        x = _checkpoint(block, x, modules=[block])
    return x


def _run_block(
    x: torch.Tensor, blocks: Sequence[nn.Module], shared_input: bool, checkpoint: bool, fold: bool = True
) -> torch.Tensor:
    """``_block``; with ``checkpoint``, its activations are not kept but recomputed in the backward pass
    (grad checkpointing, as :func:`checkpoint_blocks` does for each block of the modules' path)."""
    if checkpoint:
        return _checkpoint(_block, x, blocks, shared_input, fold, modules=blocks)
    return _block(x, blocks, shared_input, fold)


def fused_expert_stages(
    x: torch.Tensor,
    experts: Sequence[nn.Module],
    stage_names: Optional[Sequence[str]] = None,
    shared_input: bool = True,
    checkpoint: bool = False,
    fold: bool = True,
) -> torch.Tensor:
    """Every expert's stages in one pass.

    Args:
        x: ``[B, C_s, H, W]``, the shared trunk's output (the input of every expert), or with
            ``shared_input=False`` the experts' maps concatenated along channels ``[B, E * C, H, W]``.
        experts: E modules of identical structure, each an ``nn.Sequential`` of stages of blocks.
        stage_names: the stages to run, in order (default: all of them).
        shared_input: whether ``x`` is the one input of every expert.
        checkpoint: recompute each block's activations in the backward pass instead of keeping them.
        fold: in eval mode, fold each batch norm into the convolution before it (the model's ``fold_bn``).

    Returns:
        ``[B, E * D, h, w]``: expert e's map in channels ``[e * D, (e + 1) * D)``.
    """
    names = list(stage_names) if stage_names is not None else [n for n, _ in experts[0].named_children()]
    for name in names:
        stages = [getattr(expert, name) for expert in experts]
        for j in range(len(stages[0])):
            x = _run_block(x, [stage[j] for stage in stages], shared_input, checkpoint, fold)
            shared_input = False
    if shared_input:  # no block ran (pruned stages): every expert passes the shared map on unchanged
        x = x.repeat(1, len(experts), 1, 1)
    return x


def folded_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``; in eval mode as one convolution, the batch norm folded into its weights and bias."""
    return _conv_bn(x, [conv], [bn], shared_input=False)


def folded_blocks(x: torch.Tensor, stages: Sequence[nn.Module], checkpoint: bool = False) -> torch.Tensor:
    """The blocks of ``stages`` (``nn.Sequential`` s of ``BasicBlock`` / ``Bottleneck``) on one path.

    The computation of the blocks' own ``forward``, with every convolution and its batch norm as
    :func:`folded_conv_bn`: in eval mode, one pass over the maps instead of two (on CUDA, with the bias,
    ReLU and shortcut add in cuDNN's epilogue where it applies: :func:`_conv_epilogue`). The caller checks
    that the blocks can run this way (:func:`can_fuse`: no hooks inside, standard batch norms). With
    ``checkpoint``, each block's activations are recomputed in the backward pass instead of kept.
    """
    for stage in stages:
        for block in stage:
            x = _run_block(x, [block], False, checkpoint)
    return x
