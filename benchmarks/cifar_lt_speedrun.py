"""CIFAR-10-LT speed run: the official RIDE recipe, timed from the JPEG files to the test accuracy.

    python benchmarks/cifar_lt_speedrun.py                            # GPU: the full 200-epoch recipe
    python benchmarks/cifar_lt_speedrun.py --device cpu --epochs 2    # CPU smoke run (a shortened schedule)

* Data: CIFAR-10-LT at imbalance ratio 100 (12,406 training images, 5,000 ... 50 per class), selected with
  the official sampling (``ride_models.data.cifar_lt_indices``) from the JPEG archives of
  ``../shared/data/cifar10/`` (``cifar10_train_jpeg.zip`` holding ``train/<class>/<rank>.jpg``, where rank is
  the image's position within its class in the official array, and ``cifar10_test_jpeg.zip``). Only the
  selected training images and the 10,000 test images are decoded, straight from the archives.
* Model and loss: ``ride_resnet32_4e`` with ``ldam_diversity`` (LDAM with DRW at epoch 160, diversity
  weight 0.45, temperature re-weighting 0.05), SGD with Nesterov momentum 0.9, weight decay 5e-4, batch
  128, lr 0.1 with 5 warm-up epochs and x0.01 at epochs 160 and 180: train.py's CIFAR preset, which is the
  official config's. Stage 1 only (no router): the test accuracy is that of all experts.
* The fast path: the training set lives on the GPU as uint8 and is augmented there
  (``DeviceDataLoader``: crop, flip, rotation, as the official loader); the experts run in one pass
  (grouped convolutions); bf16 autocast and channels-last; the whole step (forward, loss, backward, SGD)
  replayed as a CUDA graph (``ride_models.cuda_graph``). ``--fused auto`` (the default) takes the model's
  choice (``uses_fused_experts``: one pass on CUDA for these basic-block experts); ``--fused time`` times both
  expert passes on throw-away copies of the model for a few steps and keeps the faster (seconds of the
  run's time: two more models to record and tune cuDNN for).
* Reported: top-1 and many/medium/few on the 10,000 CIFAR-10 test images (CIFAR-10-LT at ratio 100 has no
  few-shot class: 8 many, 2 medium), and the wall-clock seconds from the start of the script, data
  loading, graph recording and evaluation included. ``--eval-every N`` adds the test accuracy every N
  epochs (``curve`` in the JSON; its evaluations count in the total, not in the training time). Beside
  each evaluation, ``flip`` holds the same with test-time flipping (each image's logits added to those of
  its mirror image): an experiment, not the recipe's evaluation.

``--epochs N`` shortens the schedule proportionally (milestones, DRW epoch; warm-up min(5, N // 40)).
``--lr`` and ``--full-width`` are experiments away from the official recipe (for CIFAR-10-LT, the authors
of SADE, built on the RIDE code, advise full-width experts and lr 0.05: Vanint/SADE-AgnosticLT issue 11);
the JSON and the summary line record both.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(_ROOT))

import timm  # noqa: E402

import ride_models  # noqa: E402, F401  (registers the models)
from ride_models.cuda_graph import GraphedTrainStep  # noqa: E402
from ride_models.data import DeviceDataLoader, cifar_lt_indices  # noqa: E402
from ride_models.data.datasets import CIFAR10_CLASSES  # noqa: E402
from ride_models.data.transforms import SMALL_IMAGE_CONFIGS  # noqa: E402
from ride_models.engine import make_step, train_one_epoch  # noqa: E402
from ride_models.losses import create_loss  # noqa: E402
from ride_models.metrics import per_class_accuracy, shot_accuracy  # noqa: E402
from ride_models.scheduler import lr_at_epoch  # noqa: E402
from ride_models.training import PRESETS, build_optimizer, check_device  # noqa: E402

DEFAULT_DATA_DIR = _ROOT.parent / "shared" / "data" / "cifar10"
PER_CLASS = 5000  # CIFAR-10 training images per class
FULL_WIDTH_PLANES = (16, 32, 64)  # a CIFAR ResNet-32's planes; the RIDE models' experts have 24 and 48


def _open(data_dir: Path, split: str):
    """A function reading ``<split>/<class>/<file>`` from ``<split>/`` or ``cifar10_<split>_jpeg.zip``."""
    folder = data_dir / split
    if folder.is_dir():
        return lambda name: (data_dir / name).read_bytes(), None
    archive = data_dir / f"cifar10_{split}_jpeg.zip"
    if not archive.is_file():
        raise FileNotFoundError(
            f"no CIFAR-10 {split} images in {data_dir}: expected {archive.name} or a folder "
            f"{split}/<class>/; pass --data-dir (the folder of ../shared/data/cifar10/)"
        )
    z = zipfile.ZipFile(archive)
    return z.read, z


def _decode(read, names: list[str]) -> np.ndarray:
    """``[N, H, W, 3]`` uint8: the JPEG files, decoded one after the other in this thread.

    For 32 x 32 JPEGs most of ``PIL.Image.open(...).convert("RGB")``'s time is Python, so threads mostly wait
    for the GIL: on the 2-core CPU the speed run's 22,406 images load in 3.2 to 3.6 s this way, against 6.5
    to 6.8 s from a 16-thread pool (reading the archives included; three runs each). torchvision's batched
    ``decode_jpeg`` took 1.8 s, but torchvision 0.29 deprecates its image decoding.
    """
    return np.stack([np.asarray(Image.open(io.BytesIO(read(name))).convert("RGB")) for name in names])


def load_cifar10_lt(data_dir: Path, ratio: float = 100, seed: int = 0):
    """The official CIFAR-10-LT training subset and the CIFAR-10 test set, decoded from the JPEG files.

    Returns ``(train_images [N, 32, 32, 3] uint8, train_targets [N], test_images, test_targets)``. The
    official selection depends only on the class sizes (5,000 each), so it runs on class-sorted,
    rank-ordered labels: the k-th kept index i is ``train/<class i // 5000>/<i % 5000>.jpg``.
    """
    ranked = np.repeat(np.arange(len(CIFAR10_CLASSES)), PER_CLASS)
    keep = cifar_lt_indices(ranked, ratio, seed)
    names = [f"train/{CIFAR10_CLASSES[i // PER_CLASS]}/{i % PER_CLASS:04d}.jpg" for i in keep]
    read, archive = _open(data_dir, "train")
    train_images = _decode(read, names)
    train_targets = ranked[keep]
    read, test_archive = _open(data_dir, "test")
    if test_archive is not None:
        test_names = sorted(n for n in test_archive.namelist() if n.endswith(".jpg"))
    else:
        test_names = sorted(str(p.relative_to(data_dir)) for p in (data_dir / "test").glob("*/*.jpg"))
    test_targets = np.array([CIFAR10_CLASSES.index(n.split("/")[1]) for n in test_names])
    test_images = _decode(read, test_names)
    return train_images, train_targets, test_images, test_targets


def scaled_recipe(epochs: int) -> dict:
    """train.py's CIFAR preset, its milestones scaled to ``epochs``."""
    preset = PRESETS["cifar"]
    full = preset["epochs"]

    def scale(e: int) -> int:
        return max(1, round(e * epochs / full))

    return dict(
        lr=preset["lr"],
        weight_decay=preset["weight_decay"],
        batch_size=preset["batch_size"],
        epochs=epochs,
        milestones=[scale(m) for m in preset["decay_epochs"]],
        gamma=preset["decay_rate"],
        warmup_epochs=preset["warmup_epochs"]
        if epochs == full
        else min(preset["warmup_epochs"], epochs // 40),
        drw_epoch=scale(preset["drw_epoch"]),
        loss_kwargs=preset["loss_kwargs"],
    )


def recipe_lr(recipe: dict, epoch: int) -> float:
    """The learning rate of 1-based ``epoch`` under ``recipe`` (warm-up, then steps at the milestones)."""
    return lr_at_epoch(
        epoch, schedule="step", base_lr=recipe["lr"], epochs=recipe["epochs"],
        milestones=recipe["milestones"], gamma=recipe["gamma"], warmup_epochs=recipe["warmup_epochs"],
    )  # fmt: skip


def build_trainer(model, loss_fn, recipe: dict, amp_dtype, cuda_graph: bool):
    """The SGD optimizer and the step for ``engine.train_one_epoch``: train.py's forward pass and loss, or
    on CUDA the whole step (forward, loss, backward, SGD) replayed as a CUDA graph."""
    optimizer = build_optimizer(model, recipe["lr"], recipe["weight_decay"])
    step = make_step("experts", model, loss_fn)
    if cuda_graph:
        step = GraphedTrainStep(
            step, optimizer, model=model, amp_dtype=amp_dtype, key_fn=loss_fn.schedule_state
        )
    return optimizer, step


def run_epoch(step, batches, optimizer, epoch: int, device: torch.device, amp_dtype) -> float:
    """One epoch of ``batches`` through train.py's loop (``engine.train_one_epoch``), silent: the loss is
    read once, at the end (one host synchronisation per epoch). Returns the epoch's mean loss."""
    return train_one_epoch(
        step, batches, optimizer, epoch=epoch, device=device, amp_dtype=amp_dtype, channels_last=True,
        log_interval=len(batches), verbose=False,
    )  # fmt: skip


def predict_test_set(model, loader, device: torch.device, amp_dtype) -> tuple[torch.Tensor, ...]:
    """``(plain, flipped, true)`` classes ``[N]``, in one pass over ``loader``: all experts' prediction (the
    recipe's evaluation) and the same with test-time flipping (each image's logits added to those of its
    mirror image; two forward passes per batch, the plain one shared)."""
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    plain, flipped, targets = [], [], []
    was_training = model.training
    model.eval()
    try:
        with model.routing_scope("all"), torch.no_grad(), autocast:
            for x, y in loader:
                x = x.to(device).contiguous(memory_format=torch.channels_last)
                logits = model(x).float()
                plain.append(logits.argmax(dim=1))
                mirror = model(x.flip(3).contiguous(memory_format=torch.channels_last))
                flipped.append((logits + mirror).argmax(dim=1))
                targets.append(y)
    finally:
        model.train(was_training)
    return torch.cat(plain).cpu(), torch.cat(flipped).cpu(), torch.cat(targets).cpu()


def scores(predicted: torch.Tensor, true: torch.Tensor, class_counts) -> dict:
    """Top-1 and many / medium / few (None for a split without classes), in percent, rounded to 0.01: the
    library's metrics (``ride_models.metrics``, as ``evaluate`` and validate.py compute them)."""
    shots = shot_accuracy(per_class_accuracy(predicted, true, len(class_counts)), class_counts)
    top1 = (predicted == true).double().mean().item() * 100.0
    return dict(top1=round(top1, 2), **{k: None if np.isnan(v) else round(v, 2) for k, v in shots.items()})


def time_expert_pass(model, loss_fn, recipe, loader, device, amp_dtype, cuda_graph, steps: int = 32) -> dict:
    """Seconds per step of the fused and the per-expert pass, on throw-away copies of the model."""
    times = {}
    batches = [batch for _, batch in zip(range(4), loader)]
    for fused in (True, False):
        trial = copy.deepcopy(model)
        trial.set_fused_experts(fused)
        optimizer, step = build_trainer(trial, copy.deepcopy(loss_fn), recipe, amp_dtype, cuda_graph)
        run_epoch(step, batches * 2, optimizer, 0, device, amp_dtype)  # warm-up and graph recording
        start = time.perf_counter()  # (run_epoch ends by reading the loss: the device has finished)
        run_epoch(step, batches * (steps // len(batches)), optimizer, 0, device, amp_dtype)
        times["fused" if fused else "per_expert"] = (time.perf_counter() - start) / steps
    return times


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=_positive, default=200)
    parser.add_argument("--model", default="ride_resnet32_4e")
    parser.add_argument("--amp", choices=("bf16", "none"), default=None, help="default: bf16 on CUDA")
    parser.add_argument(
        "--fused", choices=("auto", "time", "on", "off"), default="auto",
        help="the experts' pass: the library's choice (auto), the faster of both, timed (time), fused (on), "
        "one by one (off)",
    )  # fmt: skip
    parser.add_argument("--no-cuda-graph", action="store_true", help="eager steps on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr", type=float, default=None,
        help="base learning rate instead of the recipe's 0.1 (an experiment: not the official recipe)",
    )  # fmt: skip
    parser.add_argument(
        "--full-width", action="store_true",
        help="experts at the full ResNet-32 widths 32/64 (the official reduce_dimension=False) instead of "
        "the recipe's 24/48: more MACs; an experiment, not the official CIFAR recipe",
    )  # fmt: skip
    parser.add_argument("--log-every", type=_positive, default=10, help="epochs between printed losses")
    parser.add_argument(
        "--eval-every", type=int, default=0,
        help="also evaluate on the test set every N epochs (an accuracy curve; its time counts in the total)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    check_device(args.device)  # before minutes of decoding, not after
    if args.json:  # an unwritable path fails now, not after the run
        args.json.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if (args.amp or ("bf16" if cuda else "none")) == "bf16" else None
    cuda_graph = cuda and not args.no_cuda_graph
    if cuda:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    recipe = scaled_recipe(args.epochs)
    if args.lr is not None:
        recipe["lr"] = args.lr

    train_images, train_targets, test_images, test_targets = load_cifar10_lt(args.data_dir, 100, 0)
    class_counts = np.bincount(train_targets, minlength=10).tolist()
    config = SMALL_IMAGE_CONFIGS["cifar10_lt"]
    train_loader = DeviceDataLoader(
        train_images, train_targets, recipe["batch_size"], config, device=device, seed=args.seed
    )
    test_loader = DeviceDataLoader(test_images, test_targets, 1000, config, device=device, train=False)
    data_seconds = time.perf_counter() - start
    print(f"data: {len(train_targets)} training images {class_counts}, {len(test_targets)} test images, "
          f"{data_seconds:.1f} s")  # fmt: skip

    widths = dict(planes=FULL_WIDTH_PLANES) if args.full_width else {}
    model = timm.create_model(args.model, num_classes=10, **widths)
    model.set_expert_training(True)
    model.to(device).train()
    model.to(memory_format=torch.channels_last)
    loss_fn = create_loss(
        "ldam_diversity", class_counts, drw_epoch=recipe["drw_epoch"], **recipe["loss_kwargs"]
    ).to(device)

    if args.fused == "time":
        train_loader.set_epoch(0)
        times = time_expert_pass(model, loss_fn, recipe, train_loader, device, amp_dtype, cuda_graph)
        fused = times["fused"] <= times["per_expert"]
        print("expert pass, ms per step: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in times.items()))
    elif args.fused == "auto":  # the model's own per-call choice for these images (channels-last, training)
        images = torch.empty(1, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        fused = model.uses_fused_experts(images)
    else:
        fused = args.fused == "on"
    model.set_fused_experts(fused)
    optimizer, step = build_trainer(model, loss_fn, recipe, amp_dtype, cuda_graph)

    curve: list = []  # the test accuracy after each evaluated epoch

    def evaluate_on_test(epoch: int) -> dict:
        """The recipe's evaluation, with the test-time flipping experiment under ``flip``."""
        plain, flipped, true = predict_test_set(model, test_loader, device, amp_dtype)
        point = dict(epoch=epoch, **scores(plain, true, class_counts))
        point["flip"] = scores(flipped, true, class_counts)
        curve.append(point)
        return point

    eval_seconds = 0.0
    train_start = time.perf_counter()
    for epoch in range(1, recipe["epochs"] + 1):
        lr = recipe_lr(recipe, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_fn.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loss = run_epoch(step, train_loader, optimizer, epoch, device, amp_dtype)
        if epoch % args.log_every == 0 or epoch == recipe["epochs"]:
            print(f"epoch {epoch}: lr {lr:.4g} train loss {loss:.4f} | {time.perf_counter() - start:.1f} s")
        if args.eval_every and epoch % args.eval_every == 0 and epoch < recipe["epochs"]:
            eval_start = time.perf_counter()
            evaluate_on_test(epoch)
            eval_seconds += time.perf_counter() - eval_start
            point = curve[-1]
            print(f"epoch {epoch}: test top-1 {point['top1']:.2f} (many {point['many']:.2f} / medium "
                  f"{point['medium']:.2f}); with test-time flipping {point['flip']['top1']:.2f}")  # fmt: skip
    train_seconds = time.perf_counter() - train_start - eval_seconds

    result = evaluate_on_test(recipe["epochs"])
    total = time.perf_counter() - start
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    out = dict(
        model=args.model, loss="ldam_diversity", epochs=recipe["epochs"], lr=recipe["lr"],
        full_width=args.full_width, device=device_name,
        torch=torch.__version__, amp=str(amp_dtype), fused_experts=fused, cuda_graph=cuda_graph,
        graphs_recorded=getattr(step, "recordings", None),
        top1=result["top1"], many=result["many"], medium=result["medium"], few=result["few"],
        flip=result["flip"],
        data_seconds=round(data_seconds, 1), train_seconds=round(train_seconds, 1),
        total_seconds=round(total, 1),
        curve_seconds=round(eval_seconds, 1),  # the --eval-every evaluations, part of total_seconds
        train_images_per_s=round(len(train_targets) * recipe["epochs"] / train_seconds),
        curve=curve,
    )  # fmt: skip
    timing = f"data {data_seconds:.1f} s, training {train_seconds:.1f} s, {out['train_images_per_s']} img/s"
    if eval_seconds:
        timing += f", the curve's evaluations {eval_seconds:.1f} s"
    print(
        f"CIFAR-10-LT r100, {args.model}{' (full width)' if args.full_width else ''}, {recipe['epochs']} "
        f"epochs, lr {recipe['lr']:g} on {device_name}: "
        f"top-1 {out['top1']:.2f} "
        f"(many {out['many']:.2f} / medium {out['medium']:.2f} / few: no class) in {total:.1f} s end to end "
        f"({timing}); with test-time flipping {out['flip']['top1']:.2f} (many {out['flip']['many']:.2f} / "
        f"medium {out['flip']['medium']:.2f})"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # bad input: one line, no traceback
        sys.exit(f"cifar_lt_speedrun.py: error: {error}")
