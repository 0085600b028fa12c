"""validate.py end to end: in-process through ``main(argv)`` and once as a command; its errors; the plots."""

from __future__ import annotations

import csv
import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

import ride_models  # noqa: F401  (registers the models)
from ride_models.checkpoint import save_weights
from ride_models.data import CIFAR100_CLASSES, long_tail_counts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import validate  # noqa: E402  (the script at the repository root)

REQUIRED_KEYS = {
    *("model", "dataset", "routing", "top1", "top5", "many_top1", "medium_top1", "few_top1", "ece"),
    *("experts_mean", "experts_per_split", "gmacs_per_image", "num_images"),
}


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """Weights of a 2-expert, 10-class model as train.py writes them (the embedded digits have 10 classes)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "best.safetensors"
    save_weights(path, timm.create_model("ride_resnet32_2e", num_classes=10).state_dict())
    return path


# ------------------------------------------------------------------ the 20 real CIFAR-100 test images


@pytest.fixture(scope="module")
def cifar20(tmp_path_factory, reference_dir, shared_data_dir):
    """A ``--dataset folder`` tree of the first 20 CIFAR-100 test images, an official EA checkpoint
    (RIDE backbone + router fixtures, 3 experts), and the CIFAR-100-LT ratio-100 training counts."""
    tmp = tmp_path_factory.mktemp("cifar20")
    images = sorted((shared_data_dir / "cifar100" / "sample_test_first20").glob("cifar100_*.png"))
    assert len(images) == 20
    # folder datasets take class names and order from train/; CIFAR-100's names sorted are its label order.
    for name in CIFAR100_CLASSES:
        (tmp / "data" / "train" / name).mkdir(parents=True)
        shutil.copy(images[0], tmp / "data" / "train" / name / "placeholder.png")
    for image in images:
        label = int(image.stem.split("_")[2])  # cifar100_II_LL.png: II test index, LL fine label
        folder = tmp / "data" / "test" / CIFAR100_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / image.name)
    official = {
        **load_file(reference_dir / "cifar_ride_resnet32_e3_state_dict.safetensors"),
        **load_file(reference_dir / "cifar_ea_resnet32_e3_router_state_dict.safetensors"),
    }
    torch.save({"state_dict": official}, tmp / "official_ea_e3.pth")  # the official checkpoint layout
    (tmp / "counts.json").write_text(json.dumps(long_tail_counts(100, 500, 100)))
    return tmp


def test_cifar100_first20_images_end_to_end(cifar20, capsys):
    out = cifar20 / "out"
    results = validate.main(
        [
            *("--model", "ride_resnet32_3e", "--checkpoint", str(cifar20 / "official_ea_e3.pth")),
            *("--dataset", "folder", "--data-dir", str(cifar20 / "data"), "--split", "test"),
            *("--class-counts", str(cifar20 / "counts.json"), "--routing", "all", "router", "-j", "0"),
            *("--results-file", str(out / "r.json"), "--per-class-csv", str(out / "c.csv")),
            *("--plot-dir", str(out / "plots"), "--device", "cpu"),
        ]
    )
    # both rows in one printed table
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("routing"))
    assert [line.split()[0] for line in lines[header + 1 : header + 3]] == ["all", "router"]

    rows = json.loads((out / "r.json").read_text())
    assert [r["routing"] for r in rows] == ["all", "router"] and REQUIRED_KEYS <= set(rows[0])
    every, routed = rows
    assert every["model"] == "ride_resnet32_3e" and every["dataset"] == "folder"
    assert every["num_images"] == routed["num_images"] == 20
    # ratio 100 on CIFAR-100: 35 many / 35 medium / 30 few classes (the shared data README)
    assert every["classes_per_split"] == {"many": 35, "medium": 35, "few": 30}
    # all experts: 3 per image; 100,358,208 MACs per image (flops.json own_conv_linear_macs, ResNet32Model
    # E=3 "total": convs + the three 48 x 100 classifiers), written rounded to 6 decimals in GMACs
    assert every["experts_mean"] == 3 and every["experts_counts"]["all"] == [0, 0, 20]
    assert every["gmacs_per_image"] == pytest.approx(100_358_208 / 1e9, abs=5e-7)
    # Images per split from the file names (cifar100_II_LL.png) and the ratio-100 splits of the shared data
    # README: labels 0..34 many (> 100 training images), 35..69 medium, 70..99 few.
    labels = [int(p.stem.split("_")[2]) for p in (cifar20 / "data" / "test").rglob("cifar100_*.png")]
    per_split = {"many": sum(x < 35 for x in labels), "medium": sum(35 <= x < 70 for x in labels)}
    per_split["few"] = 20 - per_split["many"] - per_split["medium"]
    for r in rows:
        assert {k: sum(r["experts_counts"][k]) for k in per_split} == per_split
    # the trained (EA) router stops some images early: fewer experts and MACs on average
    hist = routed["experts_counts"]["all"]
    assert sum(hist) == 20 and 1 <= routed["experts_mean"] < 3
    assert routed["experts_mean"] == pytest.approx((hist[0] + 2 * hist[1] + 3 * hist[2]) / 20)
    # Realized cost by hand (tests/test_flops.py: shared 24,035,328, expert 25,436,160, classifier 4,800 with
    # 100 classes, routing decision 48 x 16 + 30 + 16 = 814): an image with 1 / 2 / 3 experts costs
    # 49,477,102 / 74,918,876 / 100,359,836 MACs (1 decision, 2 decisions, 2 decisions).
    by_hand = (hist[0] * 49_477_102 + hist[1] * 74_918_876 + hist[2] * 100_359_836) / 20
    assert routed["gmacs_per_image"] == pytest.approx(by_hand / 1e9, abs=5e-7)
    # top-1 over the 20 images equals the per-class top-1 of the CSV weighted by each class's images
    # (checked below, once the CSV is read); with 20 images every accuracy is a multiple of 5 %.
    for r in rows:
        assert r["top1"] % 5 == 0 and r["top5"] % 5 == 0 and r["top1"] <= r["top5"]
    assert [r.routing for r in results] == ["all", "router"]

    with open(out / "c.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 200  # 100 classes x 2 routing modes
    first = table[:100]
    assert first[0]["name"] == "apple" and first[0]["train_images"] == "500" and first[0]["split"] == "many"
    assert first[99]["train_images"] == "5" and first[99]["split"] == "few"
    # labels 71 (test images 4 and 10) and 92 (5 and 16) have two images each, from the file names
    assert first[71]["eval_images"] == first[92]["eval_images"] == "2"
    assert sum(int(row["eval_images"]) for row in first) == 20
    assert first[1]["top1"] == "" and first[1]["eval_images"] == "0"  # aquarium_fish: not among the 20
    for r, part in zip(rows, (table[:100], table[100:])):
        assert {row["routing"] for row in part} == {r["routing"]}
        weighted = sum(
            float(row["top1"]) * int(row["eval_images"]) for row in part if row["eval_images"] != "0"
        )
        assert r["top1"] == pytest.approx(weighted / 20, abs=1e-4)

    pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install matplotlib)")
    for name, size in (("per_class_accuracy.png", (700, 450)), ("experts_per_split.png", (800, 380))):
        with Image.open(out / "plots" / name) as png:
            assert png.format == "PNG" and png.size == size  # figure inches x 100 dpi


# ------------------------------------------------------------- the embedded default dataset, timm names


def test_default_dataset_with_a_train_checkpoint(digits_checkpoint, tmp_path, capsys):
    """No --dataset: the embedded digits; the class count comes from the checkpoint; one routing, one dict."""
    results = validate.main(
        ["--model", "ride_resnet32_2e", "--checkpoint", str(digits_checkpoint), "-j", "0", "--device", "cpu"]
        + ["--routing", "all", "--results-file", str(tmp_path / "r.json")]
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert isinstance(result, dict) and REQUIRED_KEYS <= set(result)
    # digits_lt test split: 300 images; training counts 144 .. 7 give 2 many / 4 medium / 4 few classes
    assert result["dataset"] == "digits_lt" and result["num_images"] == 300
    assert result["classes_per_split"] == {"many": 2, "medium": 4, "few": 4}
    assert result["split"] == "test" and result["checkpoint"] == str(digits_checkpoint)
    assert results[0].num_classes == 10
    assert "digits_lt test: 300 images, 10 classes" in capsys.readouterr().out


def test_imb_ratio_sets_the_training_counts_of_the_embedded_digits(digits_checkpoint, tmp_path):
    """--imb-ratio 10 instead of the digits' default 20: other training counts, so other shot splits."""
    import numpy as np

    # Head count from the data file itself: the smallest class after the last 30 images of each class go
    # to the test split (the digits' classes have 174..183 images, so 144..153 remain).
    with np.load(ROOT / "ride_models" / "data" / "digits_8x8.npz") as data:
        img_max = int(np.bincount(data["labels"]).min()) - 30
    assert img_max == 144
    # The official CIFAR-LT profile (shared data README): int(img_max * (1 / ratio) ** (i / (C - 1))),
    # ratio 10, C = 10: int(144 * 0.1 ** (i / 9)) for i = 0..9.
    expected = [144, 111, 86, 66, 51, 40, 31, 24, 18, 14]
    assert [int(img_max * 0.1 ** (i / 9)) for i in range(10)] == expected
    csv_path = tmp_path / "c.csv"
    (r,) = validate.main(
        ["--model", "ride_resnet32_2e", "--checkpoint", str(digits_checkpoint), "-j", "0", "--device", "cpu"]
        + ["--routing", "all", "--imb-ratio", "10", "--per-class-csv", str(csv_path)]
    )
    with open(csv_path, newline="") as f:
        assert [int(row["train_images"]) for row in csv.DictReader(f)] == expected
    # > 100 many (144, 111), 20..100 medium (86 .. 24), < 20 few (18, 14); the default ratio 20
    # (144, 103, 74, 53, 38, 27, 19, 14, 10, 7) gives 2 / 4 / 4 (test_default_dataset_with_a_train_checkpoint)
    assert r.to_dict()["classes_per_split"] == {"many": 2, "medium": 6, "few": 2}
    assert r.num_images == 300  # the test split does not depend on the ratio: 30 per class


