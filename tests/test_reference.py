"""Our models against the recorded outputs of the official RIDE implementation.

Fixtures: ``../shared/reference/official_ride`` (see its README). Tolerances are the README's: fp32
outputs atol 1e-4 / rtol 1e-5, fp64 atol 1e-9, routing decisions and help targets exact.
"""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import ride_models  # noqa: F401
from ride_models.convert import convert_official_state_dict, rename_official_keys
from ride_models.losses import create_loss

FP32 = dict(atol=1e-4, rtol=1e-5)
FP64 = dict(atol=1e-9, rtol=0)


def _model(reference_dir, name, *files, dtype=torch.float32):
    state_dict = {}
    for f in files:
        state_dict.update(load_file(reference_dir / f))
    model = timm.create_model(name).to(dtype)
    model.load_state_dict(convert_official_state_dict(state_dict, name), strict=True)
    return model.eval()


def _per_expert_features(model, x):
    """Pooled features of each expert ``[B, E, D]`` (the official ``feat``)."""
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    return pooled.view(x.shape[0], model.num_experts, -1)


RIDE_FIXTURES = [
    ("ride_resnet32_2e", "cifar_ride_resnet32_e2"),
    ("ride_resnet32_3e", "cifar_ride_resnet32_e3"),
    ("ride_resnet32_4e", "cifar_ride_resnet32_e4"),
    ("ride_resnet10_3e", "imagenet_ride_resnet10_e3"),
]


def _state_file(prefix):
    return f"{prefix}_state_dict{'_fp16' if prefix.startswith('imagenet') else ''}.safetensors"


@pytest.mark.parametrize("name,prefix", RIDE_FIXTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_ride_eval_outputs(reference_dir, name, prefix, dtype):
    io = load_file(reference_dir / f"{prefix}_io.safetensors")
    model = _model(reference_dir, name, _state_file(prefix), dtype=dtype)
    suffix, tol = ("fp32", FP32) if dtype == torch.float32 else ("fp64", FP64)
    x = io["input"].to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_experts(x), io[f"logits_eval_{suffix}"], **tol)
        torch.testing.assert_close(model(x), io[f"output_eval_{suffix}"], **tol)
        torch.testing.assert_close(_per_expert_features(model, x), io[f"feat_eval_{suffix}"], **tol)


@pytest.mark.parametrize("name,prefix", RIDE_FIXTURES)
def test_ride_train_mode_outputs(reference_dir, name, prefix):
    io = load_file(reference_dir / f"{prefix}_io.safetensors")
    model = _model(reference_dir, name, _state_file(prefix)).train()
    model.set_expert_training(True)
    with torch.no_grad():
        out = model(io["input"])
    torch.testing.assert_close(out.expert_logits, io["logits_train_mode_fp32"], **FP32)
    torch.testing.assert_close(out.logits, io["output_train_mode_fp32"], **FP32)


def _bce_per_decision(router_logits, help_targets):
    """``[E-1]``: each decision's batch-mean BCE with pos_weight 100, as the reference README states it."""
    pos_weight = torch.tensor(100.0)
    return torch.stack(
        [
            F.binary_cross_entropy_with_logits(z, t.float(), pos_weight=pos_weight)
            for z, t in zip(router_logits.unbind(1), help_targets.unbind(1))
        ]
    )


EA_FIXTURES = [
    ("ride_resnet32_3e", "cifar_ride_resnet32_e3_state_dict.safetensors", "cifar_ea_resnet32_e3"),
    ("ride_resnet32_4e", "cifar_ride_resnet32_e4_state_dict.safetensors", "cifar_ea_resnet32_e4"),
]


def _ea_model(reference_dir, name, backbone_file, prefix, dtype=torch.float32):
    return _model(reference_dir, name, backbone_file, f"{prefix}_router_state_dict.safetensors", dtype=dtype)


