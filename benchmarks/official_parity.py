"""Train our model and the official one side by side, from the same weights on the same batches.

    python benchmarks/official_parity.py --official-dir /path/to/RIDE-LongTailRecognition

The fixtures check one forward pass, one loss value and one gradient. This checks what the accuracy of a
training run rests on besides: the training dynamics of the speed run's recipe (``ride_resnet32_4e``,
``ldam_diversity``, SGD with Nesterov momentum and weight decay, the learning rate schedule, DRW and the
per-class diversity temperature from epoch 161) over consecutive steps, batch-norm running statistics
included. Our model (experts fused, and one by one) and the official one start from the same weights
(ours converted from the official state dict) and take the same real CIFAR-10-LT batches (the speed run's
data and augmentation, ``--data-dir``), in float64; after every step the losses, the parameters and the
running statistics are compared with the official run's.

Early training is chaotic: a difference of 1e-9 in the weights grows a thousandfold within a few steps.
So a second official run, its initial weights perturbed by ``--perturbation`` (1e-9, relative), is
compared too: that is how fast the official run leaves its own track. Ours matching the official code
means ours stays as close as that baseline does, or closer.

Each phase of the official schedule starts afresh from the same weights: epoch 1 (warm-up, lr 0.02),
epoch 100 (lr 0.1) and epoch 161 (lr 0.001, re-weighting and the per-class temperature on).

The official code is imported from ``--official-dir`` at run time (it needs pandas); nothing of it is
copied here. Its class constants are float32 (margins, DRW weights, temperatures), as are ours; the one
place where the two round differently, the product of margin and scale, is aligned
(``round_margins_as_official``). Everything else runs in float64.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent, _HERE):  # the library (run from a clone) and the sibling benchmark scripts
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import timm  # noqa: E402
from cifar_lt_speedrun import DEFAULT_DATA_DIR, load_cifar10_lt, recipe_lr, scaled_recipe  # noqa: E402
from throughput import OFFICIAL, Official, model_spec  # noqa: E402

import ride_models  # noqa: E402, F401  (registers the models)
from ride_models.convert import convert_official_state_dict  # noqa: E402
from ride_models.data import DeviceDataLoader  # noqa: E402
from ride_models.data.transforms import SMALL_IMAGE_CONFIGS  # noqa: E402
from ride_models.engine import make_step  # noqa: E402
from ride_models.losses import create_loss  # noqa: E402
from ride_models.training import build_optimizer  # noqa: E402

PHASES = (1, 100, 161)  # official 1-based epochs: warm-up, stage 1 at full lr, after DRW


def official_loss(official: Official, spec, counts, dtype: torch.dtype) -> torch.nn.Module:
    """The official RIDELoss of the CIFAR config, its class weights in ``dtype`` (margins stay float32)."""
    loss = official.create_loss(spec, counts, torch.device("cpu"))
    loss.per_cls_weights_enabled = loss.per_cls_weights_enabled.to(dtype)
    loss.per_cls_weights_enabled_diversity = loss.per_cls_weights_enabled_diversity.to(dtype)
    return loss


def round_margins_as_official(loss_fn: torch.nn.Module) -> None:
    """Give our LDAM the margin products the official code computes: it multiplies its float32 margins by
    s in float32 (``batch_m * self.s``), ours in the logits' dtype. Our margins (our derivation, float32)
    are kept; only that product's rounding, 1e-7 relative, is made the same, so that it does not add a
    difference of its own at every step."""
    ldam = loss_fn.base
    products = ldam.margins.float() * ldam.s  # float32, as the official
    ldam._buffers["margins"] = products.double() / ldam.s  # s * this, in float64, gives those products


def official_step(model, loss_fn, x, y) -> torch.Tensor:
    """The official trainer's forward pass and loss (trainer/trainer.py, ``add_extra_info``)."""
    model._hook_before_iter()
    out = model(x)
    if isinstance(out, dict):
        logits, out = out["logits"].transpose(0, 1), out["output"]
    else:  # the CIFAR model returns the mean and keeps the experts' logits on its backbone
        logits = model.backbone.logits
    return loss_fn(output_logits=out, target=y, extra_info={"logits": logits})


def train_step(step, optimizer, x, y) -> float:
    """One SGD step (zero_grad, forward and loss, backward, step), as the official trainer takes it."""
    optimizer.zero_grad()
    loss = step(x, y)
    loss.backward()
    optimizer.step()
    return loss.item()


def flat(state: dict, keys) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in keys])


def deviation(model: torch.nn.Module, name: str, ref: dict, ours: bool) -> dict:
    """Relative L2 distance of the parameters and of the running statistics from the official model's.

    ``ref``: the official model's state dict in our layout. Our router is left out: the official CIFAR
    model of stage 1 has none (and ours is frozen then).
    """
    state = (
        model.state_dict() if ours else convert_official_state_dict(model.state_dict(), name, num_classes=10)
    )
    floating = [k for k, v in ref.items() if v.is_floating_point() and not k.startswith("router.")]
    stats = [k for k in floating if k.endswith(("running_mean", "running_var"))]
    params = [k for k in floating if k not in stats]
    out = {}
    for kind, keys in (("params", params), ("stats", stats)):
        a, b = flat(state, keys), flat(ref, keys)
        out[kind] = ((a - b).norm() / b.norm()).item()
    return out