def test_local_dir_model_and_class_counts_list(tmp_path):
    from timm.models import save_for_hf

    torch.manual_seed(1)
    model = timm.create_model("ride_resnet32_2e", num_classes=10)
    save_for_hf(model, tmp_path / "hf")
    # --class-counts as a list overrides the training counts: 3 many, 3 medium, 4 few
    counts = "500,200,101,100,50,20,19,10,5,1"
    (r,) = validate.main(
        ["--model", f"local-dir:{tmp_path / 'hf'}", "--pretrained", "--routing", "1", "-j", "0"]
        + ["--class-counts", counts, "--device", "cpu"]
    )
    assert r.to_dict()["classes_per_split"] == {"many": 3, "medium": 3, "few": 4}
    assert r.experts_mean == 1 and r.num_images == 300
    # the saved weights were loaded: the same model evaluated directly predicts the same
    from ride_models.data import build_transform, create_dataset
    from ride_models.metrics import evaluate

    test = create_dataset("digits_lt", split="test", transform=build_transform("digits_lt", False))
    loader = torch.utils.data.DataLoader(test, batch_size=300)
    direct = evaluate(model, loader, class_counts=[int(n) for n in counts.split(",")], routing=1)
    assert direct.top1 == pytest.approx(r.top1) and direct.ece == pytest.approx(r.ece)