@pytest.mark.parametrize("name,backbone_file,prefix", EA_FIXTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_ea_routed_inference(reference_dir, name, backbone_file, prefix, dtype):
    io = load_file(reference_dir / f"{prefix}_io.safetensors")
    model = _ea_model(reference_dir, name, backbone_file, prefix, dtype)
    assert model.routing == "router"  # loading a trained router switches routing on
    suffix, tol = ("fp32", FP32) if dtype == torch.float32 else ("fp64", FP64)
    x = io["input"].to(dtype)
    with torch.no_grad():
        out = model.route(x)
        y, n = model.forward_routed(x)
        plain = model(x)
    assert torch.equal(out.num_experts, io["num_experts_for_each_sample"].squeeze(1))
    assert torch.equal(n, out.num_experts)
    torch.testing.assert_close(out.logits, io[f"routed_output_eval_{suffix}"], **tol)
    torch.testing.assert_close(y, out.logits, atol=0, rtol=0)
    torch.testing.assert_close(plain, out.logits, atol=0, rtol=0)
    expected_logits = io[f"router_logits_eval_{suffix}"]
    assert torch.equal(out.router_logits.isnan(), expected_logits.isnan())
    torch.testing.assert_close(out.router_logits.nan_to_num(), expected_logits.nan_to_num(), **tol)


def test_ea_routing_distribution_matches_summary(reference_dir):
    summary = json.loads((reference_dir / "cifar_models_summary.json").read_text())
    for name, backbone_file, prefix in EA_FIXTURES:
        io = load_file(reference_dir / f"{prefix}_io.safetensors")
        model = _ea_model(reference_dir, name, backbone_file, prefix)
        with torch.no_grad():
            n = model.forward_routed(io["input"])[1]
        key = prefix.replace("cifar_ea_resnet32_", "ea_")
        expected = {int(k): v for k, v in summary[key]["num_experts_distribution"].items()}
        assert {k: int((n == k).sum()) for k in expected} == expected


@pytest.mark.parametrize("name,backbone_file,prefix", EA_FIXTURES)
def test_ea_router_training_path(reference_dir, name, backbone_file, prefix):
    io = load_file(reference_dir / f"{prefix}_io.safetensors")
    model = _ea_model(reference_dir, name, backbone_file, prefix)
    model.set_router_training(True)
    model.train()  # the official stage 2: frozen BNs in eval mode
    out = model.forward_router_train(io["input"], io["target"])
    assert out.help_targets.dtype == torch.bool
    assert torch.equal(out.help_targets, io["expert_help_targets"].bool())
    torch.testing.assert_close(out.router_logits, io["expert_help_logits_train_fp32"], **FP32)
    torch.testing.assert_close(out.logits, io["train_output_fp32"], **FP32)

    # The routing loss as the reference README states it: the mean over decisions of the batch-mean
    # binary cross-entropy with pos_weight 100.
    bce = _bce_per_decision(out.router_logits, out.help_targets)
    torch.testing.assert_close(bce, io["bce_per_stage_fp32"], atol=0, rtol=1e-5)
    loss = create_loss("routing")(out.router_logits, out.help_targets)
    torch.testing.assert_close(loss, bce.mean(), atol=0, rtol=1e-6)
    torch.testing.assert_close(loss, io["train_routing_loss_fp32"][0], atol=0, rtol=1e-5)
    loss.backward()
    grads = {k.removeprefix("grad."): v for k, v in io.items() if k.startswith("grad.")}
    expected = rename_official_keys(grads)
    params = dict(model.named_parameters())
    for key, grad in expected.items():
        torch.testing.assert_close(params[key].grad, grad, atol=1e-6, rtol=1e-5, msg=key)
    assert all(p.grad is None for k, p in params.items() if not k.startswith("router."))


def test_resnet10_ea_fixture(reference_dir):
    io = load_file(reference_dir / "imagenet_ride_resnet10_e3_io.safetensors")
    ea = load_file(reference_dir / "imagenet_ea_resnet10_e3_io.safetensors")
    model = _model(
        reference_dir,
        "ride_resnet10_3e",
        "imagenet_ride_resnet10_e3_state_dict_fp16.safetensors",
        "imagenet_ea_resnet10_e3_router_state_dict_fp16.safetensors",
    )
    with torch.no_grad():
        out = model.route(io["input"])
    assert out.num_experts.tolist() == [3, 1]
    assert torch.equal(out.num_experts, ea["num_experts_for_each_sample"].squeeze(1))
    torch.testing.assert_close(out.logits, ea["routed_output_eval_fp32"], **FP32)
    # Router logits at decision 0 recorded in the summary: +0.0665 and -0.0668.
    torch.testing.assert_close(out.router_logits[:, 0], torch.tensor([0.0665, -0.0668]), atol=1e-4, rtol=0)
    with torch.no_grad():
        train = model.forward_router_train(io["input"], ea["target"])
    assert torch.equal(train.help_targets, ea["expert_help_targets"].bool())
    torch.testing.assert_close(train.router_logits, ea["expert_help_logits_train_fp32"], **FP32)
    torch.testing.assert_close(train.logits, ea["train_output_fp32"], **FP32)
    loss = _bce_per_decision(train.router_logits, train.help_targets).mean()
    torch.testing.assert_close(loss, ea["train_routing_loss_fp32"][0], atol=0, rtol=1e-5)


# ------------------------------------------------------------------------------------- parameter counts
_OFFICIAL_CLASSES = {
    "ResNet10Model": "ride_resnet10",
    "ResNet50Model": "ride_resnet50",
    "ResNeXt50Model": "ride_resnext50",
    "ResNet10EAModel": "ride_resnet10",
    "ResNet50EAModel": "ride_resnet50",
    "ResNeXt50EAModel": "ride_resnext50",
}


def _count(model, router: bool) -> int:
    return sum(p.numel() for k, p in model.named_parameters() if router or not k.startswith("router."))


def _manifest_entries(reference_dir):
    manifest = json.loads((reference_dir / "imagenet_models_manifest.json").read_text())
    entries = manifest["models"] + [
        e
        for e in manifest["extra_param_counts"]
        if e["ctor"]["num_experts"] > 1  # 6-expert teachers, iNat
    ]
    return entries


def test_imagenet_parameter_counts_match_manifest(reference_dir):
    checked = 0
    for entry in _manifest_entries(reference_dir):
        official = entry["class"].rsplit(".", 1)[1]
        ea = "EA" in official
        name = f"{_OFFICIAL_CLASSES[official]}_{entry['ctor']['num_experts']}e"
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=entry["ctor"]["num_classes"])
        assert _count(model, router=ea) == entry["num_params"], (name, entry["ctor"])
        own_keys = [
            k for k in model.state_dict() if k != "router.trained" and (ea or not k.startswith("router."))
        ]
        assert len(own_keys) == entry["num_state_dict_entries"], name
        if ea:
            # The official EA model trains only its router; so does ours in stage 2.
            model.set_router_training(True)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert trainable == entry["num_trainable_params_at_construction"], name
        checked += 1
    assert checked == 18 + 4  # 18 RIDE/EA models, three 6-expert teachers and the iNaturalist model


