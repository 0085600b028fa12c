"""Publishing: official checkpoints read safely and converted; exported folders load every timm way."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import ride_models  # noqa: F401
from ride_models import hub, training
from ride_models.checkpoint import (
    atomic_write,
    load_model,
    load_training_state,
    read_state_dict,
    save_training_state,
    save_weights,
)
from ride_models.convert import convert_official_state_dict
from ride_models.hub import UnsafeCheckpointError, read_official_checkpoint
from ride_models.models.ride_resnet import PUBLISHED_CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]
NAME, TAG = "ride_resnet32_3e", "cifar100_lt_r100"


def _research_module(tmp_path: Path, name: str, source: str):
    """Import a stand-in of a research-code module from tmp_path; the caller removes it again."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(tmp_path))
    return importlib.import_module(name)


def _forget(name: str, tmp_path: Path) -> None:
    sys.modules.pop(name, None)
    sys.path.remove(str(tmp_path))


def _official_pth(tmp_path: Path, state_dict: dict, name: str = "official.pth") -> Path:
    """An official-style training checkpoint: DataParallel keys, optimizer, a research-code config object
    (with pathlib paths and an OrderedDict, as the official ConfigParser), a numpy monitor_best."""
    research = _research_module(
        tmp_path,
        "parse_config",
        """
        from collections import OrderedDict
        from pathlib import Path

        class ConfigParser:
            def __init__(self, config):
                self._config = OrderedDict(config)
                self.resume = Path("saved/models/run/model_best.pth")
                self._save_dir = Path("saved") / "models" / "run"
                self.log_levels = {0: 30, 1: 20, 2: 10}
        """,
    )
    path = tmp_path / name
    checkpoint = {
        "arch": "ResNet32EAModel",
        "epoch": 5,
        "state_dict": OrderedDict(("module." + k, v) for k, v in state_dict.items()),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "monitor_best": np.float64(48.6),
        "config": research.ConfigParser(
            {"name": "Imbalance_CIFAR100LT_RIDE_EA", "arch": {"type": "ResNet32EAModel"}}
        ),
        "criterion": OrderedDict(),
    }
    torch.save(checkpoint, path)
    _forget("parse_config", tmp_path)
    return path


@pytest.fixture(scope="module")
def official_ea(reference_dir):
    return {
        **load_file(reference_dir / "cifar_ride_resnet32_e3_state_dict.safetensors"),
        **load_file(reference_dir / "cifar_ea_resnet32_e3_router_state_dict.safetensors"),
    }


@pytest.fixture(scope="module")
def ea_io(reference_dir):
    return load_file(reference_dir / "cifar_ea_resnet32_e3_io.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, official_ea):
    tmp = tmp_path_factory.mktemp("convert")
    pth = _official_pth(tmp, official_ea)
    out = hub.main(["convert", str(pth), "--model", NAME, "--tag", TAG, "--out", str(tmp / "folder")])
    return Path(out)


def test_official_checkpoint_is_read_without_its_code(tmp_path, official_ea):
    checkpoint = read_official_checkpoint(_official_pth(tmp_path, official_ea))
    assert "parse_config" not in sys.modules
    assert checkpoint["epoch"] == 5 and float(checkpoint["monitor_best"]) == 48.6
    assert torch.equal(
        checkpoint["state_dict"]["module.backbone.conv1.weight"], official_ea["backbone.conv1.weight"]
    )
    config = checkpoint["config"]
    assert (
        config.state["_save_dir"] == "saved/models/run"
        and config.state["_config"]["arch"]["type"] == "ResNet32EAModel"
    )


def test_official_training_checkpoint_loads_wherever_weights_are_read(tmp_path, official_ea, ea_io):
    """validate.py --checkpoint and train.py --initial-checkpoint / --teacher-checkpoint take it as is."""
    model = load_model(NAME, checkpoint=_official_pth(tmp_path, official_ea)).eval()
    assert model.routing == "router"
    with torch.no_grad():
        torch.testing.assert_close(
            model(ea_io["input"]), ea_io["routed_output_eval_fp32"], atol=1e-4, rtol=1e-5
        )


def test_convert_writes_a_timm_folder_with_identical_outputs(converted, official_ea, ea_io):
    assert sorted(p.name for p in converted.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((converted / "config.json").read_text())
    assert config["architecture"] == NAME and config["num_classes"] == 100
    assert config["pretrained_cfg"]["mean"] == [0.4914, 0.4822, 0.4465]
    card = (converted / "README.md").read_text()
    assert "library_name: timm" in card and "| router | 48.6 | 67.0 | 49.9 | 25.7 |" in card
    assert "@inproceedings{wang2021longtailed" in card and f"hf-hub:ride-models/{NAME}.{TAG}" in card

    model = timm.create_model(f"local-dir:{converted}", pretrained=True).eval()
    direct = timm.create_model(NAME)
    direct.load_state_dict(convert_official_state_dict(official_ea, NAME))
    direct.eval()
    assert model.routing == "router"
    with torch.no_grad():
        y, n = model.forward_routed(ea_io["input"])
        y_direct, _ = direct.forward_routed(ea_io["input"])
    assert torch.equal(y, y_direct)
    assert torch.equal(n, ea_io["num_experts_for_each_sample"].squeeze(1))
    torch.testing.assert_close(y, ea_io["routed_output_eval_fp32"], atol=1e-4, rtol=1e-5)


def test_folder_loads_through_a_file_overlay(converted, ea_io):
    model = timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(converted / "model.safetensors"))
    )
    with torch.no_grad():
        out = model.eval()(ea_io["input"])
    torch.testing.assert_close(out, ea_io["routed_output_eval_fp32"], atol=1e-4, rtol=1e-5)