def test_results_as_csv(digits_checkpoint, tmp_path):
    """A .csv --results-file holds one row per routing mode with the JSON's fields, nested ones flattened."""
    flags = [
        "--model",
        "ride_resnet32_2e",
        "--checkpoint",
        str(digits_checkpoint),
        "-j",
        "0",
        "--device",
        "cpu",
    ]
    results = validate.main([*flags, "--routing", "all", "1", "--results-file", str(tmp_path / "r.csv")])
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["routing"] for row in rows] == ["all", "1"]
    for row, result in zip(rows, results):
        expected = result.to_dict()
        assert float(row["top1"]) == expected["top1"] and float(row["ece"]) == expected["ece"]
        assert row["experts_counts_all"] == " ".join(map(str, expected["experts_counts"]["all"]))
        assert float(row["experts_per_split_few"]) == expected["experts_per_split"]["few"]
        assert int(row["classes_per_split_many"]) == 2 and row["split"] == "test"
    assert rows[1]["experts_counts_all"] == "300 0"  # --routing 1: every image used the first expert only
    validate.main(
        [*flags, "--routing", "all", "--results-file", str(tmp_path / "r.csv"), "--results-format", "json"]
    )
    assert json.loads((tmp_path / "r.csv").read_text())["routing"] == "all"


