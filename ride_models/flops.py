"""Multiply-accumulates (MACs) per image of RIDE models, by part, and realized under routing.

What is counted: every convolution (``out_elements x in_channels / groups x kh x kw``) and every linear
layer, including the normalised classifiers and the router (``out_elements x in_features``), per image.
Each MAC is attributed to the shared trunk, to one expert's stages, to one expert's classifier, or to one
routing decision (its hidden layer plus one use of the shared output layer).

How this differs from the official counter (``utils/gflops.py`` with thop, recorded in the reference
``flops.json``), and why:

* The official counter also counts batch norm (2 per element with thop 0.0.4, 4 with 0.1.1) and
  ``nn.AvgPool2d`` outputs, but not functional operations (``F.relu``, ``F.avg_pool2d``, the option-A
  shortcut's ``F.pad``). These are element-wise operations, not multiply-accumulates of a layer's weights;
  counting some of them and not others made the total depend on how the code was written. We count none.
* It counts the RIDE models' classifiers as zero: their ``NormedLinear`` class has no thop rule (so the
  iNaturalist model with 8,142 classes reports the same MACs as with 1,000). We count them: with many
  classes they are a real share of the cost (1.5 M MACs per expert at D=1536, C=1000).
* It reports routed cost as ``sum_k p_k x MACs(model with k experts)`` and leaves out the router itself;
  we add each decision a sample takes (small: about 0.8 k MACs per decision on CIFAR, 25 k on ResNet-50).

For a RIDE model, official (thop 0.0.4) = our convolution MACs + 2 x batch-norm elements + pooling
outputs (+ classifier MACs where a thop rule existed); the tests check this identity on the fixtures.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ride_models.models.ride_resnet import NormedLinear, RIDEResNet, require_ride_model

__all__ = ["MacsBreakdown", "count_macs"]


@dataclass(frozen=True)
class MacsBreakdown:
    """MACs per image of each part of a RIDE model, for one input size and class count."""

    shared: int  # stem and shared stages
    experts: Tuple[int, ...]  # each expert's stages
    classifiers: Tuple[int, ...]  # each expert's classifier
    router: Tuple[int, ...]  # each routing decision: hidden layer + the shared output layer
    # What the counts hold for (count_macs records them; None: not recorded, e.g. a breakdown built by hand).
    input_size: Optional[Tuple[int, int, int]] = None  # (C, H, W) of the counted image
    num_classes: Optional[int] = None  # the classifiers' output classes

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def per_image(self, num_experts: int, routed: bool = True) -> int:
        """MACs of one image that used the first ``num_experts`` experts.

        With ``routed=True`` the router's decisions are included: an image that stopped after n < E
        experts took n decisions (the last one said stop), one that used all E experts took E - 1.
        """
        if not 1 <= num_experts <= self.num_experts:
            raise ValueError(f"num_experts must be between 1 and {self.num_experts}, got {num_experts}")
        total = self.shared + sum(self.experts[:num_experts]) + sum(self.classifiers[:num_experts])
        if routed:
            total += sum(self.router[: min(num_experts, self.num_experts - 1)])
        return total

    @property
    def all_experts(self) -> int:
        """MACs per image with every expert and no router (``set_routing("all")``)."""
        return self.per_image(self.num_experts, routed=False)

    def average(self, num_experts_per_sample: Union[torch.Tensor, Sequence[int]]) -> float:
        """Realized MACs per image of routed inference, given the experts each sample used (``[N]``)."""
        counts = torch.as_tensor(num_experts_per_sample).flatten()
        if counts.numel() == 0:
            raise ValueError("num_experts_per_sample is empty")
        histogram = torch.bincount(counts.long(), minlength=self.num_experts + 1).tolist()
        if histogram[0] or len(histogram) > self.num_experts + 1:
            raise ValueError(f"experts per sample must be between 1 and {self.num_experts}")
        return sum(n * self.per_image(k) for k, n in enumerate(histogram) if n) / counts.numel()

    def for_routing(
        self,
        routing: Union[str, int],
        num_experts_per_sample: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    ) -> float:
        """MACs per image for a routing mode: ``"all"``, an int k, or ``"router"`` (realized average over
        ``num_experts_per_sample``, which that mode needs)."""
        if routing == "all":
            return float(self.all_experts)
        if routing == "router":
            if num_experts_per_sample is None:
                raise ValueError("routing='router' needs num_experts_per_sample (from model.route(...))")
            return self.average(num_experts_per_sample)
        if isinstance(routing, int) and not isinstance(routing, bool):
            return float(self.per_image(routing, routed=False))
        raise ValueError(f"unknown routing {routing!r}: expected 'all', 'router' or an int k")


def _layer_macs(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    per_output = 0
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = module.in_channels // module.groups * kh * kw
    elif isinstance(module, (nn.Linear, NormedLinear)):
        per_output = module.in_features
    return output.numel() * per_output // output.shape[0]


@torch.no_grad()
def count_macs(model: RIDEResNet, input_size: Optional[Tuple[int, int, int]] = None) -> MacsBreakdown:
    """Count a RIDE model's MACs per image, by part, for inputs of ``input_size`` (C, H, W).

    The input size defaults to the model's pretrained config (32x32 for CIFAR models, 224x224 otherwise), with
    the model's own input channels.
    """
    require_ride_model(model)
    if input_size is None:
        size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        input_size = (model.in_chans, *size[1:])
    if not (
        isinstance(input_size, Sequence)
        and len(input_size) == 3
        and all(isinstance(n, numbers.Integral) and n > 0 for n in input_size)
    ):
        raise ValueError(
            f"input_size must be (C, H, W), three positive ints, e.g. (3, 32, 32); got {input_size!r}"
        )
    num_experts = model.num_experts
    shared, experts = 0, [0] * num_experts
    classifiers, router = [0] * num_experts, [0] * max(num_experts - 1, 0)
    fc_calls = [0]

    def part_of(name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            nonlocal shared
            macs = _layer_macs(module, inputs, output)
            m = re.match(r"(experts|heads|router\.hidden)\.(\d+)", name)
            if m:
                {"experts": experts, "heads": classifiers, "router.hidden": router}[m[1]][int(m[2])] += macs
            elif name == "router.fc":  # shared by the decisions, which call it in order
                router[fc_calls[0]] += macs
                fc_calls[0] += 1
            else:
                shared += macs

        return hook

    was_training = model.training
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    handles = []
    try:  # the hooks come off whatever happens: a failed count must leave the model as it was
        handles = [
            m.register_forward_hook(part_of(name))
            for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, NormedLinear))
        ]
        model.eval()
        if model.num_classes > 0 and num_experts > 1:
            model.forward_router_train(x)  # every expert, classifier and routing decision once
        elif model.num_classes > 0:
            model.forward_experts(x)  # one expert: no routing decision
        else:
            model.forward_features(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return MacsBreakdown(
        shared, tuple(experts), tuple(classifiers), tuple(router), tuple(input_size), model.num_classes
    )
