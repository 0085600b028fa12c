"""Images per second of RIDE training steps and inference: ours, the official code, and timm's ResNet-50.

    python benchmarks/throughput.py --device cpu --models ride_resnet32_4e --official-dir /path/to/RIDE \\
        --precision fp32 --json throughput.json

What is measured, on synthetic inputs created once on the device (speed does not depend on pixel values):

* ``train``: one optimisation step: ``zero_grad``, forward, loss, backward, ``optimizer.step()``. SGD with
  Nesterov momentum, with train.py's preset values (CIFAR: lr 0.1, momentum 0.9, weight decay 5e-4;
  ImageNet-LT: weight decay 2e-4). Our models train with ``set_expert_training(True)`` and the loss
  train.py builds for the preset (``ldam_diversity``); timm's ``resnet50`` with plain cross-entropy; the
  official models with the official ``RIDELoss``, its arguments and optimizer read from the official
  config (``configs/config_imbalance_cifar100_ride.json``, ``configs/config_imagenet_lt_*_ride.json``) and
  called as the official trainer calls it (``extra_info={"logits": ...}``; its per-step ``loss.item()``
  and accuracy metrics are left out, as they are of ours). The class counts are those of CIFAR-100-LT at
  ratio 100 (10,847 images) for CIFAR models and, for ImageNet models, the same exponential profile over
  1,000 classes from 1,280 to 5 images (a stand-in for ImageNet-LT's counts, which speed does not depend
  on). The losses are at ``--loss-epoch`` (default 1, before deferred re-weighting).
* ``infer``: eval mode under ``torch.inference_mode()``; our models with ``set_routing("all")``.
* ``routed``: routed inference (our ``set_routing("router", 0.5)``; the official EA models, whose cascade
  is fixed at 0.5), at given shares of samples sent on to each next expert. The realized experts per image
  and MACs per image (``ride_models.flops.count_macs(...).for_routing("router", num_experts)``, counted on
  an unfused copy of our model of the same architecture; timm models: torch's FLOP counter / 2) are
  reported next to images/s, with the same model's all-experts inference and timm's ``resnet50`` at the
  same precision.

How the routing shares are set. The routers are untrained in these runs, so their decisions would be
arbitrary. ``--route-shares 0.6,0.3`` means: 60 % of the samples continue after expert 1 and 30 % (of all
samples) after expert 2, so 40 % use 1 expert, 30 % use 2 and 30 % use 3. Our routing API has one
threshold for every decision, so the shares are set through the router's weights instead of per-decision
thresholds: in every decision's hidden layer two units are made constant (weights zeroed), the shared
output layer weighs them +1 and -1, and their biases (max(o_i, 0) and max(-o_i, 0)) add an offset o_i of
its own to decision i's logit; the threshold stays 0.5 (logit 0). The offsets are chosen on the measured
batch, decision by decision, from the logits the routed cascade itself computes (captured at the shared
output layer, ours and official alike): with the earlier decisions set, o_i is placed midway between the
n-th and (n+1)-th largest logits of the samples that reach decision i, n being the requested share of the
batch (rounded to whole samples). The same method sets the official EA models, so both cascades route the
same samples. The shared output layer is also scaled by 1e4 and, under bf16 autocast, each decision runs
in float32 (a wrapper around our ``router.decision`` and the official ``pred_expert_help``): the untrained
routers' logits differ between samples by about 1e-3 around a common value near 0.5, below bf16's
resolution, and bf16's sigmoid rounds anything within 0.008 of 0 to exactly 0.5, so without these the bf16
cascades stop every sample. The wrapper costs a few tiny kernels. The realized shares (from the experts
each sample used in a routed call after calibration) are reported; ties can move them by a sample.

"Paper" shares (``--route-shares paper``, the default) reproduce the paper's routed cost: the ratio of
the paper's routed MACs to the all-experts MACs of the official counter (ResNet-32: 64.8 / 75.6,
77.8 / 101.3, 91.9 / 126.9 M for 2 / 3 / 4 experts; ResNet-50: 3.71 / 4.47, 4.36 / 5.80, 5.15 / 7.12 G)
is applied to our ``count_macs`` all-experts cost, and the shares solve
``sum_k p_k per_image(k) = ratio * all_experts``, where the share continuing at every decision is the same
fraction q of the samples that reached it (shares q, q^2, ...: one equation, one unknown). Families the
paper gives no routed cost for (ResNet-10, ResNeXt-50) are skipped with a note.

Timing: cudnn.benchmark on GPU; ``--warmup`` iterations first (at least 1; compilation included), then
``--repeats`` rounds; in each round every case runs ``--iters`` iterations (or as many as fill
``--seconds``), with ``torch.cuda.synchronize()`` before and after on GPU. The rounds interleave all
cases, so drift of a shared machine spreads over all of them; images/s is the median over the rounds, and
a ratio between two rows is the median of the ratios of their rounds (each pair ran moments apart, so the
machine's drift between rounds cancels). Ratios compare rows of the same mode, batch, precision and memory
format measured in this process: ours / official of the same family and expert count, and against timm's
``resnet50`` for 224x224 models. With ``--shipped-official``, the official code is also measured as it
ships (fp32, contiguous NCHW: it has no autocast and no channels-last option), and each of our rows gets
a second ratio, "ours / official as shipped", against that row of the same mode and batch: what a user
gains by switching, our fast path (channels-last, bf16, CUDA graphs) included.

``--compile`` compiles our models and timm's (which a timm user compiles with ``--torchcompile``), not
the official ones, which have no such option; only ours take ``--fused/--no-fused``. Routed inference is
compiled with dynamic shapes (its batch after each routing decision depends on the data; a graph break at
each decision, where the cascade reads how many samples go on). The official EA models print on every
forward: that output goes to /dev/null, its cost (and its host syncs) stays in the measurement. The official
code is imported from ``--official-dir`` at run time (it needs pandas; nothing of it is copied here).
Work-arounds applied to it at run time: its ``RIDELoss`` calls ``.cuda()`` in its constructor, which is made
a no-op on CPU; its ImageNet EA cascade (``EAResNet``) builds uint8 masks that current PyTorch rejects, so
``uint8`` is read as ``bool`` inside that one module (the semantics old PyTorch gave them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ride_models
from ride_models.cuda_graph import GraphedRouting, GraphedTrainStep
from ride_models.data.sampling import long_tail_counts
from ride_models.engine import make_step
from ride_models.flops import count_macs
from ride_models.models.fused_experts import cudnn_epilogue
from ride_models.models.parallel_experts import parallelizing_pays
from ride_models.training import build_loss, build_optimizer, check_device, parse_args, resolve_defaults

# The paper's MACs per image with the router and the official counter's all-experts MACs (anchors README).
PAPER_ROUTED_MACS: Dict[Tuple[str, int], Tuple[float, float]] = {
    ("resnet32", 2): (64.8e6, 75.6e6),
    ("resnet32", 3): (77.8e6, 101.3e6),
    ("resnet32", 4): (91.9e6, 126.9e6),
    ("resnet50", 2): (3.71e9, 4.47e9),
    ("resnet50", 3): (4.36e9, 5.80e9),
    ("resnet50", 4): (5.15e9, 7.12e9),
}
# Our family -> the official model class, its EA class and the official configs its arguments come from.
OFFICIAL = {
    "resnet32": ("ResNet32Model", "ResNet32EAModel", "config_imbalance_cifar100_ride"),
    "resnet10": ("ResNet10Model", "ResNet10EAModel", "config_imagenet_lt_resnet10_ride"),
    "resnet50": ("ResNet50Model", "ResNet50EAModel", "config_imagenet_lt_resnet50_ride"),
    "resnext50": ("ResNeXt50Model", "ResNeXt50EAModel", "config_imagenet_lt_resnext50_ride"),
}
BASELINE = "resnet50"
ROW_KEYS = (
    "label", "impl", "model", "family", "num_experts", "mode", "routing", "route_shares", "batch",
    "precision", "channels_last", "compiled", "fused", "parallel_experts", "fold_bn", "cudnn_epilogue",
    "cuda_graph",
    "images_per_s", "ms_per_iter", "images_per_s_rounds", "iters_per_round", "macs_per_image",
    "experts_per_image", "realized_shares",
    "profile", "ratio_vs_official", "ratio_vs_official_shipped", "ratio_vs_all_experts", "ratio_vs_resnet50",
    "device",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Images/s of RIDE training steps and inference: ours, the official code, timm resnet50.",
        epilog="Method (routing shares, timing, work-arounds): the docstring of benchmarks/throughput.py.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=["ride_resnet32_4e", "ride_resnet50_3e"],
        help="our ride_* models and/or timm models (default: ride_resnet32_4e ride_resnet50_3e)",
    )
    p.add_argument(
        "--baseline",
        default=BASELINE,
        help="timm model added when a 224x224 RIDE model is measured ('none' to skip; default resnet50)",
    )
    p.add_argument(
        "--official-dir", default="", help="a copy of the official RIDE repository to compare with"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument(
        "--modes", nargs="+", default=["train", "infer", "routed"], choices=["train", "infer", "routed"]
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="batch for every mode (overrides the defaults)"
    )
    p.add_argument("--train-batch-size", type=int, default=None, help="default 128 (CIFAR), 256 (ImageNet)")
    p.add_argument("--infer-batch-size", type=int, default=None, help="default 256")
    p.add_argument(
        "--precision",
        nargs="+",
        default=None,
        choices=["fp32", "bf16"],
        help="fp32 and/or bf16 (torch.autocast); default fp32 on CPU, both on GPU",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on for bf16, off for fp32, as in the anchors)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile our models (training, all-experts and routed inference) and timm's",
    )
    p.add_argument(
        "--fused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="our models: model.set_fused_experts(True/False) (default: the library's choice per call)",
    )
    p.add_argument(
        "--fused-both",
        action="store_true",
        help="our models: a row with the experts fused, one with them run one by one (their modules called) "
        "and one with the library's choice (auto)",
    )
    p.add_argument(
        "--parallel-both",
        action="store_true",
        help="our training rows on the CPU: also a row with the experts run one after the other "
        "(set_parallel_experts(False)) beside the default, side by side in threads where they run one by one",
    )
    p.add_argument(
        "--unfolded",
        action="store_true",
        help="our inference and routed rows: also a row with batch norm not folded into the convolutions "
        "(fold_bn=False: the modules' own computation), to show what folding gives",
    )
    p.add_argument(
        "--plain-epilogue",
        action="store_true",
        help="our inference and routed rows on CUDA: also a row without cuDNN's fused epilogue "
        "(cudnn_epilogue(False)), as the library then runs: batch norms as modules where blocks run one by "
        "one (folding pays on CUDA only with the epilogue), folded with bias, ReLU and the shortcut's add "
        "as separate operators in the experts' fused pass",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="add rows replayed as CUDA graphs: our CIFAR training steps (the whole step, "
        "ride_models.cuda_graph.GraphedTrainStep) and our routed inference (bucketed, GraphedRouting); "
        "CUDA only",
    )
    p.add_argument(
        "--shipped-official",
        action="store_true",
        help="with --official-dir: also measure the official code as it ships (fp32, contiguous NCHW: it "
        "has no autocast and no channels-last option) and give each of our rows its ratio to that",
    )
    p.add_argument(
        "--route-shares",
        nargs="+",
        default=["paper"],
        metavar="SPEC",
        help="for routed mode: 'paper', comma-separated shares continuing after experts 1, 2, ... "
        "(e.g. 0.6,0.3), or 'none'; several specs give several rows",
    )
    p.add_argument("--warmup", type=int, default=3, help="warm-up iterations per case")
    p.add_argument("--iters", type=int, default=None, help="iterations per round (default: fill --seconds)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per case per round without --iters")
    p.add_argument("--repeats", type=int, default=5, help="rounds; images/s is their median")
    p.add_argument("--loss-epoch", type=int, default=1, help="epoch the losses are set to (DRW after 160/80)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile N iterations of every case (torch.profiler) and report the operators "
        "taking the most time (GPU time on CUDA, CPU time on the CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", metavar="OUT", help="write the machine and every row to OUT")
    return p


# ------------------------------------------------------------------------------------------------ models
@dataclass
class ModelSpec:
    name: str  # our registry name or a timm model name
    impl: str  # "ours" or "timm"
    family: Optional[str]  # resnet32 / resnet10 / resnet50 / resnext50 for RIDE models
    num_experts: Optional[int]
    input_size: Tuple[int, int, int]
    num_classes: int

    @property
    def cifar(self) -> bool:
        return self.family == "resnet32"


def model_spec(name: str) -> ModelSpec:
    if name not in timm.list_models():
        raise SystemExit(f"unknown model {name!r}: not registered in timm (ours: timm.list_models('ride_*'))")
    if name.startswith("ride_"):
        family, experts = name[len("ride_") :].rsplit("_", 1)
        num_classes = 100 if family == "resnet32" else 1000
        input_size = (3, 32, 32) if family == "resnet32" else (3, 224, 224)
        return ModelSpec(name, "ours", family, int(experts.rstrip("e")), input_size, num_classes)
    cfg = timm.get_pretrained_cfg(name)
    input_size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    return ModelSpec(name, "timm", None, None, input_size, 1000)


def preset_args(spec: ModelSpec) -> argparse.Namespace:
    """train.py's resolved flags for this model's benchmark (CIFAR-100-LT or ImageNet-LT preset)."""
    dataset = "cifar100_lt" if spec.cifar else "imagenet_lt"
    return resolve_defaults(parse_args(["--model", spec.name, "--dataset", dataset]))


def class_counts(spec: ModelSpec) -> List[int]:
    if spec.cifar:
        return long_tail_counts(100, 500.0, 100)  # CIFAR-100-LT, ratio 100
    return long_tail_counts(spec.num_classes, 1280.0, 256)  # ImageNet-LT's range, exponential profile


def create_ours(spec: ModelSpec, fused: Optional[bool], fold_bn: bool = True) -> nn.Module:
    model = timm.create_model(spec.name, num_classes=spec.num_classes, fold_bn=fold_bn)
    if fused is not None:
        model.set_fused_experts(fused)
    return model


def fused_state(model: nn.Module) -> Optional[bool]:
    """Whether our model runs its experts fused (None: the library decides per call, ``fusing_pays``)."""
    state = getattr(model, "fused_experts", None)
    return state if isinstance(state, bool) else None


_WARNED: set = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def _note_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"note: {message}")


# ------------------------------------------------------------------------------------------- official code
class Official:
    """The official RIDE code, imported from a local copy at run time (never copied into this project)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).resolve()
        if not (self.root / "model" / "model.py").is_file():
            raise SystemExit(
                f"--official-dir {self.root}: no model/model.py there; expected a copy of "
                "frank-xwang/RIDE-LongTailRecognition"
            )
        sys.path.insert(0, str(self.root))
        try:
            self.models = importlib.import_module("model.model")
            self.losses = importlib.import_module("model.loss")
        except ModuleNotFoundError as error:
            raise SystemExit(
                f"importing the official RIDE code from {self.root} failed: it needs the Python module "
                f"{error.name!r}, which is not installed in this environment (pip install {error.name}); "
                "it is needed by this benchmark only, not by ride_models"
            ) from error
        self._patch_ea_masks()
        # Its LDAM margins use uint8 masks in torch.where: a deprecation warning on every step.
        warnings.filterwarnings("ignore", message="where received a uint8 condition", category=UserWarning)

    def _patch_ea_masks(self) -> None:
        # EAResNet builds uint8 masks, which current PyTorch refuses as masks: read uint8 as bool there only.
        module = sys.modules.get("model.fb_resnets.EAResNet")
        if module is not None and getattr(module, "torch", None) is torch:
            proxy = types.ModuleType("torch_with_bool_masks")
            proxy.__dict__.update(torch.__dict__)
            proxy.uint8 = torch.bool
            module.torch = proxy

    def config(self, family: str, ea: bool = False) -> Dict[str, Any]:
        name = OFFICIAL[family][2] + ("_ea" if ea else "")
        path = self.root / "configs" / f"{name}.json"
        with open(path) as f:
            return json.load(f)

    def create(self, spec: ModelSpec, ea: bool = False) -> nn.Module:
        config = self.config(spec.family, ea)
        cls = getattr(self.models, OFFICIAL[spec.family][1 if ea else 0])
        return cls(**{**config["arch"]["args"], "num_experts": spec.num_experts})

    def create_loss(self, spec: ModelSpec, counts: Sequence[int], device: torch.device) -> nn.Module:
        config = self.config(spec.family)
        loss_cls = getattr(self.losses, config["loss"]["type"])
        with _cuda_is_a_no_op(device):  # RIDELoss calls .cuda() in its constructor
            loss = loss_cls(cls_num_list=list(counts), **config["loss"]["args"])
        return loss.to(device)

    def optimizer(self, spec: ModelSpec, model: nn.Module) -> torch.optim.Optimizer:
        config = self.config(spec.family)["optimizer"]
        params = [p for p in model.parameters() if p.requires_grad]
        return getattr(torch.optim, config["type"])(params, **config["args"])


