"""Losses of RIDE (Wang et al., "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts",
ICLR 2021) and the single-output baselines it is compared with.

``create_loss(name, cls_num_list=None, **kwargs)`` is the entry point; ``docs/losses.md`` has one table of
every loss (formula, paper equation, official class) and the differences between the official code and the
paper. Every loss is an ``nn.Module`` with ``set_epoch(epoch)`` (the official 1-based epoch: deferred
re-weighting and the temperature switch happen when ``epoch > drw_epoch``) and ``forward(expert_logits,
target)``::

    expert_logits  # [B, E, C], already multiplied by the model's scale s (or [B, C] / a list of E [B, C])
    target         # [B] int64 class indices

Default behaviour reproduces the official code's numbers; the paper's variants are options.
Losses are computed in float32 (float64 when the logits are float64), with autocast switched off.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ride_models._compat import autocast_known

__all__ = [
    "LOSS_NAMES",
    "CrossEntropyLoss",
    "DistillLoss",
    "FocalLoss",
    "LDAMLoss",
    "RIDELoss",
    "RoutingLoss",
    "create_loss",
    "loss_arguments",
    "check_target",
    "diversity_temperature",
    "drw_weights",
    "ldam_margins",
]

Logits = Union[Tensor, Sequence[Tensor]]


# --- Class-count constants: each computed by exactly one function, in float64 from the integer counts ---


def ldam_margins(cls_num_list: Tensor, max_m: float) -> Tensor:
    """LDAM margins (Cao et al., 2019): m_c proportional to n_c^(-1/4), the rarest class getting ``max_m``.

    ``cls_num_list``  # [C] training images per class. Returns [C] float64.
    """
    margins = cls_num_list.double().pow(-0.25)
    return margins * (max_m / margins.max())


def drw_weights(cls_num_list: Tensor, beta: float = 0.9999) -> Tensor:
    """Deferred re-weighting weights from the effective number of samples (Cui et al., 2019).

    w_c = (1 - beta) / (1 - beta^n_c), normalised so the C weights sum to C. Returns [C] float64.
    """
    weights = (1.0 - beta) / (1.0 - torch.pow(beta, cls_num_list.double()))
    return weights * (len(weights) / weights.sum())


def diversity_temperature(
    cls_num_list: Tensor, base_temperature: float, temperature_reweight: float
) -> Tensor:
    """The distribution-aware temperature T_c of the diversity loss (the paper's equation 3).

    With beta_c = gamma * C * n_c / sum(n) (gamma = ``temperature_reweight``), the official code uses
    T_c = T_base * (beta_c + 1 - gamma) / max_k(beta_k + 1 - gamma): the most frequent class gets T_base,
    rarer classes a lower temperature. Returns [C] float64.
    """
    counts = cls_num_list.double()
    beta = temperature_reweight * len(counts) * counts / counts.sum()
    factor = beta + 1.0 - temperature_reweight
    return base_temperature * factor / factor.max()


# --- Input handling ---


def _compute_dtype(x: Tensor) -> torch.dtype:
    # float64 inputs stay float64 (to match the float64 references); everything else is computed in float32,
    # so bf16/fp16 logits from an autocast forward never reach log_softmax in low precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device):
    if not autocast_known(device.type):
        return nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _stack_experts(expert_logits: Logits) -> Tensor:
    """A list of E tensors [B, C] (as the official trainer passes them) becomes [B, E, C]."""
    if isinstance(expert_logits, Tensor):
        return expert_logits
    if len(expert_logits) == 0:
        raise ValueError(
            "expert_logits is an empty list; pass a tensor [B, E, C] or a list of E tensors [B, C]"
        )
    return torch.stack(list(expert_logits), dim=1)


def check_target(target: Tensor, batch: int, num_classes: int) -> None:
    """Refuse a ``target`` that is not ``batch`` class indices in 0..num_classes-1, with the fix."""
    if not isinstance(target, Tensor):
        raise ValueError(
            f"target must be a tensor of class indices [B]; got {type(target).__name__}. Pass "
            "torch.as_tensor(target)"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.dim() != 1:
        raise ValueError(
            f"target must be a 1-D integer tensor of class indices [B]; got dtype {target.dtype} and shape "
            f"{tuple(target.shape)}. Pass class indices (not one-hot or soft labels), e.g. target.long()."
        )
    if target.shape[0] != batch:
        raise ValueError(f"target has {target.shape[0]} entries but the logits have batch size {batch}")
    # The range check reads the targets on the host: skipped where that would stall the device (CUDA's own
    # kernels assert on an out-of-range class index) or break a compiled graph.
    if torch.compiler.is_compiling() or target.numel() == 0 or target.device.type != "cpu":
        return
    low, high = int(target.min()), int(target.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"target holds class indices in [{low}, {high}], but the logits have C = {num_classes} classes "
            f"(valid indices 0..{num_classes - 1}). Map the labels to 0..C-1, or build the model with the "
            f"dataset's number of classes."
        )


def _check_counts(cls_num_list: Any) -> Optional[Tensor]:
    if cls_num_list is None:
        return None
    counts = torch.as_tensor(cls_num_list).detach().cpu()
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"cls_num_list must be a flat list of per-class training-image counts; got shape "
            f"{tuple(counts.shape)}. Pass e.g. [500, 477, ..., 5] (one count per class)."
        )
    if counts.dtype.is_floating_point and not torch.equal(counts, counts.round()):
        raise ValueError(f"cls_num_list must hold whole image counts; got {counts.tolist()[:10]}...")
    bad = (counts <= 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"cls_num_list must hold a positive count for every class; class(es) {bad[:10]} have "
            f"{counts[bad[:10]].tolist()}. Remove classes with no training images from the label space, or "
            f"compute the counts from the training split."
        )
    return counts.long()


# --- Base classes ---


class _ClassCountLoss(nn.Module):
    """Holds the class counts and the constants derived from them as (non-persistent) buffers."""

    cls_num_list: Optional[Tensor]
    _constant_names: tuple[str, ...] = ()

    def __init__(self, cls_num_list: Any) -> None:
        super().__init__()
        counts = _check_counts(cls_num_list)
        # A CPU copy outside the buffers (so .to() leaves it alone) to re-derive the constants from.
        self._counts = counts
        self.register_buffer("cls_num_list", None if counts is None else counts.clone(), persistent=False)

    def _class_constants(self, counts: Tensor) -> dict[str, Tensor]:
        """The float64 constants named in ``_constant_names``, derived from ``counts  # [C]``."""
        return {}

    def _register_class_constants(self) -> None:
        """Register the constants as buffers in the default dtype (None without class counts)."""
        constants = {} if self._counts is None else self._class_constants(self._counts)
        for name in self._constant_names:
            value = constants.get(name)
            value = None if value is None else value.to(torch.get_default_dtype())
            self.register_buffer(name, value, persistent=False)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> _ClassCountLoss:
        super()._apply(fn, recurse)
        # Re-derive the constants from the exact integer counts in the new dtype: a float32 buffer cast up to
        # float64 would keep its float32 rounding (1e-7 relative) and miss the float64 references.
        if self._counts is not None:
            for name, value in self._class_constants(self._counts).items():
                old = self._buffers[name]
                self._buffers[name] = value.to(device=old.device, dtype=old.dtype)
        return self

    def _check_num_classes(self, num_classes: int) -> None:
        if self._counts is not None and len(self._counts) != num_classes:
            raise ValueError(
                f"cls_num_list has {len(self._counts)} classes but the logits have C = "
                f"{num_classes}; pass the training split's image count for each of the {num_classes} classes."
            )


class _SingleOutputLoss(_ClassCountLoss):
    """A classification loss on one set of logits [B, C], optionally with deferred re-weighting (DRW).

    Given per-expert logits [B, E, C] (or a list of E [B, C]) it uses their mean over the experts.
    """

    drw_weight: Optional[Tensor]
    _constant_names = ("drw_weight",)

    def __init__(
        self, cls_num_list: Any = None, drw_epoch: Optional[int] = None, reweight: bool = False
    ) -> None:
        super().__init__(cls_num_list)
        if drw_epoch is not None and drw_epoch < 0:
            raise ValueError(
                f"drw_epoch must be None (never re-weight) or an epoch >= 0; got {drw_epoch}. The official "
                f"reweight_epoch=-1 means 'never', which is drw_epoch=None here."
            )
        if reweight and self.cls_num_list is None:
            raise ValueError("reweight=True needs cls_num_list (the weights come from the class counts)")
        self.drw_epoch = drw_epoch
        self.reweight = reweight
        self.epoch = 0
        self._register_class_constants()

    def _class_constants(self, counts: Tensor) -> dict[str, Tensor]:
        return {"drw_weight": drw_weights(counts)}

    def set_epoch(self, epoch: int) -> None:
        """Set the official 1-based epoch; re-weighting is on when ``epoch > drw_epoch``."""
        self.epoch = int(epoch)

    def schedule_state(self) -> Hashable:
        """What the epoch changes in the loss's Python-level branches (a CUDA graph records one per value)."""
        return self.reweighting, self.after_drw_epoch

    @property
    def after_drw_epoch(self) -> bool:
        return self.drw_epoch is not None and self.epoch > self.drw_epoch

    @property
    def reweighting(self) -> bool:
        """Whether the DRW class weights are applied now (never without class counts)."""
        return self.drw_weight is not None and (self.reweight or self.after_drw_epoch)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """Unweighted per-sample loss. ``logits  # [N, C]``, ``target  # [N]``; returns [N]."""
        raise NotImplementedError

    def reduce(self, per_sample: Tensor, target: Tensor) -> Tensor:
        """Batch mean, weighted by w_{y_b} while re-weighting: sum_b w_{y_b} l_b / sum_b w_{y_b}."""
        if not self.reweighting:
            return per_sample.mean()
        weight = self.drw_weight.to(per_sample.dtype)[target]
        return (weight * per_sample).sum() / weight.sum()

    def classification_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The loss of one set of logits ``[B, C]`` (already in the compute dtype)."""
        return self.reduce(self.per_sample(logits, target), target)

    def forward(self, expert_logits: Logits, target: Tensor) -> Tensor:
        """``expert_logits  # [B, E, C]`` (mean over experts used) or ``[B, C]``; returns a 0-d tensor."""
        logits = _stack_experts(expert_logits)
        with _autocast_off(logits.device):
            logits = logits.to(_compute_dtype(logits))
            if logits.dim() == 3:
                logits = logits.mean(dim=1)
            if logits.dim() != 2:
                raise ValueError(f"expected logits [B, C] or [B, E, C]; got shape {tuple(logits.shape)}")
            self._check_num_classes(logits.shape[1])
            check_target(target, logits.shape[0], logits.shape[1])
            target = target.long()  # int32 / uint8 indices: torch takes int64 (uint8 would index as a mask)
            return self.classification_loss(logits, target)

    def extra_repr(self) -> str:
        return f"drw_epoch={self.drw_epoch}, reweight={self.reweight}, epoch={self.epoch}"


# --- Single-output losses ---


class CrossEntropyLoss(_SingleOutputLoss):
    """Cross-entropy; ``reweight=True`` applies the DRW weights from the start (official ``reweight_CE``)."""

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, reduction="none")


