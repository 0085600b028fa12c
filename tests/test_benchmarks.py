"""benchmarks/throughput.py runs end to end on CPU and writes its rows (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

from ride_models.flops import count_macs

ROOT = Path(__file__).resolve().parents[1]


def _script(filename: str):
    """Import ``benchmarks/<filename>`` as the module ``benchmarks_<name>``; yield it, then forget it."""
    name = "benchmarks_" + filename.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def throughput():
    yield from _script("throughput.py")


def test_throughput_writes_json_rows(throughput, tmp_path):
    out = tmp_path / "throughput.json"
    argv = ["--device", "cpu", "--models", "ride_resnet32_2e", "--batch-size", "4", "--warmup", "1"]
    argv += ["--iters", "1", "--repeats", "1", "--route-shares", "0.5", "--json", str(out)]
    result = throughput.main(argv)

    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(result["rows"]))
    assert {"device", "torch", "cpu", "torch_threads"} <= set(written["machine"])
    rows = written["rows"]
    assert [(r["mode"], r["impl"]) for r in rows] == [
        ("train", "ours"),
        ("infer", "ours"),
        ("routed", "ours"),
    ]
    for row in rows:
        assert set(row) == set(throughput.ROW_KEYS)
        assert row["model"] == "ride_resnet32_2e" and row["batch"] == 4 and row["precision"] == "fp32"
        assert row["images_per_s"] > 0 and len(row["images_per_s_rounds"]) == 1
        assert row["ratio_vs_official"] is None  # no --official-dir
    routed = rows[2]
    # 2 of the 4 samples continue after expert 1: 1.5 experts per image, as requested.
    assert routed["route_shares"] == [0.5] and routed["realized_shares"] == [0.5]
    assert routed["experts_per_image"] == 1.5
    assert routed["ratio_vs_all_experts"] is not None


def test_throughput_cuda_graph_needs_cuda(throughput):
    with pytest.raises(SystemExit, match="--cuda-graph needs --device cuda"):
        throughput.main(["--device", "cpu", "--cuda-graph", "--models", "ride_resnet32_2e"])


def test_paper_shares_reproduce_the_paper_routed_cost(throughput):
    # ResNet-32 with 4 experts: 91.9 M MACs routed against 126.9 M for all experts (the paper and the
    # official counter), so the derived shares must give 91.9 / 126.9 of our all-experts count.
    spec = throughput.model_spec("ride_resnet32_4e")
    breakdown = count_macs(timm.create_model("ride_resnet32_4e"))
    shares = throughput.paper_shares(spec, breakdown)
    q = shares[0]
    assert shares == pytest.approx([q, q**2, q**3])
    fractions = [1.0 - shares[0], shares[0] - shares[1], shares[1] - shares[2], shares[2]]
    routed = sum(p * breakdown.per_image(k + 1) for k, p in enumerate(fractions))
    assert routed / breakdown.all_experts == pytest.approx(91.9 / 126.9, rel=1e-9)


def test_reference_deviations_names_a_folder_without_fixtures(tmp_path, capsys):
    for deviations in _script("reference_deviations.py"):
        with pytest.raises(SystemExit):
            deviations.main(["--reference-dir", str(tmp_path)])
    assert f"--reference-dir {tmp_path}: no official RIDE fixtures there" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the speed run
@pytest.fixture(scope="module")
def speedrun():
    yield from _script("cifar_lt_speedrun.py")


def test_speedrun_reads_the_official_cifar10_lt(speedrun, shared_data_dir, tmp_path):
    # Straight from the archives, the speed run must see what create_dataset builds from the extracted
    # tree: the official CIFAR-10-LT selection (12,406 images, 5,000 ... 50) and the 10,000 test images.
    import zipfile

    import numpy as np

    from ride_models.data import create_dataset
    from ride_models.data.device_loader import dataset_images

    archives = shared_data_dir / "cifar10"
    train_x, train_y, test_x, test_y = speedrun.load_cifar10_lt(archives)
    assert np.bincount(train_y).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    for name in ("cifar10_train_jpeg.zip", "cifar10_test_jpeg.zip"):
        with zipfile.ZipFile(archives / name) as z:
            z.extractall(tmp_path)
    for split, images, targets in (("train", train_x, train_y), ("test", test_x, test_y)):
        dataset = create_dataset("cifar10_lt", tmp_path, split)
        assert np.array_equal(np.asarray(dataset.targets), targets)
        assert np.array_equal(dataset_images(dataset), images)


def test_speedrun_schedule_scales_with_the_epochs(speedrun):
    full = speedrun.scaled_recipe(200)
    assert (full["milestones"], full["drw_epoch"], full["warmup_epochs"]) == ([160, 180], 160, 5)
    short = speedrun.scaled_recipe(20)
    assert (short["milestones"], short["drw_epoch"], short["warmup_epochs"]) == ([16, 18], 16, 0)
    assert short["lr"] == full["lr"] == 0.1 and short["batch_size"] == 128


def test_ratios_pair_rows_of_the_same_format_and_the_shipped_official(throughput):
    def row(impl, ips, precision="fp32", channels_last=False):
        base = dict.fromkeys(throughput.ROW_KEYS)
        base.update(impl=impl, model="ride_resnet32_4e", family="resnet32", mode="train", batch=128,
                    precision=precision, channels_last=channels_last, images_per_s=ips)  # fmt: skip
        return base

    rows = [
        row("ours", 300.0, channels_last=True),
        row("official", 200.0, channels_last=True),
        row("official", 150.0),
        row("ours", 600.0, precision="bf16", channels_last=True),
    ]
    throughput.add_ratios(rows, "resnet50")
    assert rows[0]["ratio_vs_official"] == pytest.approx(1.5)  # same memory format
    assert rows[0]["ratio_vs_official_shipped"] == pytest.approx(2.0)  # official fp32 NCHW
    assert rows[3]["ratio_vs_official"] is None  # no official bf16 row
    assert rows[3]["ratio_vs_official_shipped"] == pytest.approx(4.0)
    assert rows[2]["ratio_vs_official_shipped"] is None  # only our rows get ratios


def test_ratios_pair_the_rounds_that_ran_together(throughput):
    def row(impl, rounds):
        base = dict.fromkeys(throughput.ROW_KEYS)
        base.update(impl=impl, model="ride_resnet32_4e", family="resnet32", mode="train", batch=128,
                    precision="fp32", channels_last=False, images_per_s=sorted(rounds)[len(rounds) // 2],
                    images_per_s_rounds=rounds)  # fmt: skip
        return base

    # The machine ran at half speed in the last two rounds: round by round ours is 1.2x the official, but
    # the medians of the rounds (110 and 100) would give 1.1x.
    rows = [row("ours", [120.0, 120.0, 110.0, 60.0, 60.0]), row("official", [100.0, 100, 100, 50, 50])]
    throughput.add_ratios(rows, "resnet50")
    assert rows[0]["ratio_vs_official"] == pytest.approx(1.2)
    # Without rounds to pair (or not as many), the medians.
    assert throughput.speed_ratio(dict(rows[0], images_per_s_rounds=[110.0]), rows[1]) == pytest.approx(1.1)


def test_routed_rows_are_compared_with_all_experts_computed_the_same_way(throughput):
    def row(mode, fused, ips):
        base = dict.fromkeys(throughput.ROW_KEYS)
        base.update(impl="ours", model="ride_resnet32_4e", family="resnet32", mode=mode, batch=4,
                    precision="fp32", channels_last=False, fold_bn=True, fused=fused, images_per_s=ips,
                    route_shares=[0.5, 0.5, 0.5] if mode == "routed" else None)  # fmt: skip
        return base

    rows = [
        row("infer", False, 30.0),
        row("infer", None, 80.0),
        row("routed", False, 24.0),
        row("routed", None, 40.0),
    ]
    throughput.add_ratios(rows, "resnet50")
    assert rows[2]["ratio_vs_all_experts"] == pytest.approx(0.8)  # unfused with unfused, not with auto
    assert rows[3]["ratio_vs_all_experts"] == pytest.approx(0.5)


def test_throughput_profile_names_where_the_time_goes(throughput, capsys):
    argv = ["--device", "cpu", "--models", "ride_resnet32_2e", "--modes", "train", "--batch-size", "4"]
    result = throughput.main(argv + ["--warmup", "1", "--iters", "1", "--repeats", "1", "--profile", "2"])
    (row,) = result["rows"]
    ops = {p["name"]: p for p in row["profile"]}
    assert 0 < len(ops) <= throughput.PROFILE_ROWS
    assert "aten::convolution_backward" in ops and ops["aten::convolution_backward"]["calls_per_iter"] > 0
    assert all(0 < p["share"] <= 1 and p["ms_per_iter"] > 0 for p in row["profile"])
    assert "profile of ours ride_resnet32_2e (auto) (train, batch 4, fp32)" in capsys.readouterr().out


def test_speedrun_epoch_trains_through_the_engine_loop(speedrun):
    import copy

    import torch

    from ride_models.data import DeviceDataLoader
    from ride_models.data.transforms import SMALL_IMAGE_CONFIGS
    from ride_models.losses import create_loss

    torch.manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    targets = torch.arange(24) % 10
    loader = DeviceDataLoader(images, targets, 8, SMALL_IMAGE_CONFIGS["cifar10_lt"])
    model = timm.create_model("ride_resnet32_2e", num_classes=10).train()
    model.set_expert_training(True)
    model.to(memory_format=torch.channels_last)
    before = copy.deepcopy(model.state_dict())
    recipe = speedrun.scaled_recipe(2)
    loss_fn = create_loss("ldam_diversity", [3] * 10, drw_epoch=recipe["drw_epoch"], **recipe["loss_kwargs"])
    optimizer, step = speedrun.build_trainer(model, loss_fn, recipe, None, cuda_graph=False)
    loss = speedrun.run_epoch(step, loader, optimizer, 1, torch.device("cpu"), None)
    assert isinstance(loss, float) and loss > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("experts.1.") for k in changed) and "conv1.weight" in changed


def test_speedrun_prints_an_accuracy_curve(speedrun, monkeypatch, tmp_path, capsys):
    # The whole script on a few random images (the data loading is tested above): the curve holds the
    # evaluations asked for, the final one last, and the JSON has them; the experiment flags reach the
    # model and the recipe.
    import json

    import numpy as np

    rng = np.random.default_rng(0)

    def tiny_cifar(data_dir, ratio=100, seed=0):
        train_y = np.repeat(np.arange(10), [101, 20, 5, 3, 2, 2, 1, 1, 1, 1])  # many, medium, few
        images = rng.integers(0, 256, (len(train_y) + 20, 32, 32, 3), dtype=np.uint8)
        return images[: len(train_y)], train_y, images[len(train_y) :], np.arange(20) % 10

    monkeypatch.setattr(speedrun, "load_cifar10_lt", tiny_cifar)
    created = []
    create_model = speedrun.timm.create_model
    monkeypatch.setattr(
        speedrun.timm, "create_model", lambda *a, **k: created.append(k) or create_model(*a, **k)
    )
    argv = "--device cpu --epochs 3 --eval-every 2 --lr 0.05 --full-width --json".split()
    out = speedrun.main([*argv, str(tmp_path / "r.json")])
    assert out["lr"] == 0.05 and out["full_width"] and created[0]["planes"] == (16, 32, 64)
    assert out["fused_experts"] is False  # --fused auto: the library picks one by one for channels-last CPU
    assert [point["epoch"] for point in out["curve"]] == [2, 3]
    assert out["curve"][-1]["top1"] == out["top1"]
    assert out["flip"] == out["curve"][-1]["flip"] and set(out["flip"]) == {"top1", "many", "medium", "few"}
    assert 0 < out["curve_seconds"] <= out["total_seconds"] - out["train_seconds"]
    assert json.loads((tmp_path / "r.json").read_text())["curve"] == out["curve"]
    printed = capsys.readouterr().out
    assert (
        "epoch 2: test top-1" in printed and "ride_resnet32_4e (full width), 3 epochs, lr 0.05 on" in printed
    )
    assert "the curve's evaluations" in printed and "with test-time flipping" in printed


def test_speedrun_flip_predictions_average_each_image_with_its_mirror_image(speedrun):
    # Both views enter the sum: the flipped predictions are the same for the images and for their mirror
    # images (exactly: the two logits are added in either order); for left-right symmetric images they are
    # the plain forward's, which the same pass returns; and scores scores them.
    import contextlib

    from ride_models.data import DeviceDataLoader
    from ride_models.data.transforms import SMALL_IMAGE_CONFIGS

    class Pixels(torch.nn.Module):
        """Logits linear in the pixels (an untrained RIDE model predicts one class for all noise images)."""

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

        @contextlib.contextmanager
        def routing_scope(self, mode):
            assert mode == "all"
            yield

    torch.manual_seed(0)
    config = SMALL_IMAGE_CONFIGS["cifar10_lt"]
    model = Pixels().train()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    symmetric = torch.cat([images[..., :16], images[..., :16].flip(3)], dim=3)
    targets = torch.arange(64) % 10
    cpu = torch.device("cpu")

    def loader(x):
        return DeviceDataLoader(x, targets, 16, config, train=False)

    def plain(x):
        with torch.no_grad():
            return torch.cat([model(b) for b, _ in loader(x)]).argmax(dim=1)

    unflipped, predicted, true = speedrun.predict_test_set(model, loader(images), cpu, None)
    assert torch.equal(true, targets) and model.training  # the model is given back in train mode
    assert torch.equal(unflipped, plain(images))
    assert torch.equal(speedrun.predict_test_set(model, loader(images.flip(3)), cpu, None)[1], predicted)
    assert not torch.equal(predicted, plain(images))  # the mirror images changed some predictions
    assert len(predicted.unique()) > 1
    assert torch.equal(speedrun.predict_test_set(model, loader(symmetric), cpu, None)[1], plain(symmetric))

    counts = [300, 200, 150, 110, 90, 60, 30, 25, 10, 5]  # many > 100 (classes 0-3), medium 20..100 (4-7)
    hits = (predicted == targets).double()
    per_class = [hits[targets == c].mean().item() * 100 for c in range(10)]
    assert speedrun.scores(predicted, true, counts) == dict(
        top1=round(hits.mean().item() * 100, 2),
        many=round(sum(per_class[:4]) / 4, 2),
        medium=round(sum(per_class[4:8]) / 4, 2),
        few=round(sum(per_class[8:]) / 2, 2),
    )
    assert speedrun.scores(predicted, true, counts[:8] + [20, 20])["few"] is None  # no few-shot class


def test_speedrun_scores_its_plain_predictions_as_evaluate_does(speedrun):
    # The recipe's figures come from the speed run's own pass (shared with the flipped one): the same
    # numbers as the library's evaluate (validate.py's) on a RIDE model.
    from ride_models.data import DeviceDataLoader
    from ride_models.data.transforms import SMALL_IMAGE_CONFIGS
    from ride_models.metrics import evaluate

    torch.manual_seed(0)
    model = timm.create_model("ride_resnet32_2e", num_classes=10)
    pixels = torch.randn(3 * 32 * 32, 10)
    model.forward = lambda x: x.flatten(1) @ pixels  # varied predictions (an untrained model gives one class)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    targets = torch.arange(96) % 10
    loader = DeviceDataLoader(images, targets, 32, SMALL_IMAGE_CONFIGS["cifar10_lt"], train=False)
    counts = [300, 200, 150, 110, 90, 60, 30, 25, 10, 5]
    plain, _, true = speedrun.predict_test_set(model, loader, torch.device("cpu"), None)
    assert len(plain.unique()) > 2 and not torch.equal(plain, true)
    result = evaluate(model, loader, class_counts=counts, routing="all", channels_last=True)
    expected = [result.top1, result.many_top1, result.medium_top1, result.few_top1]
    assert list(speedrun.scores(plain, true, counts).values()) == [round(v, 2) for v in expected]


def test_parallel_both_rows_train_side_by_side_and_in_turn(throughput, tmp_path):
    argv = ["--device", "cpu", "--models", "ride_resnet32_2e", "--modes", "train", "--channels-last"]
    argv += ["--parallel-both", "--threads", "2", "--batch-size", "4", "--warmup", "1", "--iters", "1"]
    rows = throughput.main(argv + ["--repeats", "1", "--json", str(tmp_path / "t.json")])["rows"]
    assert [r["parallel_experts"] for r in rows] == [True, False]
    assert [throughput.row_label(r) for r in rows] == [
        "ours ride_resnet32_2e (auto, experts side by side)",
        "ours ride_resnet32_2e (auto, experts in turn)",
    ]
    fused = throughput.main(argv + ["--fused", "--repeats", "1"])["rows"]
    assert [r["parallel_experts"] for r in fused] == [None, None]  # one pass: neither


def test_unfolded_rows_compare_routing_with_all_experts_computed_alike(throughput, tmp_path):
    argv = ["--device", "cpu", "--models", "ride_resnet32_2e", "--modes", "infer", "routed", "--unfolded"]
    argv += ["--batch-size", "4", "--warmup", "1", "--iters", "1", "--repeats", "1", "--route-shares", "0.5"]
    rows = throughput.main(argv + ["--json", str(tmp_path / "t.json")])["rows"]
    ours = {(r["mode"], r["fold_bn"]): r for r in rows if r["impl"] == "ours"}
    assert set(ours) == {("infer", True), ("infer", False), ("routed", True), ("routed", False)}
    for fold in (True, False):
        routed, infer = ours[("routed", fold)], ours[("infer", fold)]
        assert routed["ratio_vs_all_experts"] == pytest.approx(routed["images_per_s"] / infer["images_per_s"])


# --------------------------------------------------------------------------- training parity check
@pytest.fixture(scope="module")
def parity():
    yield from _script("official_parity.py")


def test_parity_check_needs_the_official_code(parity, tmp_path):
    with pytest.raises(SystemExit, match="no model/model.py"):
        parity.main(["--official-dir", str(tmp_path)])


def test_parity_check_rounds_the_margin_products_as_the_official_code(parity):
    import torch

    from ride_models.losses import create_loss

    loss = create_loss("ldam_diversity", [5000, 997, 50], drw_epoch=160)
    margins32 = loss.base.margins.float().clone()
    parity.round_margins_as_official(loss)
    products = loss.base.s * loss.base.margins  # what our LDAM subtracts, in float64
    assert torch.equal(products.float().double(), products)  # float32 values ...
    assert torch.equal(products.float(), margins32 * loss.base.s)  # ... the official float32 products


def test_speedrun_refuses_bad_input_before_loading_data(speedrun, tmp_path, capsys):
    for flags in (["--epochs", "0"], ["--log-every", "0"]):
        with pytest.raises(SystemExit):
            speedrun.main([*flags, "--data-dir", str(tmp_path / "none")])
        assert "must be at least 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available here"):
            speedrun.main(["--device", "cuda", "--data-dir", str(tmp_path / "none")])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--repeats", "0"], "--repeats and --iters must be at least 1"),
        (["--seconds", "0"], "--seconds above 0"),
        (["--shipped-official"], "give --official-dir too"),
    ],
)
def test_throughput_refuses_degenerate_settings(throughput, capsys, flags, message):
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cpu", *flags])
    assert message in capsys.readouterr().err


def test_throughput_names_a_device_it_cannot_run_on(throughput):
    with pytest.raises(ValueError, match="--device gpu: not a device name"):
        throughput.main(["--device", "gpu"])