@contextlib.contextmanager
def _cuda_is_a_no_op(device: torch.device):
    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


# --------------------------------------------------------------------------------------------- routing
def paper_shares(spec: ModelSpec, macs) -> Optional[List[float]]:
    """Shares continuing after experts 1..E-1 (q, q^2, ...) that give our count the paper's routed saving."""
    paper = PAPER_ROUTED_MACS.get((spec.family, spec.num_experts))
    if paper is None:
        return None
    target = paper[0] / paper[1] * macs.all_experts

    def expected(q: float) -> float:
        shares = [1.0] + [q**i for i in range(1, spec.num_experts)] + [0.0]
        return sum((shares[k - 1] - shares[k]) * macs.per_image(k) for k in range(1, spec.num_experts + 1))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) < target else (lo, mid)
    q = (lo + hi) / 2
    return [q**i for i in range(1, spec.num_experts)]


def parse_share_spec(spec_text: str) -> Optional[List[float]]:
    """``'paper'`` -> None (derived per model); else the comma-separated shares."""
    if spec_text == "paper":
        return None
    try:
        shares = [float(s) for s in spec_text.split(",")]
    except ValueError:
        raise SystemExit(  # noqa: B904 (a usage error: the ValueError adds nothing)
            f"--route-shares: expected 'paper', 'none' or numbers like 0.6,0.3; got {spec_text!r}"
        )
    if any(not 0.0 <= s <= 1.0 for s in shares) or any(b > a for a, b in zip(shares, shares[1:])):
        raise SystemExit(f"--route-shares {spec_text}: shares must lie in [0, 1] and not increase")
    return shares


