"""One training epoch, as one loop you can follow.

``train_one_epoch`` runs the optimisation steps of an epoch for any of RIDE's three stages; what differs
between the stages is the ``step`` function (the forward pass and the loss), built by :func:`make_step`:

* ``experts`` (stage 1): ``loss(model(x).expert_logits, y)``, the model in expert-training mode;
* ``router`` (stage 2): ``loss(router_logits, help_targets)`` from ``model.forward_router_train(x, y)``;
* ``distill`` (stage 3): ``loss(student expert logits, y, teacher(x))``, the teacher frozen.

No host synchronisation inside the step: the loss is accumulated on the device and read (and checked for
NaN / infinity) only every ``log_interval`` steps and at the end of the epoch.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from ride_models.cuda_graph import GraphedTrainStep

__all__ = ["NonFiniteLossError", "RouterTrainStep", "make_step", "train_one_epoch"]

_logger = logging.getLogger("train")

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class RouterTrainStep(nn.Module):
    """Wraps a RIDE model so that ``forward(x, y)`` is its router-training path (stage 2).

    DistributedDataParallel synchronises gradients only through ``forward``; this puts
    ``forward_router_train`` behind it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, target: torch.Tensor):
        return self.model.forward_router_train(x, target)


def make_step(
    stage: str, model: nn.Module, loss_fn: nn.Module, teacher: Optional[nn.Module] = None
) -> StepFn:
    """The forward pass and loss of one batch for ``stage``; ``model`` may be DDP-wrapped or compiled.

    For ``router``, ``model`` is a :class:`RouterTrainStep` (possibly wrapped).
    """
    if stage == "experts":
        return lambda x, y: loss_fn(model(x).expert_logits, y)
    if stage == "router":

        def router_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = model(x, y)
            return loss_fn(out.router_logits, out.help_targets)

        return router_step
    if stage == "distill":
        if teacher is None:
            raise ValueError("the distill stage needs a teacher model")

        def distill_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teacher(x)  # [B, C]: the teacher's mean over all its experts
            return loss_fn(model(x).expert_logits, y, teacher_logits)

        return distill_step
    raise ValueError(f"unknown stage {stage!r}: expected 'experts', 'router' or 'distill'")


class _Progress:
    """A one-line progress display on a terminal; plain log lines every ``log_interval`` steps otherwise."""

    def __init__(self, epoch: int, total: int, log_interval: int, enabled: bool) -> None:
        self.epoch, self.total, self.log_interval, self.enabled = epoch, total, log_interval, enabled
        self.tty = enabled and sys.stdout.isatty()

    def update(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        line = (
            f"epoch {self.epoch} [{step:>{len(str(self.total))}}/{self.total}] loss {loss:.4f} "
            f"lr {lr:.3g} {images_per_s:.{0 if images_per_s >= 10 else 1}f} img/s"
        )
        if self.tty:
            sys.stdout.write("\r" + line)
            sys.stdout.flush()
        else:
            _logger.info(line)

    def close(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


def train_one_epoch(
    step: StepFn,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    ema: Optional[nn.Module] = None,
    model: Optional[nn.Module] = None,
    channels_last: bool = False,
    log_interval: int = 50,
    verbose: bool = True,
) -> float:
    """Run one epoch of optimisation steps; return the mean training loss.

    Args:
        step: ``step(x, y) -> loss`` (:func:`make_step`); the model must already be in train mode. A
            :class:`~ride_models.cuda_graph.GraphedTrainStep` also does the backward pass and the
            optimizer step (``amp_dtype`` and ``scaler`` are then its own).
        loader: batches ``(x [B, 3, H, W], y [B])``.
        optimizer: updates the parameters; its learning rate is set by the caller for the epoch.
        epoch: the 1-based epoch, for the progress display and the error messages.
        device: where the batches go.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for full precision.
        scaler: gradient scaler (float16 autocast).
        ema: a ``timm.utils.ModelEmaV3`` updated from ``model`` after every step.
        model: the (unwrapped) model the EMA follows.
        channels_last: move inputs to channels-last memory format.
        log_interval: steps between loss reads (display, NaN check).
        verbose: show progress (rank 0 only under DDP).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the weights in memory are not to be saved.
    """
    if ema is not None and model is None:
        raise ValueError("an EMA needs the model it follows (model=...)")
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    total = len(loader) if hasattr(loader, "__len__") else 0
    progress = _Progress(epoch, total, log_interval, verbose)
    loss_sum = torch.zeros((), device=device)
    steps, images, start = 0, 0, time.perf_counter()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(step, GraphedTrainStep):  # forward, backward and optimizer step in one replay
            loss = step(x, y)
        else:
            with autocast:
                loss = step(x, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None and scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach()
        steps += 1
        images += x.shape[0]
        if steps % log_interval == 0 or steps == total:
            mean = _checked_mean(loss_sum, steps, epoch)
            progress.update(
                steps, mean, optimizer.param_groups[0]["lr"], images / (time.perf_counter() - start)
            )
    progress.close()
    if steps == 0:
        raise RuntimeError(f"epoch {epoch}: the training loader gave no batch (is the dataset empty?)")
    return _checked_mean(loss_sum, steps, epoch)


def _checked_mean(loss_sum: torch.Tensor, steps: int, epoch: int) -> float:
    mean = loss_sum.item() / steps
    if not torch.isfinite(torch.tensor(mean)):
        raise NonFiniteLossError(
            f"the training loss became {mean} in epoch {epoch} (by step {steps}); stopping. The last "
            "checkpoint is from before this epoch and is kept; lower --lr, or try without --amp float16"
        )
    return mean
