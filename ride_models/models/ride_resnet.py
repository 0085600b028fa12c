"""RIDE ResNets: a shared trunk, several experts, a normalised classifier per expert, and a router.

RIDE (Wang et al., "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts", ICLR 2021)
splits a ResNet in two. The stem and the early stages are **shared**; the last two stages and the
classifier are replicated into E **experts** of reduced width. The prediction is the mean of the experts'
logits, and a **router** (paper section 3.3, ``ride_models.router``) lets confident samples stop after
the first experts.

Families, as in the official code (frank-xwang/RIDE-LongTailRecognition):

==================  =========================  ==============================  ======================
family              shared                     per expert                      classifier input D
==================  =========================  ==============================  ======================
ResNet-32 (CIFAR)   3x3 stem, layer1 (16)      layer2 (24), layer3 (48)        48
ResNet-10           7x7 stem, layer1, layer2   layer3 (192), layer4 (384)      384
ResNet-50           7x7 stem, layer1, layer2   layer3 (192x4), layer4 (384x4)  1536
ResNeXt-50 32x4d    7x7 stem, layer1, layer2   layer3, layer4 (grouped 3x3)    1536
==================  =========================  ==============================  ======================

State-dict layout (``ride_models.convert`` maps the official one onto it)::

    conv1, bn1, layer1[, layer2]          the shared trunk
    experts.{e}.layer{k}                  expert e's two stages
    heads.{e}.weight [C, D]               expert e's normalised classifier (nn.Linear layout)
    router.hidden.{i}, router.fc          the router's decisions and shared output layer
    router.trained                        whether the router has been fitted (switches routing on)
"""

# No `from __future__ import annotations`: TorchScript needs the NamedTuple annotations as real types.
import operator
import os
import re
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
)
from torch import nn

from ride_models._compat import autocast_known, is_exporting
from ride_models.data.transforms import CIFAR_MEAN, CIFAR_STD
from ride_models.losses import check_target
from ride_models.models.fused_experts import (
    can_fuse,
    checkpoint_blocks,
    folded_blocks,
    folded_conv_bn,
    folding_pays,
    forget_folded_weights,
    fused_expert_stages,
    fusing_pays,
    kept,
)
from ride_models.models.parallel_experts import parallel_expert_maps, parallelizing_pays
from ride_models.router import ExpertRouter

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "NormedLinear",
    "RIDEOutput",
    "RIDEResNet",
    "RoutedOutput",
    "RouterTrainOutput",
    "require_ride_model",
    "summarize_state_dict",
]


class RIDEOutput(NamedTuple):
    """Train-mode output with ``set_expert_training(True)``: what the RIDE losses need."""

    logits: torch.Tensor  # [B, C], mean over experts
    expert_logits: torch.Tensor  # [B, E, C], each expert's logits (already scaled by s)


class RoutedOutput(NamedTuple):
    """Output of routed inference (:meth:`RIDEResNet.route`)."""

    logits: torch.Tensor  # [B, C], mean over the experts each sample used
    num_experts: torch.Tensor  # [B] int64, experts used per sample
    router_logits: torch.Tensor  # [B, E-1], NaN where a sample stopped before that decision


class RouterTrainOutput(NamedTuple):
    """Output of the router's training path (:meth:`RIDEResNet.forward_router_train`)."""

    logits: torch.Tensor  # [B, C], mean over all experts
    router_logits: torch.Tensor  # [B, E-1], every decision on every sample
    help_targets: Optional[torch.Tensor]  # [B, E-1] bool (paper equation 5), None without targets


def _check_input(x: torch.Tensor, in_chans: int, weight: torch.Tensor) -> None:
    """An image batch ``[B, in_chans, H, W]`` of the dtype of ``weight`` (the stem's; see _check_dtype)."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch of shape [B, {in_chans}, H, W], got {list(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected an image batch of shape [B, {in_chans}, H, W], got {list(x.shape)}; "
            f"create the model with in_chans={x.shape[1]} for {x.shape[1]}-channel images"
        )
    if not torch.jit.is_scripting():
        _check_dtype(x, weight)


torch.fx.wrap("_check_input")  # a leaf for FX: its data-dependent branch is not traced


def _check_threshold(threshold: Any, closed: bool = False) -> float:
    """The router threshold as a float in (0, 1) (``closed``: in [0, 1], where 0 sends every sample on and 1
    stops every sample), or a ValueError naming the value."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not (0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0):
        bounds = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"routing threshold must be a number in {bounds}, got {threshold!r}")
    return value


def _routing_int(mode: Any) -> Optional[int]:
    """``mode`` as an int k if it is an integer of any kind (int, numpy, a 0-d integer tensor), else None."""
    if mode is None or isinstance(mode, (bool, str)):
        return None
    try:
        return operator.index(mode)
    except TypeError:
        return None


@torch.jit.unused  # only called outside TorchScript (is_scripting() guards the call)
def _autocast_enabled(x: torch.Tensor) -> bool:
    if isinstance(x, torch.fx.Proxy):  # FX traces the plain computation
        return False
    return autocast_known(x.device.type) and torch.is_autocast_enabled(x.device.type)