ROUTER_SCALE = 1e4  # router logits are multiplied by this, so bf16's sigmoid resolves the decisions


def set_router_shares(
    hidden: Sequence[nn.Linear],
    fc: nn.Linear,
    top_k: int,
    run_cascade: Callable[[], Any],
    batch: int,
    shares: Sequence[float],
) -> List[float]:
    """Shift each routing decision's logit so that ``shares[i]`` of the batch continues after expert i+1.

    ``hidden[i]``: decision i's hidden layer; ``fc``: the shared output layer over ``[top-k logits, hidden]``,
    called once per decision taken, in order; ``run_cascade()``: routed inference on the batch. Returns the
    offsets (see the module docstring).
    """
    plus, minus = hidden[0].out_features - 1, hidden[0].out_features - 2
    offsets: List[float] = []
    with torch.no_grad():
        for layer in hidden:  # two constant units: +offset and -offset, zero for now
            layer.weight[[plus, minus]] = 0.0
            layer.bias[[plus, minus]] = 0.0
        fc.weight.mul_(ROUTER_SCALE)
        fc.bias.mul_(ROUTER_SCALE)
        fc.weight[0, top_k + plus] = 1.0
        fc.weight[0, top_k + minus] = -1.0
        captured: List[torch.Tensor] = []
        handle = fc.register_forward_hook(lambda module, args, out: captured.append(out.detach().float()))
        for i, share in enumerate(shares):
            captured.clear()
            try:
                run_cascade()
            except BaseException:
                handle.remove()
                raise
            z = captured[i].flatten().cpu() if i < len(captured) else torch.zeros(0)  # the reached samples
            z = z.sort(descending=True).values
            n = min(round(share * batch), len(z))
            if len(z) == 0:
                offset = 0.0
            elif n == 0:
                offset = -float(z[0]) - 1.0
            elif n == len(z):
                offset = -float(z[-1]) + 1.0
            else:
                offset = -float(z[n - 1] + z[n]) / 2
            hidden[i].bias[plus] = max(offset, 0.0)
            hidden[i].bias[minus] = max(-offset, 0.0)
            offsets.append(offset)
        handle.remove()
    return offsets


