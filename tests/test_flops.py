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


# Hand count of ride_resnet32_3e (README of the reference fixtures: CIFAR stem and layer1 shared at width 16,
# each expert layer2 width 24 and layer3 width 48, 5 BasicBlocks each; conv MACs = output pixels x out
# channels x in channels x 3 x 3):
#   shared: conv1 1024 x 16 x 27 = 442,368; layer1 10 convs x 1024 x 16 x 144 = 23,592,960 -> 24,035,328
#   expert: layer2 256 x 24 x 144 = 884,736 + 9 x 256 x 24 x 216 = 11,943,936;
#           layer3 64 x 48 x 216 = 663,552 + 9 x 64 x 48 x 432 = 11,943,936 -> 25,436,160
#   classifier 48 x C; routing decision: hidden Linear(48, 16) + shared Linear(K + 16, 1), K = min(30, C).
CIFAR_SHARED, CIFAR_EXPERT = 24_035_328, 25_436_160


def test_breakdown_parts_and_router():
    macs = count_macs(_meta_model("ride_resnet32_3e"))
    assert macs.shared == 442_368 + 10 * 1024 * 16 * 144 == CIFAR_SHARED
    assert macs.experts == (884_736 + 9 * 256 * 24 * 216 + 663_552 + 9 * 64 * 48 * 432,) * 3
    assert macs.experts == (CIFAR_EXPERT,) * 3
    # one routing decision: hidden Linear(48, 16) + the shared Linear(30 + 16, 1) = 814
    assert macs.router == (814, 814) == (48 * 16 + 46,) * 2
    assert macs.classifiers == (4_800,) * 3
    assert macs.all_experts == 100_358_208  # flops.json own_conv_linear_macs, ResNet32Model E=3, "total"
    assert macs.input_size == (3, 32, 32) and macs.num_classes == 100  # what the counts hold for


# One expert = conv(E + 1 experts) - conv(E experts); shared = conv(2 experts) - 2 x one expert, from the
# "conv" fields of flops.json's own_conv_linear_macs (reduce_dimension=True), written out:
#   ResNet32Model  conv E=2/3/4   74,907,648 /   100,343,808 /   125,779,968 -> expert 25,436,160,
#                  shared 24,035,328
#   ResNet10Model  conv E=2/3/4  957,759,488 / 1,172,111,360 / 1,386,463,232 -> expert 214,351,872,
#                  shared 529,055,744 (= conv1 118,013,952 + layer1 231,211,008 + layer2 179,830,784)
#   ResNet50Model  conv E=2/3/4 4,448,403,456 / 5,765,824,512 / 7,083,245,568 -> expert 1,317,421,056,
#                  shared 1,813,561,344
# Classifier D x C; router decision D x 16 + K + 16 (K = 30 CIFAR/ResNet-10, 50 ResNet-50).
@pytest.mark.parametrize(
    "name,official,classes,dim,top_k,expert,shared",
    [
        ("ride_resnet32_3e", "ResNet32Model", 100, 48, 30, 25_436_160, 24_035_328),
        ("ride_resnet10_3e", "ResNet10Model", 1000, 384, 30, 214_351_872, 529_055_744),
        ("ride_resnet50_2e", "ResNet50Model", 1000, 1536, 50, 1_317_421_056, 1_813_561_344),
    ],
)
def test_shared_and_expert_macs_against_the_independent_count(
    reference_dir, name, official, classes, dim, top_k, expert, shared
):
    entries = json.loads((reference_dir / "flops.json").read_text())["own_conv_linear_macs"]
    conv = {
        e["ctor"]["num_experts"]: e["macs"]["conv"]
        for e in entries
        if e["model_name"] == official and e["ctor"].get("reduce_dimension")
    }
    assert conv[3] - conv[2] == conv[4] - conv[3] == expert  # the hand numbers above, from the fixture
    assert conv[2] - 2 * expert == shared
    model = _meta_model(name, num_classes=classes)
    experts = model.num_experts
    macs = count_macs(model)
    assert macs.shared == shared
    assert macs.experts == (expert,) * experts
    assert macs.classifiers == (dim * classes,) * experts
    assert macs.router == (dim * 16 + top_k + 16,) * (experts - 1)
    assert macs.all_experts - sum(macs.classifiers) == conv[experts]


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


# ride_resnet32_3e, 100 classes, with the hand numbers above (shared 24,035,328, expert 25,436,160,
# classifier 4,800, decision 814):
#   1 expert : 24,035,328 +     25,436,160 +      4,800 +     814 =  49,477,102
#   2 experts: 24,035,328 + 2 x 25,436,160 + 2 x  4,800 + 2 x 814 =  74,918,876
#   3 experts: 24,035,328 + 3 x 25,436,160 + 3 x  4,800 + 2 x 814 = 100,359,836 (no third decision)
CIFAR_ROUTED = {1: 49_477_102, 2: 74_918_876, 3: 100_359_836}


def test_routed_costs_of_a_real_model_by_hand():
    macs = count_macs(_meta_model("ride_resnet32_3e"))
    assert {k: macs.per_image(k) for k in (1, 2, 3)} == CIFAR_ROUTED
    assert macs.per_image(2, routed=False) == 74_917_248  # flops.json own_conv_linear_macs E=2 "total"
    assert macs.for_routing("all") == 100_358_208  # flops.json E=3 "total"
    # 20 / 18 / 26 samples with 1 / 2 / 3 experts (the CIFAR EA E=3 fixture's routing, README)
    counts = [1] * 20 + [2] * 18 + [3] * 26
    expected = (20 * 49_477_102 + 18 * 74_918_876 + 26 * 100_359_836) / 64
    assert macs.for_routing("router", torch.tensor(counts)) == pytest.approx(expected, rel=1e-12)


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


def test_count_macs_refuses_bad_input_and_leaves_the_model_as_it_was():
    model = timm.create_model("ride_resnet32_2e", num_classes=10)
    before = count_macs(model)
    for size in (32, (3, 32), (3, 32, 32.0), (0, 32, 32)):
        with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\), three positive ints"):
            count_macs(model, size)
    assert count_macs(model) == before  # no hook left behind by the refused calls
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="ResNet is not a RIDE model"):
        count_macs(timm.create_model("resnet18"))


def test_count_macs_takes_the_model_input_channels():
    # One input channel instead of three: only the stem convolution changes, 16 x 3 x 3 x 32 x 32 MACs per
    # channel, so the shared part is 24,035,328 - 2 x 147,456 = 23,740,416.
    macs = count_macs(timm.create_model("ride_resnet32_2e", num_classes=10, in_chans=1))
    assert macs.shared == 23_740_416 and macs.experts == (25_436_160, 25_436_160)
    assert macs.input_size == (1, 32, 32) and macs.num_classes == 10