def test_command_line(digits_checkpoint, tmp_path):
    results_file = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "validate.py", "--model", "ride_resnet32_2e", "--checkpoint", str(digits_checkpoint)]
        + ["--num-classes", "10", "--routing", "all", "1", "--results-file", str(results_file), "-j", "0"]
        + ["--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()[-2:]] == ["all", "1"]
    assert [r["routing"] for r in json.loads(results_file.read_text())] == ["all", 1]


def test_help_shows_only_defaults_that_say_something(capsys):
    with pytest.raises(SystemExit):
        validate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 2)" in text and "(default: False)" in text  # -j, --amp
    for noise in ("(default: None)", "(default: [None])", "(default: )"):
        assert noise not in text
    assert text.count("(default: the checkpoint's or dataset's)") == 1  # stated once, not twice


def test_command_line_error_is_one_line(tmp_path, monkeypatch, capsys):
    """Run as a script, bad input ends with exit status 1 and one message, no traceback."""
    monkeypatch.setattr(sys, "argv", ["validate.py", "--checkpoint", str(tmp_path / "nope.safetensors")])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "validate.py"), run_name="__main__")
    message = str(exit_.value.code)
    assert message.startswith("validate.py: error: --checkpoint") and ".safetensors" in message


# ---------------------------------------------------------------------------------------- bad input


def test_checkpoint_class_count_differs_from_the_dataset(tmp_path):
    path = tmp_path / "cifar100.safetensors"
    save_weights(path, timm.create_model("ride_resnet32_2e").state_dict())  # 100 classes
    with pytest.raises(ValueError) as error:
        validate.main(
            ["--model", "ride_resnet32_2e", "--checkpoint", str(path), "-j", "0", "--device", "cpu"]
        )
    message = str(error.value)
    assert f"checkpoint {path} has 100 classes" in message
    assert "digits_lt (test split) has 10" in message and "--dataset" in message


def test_num_classes_differs_from_the_checkpoint(digits_checkpoint):
    with pytest.raises(ValueError, match="num_classes is 100, but the checkpoint .* has 10 classes; leave"):
        validate.main(
            ["--model", "ride_resnet32_2e", "--checkpoint", str(digits_checkpoint), "--num-classes", "100"]
        )


def test_checkpoint_with_other_experts(digits_checkpoint):
    with pytest.raises(ValueError, match=r"does not fit model ride_resnet32_3e(.|\n)*experts: .* has 2"):
        validate.main(["--model", "ride_resnet32_3e", "--checkpoint", str(digits_checkpoint)])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.pth: no such file; expected a \.safetensors file"):
        validate.main(["--checkpoint", str(tmp_path / "nope.pth")])


def test_split_file_dataset_without_class_counts(tmp_path):
    """ImageNet-LT test images without the training split file: many/medium/few cannot be known until
    --class-counts gives them; then it runs."""
    (tmp_path / "val").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(tmp_path / "val" / f"{i}.png")
    (tmp_path / "ImageNet_LT_test.txt").write_text("val/0.png 0\nval/1.png 999\n")
    args = ["--model", "ride_resnet10_2e", "--dataset", "imagenet_lt", "--data-dir", str(tmp_path), "-j", "0"]
    with pytest.raises(FileNotFoundError) as error:
        validate.main(args)
    assert "ImageNet_LT_train.txt" in str(error.value) and "--class-counts FILE_OR_LIST" in str(error.value)

    with pytest.raises(ValueError, match=r"3 entries, expected one per class \(1000\)(.|\n)*--class-counts"):
        validate.main([*args, "--class-counts", "5,5,5"])
    with pytest.raises(FileNotFoundError, match="--class-counts counts.json: no such file"):
        validate.main([*args, "--class-counts", "counts.json"])

    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps([200] * 400 + [50] * 400 + [10] * 200))
    (r,) = validate.main([*args, "--class-counts", str(counts), "--device", "cpu"])
    assert r.num_images == 2 and r.to_dict()["classes_per_split"] == {"many": 400, "medium": 400, "few": 200}
    assert r.experts_per_split["many"] == 2 and r.experts_per_split["few"] == 2  # labels 0 and 999