def test_offline_huggingface_cache(converted, tmp_path, ea_io):
    """A cache laid out as the Hub fills it, HF_HUB_OFFLINE=1: by name (default tag), name.tag and hf-hub:."""
    repo = tmp_path / "hub" / f"models--ride-models--{NAME}.{TAG}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "README.md"):
        (snapshot / name).write_bytes((converted / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({"x": ea_io["input"]}, str(tmp_path / "input.safetensors"))
    script = textwrap.dedent(
        f"""
        import timm, torch, ride_models
        from safetensors.torch import load_file
        x = load_file({str(tmp_path / "input.safetensors")!r})["x"]
        for name in ({NAME!r}, {f"{NAME}.{TAG}"!r}, {f"hf-hub:ride-models/{NAME}.{TAG}"!r}):
            with torch.no_grad():
                print(name, timm.create_model(name, pretrained=True).eval()(x).sum().item())
        """
    )
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home")
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sums = [float(line.split()[-1]) for line in result.stdout.splitlines()]
    expected = ea_io["routed_output_eval_fp32"].sum().item()
    assert len(sums) == 3 and all(abs(s - expected) < 1e-2 for s in sums)


def test_no_network_and_no_cache_says_what_to_do(tmp_path):
    script = f"import timm, ride_models; timm.create_model({NAME!r}, pretrained=True)"
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"), HF_HOME=str(tmp_path / "home")
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode != 0
    assert f"could not be loaded from ride-models/{NAME}.{TAG}" in result.stderr
    assert "pretrained_cfg_overlay=dict(file=" in result.stderr and "ride_models.hub convert" in result.stderr


def test_scripts_name_an_hf_hub_model_missing_offline(converted, tmp_path):
    """train.py / validate.py with an hf-hub: name whose config is not cached say which model and how to get
    it, in one line; with the config cached but not the weights, the model's own loader says so."""
    name = f"hf-hub:ride-models/{NAME}.{TAG}"
    snapshot = tmp_path / "hub" / f"models--ride-models--{NAME}.{TAG}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home")
    )
    validate = [sys.executable, str(ROOT / "validate.py"), "--model", name, "--pretrained"]
    train = [
        sys.executable,
        str(ROOT / "train.py"),
        "--model",
        name,
        "--pretrained",
        "--output",
        str(tmp_path),
    ]
    for config_cached, command in ((False, validate), (True, train)):
        if config_cached:  # the config alone: train.py gets past the model's template, not its weights
            (snapshot / "config.json").write_bytes((converted / "config.json").read_bytes())
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        if config_cached:
            assert f"could not be loaded from ride-models/{NAME}.{TAG}" in result.stderr
            assert "pretrained_cfg_overlay=dict(file=" in result.stderr  # and its command-line form:
            assert "the file as train.py --initial-checkpoint or validate.py --checkpoint" in result.stderr
        else:
            assert f"model {name}: not in this machine's Hugging Face cache" in result.stderr
            assert f"huggingface-cli download ride-models/{NAME}.{TAG}" in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == ["hub"]  # no run folder


