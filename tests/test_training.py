"""train.py on the embedded default dataset: the three stages, outputs, exact resume, DDP, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

import ride_models  # noqa: F401
from ride_models import training
from ride_models.checkpoint import load_training_state, save_training_state, save_weights
from ride_models.data import DIGITS_CONFIG, DeviceDataLoader
from ride_models.engine import NonFiniteLossError
from ride_models.plots import PLOT_FILES

ROOT = Path(__file__).resolve().parents[1]
# Short runs: 489 training images at batch 128 are 4 steps per epoch.
FAST = ["--model", "ride_resnet32_2e", "-b", "128", "--log-interval", "2", "--workers", "0"]


def _train(tmp_path: Path, name: str, *flags: str) -> dict:
    return training.main([*FAST, "--output", str(tmp_path), "--experiment", name, *flags])


def _summary_rows(run: Path) -> list:
    with (run / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_train_py_on_the_embedded_default(tmp_path):
    """The issue's command: writes the run files and prints many/medium/few accuracy."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--model", "ride_resnet32_2e", "--loss", "ldam_diversity",
         "--epochs", "2", "--output", str(tmp_path), "--experiment", "run", "--workers", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert {"args.yaml", "summary.csv", "last.safetensors", "best_on_test.safetensors", "last_state.pt",
            "results.json", "log.txt"} <= {p.name for p in run.iterdir()}  # fmt: skip
    sizes = {name: Image.open(run / name).size for name in ("training_curves.png", *PLOT_FILES)}
    assert sizes["training_curves.png"] == (1000, 400)  # 10 x 4 inches at 100 dpi
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # every file moved into place
    assert "many" in result.stdout and "medium" in result.stdout and "few" in result.stdout
    rows = _summary_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "lr", "top1", "many_top1", "medium_top1", "few_top1"} <= set(rows[0])
    assert float(rows[0]["lr"]) == pytest.approx(0.1 / 3)  # digits preset: lr 0.1, 3 warm-up epochs
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["dataset"] == "digits_lt" and args["epochs"] == 2 and args["loss"] == "ldam_diversity"
    results = json.loads((run / "results.json").read_text())
    assert results["checkpoint"] == "last.safetensors"  # no validation split: the final epoch is the result
    final = results["test"][0]
    assert final["num_images"] == 300 and {"many_top1", "medium_top1", "few_top1"} <= set(final)
    weights = load_file(run / "last.safetensors")
    model = timm.create_model("ride_resnet32_2e", num_classes=10)
    model.load_state_dict(weights)


def test_three_stages_chain(tmp_path, capsys):
    """Experts (a 3-expert teacher), router, then distillation into 2 experts, each on short schedules."""
    _train(tmp_path, "experts", "--model", "ride_resnet32_3e", "--epochs", "2")
    stage1 = tmp_path / "experts" / "last.safetensors"

    router = _train(
        tmp_path, "router", "--model", "ride_resnet32_3e", "--stage", "router",
        "--initial-checkpoint", str(stage1), "--epochs", "1",
    )  # fmt: skip
    rows = {r["routing"]: r for r in router["test"]}
    assert set(rows) == {"all", "router"}
    assert rows["all"]["experts_mean"] == 3.0
    assert 1.0 <= rows["router"]["experts_mean"] <= 3.0
    routed = timm.create_model("ride_resnet32_3e", num_classes=10)
    routed.load_state_dict(load_file(tmp_path / "router" / "last.safetensors"))
    assert routed.routing == "router"  # the saved model routes by default
    before, after = load_file(stage1), load_file(tmp_path / "router" / "last.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("router."))

    distill = _train(
        tmp_path, "distill", "--stage", "distill", "--teacher", "ride_resnet32_3e", "--teacher-checkpoint",
        str(stage1), "--epochs", "1",
    )  # fmt: skip
    assert distill["stage"] == "distill" and distill["test"][0]["experts_mean"] == 2.0
    state = load_training_state(tmp_path / "distill")
    assert state["args"]["warmup_epochs"] == 3  # the digits preset (CIFAR's distill preset warms up for 20)
    assert "RIDE distils from more experts into fewer" not in capsys.readouterr().out

    _train(tmp_path, "same_size", "--model", "ride_resnet32_3e", "--stage", "distill", "--teacher",
           "ride_resnet32_3e", "--teacher-checkpoint", str(stage1), "--epochs", "1")  # fmt: skip
    assert (
        "the teacher ride_resnet32_3e has 3 experts and the student ride_resnet32_3e 3"
        in capsys.readouterr().out
    )


def test_exact_resume_after_a_kill(tmp_path):
    """A run killed at an arbitrary point and resumed ends with the same weights as an uninterrupted one."""
    flags = [*FAST, "--epochs", "3", "--output", str(tmp_path), "--device", "cpu"]  # a GPU could finish first
    training.main([*flags, "--experiment", "straight"])

    # Same thread count as this process: a different one changes float reductions, hence the weights.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *flags, "--experiment", "killed"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    state = tmp_path / "killed" / "last_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in epoch 2 (or later)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run was killed before its first checkpoint"
    epoch_at_kill = load_training_state(state)["epoch"]

    assert proc.returncode == -signal.SIGKILL and epoch_at_kill < 3  # killed mid-run, not after it ended
    training.main(["--resume", str(tmp_path / "killed")])
    assert _same_weights(tmp_path / "straight" / "last.safetensors", tmp_path / "killed" / "last.safetensors")
    rows = _summary_rows(tmp_path / "killed")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    straight = _summary_rows(tmp_path / "straight")
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in straight]


