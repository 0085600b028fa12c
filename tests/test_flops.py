"""MAC counting, against the independent count and the official counter in ``flops.json``."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

import ride_models  # noqa: F401
from ride_models.flops import MacsBreakdown, count_macs

_NAMES = {
    "ResNet32Model": "ride_resnet32",
    "ResNet10Model": "ride_resnet10",
    "ResNet50Model": "ride_resnet50",
    "ResNeXt50Model": "ride_resnext50",
}


def _meta_model(name, **kwargs):
    with torch.device("meta"):  # counting needs shapes only
        return timm.create_model(name, **kwargs)


def test_all_experts_equal_the_independent_count(reference_dir):
    """flops.json's own conv + linear + NormedLinear count, for every RIDE model it lists."""
    entries = json.loads((reference_dir / "flops.json").read_text())["own_conv_linear_macs"]
    checked = 0
    for entry in entries:
        experts = entry["ctor"]["num_experts"]
        if experts == 1:
            continue
        model = _meta_model(
            f"{_NAMES[entry['model_name']]}_{experts}e", num_classes=entry["ctor"].get("num_classes", 1000)
        )
        macs = count_macs(model, tuple(entry["input"][1:]))
        assert macs.all_experts == entry["macs"]["total"], entry
        assert sum(macs.classifiers) == entry["macs"]["normed_linear"]
        checked += 1
    assert checked == 12


def _bn_and_pool_elements(model, input_size):
    count = [0]

    def hook(module, inputs, output):
        count[0] += output.numel() if isinstance(module, nn.BatchNorm2d) else 0

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval().forward_features(torch.zeros(1, *input_size, device="meta"))
    for h in handles:
        h.remove()
    return count[0]


@pytest.mark.parametrize(
    "name,command,pool_outputs",
    [
        # CIFAR pools with F.avg_pool2d (uncounted); the ImageNet models with nn.AvgPool2d: D per expert.
        ("ride_resnet32_3e", "ResNet32Model 2 --num_experts 3 --reduce_dim True --use_norm True", 0),
        ("ride_resnet10_3e", "ResNet10Model 0 --num_experts 3 --reduce_dim True --use_norm True", 3 * 384),
        ("ride_resnet50_2e", "ResNet50Model 0 --num_experts 2 --reduce_dim True --use_norm True", 2 * 1536),
    ],
)
def test_relation_to_the_official_counter(reference_dir, name, command, pool_outputs):
    """Documented identity: official (thop 0.0.4) = our conv MACs + 2 x BN elements + pool outputs, since
    the official counter skips the RIDE classifiers."""
    runs = json.loads((reference_dir / "flops.json").read_text())["official_gflops_runs"]
    official = next(r for r in runs if r["command"].endswith(command))["macs_G"]["thop-0.0.4.post2009191310"]
    model = _meta_model(name, num_classes=100 if "32" in name else 1000)
    size = model.pretrained_cfg["input_size"]
    macs = count_macs(model)
    convs = macs.all_experts - sum(macs.classifiers)
    assert convs + 2 * _bn_and_pool_elements(model, size) + pool_outputs == round(official * 1e9)


def test_breakdown_parts_and_router():
    macs = count_macs(_meta_model("ride_resnet32_3e"))
    assert len(macs.experts) == 3 and len(macs.router) == 2
    assert macs.experts[0] == macs.experts[1] == macs.experts[2]
    # one routing decision: hidden Linear(48, 16) + the shared Linear(30 + 16, 1)
    assert macs.router == (48 * 16 + 46, 48 * 16 + 46)
    assert macs.classifiers == (48 * 100,) * 3
    assert macs.all_experts == macs.shared + sum(macs.experts) + sum(macs.classifiers)


def test_routed_costs_by_hand():
    b = MacsBreakdown(shared=100, experts=(10, 10, 10), classifiers=(1, 1, 1), router=(2, 2))
    assert b.per_image(1) == 100 + 10 + 1 + 2  # used 1 expert, took decision 0 (which said stop)
    assert b.per_image(2) == 100 + 20 + 2 + 4
    assert b.per_image(3) == 100 + 30 + 3 + 4  # all experts: both decisions, no third
    assert b.per_image(2, routed=False) == 122
    assert b.all_experts == 133
    assert b.average([1, 3]) == (113 + 137) / 2
    assert b.for_routing("router", torch.tensor([1, 1, 2, 3])) == (113 + 113 + 126 + 137) / 4
    assert b.for_routing("all") == 133
    assert b.for_routing(2) == 122


def test_realized_average_of_a_routed_model_is_between_one_and_all_experts():
    model = timm.create_model("ride_resnet32_4e").eval()
    with torch.no_grad():
        for p in model.router.parameters():
            p.zero_()
        model.router.fc.weight[0, 0] = 1.0
        x = torch.randn(16, 3, 32, 32)
        model.router.fc.bias.fill_(-float(model.forward_experts(x, 1)[:, 0].max(1).values.median()))
    model.router.set_trained()
    with torch.no_grad():
        n = model.forward_routed(x)[1]
    macs = count_macs(model)
    realized = macs.for_routing("router", n)
    assert macs.per_image(1) <= realized <= macs.per_image(4)
    assert 1 < n.float().mean() < 4


def test_bad_arguments():
    b = MacsBreakdown(shared=1, experts=(1, 1), classifiers=(1, 1), router=(1,))
    with pytest.raises(ValueError, match="between 1 and 2"):
        b.per_image(3)
    with pytest.raises(ValueError, match="between 1 and 2"):
        b.average([0, 1])
    with pytest.raises(ValueError, match="needs num_experts_per_sample"):
        b.for_routing("router")
    with pytest.raises(ValueError, match="unknown routing"):
        b.for_routing("fast")