class FocalLoss(_SingleOutputLoss):
    """Focal loss (Lin et al., 2017): l = CE, p = exp(-l), loss = mean((1 - p)^gamma * l)."""

    def __init__(self, cls_num_list: Any = None, gamma: float = 1.0, drw_epoch: Optional[int] = None) -> None:
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0; got {gamma}")
        self.gamma = gamma
        super().__init__(cls_num_list, drw_epoch)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        ce = F.cross_entropy(logits, target, reduction="none")
        return (1.0 - torch.exp(-ce)) ** self.gamma * ce

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, " + super().extra_repr()


class LDAMLoss(_SingleOutputLoss):
    """LDAM (Cao et al., 2019): cross-entropy after subtracting s * m_y from the target logit.

    The logits are already s-scaled cosines (the model multiplies by s), so this is s * (cos_y - m_y) for the
    target class and nothing else is rescaled; ``s`` must equal the model's scale.
    """

    margins: Tensor
    _constant_names = ("drw_weight", "margins")

    def __init__(
        self, cls_num_list: Any, max_m: float = 0.5, s: float = 30.0, drw_epoch: Optional[int] = None
    ) -> None:
        if cls_num_list is None:
            raise ValueError(
                "LDAM needs cls_num_list (its margins come from the class counts); pass the training "
                "split's per-class image counts, or use 'ce' / 'ce_diversity' when they are unknown."
            )
        if max_m <= 0 or s <= 0:
            raise ValueError(f"LDAM needs max_m > 0 and s > 0; got max_m={max_m}, s={s}")
        self.max_m, self.s = max_m, s
        super().__init__(cls_num_list, drw_epoch)

    def _class_constants(self, counts: Tensor) -> dict[str, Tensor]:
        return {**super()._class_constants(counts), "margins": ldam_margins(counts, self.max_m)}

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        shift = (self.s * self.margins.to(logits.dtype)[target]).unsqueeze(1)  # [N, 1]
        adjusted = logits.scatter_add(1, target.unsqueeze(1), -shift)
        return F.cross_entropy(adjusted, target, reduction="none")

    def extra_repr(self) -> str:
        return f"max_m={self.max_m}, s={self.s}, " + super().extra_repr()