def test_resume_keeps_what_the_run_set(tmp_path):
    """--drw-epoch given to a loss without DRW by default still applies after --resume (it used to be lost:
    only the resume command's own flags counted as set), and the run's args.yaml works with -c."""
    flags = [*FAST, "--loss", "ce", "--drw-epoch", "1", "--output", str(tmp_path)]
    training.main([*flags, "--epochs", "2", "--experiment", "straight"])
    training.main([*flags, "--epochs", "1", "--experiment", "resumed"])
    training.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    assert _same_weights(
        tmp_path / "straight" / "last.safetensors", tmp_path / "resumed" / "last.safetensors"
    )
    again = training.parse_args(["-c", str(tmp_path / "straight" / "args.yaml")])
    assert again.loss == "ce" and again.drw_epoch == 1 and "drw_epoch" in again.explicit
    assert "lr" not in again.explicit  # the preset's value, written in the file but not set by the user


def test_resume_refuses_another_process_count_and_a_changed_teacher(tmp_path):
    _train(tmp_path, "teacher", "--model", "ride_resnet32_3e", "--epochs", "1")
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes((tmp_path / "teacher" / "last.safetensors").read_bytes())
    _train(tmp_path, "student", "--stage", "distill", "--teacher", "ride_resnet32_3e", "--teacher-checkpoint",
           str(teacher), "--epochs", "1")  # fmt: skip
    state = load_training_state(tmp_path / "student")
    save_training_state(
        tmp_path / "student" / "last_state.pt", {**state, "args": {**state["args"], "world_size": 2}}
    )
    with pytest.raises(
        ValueError, match=r"trained in 2 process\(es\), this is 1; .* torchrun --nproc_per_node=2"
    ):
        training.main(["--resume", str(tmp_path / "student"), "--epochs", "2"])
    save_training_state(tmp_path / "student" / "last_state.pt", state)
    weights = load_file(teacher)
    save_weights(teacher, {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()})
    with pytest.raises(ValueError, match="the teacher checkpoint .* has changed since the run started"):
        training.main(["--resume", str(tmp_path / "student"), "--epochs", "2"])


def test_a_router_stage_run_resumes_without_its_initial_checkpoint_file(tmp_path):
    _train(tmp_path, "experts", "--epochs", "1")
    initial = tmp_path / "initial.safetensors"
    initial.write_bytes((tmp_path / "experts" / "last.safetensors").read_bytes())
    _train(tmp_path, "router", "--stage", "router", "--initial-checkpoint", str(initial), "--epochs", "1")
    initial.unlink()  # the weights are in the run's state: the file is not needed any more
    training.main(["--resume", str(tmp_path / "router"), "--epochs", "2"])
    assert load_training_state(tmp_path / "router")["epoch"] == 2

    # Stage 1 again from these routed weights: the saved model must not route with the stale router.
    _train(
        tmp_path,
        "again",
        "--initial-checkpoint",
        str(tmp_path / "router" / "last.safetensors"),
        "--epochs",
        "1",
    )
    model = timm.create_model("ride_resnet32_2e", num_classes=10)
    model.load_state_dict(load_file(tmp_path / "again" / "last.safetensors"))
    assert model.routing == "all" and not bool(model.router.trained)