@torch.jit.unused  # only called outside TorchScript (is_scripting() guards the call)
def _check_dtype(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Refuse an input whose dtype the model's weights do not have, outside autocast (which casts both), with
    a message naming the two dtypes and the fix; PyTorch's own ("Input type (double) and bias type (float)
    should be the same", with the batch norm folded) names neither the model nor what to do."""
    if isinstance(x, torch.fx.Proxy) or x.dtype == weight.dtype or _autocast_enabled(x):
        return
    if not x.is_floating_point():
        raise ValueError(
            f"the images are {x.dtype}, the model's weights {weight.dtype}: convert the images to floats and "
            "normalise them as the model expects (timm.data.resolve_data_config and create_transform build "
            "that transform)"
        )
    fix = f"convert one to the other (x.to({weight.dtype}) or model.to({x.dtype}))"
    if x.dtype in (torch.float16, torch.bfloat16):
        fix += f", or run under torch.autocast(device_type, dtype={x.dtype})"
    raise ValueError(f"the images are {x.dtype}, the model's weights {weight.dtype}: {fix}")


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The samples ``index`` of the maps ``x``, in ``x``'s memory format. (``index_select`` returns
    contiguous NCHW maps: on channels-last maps it took 4.5x as long on the CPU (16 x 512 x 28 x 28, 9
    samples), and the next convolution converts its input back.)"""
    return x[index]


class NormedLinear(nn.Module):
    """Cosine classifier: ``scale * cos(x, w_c)`` for every class c (the official ``NormedLinear``).

    Features and class weights are L2-normalised, so logits lie in ``[-scale, scale]``; RIDE uses
    ``scale = 30`` and applies it here, inside the model, as the official backbone does. The weight is
    stored as ``[num_classes, in_features]`` (the nn.Linear layout; the official layout is transposed).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Official init: uniform(-1, 1), then every class vector rescaled to unit length.
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and _autocast_enabled(x):
            # In float32 under autocast: in bfloat16, s * cos would carry errors of about s * 2^-9 = 0.06,
            # the size of the LDAM margins of the head classes. The layer is [B, D] x [D, C]: cheap.
            with torch.autocast(x.device.type, enabled=False):
                return self._cosine(x.float())
        return self._cosine(x)

    def _cosine(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            weight = F.normalize(self.weight, dim=1)
        else:
            weight = self._unit_weight(x)
        return self.scale * F.linear(F.normalize(x, dim=1), weight)

    @torch.jit.unused
    def _unit_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The class vectors scaled to unit length, kept between forwards while the weight is unchanged
        and no gradient is recorded for it (``fused_experts.kept``, as the folded convolutions): for
        ``ride_resnet50_3e``'s 8,142 iNaturalist classes, normalising the three heads' weights took about
        50 ms of a 150 ms batch-1 forward on 2 CPU cores."""
        weight = self.weight
        if isinstance(x, torch.fx.Proxy) or isinstance(weight, torch.fx.Proxy):  # FX: part of the graph
            return F.normalize(weight, dim=1)
        return kept(self, "unit_weight", [weight], lambda: F.normalize(weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut of the CIFAR ResNets (He et al. 2016).

    Keeps every second row and column and zero-pads the channels equally on both sides.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        if (out_chs - in_chs) % 2 or out_chs < in_chs:
            raise ValueError(f"option-A shortcut needs an even channel increase, got {in_chs} -> {out_chs}")
        self.stride = stride
        self.pad = (out_chs - in_chs) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (stride on the first)."""

    expansion = 1

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.drop_path(self.bn2(self.conv2(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut  # in place, as timm's blocks: batch norm's backward does not read its output
        return self.act2(x)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride, groups), 1x1 expand to ``planes * 4``, with a residual connection."""

    expansion = 4

    def __init__(
        self,
        in_chs: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.drop_path(self.bn3(self.conv3(x)))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


BlockType = Union[Type[BasicBlock], Type[Bottleneck]]


def _make_stage(
    block: BlockType,
    in_chs: int,
    planes: int,
    num_blocks: int,
    stride: int,
    shortcut: str,
    groups: int,
    base_width: int,
    drop_path_rates: Sequence[float],
) -> nn.Sequential:
    out_chs = planes * block.expansion
    downsample: Optional[nn.Module] = None
    if stride != 1 or in_chs != out_chs:
        if shortcut == "A":
            downsample = ShortcutA(in_chs, out_chs, stride)
        else:
            downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )
    blocks = []
    for i in range(num_blocks):
        blocks.append(
            block(
                in_chs if i == 0 else out_chs,
                planes,
                stride=stride if i == 0 else 1,
                downsample=downsample if i == 0 else None,
                groups=groups,
                base_width=base_width,
                drop_path=drop_path_rates[i],
            )
        )
    return nn.Sequential(*blocks)


def _blocks(expert: nn.Module) -> List[nn.Module]:
    """An expert's blocks in order, over its stages (what its ``forward`` runs)."""
    return [block for stage in expert.children() for block in stage]


def _take_indices(num_levels: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """Feature levels to return: the last ``indices`` if an int, all if None, else those listed."""
    if indices is None:
        indices = num_levels
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ValueError(f"ask for 1 to {num_levels} feature levels, got {indices}")
        take = list(range(num_levels - indices, num_levels))
    else:
        take = [num_levels + i if i < 0 else i for i in indices]
        bad = [i for i in take if not 0 <= i < num_levels]
        if bad:
            raise ValueError(f"feature indices {list(indices)} out of range for {num_levels} levels")
    return take, max(take)


class RIDEResNet(nn.Module):
    """A ResNet with a shared trunk, E experts (the last two stages and a classifier each) and a router.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: Blocks per stage; 3 stages (CIFAR) or 4 (ImageNet). The last two stages are per expert.
        planes: Planes per stage (an expert stage's output has ``planes * block.expansion`` channels).
        num_experts: Number of experts E.
        num_classes: Number of classes C (0 removes the classifiers: the model returns features).
        in_chans: Input channels.
        stem: ``"cifar"`` (3x3 conv, no max-pool) or ``"imagenet"`` (7x7 stride-2 conv and max-pool).
        shortcut: ``"A"`` (parameter-free, CIFAR) or ``"B"`` (1x1 conv + BN projection).
        groups: Groups of the 3x3 convolutions in bottlenecks (32 for ResNeXt-50 32x4d).
        base_width: Width per group in bottlenecks (4 for ResNeXt-50 32x4d).
        use_norm: Normalised (cosine) classifiers scaled by ``scale``; False gives ``nn.Linear`` heads with
            bias and scale 1, as the official ``use_norm=False``.
        scale: The logit scale s of the normalised classifiers (30 in RIDE).
        router_top_k: Number of largest mean logits the router sees (capped at ``num_classes``).
        router_hidden_dim: Width of each routing decision's hidden layer.
        drop_rate: Dropout before each classifier.
        drop_path_rate: Stochastic depth rate, growing linearly over the blocks of a path.
        global_pool: ``"avg"`` or ``""`` (no pooling, only with ``num_classes=0``).
        fused_experts: True runs every expert's stages in one pass, as grouped convolutions over
            concatenated channels (``ride_models.models.fused_experts``); False runs the experts one by one;
            None (the default) picks per call where measurements showed the fused pass faster. The same
            outputs and the same state dict either way; see :meth:`set_fused_experts`.
        parallel_experts: In training on the CPU, run the experts side by side, each in its own thread
            (forward and backward; ``ride_models.models.parallel_experts``), wherever they would run one
            by one and at least 2 intra-op threads are set (True, the default); False never. See
            :meth:`set_parallel_experts`.
        fold_bn: In eval mode, fold each batch norm into the convolution before it: one pass over the
            maps instead of two. The folded weights follow the current weights and statistics (kept
            between forwards that record no gradient for them, until one changes). The same outputs up
            to float rounding; modules with hooks inside run unfolded, so hooks fire.
    """

    __jit_unused_properties__ = ["routing"]

    def __init__(
        self,
        block: BlockType,
        layers: Sequence[int],
        planes: Sequence[int],
        num_experts: int = 3,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        shortcut: str = "B",
        groups: int = 1,
        base_width: int = 64,
        use_norm: bool = True,
        scale: float = 30.0,
        router_top_k: int = 30,
        router_hidden_dim: int = 16,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        fused_experts: Optional[bool] = None,
        fold_bn: bool = True,
        parallel_experts: bool = True,
    ) -> None:
        super().__init__()
        if len(layers) not in (3, 4) or len(planes) != len(layers):
            raise ValueError(
                f"layers and planes need 3 (CIFAR) or 4 (ImageNet) stages, got {layers}, {planes}"
            )
        if num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {num_experts}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.num_experts = num_experts
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.use_norm = use_norm
        self.scale = scale if use_norm else 1.0
        self.router_top_k = router_top_k
        self.grad_checkpointing = False
        self.fused_experts = fused_experts
        self.parallel_experts = bool(parallel_experts)
        self.fold_bn = fold_bn
        self.expert_training = False
        self.router_training = False
        # Routing mode: "auto" follows the router's trained flag; "k" runs the first `_routing_k` experts.
        self._routing_mode = "auto"
        self._routing_k = num_experts
        self.routing_threshold = 0.5

        # Stem.
        stem_width = planes[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
            reduction = 1
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
            reduction = 2
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=stem_width, reduction=reduction, module="act1")]
        if stem == "imagenet":
            reduction *= 2  # max-pool

        # Stages: all but the last two are shared; the last two belong to every expert.
        num_shared = len(layers) - 2
        stage_kwargs = dict(shortcut=shortcut, groups=groups, base_width=base_width)
        depth = sum(layers)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        in_chs, first_block = stem_width, 0
        shared: List[nn.Sequential] = []
        expert_stages: List[Tuple[str, BlockType, int, int, int, int, List[float]]] = []
        for i, (n, p) in enumerate(zip(layers, planes)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            rates = dpr[first_block : first_block + n]
            out_chs = p * block.expansion
            if i < num_shared:
                shared.append(_make_stage(block, in_chs, p, n, stride, drop_path_rates=rates, **stage_kwargs))
                module = f"layer{i + 1}"
                num_chs = out_chs
            else:
                expert_stages.append((f"layer{i + 1}", block, in_chs, p, n, stride, rates))
                module = f"experts.layer{i + 1}"  # the experts' maps, concatenated along channels
                num_chs = out_chs * num_experts
            self.feature_info.append(dict(num_chs=num_chs, reduction=reduction, module=module))
            in_chs, first_block = out_chs, first_block + n
        self.layer1 = shared[0]
        # ImageNet models share layer2; CIFAR models have one per expert, under experts.{e}.layer2.
        self.layer2: Optional[nn.Sequential] = shared[1] if num_shared > 1 else None
        self.experts = nn.ModuleList(
            [
                nn.Sequential(
                    OrderedDict(
                        (name, _make_stage(blk, c, p, n, s, drop_path_rates=r, **stage_kwargs))
                        for name, blk, c, p, n, s, r in expert_stages
                    )
                )
                for _ in range(num_experts)
            ]
        )
        self.expert_dim = in_chs
        self.num_features = self.head_hidden_size = in_chs * num_experts

        self.global_pool = self._make_pool(global_pool, num_classes)
        self.head_drop = nn.Dropout(drop_rate)
        self.heads = nn.ModuleList([self._make_head(num_classes) for _ in range(num_experts)])
        self.router = self._make_router(num_classes)
        self._init_weights(stem)
        self._update_trainable()

    # ----------------------------------------------------------------------------------------- building
    def _make_pool(self, global_pool: str, num_classes: int) -> SelectAdaptivePool2d:
        if global_pool not in ("avg", ""):
            raise ValueError(
                f"global_pool must be 'avg' or '' (the router reads averaged features); got {global_pool!r}"
            )
        if not global_pool and num_classes:
            raise ValueError(
                "global_pool='' (no pooling) needs num_classes=0: the classifiers need pooled features"
            )
        return SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.use_norm:
            return NormedLinear(self.expert_dim, num_classes, scale=self.scale)
        return nn.Linear(self.expert_dim, num_classes)

    def _make_router(self, num_classes: int) -> ExpertRouter:
        top_k = min(self.router_top_k, num_classes) if num_classes > 0 else self.router_top_k
        return ExpertRouter(self.num_experts, self.expert_dim, top_k)

    def _init_weights(self, stem: str) -> None:
        # The official initialisations: CIFAR ResNets use Kaiming-normal (fan-in) on every conv and linear
        # layer, the ImageNet ResNets normal(0, sqrt(2 / (k * k * out_channels))), i.e. fan-out. BN: 1, 0.
        # The router keeps PyTorch's default init, as in the official ImageNet EA models.
        for name, m in self.named_modules():
            if name.startswith("router"):
                continue
            if isinstance(m, nn.Conv2d):
                mode = "fan_in" if stem == "cifar" else "fan_out"
                nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            elif isinstance(m, nn.Linear) and stem == "cifar":
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^conv1|^bn1",
            blocks=[
                (r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)", None),
                (r"^experts\.\d+\.layer(\d+)" if coarse else r"^experts\.\d+\.layer(\d+)\.(\d+)", None),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (as timm's
        ``checkpoint_seq``, but batch norm's running statistics move once per step, not again in the
        recomputation), in ``forward`` and ``forward_intermediates`` alike. It acts only where autograd
        records: under ``torch.no_grad`` or inference mode the forward is the one without it (in eval mode,
        batch norm folded), and in eval mode the outputs are the same as without it."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fused_experts(self, enable: Optional[bool] = True) -> None:
        """Run the experts in one pass (grouped convolutions, True), one by one (False), or pick per call
        (None, the default: :func:`~ride_models.models.fused_experts.fusing_pays`).

        Outputs, gradients and state dicts are the same (up to float summation order). Gradient
        checkpointing in training, TorchScript and stochastic depth in training always use the per-expert
        loop.
        """
        self.fused_experts = None if enable is None else bool(enable)

    @torch.jit.ignore
    def set_parallel_experts(self, enable: bool = True) -> None:
        """In training on the CPU, run the experts side by side, each in its own thread, wherever that
        applies (True, the default), or always one after the other (False).

        It applies where the experts would run one by one (:meth:`uses_fused_experts` is False: on the CPU,
        channels-last maps by default), autograd records, at least 2 intra-op threads are set
        (``torch.set_num_threads``) and nothing needs the modules called one by one (gradient
        checkpointing, hooks inside the experts, stochastic depth). The same outputs, gradients and
        running statistics up to float rounding. Its backward frees the experts' graphs: a second backward
        through the same forward (``retain_graph=True``) or a gradient of the gradient needs
        ``set_parallel_experts(False)``. Where the C library is glibc, importing ``ride_models`` sets malloc
        for these passes (one arena, freed memory kept for reuse) unless the user has chosen its settings or
        ``RIDE_MODELS_TUNE_MALLOC=0``; ``ride_models.models.parallel_experts`` says why.
        """
        self.parallel_experts = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.ModuleList:
        """The experts' classifiers (one per expert)."""
        return self.heads

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace every expert's classifier; the router is rebuilt untrained, as its inputs change."""
        self.global_pool = self._make_pool(
            self.global_pool.pool_type if global_pool is None else global_pool, num_classes
        )
        self.num_classes = num_classes
        self.heads = nn.ModuleList([self._make_head(num_classes) for _ in range(self.num_experts)])
        device = self.conv1.weight.device
        self.router = self._make_router(num_classes).to(device)
        # The new router is untrained: routing falls back to the default ("all" until it is fitted), and a
        # fixed k needs classifiers.
        if self._routing_mode == "router" or (num_classes <= 0 and self._routing_mode == "k"):
            self._routing_mode, self._routing_k = "auto", self.num_experts
        self._update_trainable()

    # ------------------------------------------------------------------------------------- routing API
    @property
    def routing(self) -> Union[str, int]:
        """Current routing: ``"all"``, ``"router"`` or the number k of experts every sample uses."""
        if self._use_router():
            return "router"
        return "all" if self._routing_k == self.num_experts else self._routing_k

    @torch.jit.ignore
    def set_routing(self, mode: Union[str, int, None], threshold: Optional[float] = None) -> None:
        """Choose how inference (eval mode) combines the experts.

        Args:
            mode: ``"all"`` (mean of every expert), ``"router"`` (the router decides per sample), an int k
                (the first k experts for everyone), or None (the default: ``"router"`` once the router has
                been trained, ``"all"`` before).
            threshold: Router probability above which a sample moves on to the next expert (default 0.5).
        """
        # Everything is checked before anything changes: a refused call leaves the setting as it was.
        threshold = self.routing_threshold if threshold is None else _check_threshold(threshold)
        k = _routing_int(mode)
        if mode is None or (isinstance(mode, str) and mode == "all"):
            setting = ("auto" if mode is None else "all"), self.num_experts
        elif isinstance(mode, str) and mode == "router":
            if self.num_classes <= 0:
                raise ValueError("routing needs classifier logits; this model has num_classes=0")
            if not self.router.is_trained:
                warnings.warn(
                    "set_routing('router') with an untrained router: its decisions are arbitrary "
                    "until stage 2 (train.py --stage router) has fitted it",
                    stacklevel=2,
                )
            setting = "router", self.num_experts
        elif k is not None:
            if not 1 <= k <= self.num_experts:
                raise ValueError(
                    f"routing k={k} is out of range: this model has {self.num_experts} experts, "
                    f"so k must be between 1 and {self.num_experts}"
                )
            if self.num_classes <= 0 and k < self.num_experts:
                raise ValueError(
                    f"routing k={k} needs classifier logits; this model has num_classes=0 and returns "
                    "the features of every expert"
                )
            setting = "k", k
        else:
            raise ValueError(
                f"unknown routing mode {mode!r}: expected 'all', 'router', None, or an int k with "
                f"1 <= k <= {self.num_experts}"
            )
        (self._routing_mode, self._routing_k), self.routing_threshold = setting, threshold

    @torch.jit.ignore
    @contextmanager
    def routing_scope(self, mode: Union[str, int, None], threshold: Optional[float] = None) -> Iterator[None]:
        """``set_routing(mode, threshold)`` for the duration of a ``with`` block, then back to the previous
        setting, the automatic default included (a router trained later is still picked up)."""
        saved = (self._routing_mode, self._routing_k, self.routing_threshold)
        try:
            self.set_routing(mode, threshold)
            yield
        finally:
            self._routing_mode, self._routing_k, self.routing_threshold = saved

    @torch.jit.ignore
    def set_expert_training(self, enable: bool = True) -> None:
        """In train mode, make ``forward`` return ``RIDEOutput(logits, expert_logits)`` (for the losses)."""
        self.expert_training = enable

    @torch.jit.ignore
    def set_router_training(self, enable: bool = True) -> None:
        """Switch between the two training stages of RIDE.

        Stage 1 (the default, ``enable=False``): the experts train, the router's parameters are frozen: the
        classification forward does not use them, and frozen parameters keep DistributedDataParallel and
        weight decay away from them. Stage 2 (``enable=True``): only the router trains, with
        :meth:`forward_router_train`; every other parameter is frozen and, in train mode, everything but the
        router stays in eval mode (batch norm uses its running statistics), as in the official EA stage.
        """
        self.router_training = enable
        self._update_trainable()
        self.train(self.training)

    def _update_trainable(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("router.") == self.router_training)

    def train(self, mode: bool = True) -> "RIDEResNet":
        # A switch of mode is where weights changed outside PyTorch's view (CUDA-graph replays, ``.data``)
        # are about to be evaluated: the batch-norm folds kept from the last eval forward are dropped.
        forget_folded_weights()
        super().train(mode)
        if mode and self.router_training:
            for name, child in self.named_children():
                if name != "router":
                    child.eval()
        return self

    def _use_router(self) -> bool:
        return self._routing_mode == "router" or (self._routing_mode == "auto" and self.router.is_trained)

    # ------------------------------------------------------------------------------------------ forward
    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared trunk: stem and shared stages. ``[B, in_chans, H, W]`` -> ``[B, C_s, H', W']``."""
        _check_input(x, self.in_chans, self.conv1.weight)
        if not torch.jit.is_scripting() and self._fold_trunk(x):
            return self._folded_shared(x)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if not torch.jit.is_scripting() and self._checkpointing():
            x = checkpoint_blocks(self.layer1, x)
            if self.layer2 is not None:
                x = checkpoint_blocks(self.layer2, x)
        else:
            x = self.layer1(x)
            if self.layer2 is not None:
                x = self.layer2(x)
        return x

    def _expert_maps(self, x: torch.Tensor, num_experts: int) -> torch.Tensor:
        """The final maps of the first ``num_experts`` experts, concatenated: ``[B, k * D, h, w]``."""
        shared = self.forward_shared(x)
        if not torch.jit.is_scripting():
            if self.uses_fused_experts(shared):
                return self._fused_maps(shared, num_experts)
            if self._fold_experts(shared, num_experts):
                return torch.cat([self._run_expert(i, shared, True) for i in range(num_experts)], dim=1)
            if self._parallel(shared, num_experts):
                return parallel_expert_maps(shared, list(self.experts)[:num_experts])
        maps: List[torch.Tensor] = []
        for i, expert in enumerate(self.experts):
            if i < num_experts:
                if not torch.jit.is_scripting() and self._checkpointing():
                    maps.append(checkpoint_blocks(_blocks(expert), shared))
                else:
                    maps.append(expert(shared))
        return torch.cat(maps, dim=1)

    @torch.jit.unused
    def _parallel(self, shared: torch.Tensor, num_experts: int) -> bool:
        """Whether this forward runs the experts side by side (:meth:`set_parallel_experts`); asked only
        where they would otherwise run one by one."""
        if not self.parallel_experts or not self.training or isinstance(shared, torch.fx.Proxy):
            return False
        if self._checkpointing():
            return False
        experts = list(self.experts)[:num_experts]
        return parallelizing_pays(shared, num_experts) and can_fuse(experts, training=True)

    @torch.jit.unused
    def _checkpointing(self) -> bool:
        """Whether this forward runs with grad checkpointing: it is on and autograd records. Without a
        backward to come (``torch.no_grad``, inference mode) there is nothing to recompute, and the forward
        is the one without checkpointing, batch norm folded in eval mode included."""
        return self.grad_checkpointing and torch.is_grad_enabled()

    @torch.jit.unused
    def uses_fused_experts(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x`` in the model's current mode runs the experts in one pass: the choice of
        :meth:`set_fused_experts`, or with None (the default) the per-call choice for ``x``'s device and
        memory format (``fusing_pays``), where the pass computes what the loop computes (``can_fuse``) and
        gradient checkpointing does not apply. ``x``: the images (or the shared maps; the trunk keeps
        their device and memory format)."""
        if isinstance(x, torch.fx.Proxy):  # FX traces the per-expert modules (feature extraction names them)
            return False
        if self.training and self._checkpointing():  # checkpoint_blocks over the experts' modules
            return False
        enabled = self.fused_experts
        if enabled is None:
            channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            enabled = fusing_pays(list(self.experts), x.device.type, self.training, channels_last)
        return enabled and can_fuse(list(self.experts), self.training)

    def _can_fold(self, x: torch.Tensor, modules: List[nn.Module], weight: torch.Tensor) -> bool:
        """Whether ``modules`` (run one by one; ``weight``: one of their convolution weights) run with batch
        norm folded into the convolutions on this input: eval mode, ``fold_bn`` on, no FX tracing, where
        folding pays on the device (``folding_pays``: on CUDA, with cuDNN's fused epilogue) and
        ``can_fuse``'s conditions (no hooks inside: a hook must fire)."""
        if self.training or not self.fold_bn or isinstance(x, torch.fx.Proxy):
            return False
        return folding_pays(x, weight) and can_fuse(modules, training=False)

    @torch.jit.unused
    def _shared_stages(self) -> List[nn.Module]:
        return [self.layer1] if self.layer2 is None else [self.layer1, self.layer2]

    @torch.jit.unused
    def _fold_trunk(self, x: torch.Tensor) -> bool:
        modules = [self.conv1, self.bn1, self.act1, self.maxpool, *self._shared_stages()]
        return self._can_fold(x, modules, self.conv1.weight)

    @torch.jit.unused
    def _fold_experts(self, x: torch.Tensor, num_experts: int) -> bool:
        experts = list(self.experts)[:num_experts]
        return self._can_fold(x, experts, next(experts[0].parameters()))

    @torch.jit.unused
    def _folded_shared(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self._folded_stem_conv(x)))
        return folded_blocks(x, self._shared_stages(), self._checkpointing())

    @torch.jit.unused
    def _folded_stem_conv(self, x: torch.Tensor) -> torch.Tensor:
        return folded_conv_bn(x, self.conv1, self.bn1)

    @torch.jit.unused
    def _folded_stage(self, x: torch.Tensor, stage: nn.Module) -> torch.Tensor:
        return folded_blocks(x, [stage], self._checkpointing())

    @torch.jit.unused
    def _module_stage(self, x: torch.Tensor, stage: nn.Module) -> torch.Tensor:
        """A stage's modules on ``x``, each block checkpointed under grad checkpointing
        (``checkpoint_blocks``)."""
        return checkpoint_blocks(stage, x) if self._checkpointing() else stage(x)

    @torch.jit.unused
    def _run_expert(self, i: int, x: torch.Tensor, fold: bool) -> torch.Tensor:
        """Expert i's stages on ``x`` (its input maps): as modules, or with batch norm folded (``fold``)."""
        expert = self.experts[i]
        if fold:
            return folded_blocks(x, list(expert.children()), self._checkpointing())
        return checkpoint_blocks(_blocks(expert), x) if self._checkpointing() else expert(x)

    @torch.jit.unused
    def _fused_maps(self, shared: torch.Tensor, num_experts: int) -> torch.Tensor:
        experts = list(self.experts)[:num_experts]
        return fused_expert_stages(shared, experts, checkpoint=self._checkpointing(), fold=self.fold_bn)

    @torch.jit.unused
    def _fused_stage(self, x: torch.Tensor, name: str, shared_input: bool) -> torch.Tensor:
        return fused_expert_stages(
            x, list(self.experts), [name], shared_input, self._checkpointing(), fold=self.fold_bn
        )

    def _classify(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        """Expert logits ``[B, k, C]`` from the pooled features ``[B, D]`` of the first k experts."""
        logits: List[torch.Tensor] = []
        for i, head in enumerate(self.heads):
            if i < len(pooled):
                logits.append(head(self.head_drop(pooled[i])))
        return torch.stack(logits, dim=1)

    def _split_experts(self, pooled: torch.Tensor, num_experts: Optional[int] = None) -> List[torch.Tensor]:
        """``[B, k * D]`` -> k tensors ``[B, D]`` (slices rather than torch.split, which FX cannot unpack)."""
        d = self.expert_dim
        k = self.num_experts if num_experts is None else num_experts
        return [pooled[:, i * d : (i + 1) * d] for i in range(k)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's final feature map, concatenated along channels: ``[B, E * D, h, w]``."""
        return self._expert_maps(x, self.num_experts)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, classify with each expert's head and average: ``[B, E * D, h, w]`` -> ``[B, C]``.

        With ``pre_logits=True`` (or ``num_classes=0``) returns the pooled features ``[B, E * D]``.
        """
        x = self.global_pool(x)
        if pre_logits or self.num_classes <= 0:
            return x
        return self._classify(self._split_experts(x)).mean(dim=1)

    def forward_experts(self, x: torch.Tensor, num_experts: Optional[int] = None) -> torch.Tensor:
        """Logits of every expert (or of the first ``num_experts``): ``[B, E, C]``, already scaled by s."""
        if self.num_classes <= 0:
            raise RuntimeError("forward_experts needs classifiers; this model has num_classes=0")
        k = self.num_experts if num_experts is None else num_experts
        if k < 1 or k > self.num_experts:
            raise ValueError(f"num_experts={k} is out of range: this model has {self.num_experts} experts")
        return self._classify(self._split_experts(self.global_pool(self._expert_maps(x, k)), k))

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, RIDEOutput]:
        """``[B, C]`` logits; in train mode with ``set_expert_training(True)``, a :class:`RIDEOutput`.

        In eval mode the routing set by :meth:`set_routing` applies; training always uses every expert.
        Every path checks the input in :meth:`forward_shared`.
        """
        if not self.training and self.num_classes > 0:
            if self._use_router():
                if torch.jit.is_scripting():
                    raise RuntimeError(
                        "routed inference does not run under TorchScript; call model.set_routing('all') "
                        "(or an int k) before torch.jit.script"
                    )
                return self.forward_routed(x)[0]
            if self._routing_k < self.num_experts:
                return self.forward_experts(x, self._routing_k).mean(dim=1)
        features = self.forward_features(x)
        if self.training and self.expert_training and self.num_classes > 0:
            expert_logits = self._classify(self._split_experts(self.global_pool(features)))
            return RIDEOutput(expert_logits.mean(dim=1), expert_logits)
        return self.forward_head(features)

    # ---------------------------------------------------------------------------------- router paths
    @torch.jit.unused
    def route(self, x: torch.Tensor, threshold: Optional[float] = None) -> RoutedOutput:
        """Routed inference (the official EA cascade): later experts run only for samples that continue.

        Every sample uses expert 0. Before expert i (i >= 1) runs, decision i-1 looks at the samples still
        active; those whose router probability is above ``threshold`` run expert i, the others stop. The
        prediction is the mean of the logits of the experts a sample used.
        """
        if self.num_classes <= 0:
            raise RuntimeError("routed inference needs classifiers; this model has num_classes=0")
        if isinstance(x, torch.fx.Proxy) or is_exporting():
            raise RuntimeError(
                "routed inference cannot be traced with FX or exported with torch.export (how many samples "
                "go on depends on the data); call model.set_routing('all') (or an int k) before tracing or "
                "exporting"
            )
        threshold = self.routing_threshold if threshold is None else _check_threshold(threshold, closed=True)
        shared = self.forward_shared(x)
        fold = self._fold_experts(shared, self.num_experts)
        batch = shared.shape[0]
        active = torch.arange(batch, device=shared.device)  # indices of the samples still routed on
        features = self.global_pool(self._run_expert(0, shared, fold))  # [n_active, D]
        running_sum = self.heads[0](features)  # [n_active, C], sum of the logits of the experts used so far
        logit_sum = running_sum.clone()  # [B, C]
        num_experts = torch.ones(batch, dtype=torch.long, device=shared.device)
        router_logits = running_sum.new_full((batch, self.num_experts - 1), float("nan"))
        for i in range(1, self.num_experts):
            z = self.router.decision(i - 1, features, running_sum / i)  # [n_active]
            router_logits[active, i - 1] = z.to(router_logits.dtype)  # bf16 under autocast, like the heads
            # One host synchronisation per decision: nonzero() must learn how many samples go on.
            keep = (torch.sigmoid(z) > threshold).nonzero().squeeze(1)  # positions within the active samples
            if keep.numel() == 0:
                break
            active = active.index_select(0, keep)
            features = self.global_pool(self._run_expert(i, _rows(shared, active), fold))
            running_sum = running_sum.index_select(0, keep) + self.heads[i](features)
            logit_sum[active] = running_sum
            num_experts[active] += 1
        return RoutedOutput(
            logit_sum / num_experts.unsqueeze(1).to(logit_sum.dtype), num_experts, router_logits
        )

    @torch.jit.unused
    def forward_routed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Routed prediction ``[B, C]`` and the number of experts each sample used ``[B]`` (int64)."""
        out = self.route(x)
        return out.logits, out.num_experts

    @torch.jit.unused
    def forward_router_train(
        self, x: torch.Tensor, target: Optional[torch.Tensor] = None
    ) -> RouterTrainOutput:
        """The router's training path (stage 2): every expert on every sample, every decision taken.

        Returns the mean logits ``[B, C]``, the router logits ``[B, E-1]`` and, given ``target`` ``[B]``,
        the help targets ``[B, E-1]`` of the paper's equation 5 as the official code builds them:
        decision i should send a sample on when the mean of experts 0..i gets it wrong and some later
        running mean (experts 0..j, j > i) gets it right.
        """
        if self.num_classes <= 0:
            raise RuntimeError("the router's training path needs classifiers; this model has num_classes=0")
        if self.num_experts < 2:
            raise RuntimeError("a single-expert model has no routing decisions to train")
        pooled = self._split_experts(self.global_pool(self._expert_maps(x, self.num_experts)))
        expert_logits = self._classify(pooled)  # [B, E, C]
        running_sum = expert_logits[:, 0]
        sums = [running_sum]
        for i in range(1, self.num_experts):
            running_sum = running_sum + expert_logits[:, i]
            sums.append(running_sum)
        router_logits = torch.stack(
            [self.router.decision(i, pooled[i], sums[i] / (i + 1)) for i in range(self.num_experts - 1)],
            dim=1,
        )
        help_targets = None
        if target is not None:
            check_target(target, x.shape[0], self.num_classes)
            correct = torch.stack([s.argmax(dim=1) == target for s in sums], dim=1)  # [B, E]
            # Suffix "any" over later experts: later[:, i] = correct[:, i+1:].any(1).
            later = correct.flip(1).cumsum(1).flip(1).gt(0)[:, 1:]
            help_targets = ~correct[:, :-1] & later
        return RouterTrainOutput(running_sum / self.num_experts, router_logits, help_targets)

    # ------------------------------------------------------------------------------ feature extraction
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's intermediate-feature API. Levels: stem, then each stage; an expert stage's level is the
        experts' maps concatenated along channels (``feature_info`` gives the widths)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        _check_input(x, self.in_chans, self.conv1.weight)
        take, max_index = _take_indices(len(self.feature_info), indices)
        intermediates = []
        # The same computation as forward_features: batch norm folded where that runs folded.
        fold = not torch.jit.is_scripting() and self._fold_trunk(x)
        if fold:
            x = self.act1(self._folded_stem_conv(x))
        else:
            x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take:
            intermediates.append(x)
        x = self.maxpool(x)
        level = 0
        shared_stages = self._shared_stages()
        for stage in shared_stages:
            level += 1
            if stop_early and level > max_index:
                break
            x = self._folded_stage(x, stage) if fold else self._module_stage(x, stage)
            if level in take:
                intermediates.append(x)
        fused = not torch.jit.is_scripting() and self.uses_fused_experts(x)
        fold = not fused and not torch.jit.is_scripting() and self._fold_experts(x, self.num_experts)
        stage_names = [name for name, _ in self.experts[0].named_children()]
        maps = [x] * self.num_experts
        for j, name in enumerate(stage_names):
            level += 1
            if stop_early and level > max_index:
                break
            if fused:
                x = self._fused_stage(x, name, shared_input=j == 0)
            else:
                maps = [
                    self._folded_stage(m, expert[j]) if fold else self._module_stage(m, expert[j])
                    for expert, m in zip(self.experts, maps)
                ]
                x = torch.cat(maps, dim=1)
            if level in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last requested feature level (and the heads)."""
        take, max_index = _take_indices(len(self.feature_info), indices)
        num_shared = 1 if self.layer2 is None else 2
        if max_index < 1:
            self.layer1 = nn.Sequential()
        if max_index < 2 and self.layer2 is not None:
            self.layer2 = nn.Sequential()
        for j in range(len(self.experts[0])):
            if num_shared + 1 + j > max_index:
                for expert in self.experts:
                    expert[j] = nn.Sequential()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    # -------------------------------------------------------------------------------- state dict checks
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, with an explanation when a strict load would fail: which
        architecture, expert count or class count the state dict is for, and which keys differ."""
        if strict:
            problem = _describe_mismatch(self, state_dict)
            if problem:
                raise RuntimeError(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def require_ride_model(model: nn.Module, name: Optional[str] = None) -> None:
    """Raise a ValueError naming what to use instead if ``model`` (called ``name``) is not a RIDE model."""
    missing = [a for a in ("num_experts", "route", "set_routing") if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"{name or type(model).__name__} is not a RIDE model (it has no {', '.join(missing)}); "
            "experts, routing and their metrics need a ride_* model: one of timm.list_models('ride_*')"
        )


# ---------------------------------------------------------------------------------------------------------
# State-dict inspection (shared by load_state_dict and ride_models.convert)

_FAMILIES = {
    # (stem kernel, bottleneck, grouped, blocks per stage) -> family
    (3, False, False, (5, 5, 5)): "resnet32",
    (7, False, False, (1, 1, 1, 1)): "resnet10",
    (7, True, False, (3, 4, 6, 3)): "resnet50",
    (7, True, True, (3, 4, 6, 3)): "resnext50",
}


def summarize_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    """What a state dict in our layout is for: ``family``, ``num_experts`` and ``num_classes``.

    ``family`` is ``"resnet32"``, ``"resnet10"``, ``"resnet50"``, ``"resnext50"`` or a description of the
    blocks when it is none of them; entries are None where the state dict does not say.
    """
    stem = state_dict.get("conv1.weight")
    experts = {int(m.group(1)) for k in state_dict if (m := re.match(r"experts\.(\d+)\.", k))}
    blocks: Dict[int, set] = {}
    for k in state_dict:
        m = re.match(r"(?:experts\.0\.)?layer(\d+)\.(\d+)\.", k)
        if m and (not k.startswith("experts.") or k.startswith("experts.0.")):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    layout = tuple(len(blocks[i]) for i in sorted(blocks))
    bottleneck = "layer1.0.conv3.weight" in state_dict
    conv2 = state_dict.get("layer1.0.conv2.weight")
    grouped = conv2 is not None and conv2.ndim == 4 and conv2.shape[1] != conv2.shape[0]
    family = None
    if stem is not None and stem.ndim == 4:
        key = (stem.shape[-1], bottleneck, grouped, layout)
        family = _FAMILIES.get(key) or (
            f"{'bottleneck' if bottleneck else 'basic'}-block ResNet with blocks {list(layout)} "
            f"and a {stem.shape[-1]}x{stem.shape[-1]} stem"
        )
    head = state_dict.get("heads.0.weight")
    return dict(
        family=family,
        num_experts=len(experts) or None,
        num_classes=int(head.shape[0]) if head is not None and head.ndim == 2 else None,
    )


def _list_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def architecture_differences(
    given: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]
) -> List[Tuple[str, Any, Any]]:
    """``(what, given, expected)`` for the family, expert count and class count where two state dicts in
    our layout differ (only what ``given`` says is compared)."""
    a, b = summarize_state_dict(given), summarize_state_dict(expected)
    fields = (("family", "architecture"), ("num_experts", "experts"), ("num_classes", "classes"))
    return [(label, a[f], b[f]) for f, label in fields if a[f] is not None and a[f] != b[f]]


def key_differences(given: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> List[str]:
    """Lines listing the missing and unexpected keys and the shape mismatches of ``given``; [] if none."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: given {tuple(given[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and hasattr(given[k], "shape") and tuple(given[k].shape) != tuple(v.shape)
    ]
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_list_keys(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_list_keys(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {_list_keys(shapes, 6)}")
    return lines


def _describe_mismatch(model: RIDEResNet, state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    from ride_models.convert import is_official_state_dict

    own = model.state_dict()
    keys = key_differences(state_dict, own)
    if not keys:
        return None
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    if is_official_state_dict(state_dict):
        return (
            f"this state dict is in the official RIDE layout; convert it first: "
            f"ride_models.convert.convert_official_state_dict(state_dict, {name!r})"
        )
    lines = [f"the state dict does not fit {name}."]
    for label, given, expected in architecture_differences(state_dict, own):
        lines.append(f"  {label}: the state dict has {given}, the model has {expected}")
        if label == "classes":
            lines.append(
                f"  create the model with num_classes={given}, or load with strict=False "
                f"after dropping the heads.* and router.* keys to fine-tune a new head"
            )
    return "\n".join(lines + keys)


# ---------------------------------------------------------------------------------------------------------
# Creation, pretrained configs and registration


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: RIDEResNet) -> Dict[str, torch.Tensor]:
    """Prepare a checkpoint for ``model`` (timm's pretrained loading): unwrap training checkpoints, rename
    the official layout, and drop the router whenever the classifiers are not loaded (its inputs are the
    old classifiers' logits).

    timm then adapts the first convolution to ``in_chans`` and drops the classifiers when ``num_classes``
    differs from the pretrained config's, official files included.
    """
    from ride_models.convert import convert_to_model, is_official_state_dict, official_to_our_keys

    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    cfg_classes = getattr(model, "pretrained_cfg", {}).get("num_classes", model.num_classes)
    timm_drops_heads = model.num_classes != cfg_classes
    if is_official_state_dict(state_dict):
        ours = official_to_our_keys(state_dict, model)
        conv = ours.get("conv1.weight")
        if not timm_drops_heads and (conv is None or conv.shape[1] == model.in_chans):
            return convert_to_model(state_dict, model)  # the whole file loads: converted with every check
        state_dict = ours
    head = state_dict.get("heads.0.weight")
    if head is None:
        return state_dict
    if timm_drops_heads and head.shape[0] == model.num_classes:
        warnings.warn(
            f"the classifiers of these weights fit num_classes={model.num_classes}, but timm drops them "
            f"because the pretrained config says {cfg_classes}; to keep them, add "
            f"num_classes={model.num_classes} to pretrained_cfg_overlay",
            stacklevel=2,
        )
    if timm_drops_heads or head.shape[0] != model.num_classes:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("router.")}
    return state_dict


def _create_ride_resnet(variant: str, pretrained: bool = False, **kwargs) -> RIDEResNet:
    tag = kwargs.get("pretrained_cfg")
    if isinstance(tag, str):  # timm passes the tag of "name.tag" here
        known = known_tags(variant)
        if tag not in known:
            raise RuntimeError(
                f"unknown pretrained tag {tag!r} for {variant}; known tags: {', '.join(known) or 'none'} "
                f"(timm.list_pretrained('{variant}.*'))"
            )
    if kwargs.get("features_only") and kwargs.get("feature_cls", "getter") not in ("getter", None):
        raise ValueError(
            f"feature_cls={kwargs['feature_cls']!r} is not supported: an expert stage's feature level is the "
            "experts' maps concatenated, which no single module outputs (hooks and FX need one); use the "
            "default feature_cls='getter' (forward_intermediates)"
        )
    num_levels = len(kwargs["layers"]) + 1
    try:
        return build_model_with_cfg(
            RIDEResNet,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(num_levels))),
            **kwargs,
        )
    except OSError as error:  # no network and not in the cache (huggingface_hub's errors are OSErrors)
        if not pretrained:
            raise
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        if overlay.get("file"):
            path = os.fspath(overlay["file"])
            reason = "is not a file" if os.path.exists(path) else "does not exist"
            raise FileNotFoundError(
                f"the weights file given as pretrained_cfg_overlay=dict(file={path!r}) {reason}"
                + (f": {error}" if str(error) else "")
            ) from error
        name = f"{variant}.{tag}" if isinstance(tag, str) else variant
        cfg = get_pretrained_cfg(name)  # registered: the variant exists and the tag was checked above
        raise RuntimeError(
            f"the pretrained weights of {name} could not be loaded from {cfg.hf_hub_id}: {error}\n"
            f"Without a network, put model.safetensors from https://huggingface.co/{cfg.hf_hub_id} into the "
            "Hugging Face cache on this machine, or pass pretrained_cfg_overlay=dict(file='/path/to/"
            "model.safetensors') (from the command line: the file as train.py --initial-checkpoint or "
            f"validate.py --checkpoint, without --pretrained); the official checkpoint ({cfg.origin_url}) "
            "converts with python -m ride_models.hub convert"
        ) from error


def _cfg(num_experts: int, **kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": tuple(f"heads.{i}" for i in range(num_experts)),
        "license": "mit",
        "paper_ids": "arXiv:2010.01809",
        "paper_name": "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts",
        "origin_url": "https://github.com/frank-xwang/RIDE-LongTailRecognition",
        **kwargs,
    }


def _cifar_cfg(num_experts: int, **kwargs) -> Dict[str, Any]:
    cifar = dict(
        num_classes=100,
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        crop_pct=1.0,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
    )
    return _cfg(num_experts, **{**cifar, **kwargs})


HUB_ORG = "ride-models"  # the Hugging Face Hub organisation the published weights are pushed to


@dataclass(frozen=True)
class PublishedCheckpoint:
    """A checkpoint of the official model zoo (converted with ``python -m ride_models.hub convert``)."""

    dataset: str  # the benchmark, as the model card names it
    recipe: str  # how it was trained
    top1: float  # top-1 % on the benchmark's test set, as the official MODEL_ZOO reports it
    many: float
    medium: float
    few: float
    origin_url: str  # the official download
    routed: bool  # has a trained router (an EA checkpoint)


_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"
_DRIVE_FOLDER = "https://drive.google.com/drive/folders/{}?usp=sharing"
_CIFAR100_LT = "CIFAR-100-LT (imbalance ratio 100)"
# The official MODEL_ZOO.md (frank-xwang/RIDE-LongTailRecognition); the first tag of a model is its default.
PUBLISHED_CHECKPOINTS: Dict[str, PublishedCheckpoint] = {
    "ride_resnet32_3e.cifar100_lt_r100": PublishedCheckpoint(
        _CIFAR100_LT, "RIDE, 3 experts, with router", 48.6, 67.0, 49.9, 25.7,
        _DRIVE.format("1uE8I_2JcslWGPu4O0nAFEIk7iR_Sw5lS"), routed=True,
    ),
    "ride_resnet32_3e.cifar100_lt_r100_distill": PublishedCheckpoint(
        _CIFAR100_LT, "RIDE, 3 experts distilled from 6, with router", 49.0, 67.6, 50.9, 25.2,
        _DRIVE.format("1W-EICEpAavKzlnayiFPvb5cDyGCBl34l"), routed=True,
    ),
    "ride_resnet32_4e.cifar100_lt_r100_distill": PublishedCheckpoint(
        _CIFAR100_LT, "RIDE, 4 experts distilled from 6, with router", 49.4, 67.7, 51.3, 25.7,
        _DRIVE.format("11kyxcYIh3bXk3mn3Y8EENHcsx-Ld9PXH"), routed=True,
    ),
    "ride_resnet32_6e.cifar100_lt_r100": PublishedCheckpoint(
        _CIFAR100_LT, "RIDE, 6 experts (the distillation teacher), no router", 50.2, 69.3, 52.1, 25.8,
        _DRIVE.format("1kq8SaoHUujqIOplsKUNRpKM7UQR0qg-k"), routed=False,
    ),
    "ride_resnext50_3e.imagenet_lt": PublishedCheckpoint(
        "ImageNet-LT", "RIDE, 3 experts, with router", 55.7, 67.0, 52.2, 36.0,
        _DRIVE.format("1d4PHfWZ_rfTRDIJG5sogK1cO0BRoi9d9"), routed=True,
    ),
    "ride_resnext50_4e.imagenet_lt_distill": PublishedCheckpoint(
        "ImageNet-LT", "RIDE, 4 experts distilled from 6, with router", 56.8, 68.3, 53.5, 35.9,
        _DRIVE.format("1G3aT7YzEixb0mSQBpZpuUfTT3b9YsSbz"), routed=True,
    ),
    "ride_resnext50_6e.imagenet_lt": PublishedCheckpoint(
        "ImageNet-LT", "RIDE, 6 experts (the distillation teacher), no router", 57.5, 68.9, 54.3, 36.5,
        _DRIVE.format("1hJyMgbv0JSisXCiHpC1xcHhbGXJP8K8a"), routed=False,
    ),
    "ride_resnet50_3e.inat2018": PublishedCheckpoint(
        "iNaturalist 2018", "RIDE, 3 experts, with router", 71.2, 70.2, 71.2, 71.6,
        _DRIVE.format("1KVrKrQXsuzeeb2oFzjloEf2XrvIfb42u"), routed=True,
    ),
    "ride_resnet50_4e.inat2018_distill_200ep": PublishedCheckpoint(
        "iNaturalist 2018", "RIDE, 4 experts distilled from 6, router, 200 epochs", 73.2, 70.5, 73.7, 73.3,
        _DRIVE_FOLDER.format("1Kz-SwP6vRx7ktZhYWLmJLG6uprkj38vp"), routed=True,
    ),
    "ride_resnet50_4e.inat2018_distill": PublishedCheckpoint(
        "iNaturalist 2018", "RIDE, 4 experts distilled from 6, with router (fp16)", 72.6, 70.9, 72.5, 73.1,
        _DRIVE.format("1PdfWVQlsTjPFDr7bTFeUUskh2RA6Mb_r"), routed=True,
    ),
    "ride_resnet50_6e.inat2018_300ep": PublishedCheckpoint(
        "iNaturalist 2018", "RIDE, 6 experts, no router, 300 epochs", 74.6, 71.0, 75.7, 74.3,
        _DRIVE_FOLDER.format("1fyPJdgsLLTA7JE6uzUZmPanh1e1I8rKy"), routed=False,
    ),
    "ride_resnet50_6e.inat2018": PublishedCheckpoint(
        "iNaturalist 2018", "RIDE, 6 experts (the distillation teacher), no router", 72.9, 71.1, 72.9, 73.3,
        _DRIVE.format("1DtLlx3be7WCmtVzoGBSGCiImQDJNxHGJ"), routed=False,
    ),
}  # fmt: skip


def known_tags(variant: str) -> List[str]:
    """The registered pretrained tags of ``variant`` (``cifar100_lt_r100`` for ``ride_resnet32_3e``, ...)."""
    return sorted(name.split(".", 1)[1] for name in PUBLISHED_CHECKPOINTS if name.startswith(f"{variant}."))


_NUM_CLASSES = {_CIFAR100_LT: 100, "ImageNet-LT": 1000, "iNaturalist 2018": 8142}


def _published_cfg(name_tag: str, ckpt: PublishedCheckpoint) -> Dict[str, Any]:
    num_experts = int(name_tag.split(".")[0].rsplit("_", 1)[1].rstrip("e"))
    make = _cifar_cfg if name_tag.startswith("ride_resnet32") else _cfg
    return make(
        num_experts,
        hf_hub_id=f"{HUB_ORG}/{name_tag}",
        num_classes=_NUM_CLASSES[ckpt.dataset],
        origin_url=ckpt.origin_url,
        description=(
            f"{ckpt.recipe}, trained on {ckpt.dataset} by the RIDE authors; top-1 {ckpt.top1} "
            f"(many {ckpt.many} / medium {ckpt.medium} / few {ckpt.few}) in the official model zoo"
        ),
    )


_EXPERT_COUNTS = (2, 3, 4, 6)
_UNPUBLISHED = {
    **{f"ride_resnet32_{e}e": _cifar_cfg(e) for e in _EXPERT_COUNTS},
    **{
        f"ride_{arch}_{e}e": _cfg(e) for arch in ("resnet10", "resnet50", "resnext50") for e in _EXPERT_COUNTS
    },
}
_PUBLISHED_ARCHS = {name_tag.split(".")[0] for name_tag in PUBLISHED_CHECKPOINTS}
default_cfgs = generate_default_cfgs(
    {
        **{name_tag: _published_cfg(name_tag, ckpt) for name_tag, ckpt in PUBLISHED_CHECKPOINTS.items()},
        **{name: cfg for name, cfg in _UNPUBLISHED.items() if name not in _PUBLISHED_ARCHS},
    }
)

# Official widths with reduce_dimension=True: expert stages at 3/4 of the usual planes.
_RESNET32 = dict(
    block=BasicBlock, layers=(5, 5, 5), planes=(16, 24, 48), stem="cifar", shortcut="A", router_top_k=30
)
_RESNET10 = dict(block=BasicBlock, layers=(1, 1, 1, 1), planes=(64, 128, 192, 384), router_top_k=30)
_RESNET50 = dict(block=Bottleneck, layers=(3, 4, 6, 3), planes=(64, 128, 192, 384), router_top_k=50)
_RESNEXT50 = dict(_RESNET50, groups=32, base_width=4)


@register_model
def ride_resnet32_2e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-32 for 32x32 images (CIFAR-LT), 2 experts."""
    model_args = dict(_RESNET32, num_experts=2)
    return _create_ride_resnet("ride_resnet32_2e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet32_3e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-32 for 32x32 images (CIFAR-LT), 3 experts."""
    model_args = dict(_RESNET32, num_experts=3)
    return _create_ride_resnet("ride_resnet32_3e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet32_4e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-32 for 32x32 images (CIFAR-LT), 4 experts."""
    model_args = dict(_RESNET32, num_experts=4)
    return _create_ride_resnet("ride_resnet32_4e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet32_6e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-32 for 32x32 images (CIFAR-LT), 6 experts (the distillation teacher)."""
    model_args = dict(_RESNET32, num_experts=6)
    return _create_ride_resnet("ride_resnet32_6e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet10_2e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-10, 2 experts."""
    model_args = dict(_RESNET10, num_experts=2)
    return _create_ride_resnet("ride_resnet10_2e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet10_3e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-10, 3 experts."""
    model_args = dict(_RESNET10, num_experts=3)
    return _create_ride_resnet("ride_resnet10_3e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet10_4e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-10, 4 experts."""
    model_args = dict(_RESNET10, num_experts=4)
    return _create_ride_resnet("ride_resnet10_4e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet10_6e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-10, 6 experts (the distillation teacher)."""
    model_args = dict(_RESNET10, num_experts=6)
    return _create_ride_resnet("ride_resnet10_6e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet50_2e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-50, 2 experts."""
    model_args = dict(_RESNET50, num_experts=2)
    return _create_ride_resnet("ride_resnet50_2e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet50_3e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-50, 3 experts."""
    model_args = dict(_RESNET50, num_experts=3)
    return _create_ride_resnet("ride_resnet50_3e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet50_4e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-50, 4 experts."""
    model_args = dict(_RESNET50, num_experts=4)
    return _create_ride_resnet("ride_resnet50_4e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnet50_6e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNet-50, 6 experts (the distillation teacher)."""
    model_args = dict(_RESNET50, num_experts=6)
    return _create_ride_resnet("ride_resnet50_6e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnext50_2e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNeXt-50 32x4d, 2 experts."""
    model_args = dict(_RESNEXT50, num_experts=2)
    return _create_ride_resnet("ride_resnext50_2e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnext50_3e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNeXt-50 32x4d, 3 experts."""
    model_args = dict(_RESNEXT50, num_experts=3)
    return _create_ride_resnet("ride_resnext50_3e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnext50_4e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNeXt-50 32x4d, 4 experts."""
    model_args = dict(_RESNEXT50, num_experts=4)
    return _create_ride_resnet("ride_resnext50_4e", pretrained, **dict(model_args, **kwargs))


@register_model
def ride_resnext50_6e(pretrained: bool = False, **kwargs) -> RIDEResNet:
    """RIDE ResNeXt-50 32x4d, 6 experts (the distillation teacher)."""
    model_args = dict(_RESNEXT50, num_experts=6)
    return _create_ride_resnet("ride_resnext50_6e", pretrained, **dict(model_args, **kwargs))