def test_torch_hub_local(converted, ea_io):
    model = torch.hub.load(str(ROOT), "ride_resnet32_4e", source="local", pretrained=False, num_classes=10)
    assert model.num_classes == 10 and model.num_experts == 4
    overlay = dict(file=str(converted / "model.safetensors"))
    model = torch.hub.load(str(ROOT), NAME, source="local", pretrained=True, pretrained_cfg_overlay=overlay)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(ea_io["input"]), ea_io["routed_output_eval_fp32"], atol=1e-4, rtol=1e-5
        )
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert set(timm.list_models("ride_*")) <= set(dir(hubconf)) and "timm" in hubconf.dependencies


def test_export_a_training_run(tmp_path):
    run = tmp_path / "run"
    training.main(
        [
            "--model",
            "ride_resnet32_2e",
            "--epochs",
            "1",
            "-b",
            "128",
            "--workers",
            "0",
            "--output",
            str(tmp_path),
            "--experiment",
            "run",
        ]
    )
    out = hub.main(["export", str(run), "--out", str(tmp_path / "export")])
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    weights = load_file(run / "last.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    card = (Path(out) / "README.md").read_text()
    results = json.loads((run / "results.json").read_text())["test"][0]
    assert (
        f"| all | {results['top1']:.1f} |" in card and "digits_lt" in card and "ride-models train.py" in card
    )
    # Not a zoo entry: the digits' own normalisation, and nothing of the default tag's identity.
    config = json.loads((Path(out) / "config.json").read_text())["pretrained_cfg"]
    digits = ride_models.data.DIGITS_CONFIG
    assert tuple(config["mean"]) == tuple(digits.mean) and tuple(config["std"]) == tuple(digits.std)
    assert not {"tag", "hf_hub_id", "description", "origin_url"} & set(config)
    assert tuple(timm.data.resolve_model_data_config(model)["mean"]) == tuple(digits.mean)


def test_push_uploads_with_the_token_from_the_environment(converted, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok, private):
            calls.append(("create", repo_id, exist_ok, private))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            return "https://huggingface.co/ride-models/x/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    url = hub.main(["push", str(converted), "--repo-id", "ride-models/x"])
    assert url.endswith("/commit/1")
    assert calls == [
        ("token", "hf_test"),
        ("create", "ride-models/x", True, False),
        ("upload", str(converted), "ride-models/x"),
    ]
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ValueError, match="set HF_TOKEN"):
        hub.main(["push", str(converted), "--repo-id", "ride-models/x"])