def _image_tree(root: Path, counts: dict) -> Path:
    """A small ImageFolder tree of random 32x32 images (train/ and 2 test/ images per class), which train.py
    reads through DataLoader workers."""
    gen = torch.Generator().manual_seed(0)
    for split, cls, n in [*(("train", c, n) for c, n in counts.items()), *(("test", c, 2) for c in counts)]:
        (root / split / cls).mkdir(parents=True)
        for k in range(n):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / split / cls / f"{k:03d}.png")
    return root


def test_exact_resume_with_worker_processes(tmp_path):
    """Images read by worker processes (-j 2) are augmented from the epoch's seed, not from what the
    workers drew before: a run resumed after epoch 1 equals an uninterrupted one."""
    data = _image_tree(tmp_path / "images", {"a": 24, "b": 12, "c": 6})
    flags = [*FAST, "--workers", "2", "-b", "16", "--dataset", "folder", "--data-dir", str(data)]
    training.main([*flags, "--epochs", "2", "--output", str(tmp_path), "--experiment", "straight"])
    training.main([*flags, "--epochs", "1", "--output", str(tmp_path), "--experiment", "resumed"])
    training.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    straight, resumed = _summary_rows(tmp_path / "straight"), _summary_rows(tmp_path / "resumed")
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    assert _same_weights(
        tmp_path / "straight" / "last.safetensors", tmp_path / "resumed" / "last.safetensors"
    )


def test_each_rank_draws_its_own_augmentation(tmp_path):
    """Every image is the same, so batches differ only by their augmentation: per rank, for both paths
    (DataLoader workers seeded from the epoch's generator; the device-resident loader's own generator)."""
    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for split, n in (("train", 16), ("test", 1)):
        for cls in "ab":
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(pixels.numpy()).save(tmp_path / "tree" / split / cls / f"{k}.png")
    flags = [*FAST, "--dataset", "folder", "--data-dir", str(tmp_path / "tree"), "-j", "1", "-b", "4"]

    def first_batch(rank):
        args = training.resolve_defaults(training.parse_args(flags))
        data = training.build_data(args, training.Dist(rank, 2, 0, torch.device("cpu")))
        training.seed_epoch(args.seed, 1, rank)
        data.set_epoch(args.seed, 1)
        return next(iter(data.train_loader))[0]

    assert torch.equal(first_batch(0), first_batch(0)) and not torch.equal(first_batch(0), first_batch(1))

    images = pixels.permute(2, 0, 1).expand(20, 3, 32, 32)
    batches = []
    for rank in (None, 0, 1):
        sampler = DistributedSampler(range(20), 2, rank or 0, seed=0)
        extra = {} if rank is None else {"rank": rank}
        loader = DeviceDataLoader(images, [0] * 20, 4, DIGITS_CONFIG, sampler=sampler, **extra)
        loader.set_epoch(1)
        batches.append(next(iter(loader))[0])
    assert torch.equal(batches[0], batches[1]) and not torch.equal(batches[1], batches[2])


def test_two_process_distributed_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "train.py"), *FAST,
         "-b", "64", "--epochs", "1", "--output", str(tmp_path), "--experiment", "ddp"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 processes (gloo)" in result.stdout and "global batch 128" in result.stdout
    assert (tmp_path / "ddp" / "results.json").exists()
    rows = _summary_rows(tmp_path / "ddp")
    assert len(rows) == 1


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _train(tmp_path, "nan", "--epochs", "1")
    run = tmp_path / "nan"
    good = (run / "last.safetensors").read_bytes()
    monkeypatch.setattr(training, "lr_at_epoch", lambda *a, **k: 1e30)  # epoch 2 diverges
    with pytest.raises(NonFiniteLossError, match="epoch 2.*last checkpoint is from before this epoch"):
        training.main(["--resume", str(run), "--epochs", "2"])
    assert (run / "last.safetensors").read_bytes() == good
    assert load_training_state(run)["epoch"] == 1


