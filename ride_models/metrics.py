"""Evaluation of long-tailed classifiers: accuracy overall and per shot split, calibration, experts used.

Conventions (those of the official RIDE test script where it has one):

* **top-1 / top-5**: percent of eval images whose label is among the k highest logits. Ties between equal
  logits go to the lower class index, as ``argmax`` does, so results never depend on the sort kernel.
* **per-class accuracy**: percent of the images of a class predicted right (top-1); NaN for a class the
  eval set has no image of.
* **many / medium / few**: the mean of the per-class accuracies over the classes of each split, the splits
  being set by the *training* images per class (> 100, 20..100, < 20; ``ride_models.data.shot_splits``).
  On a balanced test set (CIFAR-LT, ImageNet-LT, Places-LT) this equals the accuracy over the split's
  images. Classes absent from the eval set are left out of the mean (the official script would give NaN).
* **ECE**: expected calibration error in percent, 15 equal-width confidence bins (Guo et al., 2017).
* **experts used**: per sample, 1..E; its mean overall and per split (over the split's images, as the
  official script's histogram), and the realized MACs per image of the experts and decisions actually run.

``evaluate`` runs a model over a loader once and returns all of these in an :class:`EvalResult`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from ride_models.data.datasets import load_class_counts
from ride_models.data.sampling import shot_splits
from ride_models.flops import MacsBreakdown
from ride_models.losses import check_target
from ride_models.models.ride_resnet import require_ride_model

__all__ = [
    "ECE_BINS",
    "SHOT_SPLITS",
    "EvalResult",
    "accuracy",
    "evaluate",
    "expected_calibration_error",
    "experts_histogram",
    "format_table",
    "parse_routing",
    "per_class_accuracy",
    "shot_accuracy",
    "topk_predictions",
]

SHOT_SPLITS = ("many", "medium", "few")
ECE_BINS = 15

Routing = Union[str, int]


# ---------------------------------------------------------------------------------------- metric functions


def topk_predictions(logits: Tensor, k: int) -> Tensor:
    """The ``k`` highest-scoring classes of each sample, best first: ``[B, C]`` -> ``[B, min(k, C)]`` int64.

    A stable sort, so equal logits rank by class index (lower first): the first column is ``argmax``.
    """
    k = min(k, logits.shape[1])
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k]


def _topk_hits(top: Tensor, target: Tensor, ks: Iterable[int]) -> List[Tensor]:
    """For each k, a ``[B]`` bool tensor: is ``target`` among the first k columns of ``top`` ``[B, K]``?"""
    match = top == target.view(-1, 1)  # [B, K]
    return [match[:, : min(k, top.shape[1])].any(dim=1) for k in ks]


def _class_indices(target: Any, batch: int, num_classes: int) -> Tensor:
    """``target`` as ``[batch]`` class indices in 0..num_classes-1, or a ValueError that says what to pass.

    A tensor, array or list of shape ``[B]``, or ``[B, 1]`` (flattened; a label column was always taken).
    Float and bool labels are refused, not truncated. The range is checked on CPU tensors only
    (``check_target`` does not read a CUDA tensor back, to keep the caller free of host syncs).
    """
    target = torch.as_tensor(target)
    if target.dim() == 2 and target.shape[1] == 1:
        target = target.flatten()
    check_target(target, batch, num_classes)
    return target


def accuracy(logits: Tensor, target: Tensor, topk: Sequence[int] = (1, 5)) -> List[float]:
    """Top-k accuracy in percent for each k in ``topk`` (k larger than C counts as C).

    Args:
        logits: ``[B, C]`` scores.
        target: ``[B]`` (or ``[B, 1]``) integer class indices in 0..C-1; a tensor, array or list.
    """
    logits = torch.as_tensor(logits)
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be [B, C] scores, got shape {tuple(logits.shape)}. For the per-expert logits "
            "[B, E, C] of forward_experts, pass their mean logits.mean(dim=1) (the model's output) or one "
            "expert's logits[:, e]."
        )
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    if not topk or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in topk):
        raise ValueError(f"topk must be whole numbers k >= 1, e.g. (1, 5); got {topk!r}")
    # On the CPU, so that the range is checked wherever the logits are (.item() below syncs anyway).
    target = _class_indices(torch.as_tensor(target).detach().cpu(), logits.shape[0], logits.shape[1])
    top = topk_predictions(logits, max(topk))
    return [hit.float().mean().item() * 100.0 for hit in _topk_hits(top, target.to(top.device), topk)]


def _class_means(values: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean of ``values`` ``[N]`` over the samples of each class: ``[C]``, NaN for a class without samples."""
    if target.size and not 0 <= target.min() <= target.max() < num_classes:
        raise ValueError(f"targets lie in {target.min()}..{target.max()}, outside [0, {num_classes})")
    samples = np.bincount(target, minlength=num_classes)
    sums = np.bincount(target, weights=values.astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(samples > 0, sums / samples, np.nan)


def per_class_accuracy(
    pred: Union[Tensor, np.ndarray], target: Union[Tensor, np.ndarray, Sequence[int]], num_classes: int
) -> np.ndarray:
    """Top-1 accuracy of each class in percent: ``[C]`` float64, NaN for a class with no eval image.

    Args:
        pred: ``[N]`` predicted class of each image.
        target: ``[N]`` (or ``[N, 1]``) true class of each image: integer class indices in 0..C-1.
        num_classes: C.
    """
    pred = torch.as_tensor(pred).flatten().cpu().long().numpy()
    target = torch.as_tensor(target).cpu()
    if pred.size != target.numel():
        raise ValueError(f"pred has {pred.size} entries, target {target.numel()}")
    target = _class_indices(target, pred.size, num_classes).long().numpy()
    return _class_means(pred == target, target, num_classes) * 100.0


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN (without numpy's warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else math.nan


def shot_accuracy(per_class_acc: np.ndarray, class_counts: Sequence[int]) -> Dict[str, float]:
    """Many / medium / few-shot accuracy: the mean per-class accuracy over each split's classes.

    As the official RIDE test script (``acc[many_shot].mean()``), the mean is over classes, not images;
    classes with no eval image (NaN in ``per_class_acc``) are left out, and a split with no such class at
    all is NaN.

    Args:
        per_class_acc: ``[C]`` from :func:`per_class_accuracy`.
        class_counts: ``[C]`` *training* images per class (> 100 many, 20..100 medium, < 20 few).

    Returns:
        ``{"many": ..., "medium": ..., "few": ...}`` in the unit of ``per_class_acc`` (percent).
    """
    per_class_acc = np.asarray(per_class_acc, dtype=np.float64)
    if len(class_counts) != per_class_acc.size:
        raise ValueError(f"{len(class_counts)} class counts for {per_class_acc.size} per-class accuracies")
    # Negative, NaN and fractional counts are refused (they were filed under "few" or "medium" silently);
    # 0 is taken, as the data package's loader of counts takes it: a class without training images is a
    # real case (a label space wider than the training split), it has fewer than 20 images, so "few" by
    # the official thresholds, and its accuracy belongs in the few-shot mean. (The losses refuse 0: their
    # log-prior of a class needs a count > 0; the metrics need none.)
    class_counts = load_class_counts(class_counts, per_class_acc.size)
    return {name: _nanmean(per_class_acc[idx]) for name, idx in shot_splits(class_counts).items()}


def expected_calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error in **percent** (Guo et al., 2017, equation 3).

    ``ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|`` over ``n_bins`` equal-width bins of
    [0, 1]; bin b holds the confidences in ``(b / n_bins, (b + 1) / n_bins]`` (the first bin also holds 0).

    Args:
        confidence: ``[N]`` confidence of each prediction (max softmax probability), in [0, 1].
        correct: ``[N]`` bool (or 0/1): was the prediction right.
        n_bins: number of bins (15 as in Guo et al. and most long-tail papers).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a whole number of bins >= 1 (15 as in Guo et al.), got {n_bins!r}")
    confidence = torch.as_tensor(confidence).flatten().cpu().double()
    correct = torch.as_tensor(correct).flatten().cpu()
    if confidence.numel() == 0 or confidence.shape != correct.shape:
        raise ValueError(f"need matching non-empty inputs, got {confidence.numel()} and {correct.numel()}")
    finite = torch.isfinite(confidence)
    if not finite.all():
        raise ValueError(
            f"confidence must be finite; {int((~finite).sum())} of {confidence.numel()} values are NaN or "
            "inf (from NaN or inf logits): check the model's outputs"
        )
    low, high = confidence.min().item(), confidence.max().item()
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"confidence must be a probability in [0, 1], got values in [{low:g}, {high:g}]; pass the max "
            "softmax probability, logits.softmax(dim=1).amax(dim=1), not the logits"
        )
    if correct.dtype != torch.bool and not ((correct == 0) | (correct == 1)).all():
        raise ValueError(
            f"correct must be bool or 0/1 (was each prediction right), got the values "
            f"{correct.unique()[:6].tolist()}; pass pred == target"
        )
    correct = correct.double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) gives i with edges[i] < x <= edges[i + 1] for the inner edges.
    bins = torch.bucketize(confidence, edges[1:-1], right=False)
    size = torch.bincount(bins, minlength=n_bins).double()
    gap = torch.bincount(bins, weights=correct - confidence, minlength=n_bins)  # sum of (acc - conf) per bin
    # |sum(acc - conf)| / N per bin is |B_b| / N * |accuracy(B_b) - confidence(B_b)|.
    return (gap.abs().sum() / size.sum()).item() * 100.0


