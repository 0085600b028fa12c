"""The pictures of a long-tailed evaluation and of a training run, as PNG files (matplotlib, no display
needed).

* ``per_class_accuracy.png``: top-1 accuracy of each class against its training images (log scale), the
  many / medium / few boundaries marked; one series per routing mode. The long tail at a glance: where
  accuracy falls off as training images get scarce.
* ``experts_per_split.png``: for each routing mode, the share of the eval images of each split that used
  1, 2, ..., E experts. RIDE's router should send tail (few-shot) images on to more experts.
* ``training_curves.png`` (train.py's run folder, redrawn as the run goes): train loss and learning rate, and
  the per-epoch top-1 overall and on many / medium / few classes, against the epoch.

matplotlib is imported only here, when a plot is drawn, through its object-oriented API (``Figure``) so
that no GUI backend is selected and a user's pyplot state is left alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, List

import numpy as np

from ride_models.checkpoint import atomic_write
from ride_models.data.sampling import FEW_SHOT_MAX, MANY_SHOT_MIN
from ride_models.metrics import SHOT_SPLITS, EvalResult

__all__ = [
    "PLOT_FILES",
    "plot_experts_per_split",
    "plot_per_class_accuracy",
    "plot_training_curves",
    "save_plots",
]

PLOT_FILES = ("per_class_accuracy.png", "experts_per_split.png")
_MARKERS = "os^Dv<>"


def _new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "the evaluation plots need matplotlib, which is not installed: pip install matplotlib "
            "(or leave out --plot-dir)"
        ) from error
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _title(results: Sequence[EvalResult]) -> str:
    first = results[0]
    return f"{first.model} on {first.dataset or 'the eval set'} ({first.num_images} images)"


def plot_per_class_accuracy(results: Sequence[EvalResult], path: str | Path) -> Path:
    """Per-class top-1 accuracy (percent) against training images per class, one series per result.

    Classes without eval images are left out.
    """
    fig = _new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for i, r in enumerate(results):
        counts = np.asarray(r.class_counts, dtype=np.float64)
        present = ~np.isnan(r.per_class_top1)
        ax.scatter(
            counts[present],
            r.per_class_top1[present],
            s=18,
            marker=_MARKERS[i % len(_MARKERS)],
            alpha=0.7,
            label=f"routing {r.routing}: top-1 {r.top1:.2f}%",
        )
    # The split boundaries: few < 20 <= medium <= 100 < many.
    for x in (FEW_SHOT_MAX, MANY_SHOT_MIN):
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_ylim(-3, 103)
    ax.set_xlabel("training images of the class (log scale; dashed: few | medium | many)")
    ax.set_ylabel("top-1 accuracy of the class (%)")
    ax.set_title(_title(results))
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def plot_experts_per_split(results: Sequence[EvalResult], path: str | Path) -> Path:
    """Share of each split's images (percent) that used 1..E experts: one panel per result."""
    fig = _new_figure(3.6 * len(results) + 0.8, 3.8)
    axes = fig.subplots(1, len(results), squeeze=False, sharey=True)[0]
    for ax, r in zip(axes, results):
        splits = [s for s in SHOT_SPLITS if sum(r.experts_counts[s])]
        width = 0.8 / r.num_experts
        for k in range(r.num_experts):
            shares = [100.0 * r.experts_counts[s][k] / sum(r.experts_counts[s]) for s in splits]
            offsets = np.arange(len(splits)) + (k - (r.num_experts - 1) / 2) * width
            ax.bar(offsets, shares, width, label=f"{k + 1} expert{'s' if k else ''}")
        ax.set_xticks(np.arange(len(splits)), [f"{s}\n({r.experts_per_split[s]:.2f})" for s in splits])
        ax.set_ylim(0, 100)
        ax.set_title(f"routing {r.routing}: {r.experts_mean:.2f} experts per image", fontsize="medium")
        ax.set_xlabel("shot split (mean experts used)")
    axes[0].set_ylabel("images of the split (%)")
    axes[-1].legend(fontsize="small")
    fig.suptitle(_title(results))
    return _save(fig, path)


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Train loss and learning rate (left), top-1 overall and by shot split (right), per epoch.

    ``rows`` are train.py's summary rows (``epoch``, ``lr``, ``train_loss``, ``eval_split``, ``top1``,
    ``many_top1``, ``medium_top1``, ``few_top1``; a split without eval images is None).
    """
    epochs = [row["epoch"] for row in rows]
    fig = _new_figure(10.0, 4.0)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [row["train_loss"] for row in rows], marker=".", color="C0")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss", color="C0")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(epochs, [row["lr"] for row in rows], color="C1", linestyle="--")
    lr_ax.set_ylabel("learning rate", color="C1")
    for key, label in (
        ("top1", "all"),
        ("many_top1", "many"),
        ("medium_top1", "medium"),
        ("few_top1", "few"),
    ):
        values = [np.nan if row[key] is None else row[key] for row in rows]
        if not all(np.isnan(values)):
            acc_ax.plot(epochs, values, marker=".", label=label)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel(f"top-1 on {rows[-1]['eval_split']} (%)")
    acc_ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # a reader never sees half a file
    return path


def save_plots(results: Sequence[EvalResult], plot_dir: str | Path) -> List[Path]:
    """Write both plots (:data:`PLOT_FILES`) for ``results`` into ``plot_dir``; return their paths."""
    if not results:
        raise ValueError("no results to plot")
    plot_dir = Path(plot_dir)
    return [
        plot_per_class_accuracy(results, plot_dir / PLOT_FILES[0]),
        plot_experts_per_split(results, plot_dir / PLOT_FILES[1]),
    ]