def test_yaml_config_ema_bf16_channels_last(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(dict(epochs=1, lr=0.05, model_ema=True)))
    results = training.main(
        [
            "-c",
            str(config),
            *FAST,
            "--amp",
            "--amp-dtype",
            "bfloat16",
            "--channels-last",
            "--output",
            str(tmp_path),
            "--experiment",
            "y",
        ]
    )
    state = load_training_state(tmp_path / "y")
    assert state["args"]["epochs"] == 1 and state["args"]["lr"] == 0.05
    assert results["test"][0]["num_images"] == 300
    # With --model-ema the average is what is evaluated and saved, not the trained weights themselves.
    saved = load_file(tmp_path / "y" / "last.safetensors")
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items()}
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    moved = [
        k for k in saved if saved[k].is_floating_point() and not torch.equal(saved[k], state["model"][k])
    ]
    assert "heads.0.weight" in moved  # one epoch at decay 0.9998 leaves the average near the initial weights


# (dataset, stage) -> the official config that fixes its schedule, optimizer and batch size
# (lr_schedules.json; batch sizes from the reference README's learning-rate section) and a losses.json case
# built with the config's loss arguments at an epoch past its DRW switch. The official code has no CIFAR-10
# config: CIFAR-10-LT takes the CIFAR-100 one.
OFFICIAL_CONFIGS = [
    ("cifar100_lt", "experts", "cifar100_ride", 128, "ride_adf-0.45_rf0.05_ep170"),
    ("cifar10_lt", "experts", "cifar100_ride", 128, "ride_adf-0.45_rf0.05_ep170"),
    ("cifar100_lt", "distill", "cifar100_distill_ride", 128, None),
    ("imagenet_lt", "experts", "imagenet_lt_ride", 256, "ride_imagenetcfg_ep90"),
    ("inat2018", "experts", "inaturalist_ride", 512, None),
    ("cifar100_lt", "router", "ea_stage2", 512, None),
    ("imagenet_lt", "router", "ea_stage2", 512, None),
]


@pytest.mark.parametrize("dataset, stage, schedule, batch_size, loss_case", OFFICIAL_CONFIGS)
def test_presets_follow_the_official_configs(reference_dir, dataset, stage, schedule, batch_size, loss_case):
    schedules = json.loads((reference_dir / "lr_schedules.json").read_text())["schedules"]
    official = next(v for k, v in schedules.items() if k.split()[0] == schedule)  # "name (config files)"
    args = training.resolve_defaults(training.parse_args(["--dataset", dataset, "--stage", stage]))
    assert args.epochs == official["epochs"] and args.batch_size == batch_size
    lrs = [training.epoch_lr(args, epoch) for epoch in range(1, args.epochs + 1)]
    assert lrs == pytest.approx(official["lr_per_epoch"], rel=1e-12)
    group = training.build_optimizer(torch.nn.Linear(2, 2), args.lr, args.weight_decay).param_groups[0]
    # The EA configs (no optimizer in the JSON) use the CIFAR RIDE optimizer: the README's "Optimiser" line.
    expected = official.get("optimizer", dict(momentum=0.9, nesterov=True, weight_decay=5e-4))
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (
        expected["momentum"], expected["nesterov"], expected["weight_decay"],
    )  # fmt: skip
    if loss_case is None:
        return
    tensors = load_file(reference_dir / "losses.safetensors")
    case = next(
        c for c in json.loads((reference_dir / "losses.json").read_text())["cases"] if c["name"] == loss_case
    )
    loss = training.build_loss(args, tensors["inputs.cls_num_list"].tolist())
    loss.set_epoch(case["hook_before_epoch"])
    value = loss(tensors["inputs.expert_logits"], tensors["inputs.target"])
    torch.testing.assert_close(value, tensors[f"{loss_case}.loss_fp32"], rtol=1e-5, atol=0)


def test_inaturalist_loss_arguments_are_the_official_config():
    # The reference README ("In the configs"): iNaturalist adf -0.2, rf 0.015, reweight_epoch 80.
    args = training.resolve_defaults(training.parse_args(["--dataset", "inat2018"]))
    loss = training.build_loss(args, [5, 3, 2])
    assert (loss.diversity_weight, loss.temperature_reweight, loss.base.drw_epoch) == (0.2, 0.015, 80)


