"""Conversion of official RIDE state dicts: prefixes, routers, and the errors for what does not fit."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import ride_models  # noqa: F401
from ride_models.convert import convert_official_state_dict, is_official_state_dict


@pytest.fixture(scope="module")
def official_e3(reference_dir):
    return load_file(reference_dir / "cifar_ride_resnet32_e3_state_dict.safetensors")


@pytest.fixture(scope="module")
def official_ea_e3(reference_dir, official_e3):
    return {**official_e3, **load_file(reference_dir / "cifar_ea_resnet32_e3_router_state_dict.safetensors")}


def _with_prefix(state_dict, old, new):
    return {new + k.removeprefix(old): v for k, v in state_dict.items()}


@pytest.mark.parametrize("prefix", ["", "backbone.", "module.backbone.", "module."])
def test_prefixes_are_stripped(official_e3, prefix):
    converted = convert_official_state_dict(
        _with_prefix(official_e3, "backbone.", prefix), "ride_resnet32_3e"
    )
    reference = convert_official_state_dict(official_e3, "ride_resnet32_3e")
    assert converted.keys() == reference.keys()
    for k, v in reference.items():
        if not k.startswith("router."):  # a stage-1 router is freshly initialised each time
            assert torch.equal(converted[k], v), k


def test_key_mapping(official_e3):
    converted = convert_official_state_dict(official_e3, "ride_resnet32_3e")
    assert torch.equal(
        converted["experts.2.layer3.4.conv2.weight"], official_e3["backbone.layer3s.2.4.conv2.weight"]
    )
    assert torch.equal(converted["heads.1.weight"], official_e3["backbone.linears.1.weight"].t())
    assert torch.equal(
        converted["layer1.0.bn1.running_var"], official_e3["backbone.layer1.0.bn1.running_var"]
    )


def test_stage1_checkpoint_gets_an_untrained_router(official_e3):
    converted = convert_official_state_dict(official_e3, "ride_resnet32_3e")
    assert not converted["router.trained"]
    assert converted["router.fc.weight"].shape == (1, 30 + 16)
    model = timm.create_model("ride_resnet32_3e")
    model.load_state_dict(converted, strict=True)
    assert model.routing == "all"


def test_ea_checkpoint_marks_the_router_trained(official_ea_e3):
    converted = convert_official_state_dict(official_ea_e3, "ride_resnet32_3e")
    assert converted["router.trained"]
    assert torch.equal(converted["router.fc.weight"], official_ea_e3["backbone.expert_help_pred_fc.weight"])
    assert torch.equal(
        converted["router.hidden.1.bias"], official_ea_e3["backbone.expert_help_pred_hidden_fcs.1.bias"]
    )
    model = timm.create_model("ride_resnet32_3e")
    model.load_state_dict(converted, strict=True)
    assert model.routing == "router"


def test_is_official_state_dict(official_e3):
    assert is_official_state_dict(official_e3)
    assert is_official_state_dict(_with_prefix(official_e3, "backbone.", ""))
    assert not is_official_state_dict(timm.create_model("ride_resnet32_2e").state_dict())


def test_timm_pretrained_loading_converts_an_official_file(reference_dir, official_ea_e3, tmp_path):
    """timm's pretrained path (here a local file) converts official weights through the filter function."""
    path = tmp_path / "official.safetensors"
    save_file(official_ea_e3, str(path))
    model = timm.create_model(
        "ride_resnet32_3e", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    io = load_file(reference_dir / "cifar_ea_resnet32_e3_io.safetensors")
    model.eval()
    with torch.no_grad():
        out = model(io["input"])
    torch.testing.assert_close(out, io["routed_output_eval_fp32"], atol=1e-4, rtol=1e-5)


def test_pretrained_with_new_class_count_drops_the_router(tmp_path):
    trained = timm.create_model("ride_resnet32_2e")
    trained.router.set_trained()
    path = tmp_path / "ours.safetensors"
    save_file(trained.state_dict(), str(path))
    model = timm.create_model(
        "ride_resnet32_2e", pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert model.routing == "all" and model.router.top_k == 5
    assert torch.equal(model.layer1[0].conv1.weight, trained.layer1[0].conv1.weight)


def test_use_norm_false_heads_keep_their_layout():
    ours = timm.create_model("ride_resnet32_2e", use_norm=False, num_classes=10)
    official = {}
    for k, v in ours.state_dict().items():
        if k.startswith("router."):
            continue
        k = k.replace("heads.", "linears.")
        for stage in (2, 3):
            for e in range(2):
                k = k.replace(f"experts.{e}.layer{stage}.", f"layer{stage}s.{e}.")
        official["backbone." + k] = v
    converted = convert_official_state_dict(official, "ride_resnet32_2e")
    assert torch.equal(converted["heads.0.weight"], ours.heads[0].weight)  # nn.Linear: [C, D], not transposed
    assert torch.equal(converted["heads.1.bias"], ours.heads[1].bias)
    timm.create_model("ride_resnet32_2e", use_norm=False, num_classes=10).load_state_dict(converted)


# ------------------------------------------------------------------------------------------- bad input
def test_wrong_expert_count(official_e3):
    with pytest.raises(
        ValueError, match="fit ride_resnet32_4e: experts: 3 in the checkpoint, 4 in the model"
    ):
        convert_official_state_dict(official_e3, "ride_resnet32_4e")


def test_wrong_family(official_e3):
    with pytest.raises(ValueError, match="architecture: resnet32 in the checkpoint, resnet10 in the model"):
        convert_official_state_dict(official_e3, "ride_resnet10_3e")


def test_wrong_class_count(official_e3):
    with pytest.raises(ValueError, match="has 100 classes, expected num_classes=10"):
        convert_official_state_dict(official_e3, "ride_resnet32_3e", num_classes=10)


def test_converted_checkpoint_into_a_model_with_other_classes(official_e3):
    converted = convert_official_state_dict(official_e3, "ride_resnet32_3e")
    with pytest.raises(RuntimeError, match="classes: the state dict has 100, the model has 10"):
        timm.create_model("ride_resnet32_3e", num_classes=10).load_state_dict(converted)


def test_unknown_keys_are_listed(official_e3):
    broken = dict(official_e3)
    broken["backbone.extra_thing.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"unknown keys in the official state dict.*backbone\.extra_thing\.weight"
    ):
        convert_official_state_dict(broken, "ride_resnet32_3e")


def test_unshared_router_output_layers_are_refused(official_e3):
    broken = dict(official_e3)
    broken["backbone.expert_help_pred_fcs.0.weight"] = torch.zeros(1, 46)
    with pytest.raises(ValueError, match="share_expert_help_pred_fc=False"):
        convert_official_state_dict(broken, "ride_resnet32_3e")


def test_missing_keys_are_listed(official_e3):
    broken = {k: v for k, v in official_e3.items() if "layer1.2.bn2" not in k}
    with pytest.raises(ValueError, match=r"(?s)in our names.*missing keys \(5\): layer1\.2\.bn2\.bias"):
        convert_official_state_dict(broken, "ride_resnet32_3e")


def test_wrong_shapes_are_listed(official_ea_e3):
    with pytest.raises(
        ValueError, match=r"(?s)router\.fc\.weight: given \(1, 46\), expected \(1, 66\).*router_top_k"
    ):
        convert_official_state_dict(official_ea_e3, "ride_resnet32_3e", router_top_k=50)


def test_official_state_dict_loaded_directly_points_to_the_converter(official_e3):
    model = timm.create_model("ride_resnet32_3e")
    with pytest.raises(
        RuntimeError,
        match=r"official RIDE layout.*convert_official_state_dict\(state_dict, "
        r"'ride_resnet32_3e'\)",
    ):
        model.load_state_dict(official_e3)


def test_official_file_through_timm_with_other_classes_or_channels(official_ea_e3, tmp_path):
    """timm's usual adaptations apply to official files as to ours: new classifiers (and so an untrained
    router) for another class count, features for num_classes=0, a first convolution for in_chans."""
    path = tmp_path / "official.safetensors"
    save_file(official_ea_e3, str(path))
    overlay = dict(file=str(path))
    reference = timm.create_model("ride_resnet32_3e", pretrained=True, pretrained_cfg_overlay=overlay)
    trunk = reference.layer1[0].conv1.weight

    new_classes = timm.create_model(
        "ride_resnet32_3e", pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay
    )
    assert new_classes.routing == "all" and new_classes.heads[0].weight.shape == (10, 48)
    assert torch.equal(new_classes.layer1[0].conv1.weight, trunk)

    features = timm.create_model(
        "ride_resnet32_3e", pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
    )
    with torch.no_grad():
        assert features.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3 * 48)

    gray = timm.create_model("ride_resnet32_3e", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay)
    assert gray.routing == "router"  # classifiers and router kept
    torch.testing.assert_close(gray.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(gray.heads[2].weight, reference.heads[2].weight)


def test_own_file_whose_classifiers_timm_would_drop(tmp_path):
    """A 10-class file into a 10-class model whose pretrained config says 100: timm drops the classifiers,
    so the router goes too, with a warning naming the overlay that keeps them."""
    trained = timm.create_model("ride_resnet32_4e", num_classes=10)
    trained.router.set_trained()
    path = tmp_path / "own10.safetensors"
    save_file(trained.state_dict(), str(path))
    with pytest.warns(UserWarning, match="add num_classes=10 to pretrained_cfg_overlay"):
        model = timm.create_model(
            "ride_resnet32_4e", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path))
        )
    assert model.routing == "all" and not torch.equal(model.heads[0].weight, trained.heads[0].weight)
    kept = timm.create_model(
        "ride_resnet32_4e",
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
    )
    assert kept.routing == "router" and torch.equal(kept.heads[0].weight, trained.heads[0].weight)