# --- RIDE: individual loss per expert + distribution-aware diversity ---


class RIDELoss(_ClassCountLoss):
    """RIDE loss: sum over experts e of base(z_e) - lambda * T^2 * KL_e (the paper's equation 2).

    ``base`` is a single-output loss (CE, focal or LDAM) whose DRW schedule (``drw_epoch``) also switches the
    temperature from the scalar ``diversity_temperature`` to the per-class T_c of equation 3.

    ``temperature_mode``: ``"per_class"`` (official: every class logit divided by its own T_c, and the KL
    scaled by mean_c(T_c)^2 as a constant) or ``"per_sample"`` (paper: sample b uses the scalar T_{y_b} of its
    target class for all logits, and T_{y_b}^2).
    ``kl_mode``: ``"ensemble"`` (official: KL(P || Q_e) with P the softmax of the detached mean logits) or
    ``"pairwise"`` (paper, equation 2: 1/(E-1) sum_{j != e} KL(Q_e || Q_j), gradients through both).
    ``zero_weight_uses_ensemble``: with ``diversity_weight == 0`` the official code computes the base loss on
    the ensemble (mean) logits for every expert, E * base(mean); set False for sum_e base(z_e).
    """

    class_temperature: Optional[Tensor]
    _constant_names = ("class_temperature",)

    def __init__(
        self,
        base: _SingleOutputLoss,
        diversity_weight: float = 0.45,
        diversity_temperature: float = 1.0,
        temperature_reweight: float = 0.05,
        temperature_mode: str = "per_class",
        kl_mode: str = "ensemble",
        zero_weight_uses_ensemble: bool = True,
    ) -> None:
        if temperature_mode not in ("per_class", "per_sample"):
            raise ValueError(
                f"temperature_mode must be 'per_class' or 'per_sample'; got {temperature_mode!r}"
            )
        if kl_mode not in ("ensemble", "pairwise"):
            raise ValueError(f"kl_mode must be 'ensemble' or 'pairwise'; got {kl_mode!r}")
        if diversity_temperature <= 0:
            raise ValueError(f"diversity_temperature must be > 0; got {diversity_temperature}")
        self.diversity_weight = float(diversity_weight)
        self.base_temperature = float(diversity_temperature)
        self.temperature_reweight = float(temperature_reweight)
        self.temperature_mode, self.kl_mode = temperature_mode, kl_mode
        self.zero_weight_uses_ensemble = zero_weight_uses_ensemble
        super().__init__(base._counts)
        self.base = base
        self._register_class_constants()
        if self.class_temperature is not None:
            self._check_temperature()

    def _class_constants(self, counts: Tensor) -> dict[str, Tensor]:
        temperature = diversity_temperature(counts, self.base_temperature, self.temperature_reweight)
        return {"class_temperature": temperature}

    def _check_temperature(self) -> None:
        temperature = self._class_constants(self._counts)["class_temperature"]
        if bool((temperature > 0).all()) and bool(temperature.isfinite().all()):
            return
        # T_c > 0 for every class iff gamma * (1 - C * n_c / sum(n)) < 1 for every class.
        share = self._counts.double() * len(self._counts) / self._counts.sum()
        upper = 1.0 / (1.0 - float(share.min())) if float(share.min()) < 1 else float("inf")
        lower = -1.0 / (float(share.max()) - 1.0) if float(share.max()) > 1 else float("-inf")
        raise ValueError(
            f"temperature_reweight={self.temperature_reweight} makes the diversity temperature non-positive "
            f"for some classes (min T_c = {float(temperature.min()):.4g}); for these class counts it must "
            f"lie in ({lower:.4g}, {upper:.4g}). The configs use 0.05 (CIFAR) and 0.02 (ImageNet-LT)."
        )

    def set_epoch(self, epoch: int) -> None:
        """Set the official 1-based epoch (DRW and the per-class temperature start when epoch > drw_epoch)."""
        self.base.set_epoch(epoch)

    def schedule_state(self) -> Hashable:
        """The base loss's (DRW also switches the temperature)."""
        return self.base.schedule_state()

    def temperature(self, target: Tensor, dtype: torch.dtype) -> tuple[Tensor | float, Tensor | float]:
        """The temperature to divide the logits by (broadcastable to [B, E, C]) and T^2 ([B], 0-d or float).

        The scalar temperature stays a Python float: a new device tensor from a host value would be a
        host-to-device copy in every step (and is not allowed inside a CUDA graph recording).
        """
        if self.class_temperature is None or not self.base.after_drw_epoch:
            return self.base_temperature, self.base_temperature**2
        per_class = self.class_temperature.to(dtype)  # [C]
        if self.temperature_mode == "per_sample":
            per_sample = per_class[target]  # [B]
            return per_sample[:, None, None], per_sample**2
        return per_class, per_class.mean() ** 2

    def diversity_per_expert(self, expert_logits: Tensor, target: Tensor) -> Tensor:
        """T^2 * KL_e of every expert, averaged over the batch (before the factor -lambda).

        ``expert_logits  # [B, E, C]`` in the compute dtype; returns [E].
        """
        num_experts = expert_logits.shape[1]
        temperature, temperature_sq = self.temperature(target, expert_logits.dtype)
        log_q = F.log_softmax(expert_logits / temperature, dim=-1)  # [B, E, C]
        if self.kl_mode == "ensemble":
            # Detached as in the official code. It changes no gradient: P is the softmax of the mean of these
            # same logits, so sum_e dKL(P || Q_e)/dP_c is equal for all classes and vanishes through softmax.
            ensemble = expert_logits.mean(dim=1, keepdim=True).detach()
            log_p = F.log_softmax(ensemble / temperature, dim=-1)  # [B, 1, C]
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [B, E]
        else:
            if num_experts < 2:
                raise ValueError("kl_mode='pairwise' needs at least 2 experts; got expert_logits with E = 1")
            q = log_q.exp()
            cross = torch.einsum("bic,bjc->bij", q, log_q)  # sum_c q_i log q_j
            pair_kl = (q * log_q).sum(dim=-1).unsqueeze(2) - cross  # [B, E, E]: KL(Q_i || Q_j)
            off_diagonal = 1.0 - torch.eye(num_experts, dtype=q.dtype, device=q.device)
            kl = (pair_kl * off_diagonal).sum(dim=2) / (num_experts - 1)  # [B, E]
        if isinstance(temperature_sq, float):
            kl = kl * temperature_sq
        elif temperature_sq.dim() == 1:
            kl = kl * temperature_sq[:, None]
        else:
            kl = kl * temperature_sq.detach()
        return kl.mean(dim=0)

    def forward(self, expert_logits: Logits, target: Tensor) -> Tensor:
        """``expert_logits  # [B, E, C]`` or a list of E ``[B, C]``; returns a 0-d tensor."""
        logits = _stack_experts(expert_logits)
        if logits.dim() != 3:
            raise ValueError(
                f"the RIDE diversity losses need every expert's logits [B, E, C] (model.forward_experts(x), "
                f"or RIDEOutput.expert_logits in training); got a tensor of shape {tuple(logits.shape)}. For "
                f"a plain loss on the mean logits (the official validation call) use create_loss('ce')."
            )
        with _autocast_off(logits.device):
            logits = logits.to(_compute_dtype(logits))
            batch, num_experts, num_classes = logits.shape
            self._check_num_classes(num_classes)
            check_target(target, batch, num_classes)
            target = target.long()  # int32 / uint8 indices: torch takes int64 (uint8 would index as a mask)
            if self.diversity_weight == 0.0 and self.zero_weight_uses_ensemble:
                return num_experts * self.base.classification_loss(logits.mean(dim=1), target)
            # sum_e of the (weighted) batch means = the weighted batch mean of the per-sample sums over e.
            per_sample = self.base.per_sample(logits.flatten(0, 1), target.repeat_interleave(num_experts))
            loss = self.base.reduce(per_sample.view(batch, num_experts).sum(dim=1), target)
            if self.diversity_weight != 0.0:
                loss = loss - self.diversity_weight * self.diversity_per_expert(logits, target).sum()
            return loss

    def extra_repr(self) -> str:
        return (
            f"diversity_weight={self.diversity_weight}, diversity_temperature={self.base_temperature}, "
            f"temperature_reweight={self.temperature_reweight}, temperature_mode={self.temperature_mode!r}, "
            f"kl_mode={self.kl_mode!r}, zero_weight_uses_ensemble={self.zero_weight_uses_ensemble}"
        )