def experts_histogram(num_experts_used: Union[Tensor, np.ndarray], num_experts: int) -> List[int]:
    """How many samples used 1, 2, ..., E experts: ``[N]`` -> E counts."""
    used = torch.as_tensor(num_experts_used).flatten().cpu().long()
    if used.numel() and (used.min() < 1 or used.max() > num_experts):
        raise ValueError(f"experts used must lie in 1..{num_experts}, got {used.min()}..{used.max()}")
    return torch.bincount(used, minlength=num_experts + 1)[1:].tolist()


def parse_routing(value: Union[str, int]) -> Routing:
    """A routing mode from the command line: ``"all"``, ``"router"`` or a positive int k."""
    if value in ("all", "router"):
        return value
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"routing must be 'all', 'router' or a number of experts k >= 1, got {value!r}")
    return k


# ----------------------------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """Everything :func:`evaluate` measures on one eval set with one routing mode.

    Accuracies and ECE are in percent; NaN where undefined (a split with no eval image).
    """

    routing: Routing  # "all", "router" or k: the mode the numbers are for
    top1: float
    top5: float
    many_top1: float
    medium_top1: float
    few_top1: float
    ece: float
    experts_mean: float  # experts used per image, over all images
    experts_per_split: Dict[str, float]  # "many" / "medium" / "few" -> experts used per image of the split
    gmacs_per_image: Optional[float]  # realized GMACs per image (None without a MACs breakdown)
    num_images: int
    num_experts: int  # E of the model
    class_counts: List[int]  # [C] training images per class
    per_class_top1: np.ndarray  # [C] percent, NaN for classes without eval images
    per_class_images: np.ndarray  # [C] eval images per class
    per_class_experts: np.ndarray  # [C] mean experts used on the class's eval images, NaN without any
    experts_counts: Dict[str, List[int]] = field(default_factory=dict)
    # "all" / "many" / "medium" / "few" -> [E] images that used 1, 2, ..., E experts (for the plots)
    model: str = ""
    dataset: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    def to_dict(self) -> Dict[str, Any]:
        """The summary as JSON-ready values (NaN as None); per-class values are in :meth:`per_class_rows`."""
        splits = shot_splits(self.class_counts)
        return {
            "model": self.model,
            "dataset": self.dataset,
            "routing": self.routing,
            "top1": _json_float(self.top1),
            "top5": _json_float(self.top5),
            "many_top1": _json_float(self.many_top1),
            "medium_top1": _json_float(self.medium_top1),
            "few_top1": _json_float(self.few_top1),
            "ece": _json_float(self.ece),
            "experts_mean": _json_float(self.experts_mean),
            "experts_per_split": {k: _json_float(v) for k, v in self.experts_per_split.items()},
            "experts_counts": {k: list(v) for k, v in self.experts_counts.items()},
            "gmacs_per_image": _json_float(self.gmacs_per_image, 6),
            "num_images": int(self.num_images),
            "num_classes": self.num_classes,
            "num_experts": int(self.num_experts),
            "classes_per_split": {k: len(v) for k, v in splits.items()},
        }

    def per_class_rows(self, class_names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        """One dict per class: index, name, training and eval images, top-1, shot split, experts used."""
        split_of = {c: name for name, idx in shot_splits(self.class_counts).items() for c in idx}
        return [
            {
                "routing": self.routing,
                "class": c,
                "name": class_names[c] if class_names is not None else "",
                "train_images": int(self.class_counts[c]),
                "eval_images": int(self.per_class_images[c]),
                "top1": _json_float(self.per_class_top1[c]),
                "split": split_of[c],
                "experts_mean": _json_float(self.per_class_experts[c]),
            }
            for c in range(self.num_classes)
        ]

    @staticmethod
    def header() -> str:
        """The column titles of :meth:`row`."""
        return _format_row(_COLUMNS, [title for title, _, _ in _COLUMNS])

    def row(self) -> str:
        """This result as one line of a table under :meth:`header` (percent, GMACs per image)."""
        values = [
            self.routing,
            self.top1,
            self.top5,
            self.many_top1,
            self.medium_top1,
            self.few_top1,
            self.ece,
            self.experts_mean,
            *(self.experts_per_split[s] for s in SHOT_SPLITS),
            self.gmacs_per_image,
            self.num_images,
        ]
        return _format_row(_COLUMNS, [_format_value(v, fmt) for v, (_, _, fmt) in zip(values, _COLUMNS)])

    def __str__(self) -> str:
        return format_table([self])


# (title, width, format) of each table column
_COLUMNS = (
    ("routing", 7, "s"),
    ("top1", 6, ".2f"),
    ("top5", 6, ".2f"),
    ("many", 6, ".2f"),
    ("medium", 6, ".2f"),
    ("few", 6, ".2f"),
    ("ECE", 6, ".2f"),
    ("experts", 7, ".3f"),
    ("e_many", 6, ".3f"),
    ("e_med", 6, ".3f"),
    ("e_few", 6, ".3f"),
    ("GMACs", 8, ".4f"),
    ("images", 7, "d"),
)


def _format_value(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if fmt != "s" else str(value)


def _format_row(columns: Sequence[tuple], cells: Sequence[str]) -> str:
    first, *rest = [(cell, width) for cell, (_, width, _) in zip(cells, columns)]
    return " ".join([first[0].ljust(first[1])] + [cell.rjust(width) for cell, width in rest])


def format_table(results: Sequence[EvalResult]) -> str:
    """A header and one row per result: accuracies (percent), ECE (percent), experts used (mean overall,
    many, medium, few), realized GMACs per image, images."""
    return "\n".join([EvalResult.header(), *(r.row() for r in results)])


def _json_float(value: Optional[float], digits: int = 4) -> Optional[float]:
    if value is None or math.isnan(value):
        return None
    return round(float(value), digits)


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    class_counts: Sequence[int],
    device: Union[torch.device, str] = "cpu",
    routing: Optional[Routing] = None,
    amp_dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    macs: Optional[MacsBreakdown] = None,
) -> EvalResult:
    """Evaluate a RIDE model on every batch of ``loader`` with one routing mode.

    Args:
        model: a RIDE model, already on ``device`` (and in channels-last memory format if
            ``channels_last``). It runs in eval mode; its train/eval mode and routing are restored after.
        loader: yields ``(x [B, 3, H, W], y [B])``: a ``DataLoader`` or a ``DeviceDataLoader``; ``y`` holds
            integer class indices in 0..C-1 (a ``[B, 1]`` column is taken too). Empty batches are skipped.
        class_counts: ``[C]`` training images per class (for many / medium / few): whole numbers >= 0.
        device: where the inputs go.
        routing: ``"all"``, ``"router"``, an int k, or None for the model's current routing.
        amp_dtype: run under ``torch.autocast`` with this dtype (float16 / bfloat16); None for float32.
        channels_last: pass the inputs in channels-last memory format.
        macs: the model's MACs breakdown at the eval input size (``ride_models.flops.count_macs``), for
            ``gmacs_per_image``; None leaves it out. A breakdown for another expert count, class count or
            input size (the images' ``[C, H, W]``) is refused.

    Raises:
        ValueError: for a batch that is not an ``(x, y)`` pair, labels that are not ``[B]`` class indices of
            the model's classes (float, one-hot, another length), a loader without images, or NaN / inf
            logits; each message says which batch and what to pass.

    Returns:
        An :class:`EvalResult`. Only per-sample records (label, top-5 classes, confidence, experts used)
        are kept while iterating, never the logits, so 8,142 iNaturalist classes cost nothing extra.
    """
    require_ride_model(model)
    num_classes, num_experts = model.num_classes, model.num_experts
    if len(class_counts) != num_classes:
        raise ValueError(
            f"{len(class_counts)} training class counts for a model with {num_classes} classes; "
            "class_counts must give the training images of every class the model predicts"
        )
    class_counts = load_class_counts(class_counts, num_classes)  # whole numbers >= 0, as in shot_accuracy
    if macs is not None and not isinstance(macs, MacsBreakdown):
        raise TypeError(
            f"macs must be a MacsBreakdown from count_macs(model) or None, got {type(macs).__name__}"
        )
    if macs is not None and macs.num_experts != num_experts:
        raise ValueError(
            f"macs is the MACs breakdown of a {macs.num_experts}-expert model, but the model has "
            f"{num_experts} experts; pass count_macs(model, input_size) of the model evaluated (or macs=None)"
        )
    if macs is not None and macs.num_classes is not None and macs.num_classes != num_classes:
        raise ValueError(
            f"macs is the MACs breakdown of a model with {macs.num_classes} classes, but the model has "
            f"{num_classes}; pass count_macs(model, input_size) of the model evaluated (or macs=None)"
        )
    device = torch.device(device)
    autocast = (
        torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    )
    was_training = model.training
    model.eval()
    targets, tops, confidences, used = [], [], [], []
    try:
        with model.routing_scope(routing) if routing is not None else nullcontext():
            mode = model.routing
            batches = 0
            for batches, batch in enumerate(loader, start=1):
                x, y = _images_and_labels(batch, batches - 1, num_classes)
                if x.shape[0] == 0:
                    continue
                _check_macs_input(macs, x, batches - 1)
                x = x.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    if mode == "router":
                        out = model.route(x)
                        logits, n = out.logits, out.num_experts
                    else:
                        logits = model(x)
                        n = torch.full((x.shape[0],), num_experts if mode == "all" else mode, device=device)
                logits = logits.float()
                targets.append(y)
                tops.append(topk_predictions(logits, 5))
                confidences.append(logits.softmax(dim=1).amax(dim=1))
                used.append(n)
    finally:
        model.train(was_training)
    if not targets:
        got = "no batch" if batches == 0 else f"{batches} empty batch{'es' if batches > 1 else ''}"
        raise ValueError(f"the loader yielded no images ({got}): nothing to evaluate; check the eval dataset")
    target = torch.cat(targets).cpu().long()  # [N]
    try:  # the label range, here for labels that came on the device (those on the CPU were checked per batch)
        _class_indices(target, target.numel(), num_classes)
    except ValueError as error:
        raise ValueError(f"evaluate: the loader's labels: {error}") from None
    top = torch.cat(tops).cpu()  # [N, min(5, C)]
    confidence = torch.cat(confidences).cpu()  # [N]
    nonfinite = int((~torch.isfinite(confidence)).sum())
    if nonfinite:
        raise ValueError(
            f"evaluate: the model gave NaN or inf logits for {nonfinite} of {target.numel()} images; "
            + (
                "float16 logits can overflow: evaluate with amp_dtype=torch.bfloat16 or None"
                if amp_dtype == torch.float16
                else "its weights may have diverged: evaluate an earlier checkpoint"
            )
        )
    used = torch.cat(used).cpu().long()  # [N]
    result = _summarize(mode, target, top, confidence, used, class_counts, num_experts, macs)
    result.model = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    result.dataset = getattr(getattr(loader, "dataset", None), "name", "")
    return result


def _check_macs_input(macs: Optional[MacsBreakdown], x: torch.Tensor, index: int) -> None:
    """Refuse a MACs breakdown counted for another image size than batch ``index``'s (its costs would be
    those of other maps)."""
    if macs is None or macs.input_size is None or tuple(x.shape[1:]) == macs.input_size:
        return
    size = tuple(x.shape[1:])
    raise ValueError(
        f"macs was counted for {list(macs.input_size)} images, but batch {index} holds {list(size)} images; "
        f"pass count_macs(model, input_size={size}) (or macs=None)"
    )


def _images_and_labels(batch: Any, index: int, num_classes: int) -> tuple:
    """A loader's batch as ``(x [B, ...], y [B])``, or a ValueError that says what the loader must yield.

    Only shape and dtype checks, which read nothing back from the device (the label range is checked here
    for labels on the CPU only; ``evaluate`` checks all of them once at the end).
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor)):
        if isinstance(batch, dict):
            got = f"a dict with the keys {list(batch)[:6]}"
        elif isinstance(batch, (tuple, list)):
            got = (
                f"a {type(batch).__name__} of {len(batch)} ({', '.join(type(b).__name__ for b in batch[:4])})"
            )
        else:
            got = f"a {type(batch).__name__}"
        raise ValueError(
            f"evaluate: batch {index} of the loader is {got}; the loader must yield (images [B, 3, H, W] "
            "tensor, labels [B]) pairs, e.g. ((b['image'], b['label']) for b in loader) for dict batches"
        )
    x, y = batch
    try:
        return x, _class_indices(y, x.shape[0], num_classes)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"evaluate: batch {index} of the loader ({x.shape[0]} images): {error}") from None


