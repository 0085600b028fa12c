"""Largest deviation of our models from every recorded output of the official RIDE implementation.

    python benchmarks/reference_deviations.py [--reference-dir ../shared/reference/official_ride]

Prints one row per fixture tensor: the largest absolute difference (and, for routing decisions and help
targets, the number of mismatches). The tests assert the README's tolerances; this shows the margins.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

import ride_models  # noqa: F401
from ride_models.convert import convert_official_state_dict, rename_official_keys
from ride_models.losses import create_loss

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "official_ride"


def _model(ref: Path, name: str, files: list[str], dtype: torch.dtype) -> torch.nn.Module:
    state_dict: dict = {}
    for f in files:
        state_dict.update(load_file(ref / f))
    model = timm.create_model(name).to(dtype)
    model.load_state_dict(convert_official_state_dict(state_dict, name))
    return model.eval()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).nan_to_num().abs().max().item()


def ride_rows(ref: Path, name: str, prefix: str, state_file: str):
    io = load_file(ref / f"{prefix}_io.safetensors")
    for dtype, suffix in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        model = _model(ref, name, [state_file], dtype)
        x = io["input"].to(dtype)
        with torch.no_grad():
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)
            yield (
                f"{prefix}_io",
                f"logits_eval_{suffix}",
                _diff(model.forward_experts(x), io[f"logits_eval_{suffix}"]),
            )
            yield f"{prefix}_io", f"output_eval_{suffix}", _diff(model(x), io[f"output_eval_{suffix}"])
            feat = pooled.view(x.shape[0], model.num_experts, -1)
            yield f"{prefix}_io", f"feat_eval_{suffix}", _diff(feat, io[f"feat_eval_{suffix}"])
    model = _model(ref, name, [state_file], torch.float32).train()
    model.set_expert_training(True)
    with torch.no_grad():
        out = model(io["input"])
    yield f"{prefix}_io", "logits_train_mode_fp32", _diff(out.expert_logits, io["logits_train_mode_fp32"])
    yield f"{prefix}_io", "output_train_mode_fp32", _diff(out.logits, io["output_train_mode_fp32"])


def ea_rows(ref: Path, name: str, files: list[str], io_file: str, has_fp64: bool):
    io = load_file(ref / io_file)
    io_file = io_file.removesuffix(".safetensors")
    x = io.get("input")
    if x is None:  # the ResNet-10 EA fixture runs on the ResNet-10 RIDE fixture's input
        x = load_file(ref / "imagenet_ride_resnet10_e3_io.safetensors")["input"]
    for dtype, suffix in ((torch.float32, "fp32"), (torch.float64, "fp64")):
        if suffix == "fp64" and not has_fp64:
            continue
        model = _model(ref, name, files, dtype)
        with torch.no_grad():
            out = model.route(x.to(dtype))
        expected_n = io["num_experts_for_each_sample"].squeeze(1)
        if suffix == "fp32":
            yield (
                io_file,
                "num_experts_for_each_sample (mismatches)",
                int((out.num_experts != expected_n).sum()),
            )
        yield io_file, f"routed_output_eval_{suffix}", _diff(out.logits, io[f"routed_output_eval_{suffix}"])
        if f"router_logits_eval_{suffix}" in io:
            yield (
                io_file,
                f"router_logits_eval_{suffix}",
                _diff(out.router_logits, io[f"router_logits_eval_{suffix}"]),
            )
    model = _model(ref, name, files, torch.float32)
    model.set_router_training(True)
    model.train()
    out = model.forward_router_train(x, io["target"])
    yield (
        io_file,
        "expert_help_targets (mismatches)",
        int((out.help_targets != io["expert_help_targets"].bool()).sum()),
    )
    yield (
        io_file,
        "expert_help_logits_train_fp32",
        _diff(out.router_logits, io["expert_help_logits_train_fp32"]),
    )
    yield io_file, "train_output_fp32", _diff(out.logits, io["train_output_fp32"])
    loss = create_loss("routing")(out.router_logits, out.help_targets)
    yield io_file, "train_routing_loss_fp32", _diff(loss, io["train_routing_loss_fp32"][0])
    if "grad.backbone.expert_help_pred_fc.weight" in io:
        loss.backward()
        params = dict(model.named_parameters())
        grads = rename_official_keys(
            {k.removeprefix("grad."): v for k, v in io.items() if k.startswith("grad.")}
        )
        worst = max(_diff(params[k].grad, v) for k, v in grads.items())
        yield io_file, "grad.* (router gradients)", worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-dir", type=Path, default=DEFAULT_DIR)
    ref = parser.parse_args(argv).reference_dir
    if not (ref / "cifar_ride_resnet32_e2_io.safetensors").is_file():
        parser.error(
            f"--reference-dir {ref}: no official RIDE fixtures there (cifar_ride_resnet32_e2_io.safetensors "
            "is missing); give the folder shared/reference/official_ride"
        )
    rows = []
    for e in (2, 3, 4):
        rows += ride_rows(
            ref,
            f"ride_resnet32_{e}e",
            f"cifar_ride_resnet32_e{e}",
            f"cifar_ride_resnet32_e{e}_state_dict.safetensors",
        )
    rows += ride_rows(
        ref,
        "ride_resnet10_3e",
        "imagenet_ride_resnet10_e3",
        "imagenet_ride_resnet10_e3_state_dict_fp16.safetensors",
    )
    for e in (3, 4):
        files = [
            f"cifar_ride_resnet32_e{e}_state_dict.safetensors",
            f"cifar_ea_resnet32_e{e}_router_state_dict.safetensors",
        ]
        rows += ea_rows(ref, f"ride_resnet32_{e}e", files, f"cifar_ea_resnet32_e{e}_io.safetensors", True)
    files = [
        "imagenet_ride_resnet10_e3_state_dict_fp16.safetensors",
        "imagenet_ea_resnet10_e3_router_state_dict_fp16.safetensors",
    ]
    rows += ea_rows(ref, "ride_resnet10_3e", files, "imagenet_ea_resnet10_e3_io.safetensors", False)
    width = max(len(f) for f, _, _ in rows)
    print(f"{'fixture':<{width}}  {'tensor':<42}  largest deviation")
    for fixture, tensor, value in rows:
        shown = f"{value}" if isinstance(value, int) else f"{value:.3g}"
        print(f"{fixture:<{width}}  {tensor:<42}  {shown}")


if __name__ == "__main__":
    main()