# --- Router (stage 2) and distillation ---


class RoutingLoss(nn.Module):
    """Weighted binary cross-entropy of the router's decisions (the paper's equation 5).

    Mean over decisions i of BCE-with-logits(z_i, t_i, pos_weight), each averaged over the batch. The
    official model returned it as a 1-element tensor; this returns a 0-d tensor.
    """

    def __init__(self, pos_weight: float = 100.0) -> None:
        super().__init__()
        if pos_weight <= 0:
            raise ValueError(f"pos_weight must be > 0; got {pos_weight}")
        self.pos_weight = float(pos_weight)

    def set_epoch(self, epoch: int) -> None:
        """No schedule; present so every loss has the same interface."""

    def schedule_state(self) -> Hashable:
        """No schedule."""
        return None

    def forward(self, router_logits: Tensor, help_targets: Tensor) -> Tensor:
        """``router_logits  # [B, E-1]``, ``help_targets  # [B, E-1]`` bool or 0/1 float; returns 0-d."""
        if router_logits.shape != help_targets.shape:
            raise ValueError(
                f"router_logits {tuple(router_logits.shape)} and help_targets {tuple(help_targets.shape)} "
                f"must have the same shape [B, E-1] (one column per routing decision)"
            )
        with _autocast_off(router_logits.device):
            logits = router_logits.to(_compute_dtype(router_logits))
            targets = help_targets.to(logits.dtype)
            pos_weight = torch.tensor(self.pos_weight, dtype=logits.dtype, device=logits.device)
            # Every decision is taken on the whole batch, so the mean over all B x (E-1) entries equals the
            # mean over decisions of the per-decision batch means.
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)

    def extra_repr(self) -> str:
        return f"pos_weight={self.pos_weight}"