def test_each_epoch_sets_its_learning_rate_and_the_loss_schedule(tmp_path, monkeypatch):
    epochs_seen, built = [], []
    build_loss = training.build_loss

    def spying_build_loss(args, counts):
        loss = build_loss(args, counts)
        set_epoch = loss.set_epoch
        loss.set_epoch = lambda epoch: (epochs_seen.append(epoch), set_epoch(epoch))[1]
        built.append(loss)
        return loss

    monkeypatch.setattr(training, "build_loss", spying_build_loss)
    _train(tmp_path, "drw", "--epochs", "2", "--drw-epoch", "1")
    assert epochs_seen == [1, 2] and built[0].base.reweighting  # epoch 2 > --drw-epoch 1: re-weighted
    # The digits preset: lr 0.1 warmed up over 3 epochs: 0.1/3 then 0.2/3, in the summary and the optimizer.
    assert [float(r["lr"]) for r in _summary_rows(tmp_path / "drw")] == pytest.approx([0.1 / 3, 0.2 / 3])
    assert load_training_state(tmp_path / "drw")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        0.2 / 3
    )


def test_with_a_validation_split_the_best_checkpoint_is_tested(tmp_path, monkeypatch):
    """The final test evaluation uses the checkpoint of the best validation epoch, not the last epoch."""
    data = _image_tree(tmp_path / "images", {"a": 12, "b": 8, "c": 4})
    for cls in "abc":  # a val/ split: two images per class, as test/
        (data / "val" / cls).mkdir(parents=True)
        for image in sorted((data / "test" / cls).iterdir()):
            (data / "val" / cls / image.name).write_bytes(image.read_bytes())
    evaluate, val_top1 = training.evaluate, iter([90.0, 10.0])  # epoch 1 is the best on val

    def evaluate_with_val_scores(model, loader, **kwargs):
        result = evaluate(model, loader, **kwargs)
        if loader is val_loader[0]:
            result.top1 = next(val_top1)
        return result

    build_data, val_loader = training.build_data, []

    def keep_val_loader(*args, **kwargs):
        built = build_data(*args, **kwargs)
        val_loader.append(built.eval_loaders["val"])
        return built

    monkeypatch.setattr(training, "evaluate", evaluate_with_val_scores)
    monkeypatch.setattr(training, "build_data", keep_val_loader)
    flags = ["--dataset", "folder", "--data-dir", str(data), "-b", "8", "--epochs", "2"]
    results = _train(tmp_path, "val", *flags)
    run = tmp_path / "val"
    assert results["checkpoint"] == "best.safetensors" and not _same_weights(
        run / "best.safetensors", run / "last.safetensors"
    )
    monkeypatch.undo()  # the same checkpoint, evaluated on its own by validate.py
    monkeypatch.syspath_prepend(str(ROOT))
    from validate import main as validate_main

    alone = validate_main(["--model", "ride_resnet32_2e", "--checkpoint", str(run / "best.safetensors"),
                           "--dataset", "folder", "--data-dir", str(data), "--split", "test"])  # fmt: skip
    final = results["test"][0]  # calibration error tells weights apart where 6 test images tie on top-1
    assert (final["top1"], final["ece"]) == pytest.approx((alone[0].top1, alone[0].ece), abs=1e-4)  # rounded


def test_training_curves_are_drawn_after_the_first_and_last_epochs_and_once_a_minute(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(training, "plot_training_curves", lambda rows, path, title: drawn.append(len(rows)))
    _train(tmp_path, "curves", "--epochs", "3")  # epochs of a few seconds: no minute has passed at epoch 2
    assert drawn == [1, 3]
    monkeypatch.setattr(training, "PLOT_EVERY_S", 0.0)
    drawn.clear()
    _train(tmp_path, "every", "--epochs", "3")
    assert drawn == [1, 2, 3]


def test_the_epoch_line_shows_a_split_without_eval_images_as_a_dash():
    row = dict(epoch=3, lr=0.1, train_loss=1.25, eval_split="test", top1=50.0, many_top1=None,
               medium_top1=40.0, few_top1=None, experts_mean=2.0, epoch_seconds=1.5)  # fmt: skip
    assert "top-1 50.00 (many - / medium 40.0 / few -) experts 2.00" in training._epoch_line(row)


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--dataset", "cifar100_lt", "--data-dir", "missing"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("train.py: error: cifar100_lt") and "Traceback" not in result.stderr
    assert not (tmp_path / "output").exists()  # no run folder for a run that never started


def test_router_stage_needs_a_stage1_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="--initial-checkpoint"):
        _train(tmp_path, "x", "--stage", "router", "--epochs", "1")