def test_folder_with_a_test_tree_only(tmp_path):
    """--dataset folder without train/: the test tree's class folders (sorted) are the classes and
    --class-counts the training counts; without them it says so instead of asking for train/."""
    for name, n in (("ant", 2), ("bee", 0), ("cat", 1)):  # bee: a class without test images
        (tmp_path / "test" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 30), (40 * i, 90, 200)).save(tmp_path / "test" / name / f"{i}.png")
    args = ["--model", "ride_resnet32_2e", "--dataset", "folder", "--data-dir", str(tmp_path), "-j", "0"]
    with pytest.raises(FileNotFoundError, match=r"no training tree(.|\n)*--class-counts"):
        validate.main(args)
    with pytest.raises(ValueError, match=r"has 3 class folders but the class counts give 2 classes"):
        validate.main([*args, "--class-counts", "150,5"])
    results_file = tmp_path / "r.json"
    validate.main(
        [*args, "--class-counts", "150,50,5", "--device", "cpu", "--results-file", str(results_file)]
    )
    # 150 > 100 many (ant), 50 medium (bee), 5 < 20 few (cat); the three images are of ant, ant, cat.
    row = json.loads(results_file.read_text())
    assert row["num_images"] == 3 and row["classes_per_split"] == {"many": 1, "medium": 1, "few": 1}
    assert row["medium_top1"] is None and sum(row["experts_counts"]["few"]) == 1


def test_not_a_ride_model():
    with pytest.raises(ValueError, match="resnet18 is not a RIDE model"):
        validate.main(["--model", "resnet18", "-j", "0"])
    with pytest.raises(ValueError, match=r"model ride_nothing: Unknown model"):
        validate.main(["--model", "ride_nothing"])


def test_bad_routing(digits_checkpoint, capsys):
    with pytest.raises(SystemExit):
        validate.main(["--routing", "some"])
    assert "'all', 'router' or a number of experts" in capsys.readouterr().err


def test_bad_routing_stops_before_any_evaluation(digits_checkpoint, monkeypatch):
    calls = []
    monkeypatch.setattr(validate, "evaluate", lambda *a, **k: calls.append(k["routing"]))
    with pytest.raises(ValueError, match="k must be between 1 and 2"):
        validate.main(
            ["--model", "ride_resnet32_2e", "--checkpoint", str(digits_checkpoint), "--routing", "all", "3"]
        )
    assert calls == []


@pytest.mark.parametrize(
    "flag, target, message",
    [
        ("--results-file", "DIR", "is a folder; give a file name"),
        ("--per-class-csv", "DIR", "is a folder; give a file name"),
        ("--plot-dir", "FILE", "is a file; give a folder"),
        ("--results-file", "FILE/results.json", "is a file, so nothing can be made in it"),
    ],
)
def test_unwritable_output_paths_stop_before_any_evaluation(tmp_path, monkeypatch, flag, target, message):
    (tmp_path / "DIR").mkdir()
    (tmp_path / "FILE").write_text("")
    monkeypatch.setattr(validate, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    with pytest.raises(ValueError, match=message):
        validate.main(["--model", "ride_resnet32_2e", flag, str(tmp_path / target)])


def test_plots_without_matplotlib(monkeypatch):
    from ride_models.plots import save_plots

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install matplotlib"):
        save_plots([object()], "unused")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_cuda_device_is_named():
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here; use --device cpu"):
        validate.main(["--device", "cuda"])