def router_in_fp32(decision: Callable[..., torch.Tensor], device_type: str) -> Callable[..., torch.Tensor]:
    """``decision`` run in float32 outside autocast; its result cast to the dtype of the logits it reads
    (its last tensor argument: our ``route`` stores it beside them)."""

    def run(*args: Any) -> torch.Tensor:
        tensors = [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if torch.is_tensor(t)]
        args = tuple(
            tuple(t.float() for t in a) if isinstance(a, tuple) else a.float() if torch.is_tensor(a) else a
            for a in args
        )
        with torch.autocast(device_type, enabled=False):
            return decision(*args).to(tensors[-1].dtype)

    return run


# ----------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    label: str
    impl: str  # ours / official / official EA / timm
    spec: ModelSpec
    mode: str  # train / infer / routed
    batch: int
    precision: str
    channels_last: bool
    step: Callable[[], Any]
    compiled: bool = False
    fused: Optional[bool] = None
    parallel_experts: Optional[bool] = None  # our CPU training: the experts side by side in threads
    fold_bn: Optional[bool] = None  # our inference: batch norm folded into the convolutions
    cudnn_epilogue: Optional[bool] = None  # our folded inference on CUDA: bias, ReLU, add in cuDNN's epilogue
    cuda_graph: bool = False
    routing: str = ""
    route_shares: Optional[List[float]] = None
    macs_per_image: Optional[float] = None
    experts_per_image: Optional[float] = None
    realized_shares: Optional[List[float]] = None
    profile: Optional[List[Dict[str, Any]]] = None
    iters: int = 1
    rounds: List[float] = field(default_factory=list)  # images/s of each round