def test_distill_needs_a_teacher(tmp_path):
    with pytest.raises(ValueError, match="--teacher NAME and --teacher-checkpoint"):
        _train(tmp_path, "x", "--stage", "distill", "--epochs", "1")


def test_num_classes_must_match_the_dataset(tmp_path):
    with pytest.raises(ValueError, match="--num-classes 100 does not match the dataset.*10 classes"):
        _train(tmp_path, "x", "--num-classes", "100", "--epochs", "1")


def test_resume_refuses_changed_arguments(tmp_path):
    _train(tmp_path, "r", "--epochs", "2")
    run = str(tmp_path / "r")
    with pytest.raises(ValueError, match=r"--lr 0\.5 \(the run used 0\.1\)"):
        training.main(["--resume", run, "--lr", "0.5"])
    # A flag given with its default value still counts: the run used ride_resnet32_2e.
    with pytest.raises(ValueError, match=r"--model 'ride_resnet32_3e' \(the run used 'ride_resnet32_2e'\)"):
        training.main(["--resume", run, "--model", "ride_resnet32_3e"])
    with pytest.raises(ValueError, match=r"--output .* \(the run used"):  # the run stays in its folder
        training.main(["--resume", run, "--output", str(tmp_path / "elsewhere")])
    with pytest.raises(ValueError, match="has already trained 2 epochs; give --epochs 2 or more"):
        training.main(["--resume", run, "--epochs", "1"])
    state = load_training_state(run)
    del state["model"]["heads.0.weight"]
    torch.save(state, tmp_path / "r" / "last_state.pt")
    with pytest.raises(ValueError, match=r"(?s)the run's saved model does not fit .*heads\.0\.weight"):
        training.main(["--resume", run, "--epochs", "3"])
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "r-1").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--model", "ride_nothing"],
            r"--model ride_nothing: Unknown model .* timm.list_models\('ride_\*'\)",
        ),
        (["--loss", "nosuch"], "nosuch"),
        (["--loss-kwargs", "foo=1"], r"--loss ldam_diversity --loss-kwargs foo=1: .*unexpected keyword"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--teacher", "ride_resnet32_3e"], "--teacher only applies to --stage distill"),
        (["--output", "FILE"], "is a file; give a folder"),
        (["--decay-rate", "-0.1"], r"the schedule \(--lr, .*gamma .* must be above 0, e.g. 0.1; got -0.1"),
        (["--lr", "-1"], r"the schedule .*learning rates cannot be negative: base_lr -1.0"),
    ],
)
def test_bad_input_stops_before_a_run_folder(tmp_path, flags, message):
    (tmp_path / "FILE").write_text("not a folder")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    with pytest.raises(ValueError, match=message):
        training.main([*FAST, "--output", str(tmp_path / "out"), "--experiment", "x", *flags])
    assert not (tmp_path / "out").exists()