def _summarize(
    mode: Routing,
    target: Tensor,
    top: Tensor,
    confidence: Tensor,
    used: Tensor,
    class_counts: List[int],
    num_experts: int,
    macs: Optional[MacsBreakdown],
) -> EvalResult:
    num_classes = len(class_counts)
    hit1, hit5 = _topk_hits(top, target, (1, 5))
    per_class = per_class_accuracy(top[:, 0], target, num_classes)
    shots = shot_accuracy(per_class, class_counts)
    split_of_sample = {
        name: torch.isin(target, torch.tensor(idx, dtype=torch.long))
        for name, idx in shot_splits(class_counts).items()
    }
    experts_per_split = {
        name: used[mask].double().mean().item() if mask.any() else math.nan
        for name, mask in split_of_sample.items()
    }
    counts = {"all": experts_histogram(used, num_experts)}
    counts.update(
        {name: experts_histogram(used[mask], num_experts) for name, mask in split_of_sample.items()}
    )
    return EvalResult(
        routing=mode,
        top1=hit1.double().mean().item() * 100.0,
        top5=hit5.double().mean().item() * 100.0,
        many_top1=shots["many"],
        medium_top1=shots["medium"],
        few_top1=shots["few"],
        ece=expected_calibration_error(confidence, hit1),
        experts_mean=used.double().mean().item(),
        experts_per_split=experts_per_split,
        gmacs_per_image=None if macs is None else macs.for_routing(mode, used) / 1e9,
        num_images=int(target.numel()),
        num_experts=num_experts,
        class_counts=class_counts,
        per_class_top1=per_class,
        per_class_images=np.bincount(target.numpy(), minlength=num_classes),
        per_class_experts=_class_means(used.numpy(), target.numpy(), num_classes),
        experts_counts=counts,
    )