# ------------------------------------------------------------------------------------------- bad input
def test_checkpoint_for_another_architecture(tmp_path, official_ea):
    pth = _official_pth(tmp_path, official_ea)
    with pytest.raises(
        ValueError, match="fit ride_resnet32_4e: experts: 3 in the checkpoint, 4 in the model"
    ):
        hub.main(["convert", str(pth), "--model", "ride_resnet32_4e", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="architecture: resnet32 in the checkpoint, resnet50 in the model"):
        hub.main(["convert", str(pth), "--model", "ride_resnet50_3e", "--out", str(tmp_path / "x")])


def test_checkpoint_with_wrong_shapes_lists_them(tmp_path, official_ea):
    broken = dict(official_ea)
    broken["backbone.layer1.0.conv1.weight"] = torch.zeros(16, 3, 3, 3)
    pth = _official_pth(tmp_path, broken)
    with pytest.raises(
        ValueError, match=r"layer1\.0\.conv1\.weight: given \(16, 3, 3, 3\), expected \(16, 16, 3, 3\)"
    ):
        hub.main(["convert", str(pth), "--model", NAME, "--out", str(tmp_path / "x")])


def test_truncated_and_corrupted_files(tmp_path, official_ea):
    data = _official_pth(tmp_path, official_ea).read_bytes()
    for name, content in (
        ("half.pth", data[: len(data) // 2]),
        ("tail.pth", data[:-40]),
        ("junk.pth", b"not a checkpoint"),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=r"truncated or corrupted") as error:
            read_official_checkpoint(tmp_path / name)
        # torch's advice to reload with weights_only=False is for files that need code execution, not these.
        assert str(tmp_path / name) in str(error.value) and "weights_only" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_official_checkpoint(tmp_path / "absent.pth")


def test_truncated_and_corrupted_safetensors(tmp_path):
    """validate.py --checkpoint, train.py --initial-checkpoint and --teacher-checkpoint read through here."""
    save_weights(tmp_path / "w.safetensors", {"conv1.weight": torch.randn(16, 3, 3, 3), "w": torch.randn(99)})
    data = (tmp_path / "w.safetensors").read_bytes()
    for name, content in (
        ("half.safetensors", data[: len(data) // 2]),
        ("tail.safetensors", data[:-40]),
        ("header.safetensors", data[:5]),  # shorter than the 8-byte header length
        ("junk.safetensors", b"not a checkpoint"),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=r"truncated or corrupted.*download it again") as error:
            read_state_dict(tmp_path / name)
        assert str(error.value).startswith(f"{tmp_path / name} cannot be read as a checkpoint")
    with pytest.raises(ValueError, match="half.safetensors cannot be read"):
        load_model(NAME, checkpoint=tmp_path / "half.safetensors")


def test_weights_files_are_read_by_their_content_not_their_name(tmp_path):
    weights = {"conv1.weight": torch.randn(16, 3, 3, 3)}
    save_weights(tmp_path / "safetensors.pth", weights)  # safetensors under a torch name
    torch.save(weights, tmp_path / "torch.safetensors")  # and the other way round
    for name in ("safetensors.pth", "torch.safetensors"):
        assert torch.equal(read_state_dict(tmp_path / name)["conv1.weight"], weights["conv1.weight"]), name
    save_weights(tmp_path / "empty.safetensors", {})  # no tensors (and no metadata): still readable
    assert read_state_dict(tmp_path / "empty.safetensors") == {}


def test_resume_reads_only_a_sound_training_state(tmp_path):
    run, weights = tmp_path / "run", {"conv1.weight": torch.randn(16, 3, 3, 3), "w": torch.randn(99)}
    save_training_state(run / "last_state.pt", {"epoch": 3, "args": {"lr": 0.1}, "model": weights})
    assert load_training_state(run)["epoch"] == 3
    data = (run / "last_state.pt").read_bytes()
    for content in (data[: len(data) // 2], data[:-40], b"not a training state"):
        (run / "last_state.pt").write_bytes(content)
        with pytest.raises(ValueError, match="cannot be read as a training state") as error:
            load_training_state(run)
        message = str(error.value)
        assert str(run / "last_state.pt") in message and "the run's last saved state is lost" in message
        assert "weights_only" not in message
    # The weights of the run are not its training state (the README names last.safetensors).
    save_weights(run / "last.safetensors", weights)
    torch.save(weights, run / "weights.pt")
    with pytest.raises(ValueError, match=r"holds weights only: --resume takes the run folder \(or its last"):
        load_training_state(run / "last.safetensors")
    with pytest.raises(
        ValueError, match=r"weights\.pt is not a training state .*--resume takes the run folder"
    ):
        load_training_state(run / "weights.pt")


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_written_files_follow_the_umask(tmp_path):
    # A new file gets mode 0o666 less the umask: 0o644 under 0o022, 0o640 under 0o027, 0o664 under 0o002.
    before = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664)):
            os.umask(umask)
            save_weights(tmp_path / "last.safetensors", {"w": torch.zeros(2)})
            save_training_state(tmp_path / "last_state.pt", {"epoch": 1})
            atomic_write(tmp_path / "summary.csv", lambda tmp: Path(tmp).write_text("epoch\n1\n"))
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
            assert modes == dict.fromkeys(["last.safetensors", "last_state.pt", "summary.csv"], mode)
            assert os.umask(umask) == umask  # reading it left it as it was
    finally:
        os.umask(before)


def test_a_missing_torch_api_is_not_blamed_on_the_file(tmp_path, official_ea, monkeypatch):
    # As under torch 2.5, which lacks this function: the error is ours, the file is fine.
    path = _official_pth(tmp_path, official_ea)
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
    with pytest.raises(AttributeError, match="get_unsafe_globals_in_checkpoint"):
        read_official_checkpoint(path)


def test_pickles_that_need_code_execution_are_refused(tmp_path):
    marker = tmp_path / "ran"
    evil = _research_module(
        tmp_path,
        "evil_payload",
        f"""
        import os

        class Payload:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))

        class Constructed:
            def __init__(self, cmd):
                self.cmd = cmd

            def __reduce__(self):
                return (Constructed, (self.cmd,))
        """,
    )
    torch.save({"state_dict": {}, "config": evil.Payload()}, tmp_path / "system.pth")
    torch.save({"state_dict": {}, "config": evil.Constructed("x")}, tmp_path / "construct.pth")
    _forget("evil_payload", tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"execute code.*posix\.system|execute code.*os\.system"):
        read_official_checkpoint(tmp_path / "system.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"would call evil_payload\.Constructed\(\.\.\.\)"):
        read_official_checkpoint(tmp_path / "construct.pth")
    assert not marker.exists()


def test_unknown_tag_lists_the_known_ones(tmp_path, official_ea):
    pth = _official_pth(tmp_path, official_ea)
    known = "known tags: cifar100_lt_r100, cifar100_lt_r100_distill"
    with pytest.raises(ValueError, match=f"unknown tag 'nope' for ride_resnet32_3e; {known}"):
        hub.main(["convert", str(pth), "--model", NAME, "--tag", "nope", "--out", str(tmp_path / "x")])
    with pytest.raises(RuntimeError, match=f"unknown pretrained tag 'nope' for ride_resnet32_3e; {known}"):
        timm.create_model(f"{NAME}.nope")


def test_converting_without_a_tag_warns_that_the_card_lacks_dataset_and_accuracy(tmp_path, official_ea):
    pth = _official_pth(tmp_path, official_ea)
    known = "for ride_resnet32_3e: cifar100_lt_r100, cifar100_lt_r100_distill"
    with pytest.warns(
        UserWarning, match=f"without --tag: its model card names no dataset and no accuracy.*{known}"
    ):
        out = hub.main(["convert", str(pth), "--model", NAME, "--out", str(tmp_path / "x")])
    assert "Dataset: (not given)" in (out / "README.md").read_text()


# The official MODEL_ZOO.md (frank-xwang/RIDE-LongTailRecognition), typed in by hand: overall / many /
# medium / few top-1 and the Google Drive id of each checkpoint.
# fmt: off
OFFICIAL_ZOO = {
    "ride_resnet32_3e.cifar100_lt_r100": (48.6, 67.0, 49.9, 25.7, "1uE8I_2JcslWGPu4O0nAFEIk7iR_Sw5lS"),
    "ride_resnet32_3e.cifar100_lt_r100_distill": (49.0, 67.6, 50.9, 25.2, "1W-EICEpAavKzlnayiFPvb5cDyGCBl34l"),  # noqa: E501
    "ride_resnet32_4e.cifar100_lt_r100_distill": (49.4, 67.7, 51.3, 25.7, "11kyxcYIh3bXk3mn3Y8EENHcsx-Ld9PXH"),  # noqa: E501
    "ride_resnet32_6e.cifar100_lt_r100": (50.2, 69.3, 52.1, 25.8, "1kq8SaoHUujqIOplsKUNRpKM7UQR0qg-k"),
    "ride_resnext50_3e.imagenet_lt": (55.7, 67.0, 52.2, 36.0, "1d4PHfWZ_rfTRDIJG5sogK1cO0BRoi9d9"),
    "ride_resnext50_4e.imagenet_lt_distill": (56.8, 68.3, 53.5, 35.9, "1G3aT7YzEixb0mSQBpZpuUfTT3b9YsSbz"),
    "ride_resnext50_6e.imagenet_lt": (57.5, 68.9, 54.3, 36.5, "1hJyMgbv0JSisXCiHpC1xcHhbGXJP8K8a"),
    "ride_resnet50_3e.inat2018": (71.2, 70.2, 71.2, 71.6, "1KVrKrQXsuzeeb2oFzjloEf2XrvIfb42u"),
    "ride_resnet50_4e.inat2018_distill": (72.6, 70.9, 72.5, 73.1, "1PdfWVQlsTjPFDr7bTFeUUskh2RA6Mb_r"),
    "ride_resnet50_6e.inat2018": (72.9, 71.1, 72.9, 73.3, "1DtLlx3be7WCmtVzoGBSGCiImQDJNxHGJ"),
    "ride_resnet50_4e.inat2018_distill_200ep": (73.2, 70.5, 73.7, 73.3, "1Kz-SwP6vRx7ktZhYWLmJLG6uprkj38vp"),
    "ride_resnet50_6e.inat2018_300ep": (74.6, 71.0, 75.7, 74.3, "1fyPJdgsLLTA7JE6uzUZmPanh1e1I8rKy"),
}
# fmt: on


def test_published_checkpoints_are_the_official_zoo():
    assert set(PUBLISHED_CHECKPOINTS) == set(OFFICIAL_ZOO)
    for name_tag, (top1, many, medium, few, drive_id) in OFFICIAL_ZOO.items():
        zoo = PUBLISHED_CHECKPOINTS[name_tag]
        assert (zoo.top1, zoo.many, zoo.medium, zoo.few) == (top1, many, medium, few), name_tag
        assert drive_id in zoo.origin_url, name_tag


def test_published_configs():
    published = timm.list_pretrained("ride_*")
    assert len(published) == 12
    for name_tag in published:
        cfg = timm.models.get_pretrained_cfg(name_tag)
        assert cfg.hf_hub_id == f"ride-models/{name_tag}" and cfg.license == "mit"
        assert (
            cfg.origin_url.startswith("https://drive.google.com/") and "official model zoo" in cfg.description
        )
    assert timm.models.get_pretrained_cfg("ride_resnet50_4e").tag == "inat2018_distill_200ep"  # best first
    assert timm.models.get_pretrained_cfg("ride_resnet50_3e.inat2018").num_classes == 8142


@pytest.mark.parametrize("name", ["ride_resnet32_4e", "ride_resnet32_2e"])  # published weights or none
def test_a_missing_overlay_file_is_named(tmp_path, name):
    for path in (tmp_path / "nope.safetensors", tmp_path):
        with pytest.raises(FileNotFoundError, match=f"file={str(path)!r}\\) (does not exist|is not a file)"):
            timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_write_folder_keeps_the_input_channels_and_the_mode(tmp_path):
    model = timm.create_model("ride_resnet32_4e", in_chans=1, num_classes=10).train()
    hub.write_folder(model, tmp_path / "gray", "card")
    assert model.training
    loaded = timm.create_model(f"local-dir:{tmp_path / 'gray'}", pretrained=True)
    assert loaded.in_chans == 1 and torch.equal(loaded.conv1.weight, model.conv1.weight)

    backbone = timm.create_model("ride_resnet32_4e", num_classes=0)
    hub.write_folder(backbone, tmp_path / "backbone", "card")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'backbone'}", pretrained=True)
    assert loaded.num_classes == 0
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_checkpoint_that_is_not_the_tags_is_refused(tmp_path, official_ea):
    stage1 = {k: v for k, v in official_ea.items() if "expert_help_pred" not in k}
    ten = {k: (v[:, :10].contiguous() if ".linears." in k else v) for k, v in stage1.items()}
    for name, state_dict, problem in (
        ("stage1.pth", stage1, "no router weights, where the tag's checkpoint has one"),
        ("ten.pth", ten, "10 classes, the tag's dataset has 100"),
    ):
        pth = _official_pth(tmp_path, state_dict, name)
        with pytest.raises(ValueError, match=f"is not the checkpoint of {NAME}.{TAG}: it has {problem}"):
            hub.main(["convert", str(pth), "--model", NAME, "--tag", TAG, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_hub_command_line_errors_are_short_and_named(tmp_path, official_ea):
    with pytest.raises(ValueError, match="--model ride_resnet99_4e: not a RIDE model"):
        hub.main(["convert", "any.pth", "--model", "ride_resnet99_4e", "--out", str(tmp_path / "x")])
    bare = tmp_path / "bare.pth"
    torch.save(official_ea, bare)  # a state dict, not a training checkpoint
    with pytest.raises(ValueError) as err:
        hub.main(["convert", str(bare), "--model", NAME, "--out", str(tmp_path / "x")])
    assert f"found {len(official_ea)} keys: " in str(err.value) and len(str(err.value)) < 600
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.yaml").write_text("model: ride_resnet32_2e\n")
    with pytest.raises(ValueError, match="lacks dataset, stage, loss, epochs"):
        hub.main(["export", str(run), "--out", str(tmp_path / "y")])