def _our_key(official_key: str) -> str:
    """Our name for an official key, written from the fixture README's layout (``backbone.`` prefix,
    per-expert ``layer3s.{e}`` / ``layer4s.{e}`` / ``linears.{e}``, router ``expert_help_pred_*``) and our
    module names (``experts.{e}.layer3``, ``heads.{e}``, ``router.hidden.{i}`` / ``router.fc``)."""
    key = official_key.removeprefix("backbone.")
    for pattern, ours in (
        (r"layer([34])s\.(\d+)\.(.+)", r"experts.\2.layer\1.\3"),
        (r"linears\.(\d+)\.weight", r"heads.\1.weight"),
        (r"expert_help_pred_hidden_fcs\.(\d+)\.(weight|bias)", r"router.hidden.\1.\2"),
        (r"expert_help_pred_fc\.(weight|bias)", r"router.fc.\1"),
    ):
        if re.fullmatch(pattern, key):
            return re.sub(pattern, ours, key)
    return key  # conv1, bn1, layer1, layer2: shared, same names


def test_imagenet_official_key_layouts_load_strictly(reference_dir):
    """Every ImageNet-style official state dict listed in the manifest (keys, shapes, dtypes of the real
    official models) converts and loads with strict=True into the timm model of the same architecture, each
    tensor landing under the name the README's layout gives it (on the meta device: shapes only)."""
    manifest = json.loads((reference_dir / "imagenet_models_manifest.json").read_text())
    checked = 0
    for entry in manifest["models"]:
        official = entry["class"].rsplit(".", 1)[1]
        name = f"{_OFFICIAL_CLASSES[official]}_{entry['ctor']['num_experts']}e"
        state_dict = {
            key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for key, shape, dtype in entry["state_dict"]
        }
        assert len(state_dict) == entry["num_state_dict_entries"]
        converted = convert_official_state_dict(state_dict, name)
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=entry["ctor"]["num_classes"])
        model.load_state_dict(converted, strict=True, assign=True)  # raises on a missing/extra key or shape
        for key, value in state_dict.items():
            ours = _our_key(key)
            if ours.startswith("heads."):  # the normalised classifier, stored [D, C], is ours [C, D]
                assert converted[ours].shape == value.shape[::-1], (name, key)
            else:
                assert converted[ours] is value, (name, key, ours)
        # a stage-2 (EA) file brings its router, marked trained; a stage-1 (RIDE) file gets an untrained one
        assert bool(converted["router.trained"]) == ("EA" in official), name
        checked += 1
    assert checked == 18