class DistillLoss(nn.Module):
    """Knowledge distillation from a teacher with more experts, wrapping any other loss.

    loss = base(expert_logits, target) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
    with the student the mean of the expert logits, the teacher detached, KL averaged over the batch.
    ``official_scaling=True`` reproduces the official RIDELossWithDistill, which (by a loop whose variable is
    unused) counts both terms E times: E * base + E * weight * T^2 * KL.
    """

    def __init__(
        self, base: nn.Module, temperature: float = 1.5, weight: float = 1.0, official_scaling: bool = False
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0; got {temperature}")
        self.base = base
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.official_scaling = official_scaling

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the wrapped loss."""
        self.base.set_epoch(epoch)

    def schedule_state(self) -> Hashable:
        """The wrapped loss's."""
        return self.base.schedule_state()

    def forward(self, expert_logits: Logits, target: Tensor, teacher_logits: Tensor) -> Tensor:
        """``expert_logits  # [B, E, C]`` (or [B, C]), ``teacher_logits  # [B, C]`` or [B, E_t, C]; 0-d."""
        logits = _stack_experts(expert_logits)
        base_loss = self.base(logits, target)
        with _autocast_off(logits.device):
            logits = logits.to(_compute_dtype(logits))
            student = logits.mean(dim=1) if logits.dim() == 3 else logits
            teacher = teacher_logits.detach().to(logits.dtype)
            teacher = teacher.mean(dim=1) if teacher.dim() == 3 else teacher
            if teacher.shape != student.shape:
                raise ValueError(
                    f"teacher_logits {tuple(teacher_logits.shape)} do not match the student's mean logits "
                    f"{tuple(student.shape)}; pass the teacher model's mean output [B, C]"
                )
            log_p_teacher = F.log_softmax(teacher / self.temperature, dim=-1)
            log_p_student = F.log_softmax(student / self.temperature, dim=-1)
            kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
            distill = self.weight * self.temperature**2 * kl
            if self.official_scaling:
                num_experts = logits.shape[1] if logits.dim() == 3 else 1
                return num_experts * base_loss + num_experts * distill
            return base_loss + distill

    def extra_repr(self) -> str:
        scaling = f"official_scaling={self.official_scaling}"
        return f"temperature={self.temperature}, weight={self.weight}, {scaling}"


# --- Factory ---

_DIVERSITY_DEFAULTS: dict[str, Any] = {
    "drw_epoch": 160,
    "diversity_weight": 0.45,
    "diversity_temperature": 1.0,
    "temperature_reweight": 0.05,
    "temperature_mode": "per_class",
    "kl_mode": "ensemble",
    "zero_weight_uses_ensemble": True,
}
_DIVERSITY_ONLY = tuple(k for k in _DIVERSITY_DEFAULTS if k != "drw_epoch")

# name -> (factory(cls_num_list, **kwargs), default kwargs: every accepted keyword and its default)
_SINGLE: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "ce": (CrossEntropyLoss, {"reweight": False, "drw_epoch": None}),
    "focal": (FocalLoss, {"gamma": 1.0, "drw_epoch": None}),
    "ldam": (LDAMLoss, {"max_m": 0.5, "s": 30.0, "drw_epoch": None}),
    "ldam_drw": (LDAMLoss, {"max_m": 0.5, "s": 30.0, "drw_epoch": 160}),
    # The paper's ablation "collaborative" loss: LDAM on the experts' mean logits, i.e. the same module.
    "ldam_collaborative": (LDAMLoss, {"max_m": 0.5, "s": 30.0, "drw_epoch": None}),
}
_DIVERSITY_BASE = {"ce_diversity": "ce", "focal_diversity": "focal", "ldam_diversity": "ldam"}
_DISTILL_DEFAULTS: dict[str, Any] = {
    "base": "ldam_diversity",
    "temperature": 1.5,
    "weight": 1.0,
    "official_scaling": False,
}