class Bench:
    """Builds the cases: models, optimizers, losses and synthetic batches on the device."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.generator = torch.Generator().manual_seed(args.seed)
        self.official = Official(args.official_dir) if args.official_dir else None
        self._macs: Dict[str, Any] = {}

    # ------------------------------------------------------------------------ helpers
    def batch_size(self, spec: ModelSpec, mode: str) -> int:
        if mode == "train":
            explicit = self.args.train_batch_size or self.args.batch_size
            return explicit or (128 if spec.cifar else 256)
        return self.args.infer_batch_size or self.args.batch_size or 256

    def inputs(self, spec: ModelSpec, batch: int, channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, *spec.input_size, generator=self.generator)
        y = torch.randint(0, spec.num_classes, (batch,), generator=self.generator)
        x = x.to(self.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device)

    def autocast(self, precision: str):
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, model: nn.Module, channels_last: bool) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    def breakdown(self, spec: ModelSpec):
        """Our MAC count by part (computed on an unfused CPU copy: the count hooks nn.Conv2d modules)."""
        if spec.name not in self._macs:
            model = timm.create_model(spec.name, num_classes=spec.num_classes)
            self._macs[spec.name] = count_macs(model)  # its hooks make the model run the per-expert loop
        return self._macs[spec.name]

    def baseline_macs(self, spec: ModelSpec) -> float:
        if spec.name not in self._macs:
            model = timm.create_model(spec.name, num_classes=spec.num_classes).eval()
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(torch.zeros(1, *spec.input_size))
            self._macs[spec.name] = counter.get_total_flops() / 2  # conv and matmul FLOPs = 2 x MACs
        return self._macs[spec.name]

    def case(self, label: str, impl: str, spec: ModelSpec, mode: str, precision: str, channels_last: bool,
             step: Callable[[], Any], **extra: Any) -> Case:  # fmt: skip
        batch = extra.pop("batch", self.batch_size(spec, mode))
        return Case(label, impl, spec, mode, batch, precision, channels_last, step, **extra)

    # ------------------------------------------------------------------------ training steps
    def train_ours(
        self, spec: ModelSpec, precision: str, channels_last: bool, fused: Optional[bool] = None,
        cuda_graph: bool = False, parallel: bool = True,
    ) -> Case:  # fmt: skip
        preset = preset_args(spec)
        model = self.place(create_ours(spec, fused), channels_last)
        model.train()
        model.set_expert_training(True)
        model.set_parallel_experts(parallel)
        optimizer = build_optimizer(model, preset.lr, preset.weight_decay, preset.momentum)
        loss_fn = build_loss(preset, class_counts(spec)).to(self.device)
        loss_fn.set_epoch(self.args.loss_epoch)
        module = torch.compile(model) if self.args.compile else model
        x, y = self.inputs(spec, self.batch_size(spec, "train"), channels_last)
        # Where the experts run one by one on the CPU: side by side in threads (set_parallel_experts), where
        # the library's condition holds, or in turn (one intra-op thread, or compiled: one graph); None where
        # they run fused or on a GPU.
        side_by_side = None
        if x.device.type == "cpu" and spec.num_experts >= 2 and not model.uses_fused_experts(x):
            side_by_side = parallel and not self.args.compile and parallelizing_pays(x, spec.num_experts)

        forward_loss = make_step("experts", module, loss_fn)  # train.py's forward pass and loss
        if cuda_graph:
            graphed = GraphedTrainStep(
                forward_loss, optimizer, model=model,
                amp_dtype=torch.bfloat16 if precision == "bf16" else None, key_fn=loss_fn.schedule_state,
            )  # fmt: skip

            def step() -> None:  # the same step, replayed from a CUDA graph
                graphed(x, y)

        else:

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                with self.autocast(precision):
                    loss = forward_loss(x, y)
                loss.backward()
                optimizer.step()

        return self.case(
            f"ours {spec.name}", "ours", spec, "train", precision,
            channels_last, step, compiled=self.args.compile, fused=fused_state(model), cuda_graph=cuda_graph,
            macs_per_image=float(self.breakdown(spec).all_experts), experts_per_image=float(spec.num_experts),
            parallel_experts=side_by_side,
        )  # fmt: skip

    def train_official(self, spec: ModelSpec, precision: str, channels_last: bool) -> Case:
        official = self.official
        model = self.place(official.create(spec), channels_last)
        model.train()
        model._hook_before_iter()  # what the official trainer calls at the start of every epoch
        optimizer = official.optimizer(spec, model)
        criterion = official.create_loss(spec, class_counts(spec), self.device)
        criterion._hook_before_epoch(self.args.loss_epoch)
        x, y = self.inputs(spec, self.batch_size(spec, "train"), channels_last)

        def step() -> None:  # the official trainer's step, without its per-step loss.item() and metrics
            optimizer.zero_grad()
            with self.autocast(precision):
                output = model(x)
                if isinstance(output, dict):
                    logits = output["logits"].transpose(0, 1)
                    output = output["output"]
                else:
                    logits = model.backbone.logits
                loss = criterion(output_logits=output, target=y, extra_info={"logits": logits})
            loss.backward()
            optimizer.step()

        return self.case(
            f"official {spec.name}", "official", spec, "train", precision, channels_last, step,
            macs_per_image=float(self.breakdown(spec).all_experts), experts_per_image=float(spec.num_experts),
        )  # fmt: skip

    def train_timm(self, spec: ModelSpec, precision: str, channels_last: bool) -> Case:
        preset = resolve_defaults(parse_args(["--dataset", "imagenet_lt"]))
        model = self.place(timm.create_model(spec.name, num_classes=spec.num_classes), channels_last).train()
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=preset.lr,
            momentum=preset.momentum,
            nesterov=True,
            weight_decay=preset.weight_decay,
        )
        x, y = self.inputs(spec, self.batch_size(spec, "train"), channels_last)
        module = torch.compile(model) if self.args.compile else model  # as timm's --torchcompile

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with self.autocast(precision):
                loss = F.cross_entropy(module(x), y)
            loss.backward()
            optimizer.step()

        return self.case(
            f"timm {spec.name}", "timm", spec, "train", precision, channels_last, step,
            compiled=self.args.compile, macs_per_image=self.baseline_macs(spec),
        )  # fmt: skip

    # ------------------------------------------------------------------------ inference
    def _infer_step(self, model: Callable, x: torch.Tensor, precision: str, quiet: bool = False):
        def step() -> Any:
            with torch.inference_mode(), self.autocast(precision), _quiet(quiet):
                return model(x)

        return step

    def _epilogue(self, fold_bn: bool, epilogue: bool, cuda_graph: bool = False) -> Optional[bool]:
        """Whether folded convolutions run with cuDNN's fused epilogue (None: not applicable, off CUDA or not
        folded). Not during CUDA-graph capture, so not in replayed graphs."""
        if self.device.type != "cuda" or not fold_bn:
            return None
        return epilogue and not cuda_graph

    def infer_ours(
        self, spec: ModelSpec, precision: str, channels_last: bool, fused: Optional[bool] = None,
        fold_bn: bool = True, epilogue: bool = True,
    ) -> Case:  # fmt: skip
        model = self.place(create_ours(spec, fused, fold_bn), channels_last).eval()
        model.set_routing("all")
        module = torch.compile(model) if self.args.compile else model
        x, _ = self.inputs(spec, self.batch_size(spec, "infer"), channels_last)
        return self.case(
            f"ours {spec.name}", "ours", spec, "infer", precision, channels_last,
            _with_epilogue(self._infer_step(module, x, precision), epilogue), compiled=self.args.compile,
            fused=fused_state(model), fold_bn=fold_bn, cudnn_epilogue=self._epilogue(fold_bn, epilogue),
            routing="all", macs_per_image=float(self.breakdown(spec).all_experts),
            experts_per_image=float(spec.num_experts),
        )  # fmt: skip

    def infer_official(self, spec: ModelSpec, precision: str, channels_last: bool) -> Case:
        model = self.place(self.official.create(spec), channels_last).eval()
        x, _ = self.inputs(spec, self.batch_size(spec, "infer"), channels_last)
        return self.case(
            f"official {spec.name}", "official", spec, "infer", precision, channels_last,
            self._infer_step(model, x, precision), routing="all",
            macs_per_image=float(self.breakdown(spec).all_experts), experts_per_image=float(spec.num_experts),
        )  # fmt: skip

    def infer_timm(self, spec: ModelSpec, precision: str, channels_last: bool) -> Case:
        model = self.place(timm.create_model(spec.name, num_classes=spec.num_classes), channels_last).eval()
        module = torch.compile(model) if self.args.compile else model
        x, _ = self.inputs(spec, self.batch_size(spec, "infer"), channels_last)
        return self.case(
            f"timm {spec.name}", "timm", spec, "infer", precision, channels_last,
            self._infer_step(module, x, precision), compiled=self.args.compile,
            macs_per_image=self.baseline_macs(spec),
        )  # fmt: skip

    # ------------------------------------------------------------------------ routed inference
    def routed_ours(
        self,
        spec: ModelSpec,
        shares: List[float],
        precision: str,
        channels_last: bool,
        cuda_graph: bool = False,
        fold_bn: bool = True,
        epilogue: bool = True,
    ) -> Case:
        model = self.place(create_ours(spec, self.args.fused, fold_bn), channels_last).eval()
        x, _ = self.inputs(spec, self.batch_size(spec, "infer"), channels_last)
        router = model.router
        if precision != "fp32":
            router.decision = router_in_fp32(router.decision, self.device.type)

        def run_cascade() -> None:
            with torch.inference_mode(), self.autocast(precision):
                model.route(x, threshold=0.5)

        set_router_shares(list(router.hidden), router.fc, router.top_k, run_cascade, len(x), shares)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "untrained router": its shares are set above
            model.set_routing("router", 0.5)
        with torch.inference_mode(), self.autocast(precision):
            num_experts = model.route(x).num_experts
        if cuda_graph:  # the same cascade, each expert replayed from a graph recorded per bucket size
            graphed = GraphedRouting(
                model, threshold=0.5, amp_dtype=torch.bfloat16 if precision == "bf16" else None
            )

            def step() -> Any:
                return graphed(x)

        else:
            # Symbolic batch sizes: the graphs after each routing decision serve any number of samples,
            # not only the counts this fixed input happens to send on.
            module = torch.compile(model, dynamic=True) if self.args.compile else model
            step = _with_epilogue(self._infer_step(module, x, precision), epilogue)
        case = self._routed_case(f"ours {spec.name}", "ours", spec, shares, precision, channels_last,
                                 step, num_experts)  # fmt: skip
        case.fused = fused_state(model)
        case.fold_bn = fold_bn
        case.cudnn_epilogue = self._epilogue(fold_bn, epilogue, cuda_graph)
        case.compiled = self.args.compile and not cuda_graph  # the graphs replay the eager modules
        case.cuda_graph = cuda_graph
        return case

    def routed_official(
        self, spec: ModelSpec, shares: List[float], precision: str, channels_last: bool
    ) -> Case:
        model = self.place(self.official.create(spec, ea=True), channels_last).eval()
        backbone = model.backbone
        x, _ = self.inputs(spec, self.batch_size(spec, "infer"), channels_last)
        if precision != "fp32":
            backbone.pred_expert_help = router_in_fp32(backbone.pred_expert_help, self.device.type)
        step = self._infer_step(model, x, precision, quiet=True)
        hidden = list(backbone.expert_help_pred_hidden_fcs)
        fc, top_k = backbone.expert_help_pred_fc, backbone.top_choices_num
        set_router_shares(hidden, fc, top_k, step, len(x), shares)
        num_experts = step()[1]
        return self._routed_case(f"official EA {spec.name}", "official EA", spec, shares, precision,
                                 channels_last, step, num_experts)  # fmt: skip

    def _routed_case(self, label, impl, spec, shares, precision, channels_last, step, num_experts) -> Case:
        num_experts = num_experts.flatten().cpu()
        realized = [float((num_experts > i).float().mean()) for i in range(1, spec.num_experts)]
        return self.case(
            label, impl, spec, "routed", precision, channels_last, step,
            routing="router " + ",".join(f"{s:.3f}" for s in shares),
            route_shares=list(shares), realized_shares=realized,
            macs_per_image=self.breakdown(spec).for_routing("router", num_experts),
            experts_per_image=float(num_experts.float().mean()),
        )  # fmt: skip


@contextlib.contextmanager
def _quiet(enabled: bool):
    if not enabled:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def build_cases(args: argparse.Namespace, bench: Bench, precisions: List[str]) -> List[Case]:
    specs = [model_spec(name) for name in args.models]
    ride_specs = [s for s in specs if s.impl == "ours"]
    if args.baseline != "none" and any(not s.cifar for s in ride_specs):
        if args.baseline not in [s.name for s in specs]:
            specs.append(model_spec(args.baseline))
    share_specs = [] if "none" in args.route_shares else [parse_share_spec(s) for s in args.route_shares]
    cases: List[Case] = []
    shipped: Dict[Tuple[str, str], ModelSpec] = {}  # (mode, model) -> official rows as shipped, to add
    for precision in precisions:
        channels_last = precision == "bf16" if args.channels_last is None else args.channels_last
        for mode in ("train", "infer"):
            if mode not in args.modes:
                continue
            for spec in specs:
                if spec.impl == "ours":
                    for fused in [True, False, None] if args.fused_both else [args.fused]:
                        cases.append(getattr(bench, f"{mode}_ours")(spec, precision, channels_last, fused))
                        if mode == "train" and args.parallel_both and bench.device.type == "cpu":
                            cases.append(
                                bench.train_ours(spec, precision, channels_last, fused, parallel=False)
                            )
                        if mode == "infer" and args.unfolded:
                            cases.append(
                                bench.infer_ours(spec, precision, channels_last, fused, fold_bn=False)
                            )
                        if mode == "infer" and args.plain_epilogue and bench.device.type == "cuda":
                            cases.append(
                                bench.infer_ours(spec, precision, channels_last, fused, epilogue=False)
                            )
                        # CUDA graphs pay where launches dominate (CIFAR models); a graph also keeps its
                        # activations in a pool of its own, tens of GB for an ImageNet model at batch 256.
                        if mode == "train" and args.cuda_graph and spec.cifar:
                            cases.append(
                                bench.train_ours(spec, precision, channels_last, fused, cuda_graph=True)
                            )
                    if bench.official is not None:
                        cases.append(getattr(bench, f"{mode}_official")(spec, precision, channels_last))
                        if args.shipped_official and (precision, channels_last) != ("fp32", False):
                            shipped[(mode, spec.name)] = spec
                else:
                    cases.append(getattr(bench, f"{mode}_timm")(spec, precision, channels_last))
        if "routed" not in args.modes:
            continue
        for spec in ride_specs:
            if spec.num_experts < 2:
                continue
            for requested in share_specs:
                shares = requested
                if shares is None:
                    shares = paper_shares(spec, bench.breakdown(spec))
                    if shares is None:
                        _note_once(f"the paper gives no routed cost for {spec.name}: no 'paper' routed row")
                        continue
                if len(shares) != spec.num_experts - 1:
                    print(
                        f"note: {len(shares)} shares given, {spec.name} has {spec.num_experts - 1} decisions"
                    )
                    continue
                cases.append(bench.routed_ours(spec, shares, precision, channels_last))
                if args.unfolded:
                    cases.append(bench.routed_ours(spec, shares, precision, channels_last, fold_bn=False))
                if args.plain_epilogue and bench.device.type == "cuda":
                    cases.append(bench.routed_ours(spec, shares, precision, channels_last, epilogue=False))
                if args.cuda_graph:
                    cases.append(bench.routed_ours(spec, shares, precision, channels_last, cuda_graph=True))
                if bench.official is not None:
                    cases.append(bench.routed_official(spec, shares, precision, channels_last))
    measured = {(c.mode, c.spec.name) for c in cases if c.impl == "official" and c.precision == "fp32"
                and not c.channels_last}  # fmt: skip
    for (mode, name), spec in shipped.items():
        if (mode, name) not in measured:
            cases.append(getattr(bench, f"{mode}_official")(spec, "fp32", False))
    return cases


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], Any], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return time.perf_counter() - start


def measure(cases: List[Case], args: argparse.Namespace, device: torch.device) -> None:
    for case in cases:
        # Warm-up iterations, timed: the fastest sets how many iterations fill --seconds.
        seconds_per_iter = min(_timed(case.step, 1, device) for _ in range(max(args.warmup, 1)))
        case.iters = args.iters or max(1, math.ceil(args.seconds / max(seconds_per_iter, 1e-6)))
    for _ in range(args.repeats):  # rounds interleave the cases
        for case in cases:
            case.rounds.append(case.batch * case.iters / _timed(case.step, case.iters, device))


PROFILE_ROWS = 12


def profile_case(case: Case, iters: int, device: torch.device) -> List[Dict[str, Any]]:
    """The operators taking the most self time over ``iters`` iterations of ``case``: on CUDA the GPU time
    of the kernels each launched, on the CPU the CPU time. Each with ms per iteration, its share of the
    profiled total and its calls per iteration."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _timed(case.step, iters, device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        dict(
            name=e.key,
            ms_per_iter=getattr(e, attr) / 1e3 / iters,
            share=getattr(e, attr) / total,
            calls_per_iter=e.count / iters,
        )
        for e in events[:PROFILE_ROWS]
    ]