def run(args: argparse.Namespace) -> dict:
    dtype = {"fp64": torch.float64, "fp32": torch.float32}[args.precision]
    spec = model_spec(args.model)
    if spec.family != "resnet32":
        raise SystemExit(
            f"--model {args.model}: this check runs the CIFAR recipe; use ride_resnet32_{{2,3,4}}e"
        )
    official = Official(args.official_dir)
    torch.manual_seed(args.seed)
    recipe = scaled_recipe(200)

    images, targets, _, _ = load_cifar10_lt(args.data_dir, 100, 0)
    counts = np.bincount(targets, minlength=10).tolist()
    loader = DeviceDataLoader(
        images, targets, recipe["batch_size"], SMALL_IMAGE_CONFIGS["cifar10_lt"], seed=0
    )

    config = official.config(spec.family)  # the official CIFAR config's model, for CIFAR-10's 10 classes
    model_cls = getattr(official.models, OFFICIAL[spec.family][0])
    arch = {**config["arch"]["args"], "num_experts": spec.num_experts, "num_classes": 10}
    initial = model_cls(**arch).to(dtype).state_dict()

    results = []
    for epoch in PHASES:
        lr = recipe_lr(recipe, epoch)
        runs = {}  # name -> (model, step, optimizer, is ours)
        for name in ("official", "official_perturbed"):
            model = model_cls(**arch).to(dtype)
            model.load_state_dict(initial)
            if name == "official_perturbed":  # the baseline: how fast the official run leaves its own track
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(1 + args.perturbation * torch.randn_like(p))
            loss_fn = official_loss(official, spec, counts, dtype)
            loss_fn._hook_before_epoch(epoch)
            runs[name] = (
                model.train(),
                partial(official_step, model, loss_fn),
                official.optimizer(spec, model),
                False,
            )
        for fused in (True, False):
            model = timm.create_model(args.model, num_classes=10).to(dtype)
            model.load_state_dict(convert_official_state_dict(initial, args.model, num_classes=10))
            model.set_expert_training(True)
            model.set_fused_experts(fused)
            loss_fn = create_loss(
                "ldam_diversity", counts, drw_epoch=recipe["drw_epoch"], **recipe["loss_kwargs"]
            )
            loss_fn.set_epoch(epoch)
            round_margins_as_official(loss_fn)
            step = make_step("experts", model, loss_fn)
            optimizer = build_optimizer(model, recipe["lr"], recipe["weight_decay"])
            runs["ours_fused" if fused else "ours_per_expert"] = (model.train(), step, optimizer, True)
        for _, _, optimizer, _ in runs.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        loader.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i == args.steps:
                break
            x = x.to(dtype)
            losses = {
                name: train_step(step, optimizer, x, y) for name, (_, step, optimizer, _) in runs.items()
            }
            reference = convert_official_state_dict(
                runs["official"][0].state_dict(), args.model, num_classes=10
            )
            for name, (model, _, _, ours) in runs.items():
                if name == "official":
                    continue
                row = dict(epoch=epoch, lr=lr, step=i + 1, run=name, loss=losses[name])
                row["loss_rel"] = abs(losses[name] - losses["official"]) / abs(losses["official"])
                row.update(deviation(model, args.model, reference, ours))
                results.append(row)
                print(
                    f"epoch {epoch:>3}  lr {lr:<6g} step {i + 1:>2}  {name:<19} loss {row['loss']:9.5f}  "
                    f"vs official: loss {row['loss_rel']:.1e}  params {row['params']:.1e}  "
                    f"running stats {row['stats']:.1e} (relative)",
                    flush=True,
                )
    return results


def summarize(results: list) -> dict:
    """Per run: the largest relative difference from the official run over every step of every phase."""
    summary = {}
    for row in results:
        worst = summary.setdefault(row["run"], {"loss_rel": 0.0, "params": 0.0, "stats": 0.0})
        for key in worst:
            worst[key] = max(worst[key], row[key])
    for name, worst in summary.items():
        print(
            f"{name:<19} worst over all steps, vs official: loss {worst['loss_rel']:.1e}  "
            f"params {worst['params']:.1e}  running stats {worst['stats']:.1e} (relative)"
        )
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-dir", required=True, help="a copy of the official RIDE repository")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--model", default="ride_resnet32_4e")
    parser.add_argument("--steps", type=int, default=8, help="training steps per phase")
    parser.add_argument("--precision", choices=("fp64", "fp32"), default="fp64")
    parser.add_argument("--seed", type=int, default=0, help="seed of the (official) initial weights")
    parser.add_argument(
        "--perturbation", type=float, default=1e-9, help="relative noise on the baseline's initial weights"
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.json:  # an unwritable path fails now, not after the run
        args.json.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run(args)
    out = dict(
        model=args.model, precision=args.precision, perturbation=args.perturbation, phases=list(PHASES),
        torch=torch.__version__, seconds=round(time.perf_counter() - start, 1), worst=summarize(results),
        results=results,
    )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # bad input: one line, no traceback
        sys.exit(f"official_parity.py: error: {error}")