def test_stage_and_file_mistakes_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="cannot write the run folder /proc/ride_models_test/x"):
        _train(tmp_path, "x", "--epochs", "1", "--output", "/proc/ride_models_test")
    _train(tmp_path, "run", "--epochs", "1")
    with pytest.raises(ValueError, match=r"summary.csv is not a training state \(not a PyTorch file\)"):
        training.main(["--resume", str(tmp_path / "run" / "summary.csv")])
    create_model = timm.create_model
    monkeypatch.setattr(training.timm, "create_model", lambda *a, **k: create_model(*a, **k, num_experts=1))
    with pytest.raises(ValueError, match="--stage router: ride_resnet32_2e has one expert"):
        _train(
            tmp_path,
            "one",
            "--stage",
            "router",
            "--initial-checkpoint",
            str(tmp_path / "run" / "last.safetensors"),
        )
    monkeypatch.undo()
    weights = load_file(tmp_path / "run" / "last.safetensors")  # a teacher for 5 classes, the data has 10
    five = {k: v[:5] if k.startswith("heads.") else v for k, v in weights.items()}
    save_weights(tmp_path / "five.safetensors", five)
    message = r"--teacher-checkpoint .*five.safetensors: the teacher must be trained on this dataset"
    with pytest.raises(ValueError, match=message + r" \(digits_lt, 10 classes\)"):
        _train(tmp_path, "d", "--stage", "distill", "--teacher", "ride_resnet32_2e", "--teacher-checkpoint",
               str(tmp_path / "five.safetensors"))  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_missing_cuda_device_is_named(tmp_path):
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here; use --device cpu"):
        _train(tmp_path, "x", "--device", "cuda")


def test_a_device_this_machine_cannot_run_on_is_named(monkeypatch):
    with pytest.raises(ValueError, match="--device gpu: not a device name; use cpu, cuda or cuda:N"):
        training.check_device("gpu")
    training.check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a two-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    training.check_device("cuda")
    training.check_device("cuda:1")
    with pytest.raises(
        ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0..cuda:1"
    ):
        training.check_device("cuda:2")


def test_an_initial_checkpoint_that_does_not_fit_is_explained(tmp_path):
    _train(tmp_path, "two", "--epochs", "1")
    with pytest.raises(
        ValueError, match=r"(?s)--initial-checkpoint .*experts: the state dict has 2, the model has 3"
    ):
        _train(tmp_path, "three", "--model", "ride_resnet32_3e", "--initial-checkpoint",
               str(tmp_path / "two" / "last.safetensors"), "--epochs", "1")  # fmt: skip


def test_unknown_config_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys in .*\['epochz'\]"):
        training.main(["-c", str(config)])


def test_router_stage_refuses_another_loss(tmp_path):
    _train(tmp_path, "s1", "--epochs", "1")
    with pytest.raises(ValueError, match="routing loss"):
        _train(tmp_path, "s2", "--stage", "router", "--loss", "ce", "--initial-checkpoint",
               str(tmp_path / "s1" / "last.safetensors"), "--epochs", "1")  # fmt: skip


def test_cuda_graph_names_every_incompatible_option(tmp_path):
    with pytest.raises(ValueError) as error:
        _train(
            tmp_path,
            "g",
            "--cuda-graph",
            "--device",
            "cpu",
            "--stage",
            "router",
            "--amp",
            "--drop-path",
            "0.1",
        )
    message = str(error.value)
    assert message.startswith("--cuda-graph:")
    for part in ("needs a CUDA device", "--stage experts", "--amp-dtype bfloat16", "--drop-path"):
        assert part in message
    assert not (tmp_path / "g").exists()  # stopped before a run folder was made


def test_a_home_relative_data_dir_finds_its_validation_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "images" / "val").mkdir(parents=True)
    args = training.parse_args(["--dataset", "folder", "--data-dir", "~/images"])
    assert training._has_validation(args)


def test_sync_bn_converts_on_gpus_and_says_what_it_cannot_do(caplog):
    model = timm.create_model("ride_resnet32_2e", num_classes=10)
    keys = list(model.state_dict())
    with pytest.raises(
        ValueError, match=r"--sync-bn: nn.SyncBatchNorm runs on CUDA devices only.*drop --sync-bn"
    ):
        training.sync_batch_norm(model, training.Dist(world_size=2))  # gloo on the CPU
    with caplog.at_level("WARNING"):
        assert training.sync_batch_norm(model, training.Dist()) is model  # one process: nothing to sync
    assert "--sync-bn does nothing in a single process" in caplog.text
    # Conversion needs no GPU (running it does): every batch norm becomes a SyncBatchNorm, keys unchanged.
    synced = training.sync_batch_norm(model, training.Dist(world_size=2, device=torch.device("cuda", 0)))
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 1 + 10 + 2 * 20 and all(type(m) is torch.nn.SyncBatchNorm for m in norms)
    assert list(synced.state_dict()) == keys
    assert training.build_parser().parse_args(["--sync-bn"]).sync_bn