def profile_table(row: Dict[str, Any]) -> str:
    """The profile of one row, titled as the row is labelled in the table (fused, folded, graphed...)."""
    mode = f"{row['mode']}, batch {row['batch']}, {row['precision']}" + (
        ", channels-last" if row["channels_last"] else ""
    )
    lines = [f"profile of {row_label(row)} ({mode}), the {PROFILE_ROWS} operators with the most self time:"]
    lines += ["| operator | ms / iteration | share | calls / iteration |", "| --- | ---: | ---: | ---: |"]
    for p in row["profile"] or []:
        lines.append(f"| {p['name']} | {p['ms_per_iter']:.2f} | {p['share']:.1%} | {p['calls_per_iter']:g} |")
    return "\n".join(lines)


def _with_epilogue(step: Callable[[], Any], epilogue: bool) -> Callable[[], Any]:
    """``step``, with cuDNN's fused epilogue for folded convolutions turned off unless ``epilogue``."""
    if epilogue:
        return step

    def plain() -> Any:
        with cudnn_epilogue(False):
            return step()

    return plain


# -------------------------------------------------------------------------------------------- reporting
def _row(case: Case, device: torch.device) -> Dict[str, Any]:
    ips = statistics.median(case.rounds) if case.rounds else float("nan")
    return dict(
        label=case.label,
        impl=case.impl,
        model=case.spec.name,
        family=case.spec.family,
        num_experts=case.spec.num_experts,
        mode=case.mode,
        routing=case.routing,
        route_shares=case.route_shares,
        batch=case.batch,
        precision=case.precision,
        channels_last=case.channels_last,
        compiled=case.compiled,
        fused=case.fused,
        parallel_experts=case.parallel_experts,
        fold_bn=case.fold_bn,
        cudnn_epilogue=case.cudnn_epilogue,
        cuda_graph=case.cuda_graph,
        images_per_s=ips,
        ms_per_iter=1000.0 * case.batch / ips if ips else float("nan"),
        images_per_s_rounds=case.rounds,
        iters_per_round=case.iters,
        macs_per_image=case.macs_per_image,
        experts_per_image=case.experts_per_image,
        realized_shares=case.realized_shares,
        profile=case.profile,
        ratio_vs_official=None,
        ratio_vs_official_shipped=None,
        ratio_vs_all_experts=None,
        ratio_vs_resnet50=None,
        device=str(device),
    )