def test_imagenet_parameter_breakdown_matches_manifest(reference_dir):
    manifest = json.loads((reference_dir / "imagenet_models_manifest.json").read_text())
    for entry in manifest["models"]:
        official = entry["class"].rsplit(".", 1)[1]
        name = f"{_OFFICIAL_CLASSES[official]}_{entry['ctor']['num_experts']}e"
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=entry["ctor"]["num_classes"])
        ours = {
            "shared:conv1": _count(model.conv1, True),
            "shared:bn1": _count(model.bn1, True),
            "shared:layer1": _count(model.layer1, True),
            "shared:layer2": _count(model.layer2, True),
        }
        for e, expert in enumerate(model.experts):
            ours[f"layer3s.{e}"] = _count(expert.layer3, True)
            ours[f"layer4s.{e}"] = _count(expert.layer4, True)
            ours[f"linears.{e}"] = _count(model.heads[e], True)
        if "EA" in official:
            for i, hidden in enumerate(model.router.hidden):
                ours[f"expert_help_pred_hidden_fcs.{i}"] = _count(hidden, True)
            ours["shared:expert_help_pred_fc"] = _count(model.router.fc, True)
        assert ours == entry["param_breakdown"], name


def test_cifar_parameter_counts_match_summary(reference_dir):
    summary = json.loads((reference_dir / "cifar_models_summary.json").read_text())
    for e in (2, 3, 4):
        model = timm.create_model(f"ride_resnet32_{e}e")
        ride, ea = summary[f"ride_e{e}"], summary.get(f"ea_e{e}")
        assert _count(model, router=False) == ride["num_params"]
        assert (
            len([k for k in model.state_dict() if not k.startswith("router.")])
            == ride["num_state_dict_entries"]
        )
        breakdown = {"shared:conv1": 432, "shared:bn1": 32, "shared:layer1": _count(model.layer1, True)}
        for i, expert in enumerate(model.experts):
            breakdown[f"layer2s.{i}"] = _count(expert.layer2, True)
            breakdown[f"layer3s.{i}"] = _count(expert.layer3, True)
            breakdown[f"linears.{i}"] = _count(model.heads[i], True)
        assert breakdown == ride["param_breakdown"]
        if ea:
            assert _count(model, router=True) == ea["num_params"]
            assert _count(model.router, True) == ea["num_trainable_params"]
            assert (
                len([k for k in model.state_dict() if k != "router.trained"]) == ea["num_state_dict_entries"]
            )
    # 6 experts (the CIFAR teacher): the README's shared part plus six times its per-expert part.
    assert _count(timm.create_model("ride_resnet32_6e"), router=False) == 23_824 + 6 * 253_344