LOSS_NAMES: tuple[str, ...] = (*_SINGLE, *_DIVERSITY_BASE, "routing", "distill")


def loss_arguments(name: str) -> dict[str, Any]:
    """Every keyword argument ``create_loss(name, ...)`` accepts, with its default.

    For ``distill``: its own arguments; the base loss's come from ``loss_arguments(base)``.
    """
    if name == "distill":
        return dict(_DISTILL_DEFAULTS)
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}")
    return _defaults(name)


def _defaults(name: str) -> dict[str, Any]:
    if name in _SINGLE:
        return dict(_SINGLE[name][1])
    if name in _DIVERSITY_BASE:
        return {**_SINGLE[_DIVERSITY_BASE[name]][1], **_DIVERSITY_DEFAULTS}
    if name == "routing":
        return {"pos_weight": 100.0}
    raise KeyError(name)


def _resolve(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    defaults = _defaults(name)
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        accepted = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        raise TypeError(
            f"create_loss({name!r}) got unexpected keyword argument(s) {unknown}; "
            f"{name!r} accepts: {accepted}"
        )
    return {**defaults, **kwargs}


def create_loss(name: str, cls_num_list: Optional[Sequence[int] | Tensor] = None, **kwargs: Any) -> nn.Module:
    """Build a loss by name (see ``LOSS_NAMES`` and docs/losses.md for the formulas and keyword arguments).

    ``cls_num_list``: training images per class, [C]. LDAM and ``reweight=True`` need it; without it there is
    nothing to re-weight by, so the other losses run without DRW and with a scalar diversity temperature
    (as the official RIDELoss does). Unknown names or keywords raise with the accepted ones listed.
    """
    if name not in LOSS_NAMES:
        raise ValueError(
            f"unknown loss {name!r}; known losses: {', '.join(LOSS_NAMES)}. Pass one of these names to "
            f"create_loss (e.g. create_loss('ldam_diversity', cls_num_list))."
        )
    if name == "distill":
        options = {**_DISTILL_DEFAULTS, **kwargs}
        base_kwargs = {k: v for k, v in options.items() if k not in _DISTILL_DEFAULTS}
        if options["base"] in ("distill", "routing"):
            raise ValueError(f"distill wraps a classification loss; base={options['base']!r} is not one")
        try:
            base = create_loss(options["base"], cls_num_list, **base_kwargs)
        except TypeError as error:  # say that distill passed the keywords on, and which are its own
            raise TypeError(
                f"{error} (create_loss('distill') passes every keyword except "
                f"{', '.join(_DISTILL_DEFAULTS)} to its base)"
            ) from None
        return DistillLoss(base, options["temperature"], options["weight"], options["official_scaling"])
    options = _resolve(name, kwargs)
    if name == "routing":
        return RoutingLoss(**options)
    if name in _SINGLE:
        return _SINGLE[name][0](cls_num_list, **options)
    diversity = {k: options.pop(k) for k in _DIVERSITY_ONLY}
    base = _SINGLE[_DIVERSITY_BASE[name]][0](cls_num_list, **options)
    return RIDELoss(base, **diversity)