def speed_ratio(row: Dict[str, Any], other: Dict[str, Any]) -> float:
    """How many times faster ``row`` ran than ``other``: the median of the ratios of their rounds, where both
    have the same number of rounds (the rounds interleave the cases, so each pair ran moments apart and a
    machine whose speed drifts between rounds moves both alike); the ratio of their medians otherwise."""
    mine, theirs = row.get("images_per_s_rounds") or [], other.get("images_per_s_rounds") or []
    if mine and len(mine) == len(theirs):
        return statistics.median(a / b for a, b in zip(mine, theirs))
    return row["images_per_s"] / other["images_per_s"]


def add_ratios(rows: List[Dict[str, Any]], baseline: str) -> None:
    def key(row: Dict[str, Any], **change: Any) -> tuple:
        row = {**row, **change}
        shares = None if row["route_shares"] is None else tuple(row["route_shares"])
        return (shares, *(row[k] for k in ("model", "mode", "batch", "precision", "channels_last")))

    def group(row: Dict[str, Any], impl: str) -> str:
        # Our rows also by fold_bn and fused: a routed row is compared with all experts computed the same way.
        if impl != "ours":
            return impl
        return f"ours, fold_bn {row['fold_bn']}, epilogue {row.get('cudnn_epilogue')}, fused {row['fused']}"

    by_impl: Dict[str, Dict[tuple, Dict[str, Any]]] = {}
    for row in rows:
        by_impl.setdefault(group(row, row["impl"]), {})[key(row)] = row
    for row in rows:
        if row["impl"] == "ours":
            official = by_impl.get("official EA" if row["mode"] == "routed" else "official", {})
            other = official.get(key(row))
            if other:
                row["ratio_vs_official"] = speed_ratio(row, other)
            shipped = official.get(key(row, precision="fp32", channels_last=False))
            if shipped:
                row["ratio_vs_official_shipped"] = speed_ratio(row, shipped)
        if row["mode"] == "routed":
            same = by_impl.get(group(row, row["impl"].replace(" EA", "")), {}).get(
                key(row, mode="infer", route_shares=None)
            )
            if same:
                row["ratio_vs_all_experts"] = speed_ratio(row, same)
        if row["model"] != baseline and row["family"] not in (None, "resnet32"):
            mode = "infer" if row["mode"] == "routed" else row["mode"]
            base = by_impl.get("timm", {}).get(key(row, model=baseline, mode=mode, route_shares=None))
            if base:
                row["ratio_vs_resnet50"] = speed_ratio(row, base)


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None else format(value, spec)


FUSED = {True: "fused", False: "unfused", None: "auto"}  # auto: the library's choice per call


def row_label(r: Dict[str, Any]) -> str:
    """A row's model label with how it ran: compiled, fused or not, batch norm folded or not, CUDA graph."""
    notes = ["compiled"] if r["compiled"] else []
    notes += [FUSED[r["fused"]]] if r["impl"] == "ours" else []
    notes += (
        [{True: "experts side by side", False: "experts in turn"}[r["parallel_experts"]]]
        if r.get("parallel_experts") is not None
        else []
    )
    notes += ["BN not folded"] if r["fold_bn"] is False else []
    notes += ["no cuDNN epilogue"] if r.get("cudnn_epilogue") is False else []
    notes += ["CUDA graph"] if r["cuda_graph"] else []
    return r["label"] + (f" ({', '.join(notes)})" if notes else "")


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    header = (
        "| model | mode | routing | batch | precision | channels_last | images/s | GMACs/img | experts/img "
        "| ours/official | ours/official as shipped | vs all experts | vs timm resnet50 |"
    )
    lines = [header, "| --- | --- | --- | ---: | --- | --- |" + " ---: |" * 7]
    for r in rows:
        label = row_label(r)
        routing = r["routing"]
        if r["realized_shares"] is not None:
            routing += " (realized " + ",".join(f"{s:.3f}" for s in r["realized_shares"]) + ")"
        macs = None if r["macs_per_image"] is None else r["macs_per_image"] / 1e9
        lines.append(
            f"| {label} | {r['mode']} | {routing} | {r['batch']} | {r['precision']} | "
            f"{'yes' if r['channels_last'] else 'no'} | {r['images_per_s']:,.1f} | {_fmt(macs, '.4f')} | "
            f"{_fmt(r['experts_per_image'], '.3f')} | {_fmt(r['ratio_vs_official'], '.2f')} | "
            f"{_fmt(r['ratio_vs_official_shipped'], '.2f')} | "
            f"{_fmt(r['ratio_vs_all_experts'], '.2f')} | {_fmt(r['ratio_vs_resnet50'], '.2f')} |"
        )
    return "\n".join(lines)


def machine_info(device: torch.device, official_dir: str) -> Dict[str, Any]:
    info: Dict[str, Any] = dict(
        device=str(device),
        torch=torch.__version__,
        timm=timm.__version__,
        ride_models=getattr(ride_models, "__version__", "unknown"),
        python=platform.python_version(),
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    if official_dir:
        info["official_dir"] = str(Path(official_dir).resolve())
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(info: Dict[str, Any]) -> str:
    if "gpu" in info:
        where = f"GPU {info['gpu']} (CUDA {info['cuda']}, cuDNN {info['cudnn']})"
    else:
        where = f"CPU {info['cpu']}, {info['torch_threads']} threads ({info['cpu_count']} logical CPUs)"
    return f"{where}; torch {info['torch']}, timm {info['timm']}, python {info['python']}"


# ------------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.iters is not None and args.iters < 1) or not args.seconds > 0:
        parser.error("--repeats and --iters must be at least 1, --seconds above 0")
    if args.shipped_official and not args.official_dir:
        parser.error("--shipped-official measures the official code: give --official-dir too")
    if args.json:  # an unwritable path fails now, not after the measurements
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_device(args.device)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif args.cuda_graph:
        raise SystemExit(f"--cuda-graph needs --device cuda (CUDA graphs), not {device.type}")
    precisions = args.precision or (["fp32", "bf16"] if device.type == "cuda" else ["fp32"])
    info = machine_info(device, args.official_dir)
    print(f"machine: {describe_machine(info)}")
    torch.manual_seed(args.seed)
    bench = Bench(args, device)
    cases = build_cases(args, bench, precisions)
    for case in cases:
        if case.mode == "routed" and case.impl == "ours":
            shares = ", ".join(f"{s:.3f}" for s in case.route_shares)
            print(
                f"{case.spec.name} {case.precision}: routing shares {shares} -> {case.experts_per_image:.3f} "
                f"experts/img, {case.macs_per_image / 1e9:.4f} GMACs/img "
                f"(all experts {bench.breakdown(case.spec).all_experts / 1e9:.4f})"
            )
    measure(cases, args, device)
    if args.profile > 0:
        for case in cases:
            case.profile = profile_case(case, args.profile, device)
    rows = [_row(case, device) for case in cases]
    add_ratios(rows, args.baseline)
    print()
    print(markdown_table(rows))
    for row in rows if args.profile > 0 else []:
        print()
        print(profile_table(row))
    result = dict(machine=info, args=vars(args), rows=rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # bad input: one line, no traceback
        sys.exit(f"throughput.py: error: {error}")
