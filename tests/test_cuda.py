"""The library's code paths on a CUDA device, against the same computation on the CPU.

Every test here needs a CUDA GPU and skips without one; CI has none, so these run in a GPU session
(``benchmarks/gpu_checks.sh``, part ``tests``). TF32 is off and cuDNN deterministic, so that CUDA and CPU
float32 results differ only by the order of their sums.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch

import ride_models  # noqa: F401
from ride_models import training

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import validate  # noqa: E402  (the script at the repository root)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

FAST = ["--model", "ride_resnet32_2e", "-b", "128", "--log-interval", "2", "--workers", "0"]


@pytest.fixture(autouse=True)
def exact_cuda_float32():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    ) = saved


def _model(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A model whose batch norms hold running statistics and affine weights far from their defaults (so
    that folding them into the convolutions changes the arithmetic), in eval mode, on the CPU."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual = actual.detach().float().cpu()
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"{what}: largest deviation {err:.3g} (largest value {scale:.3g})"


@pytest.mark.parametrize("name, size", [("ride_resnet32_4e", 32), ("ride_resnet50_3e", 64)])
def test_inference_paths_on_cuda_equal_the_cpu(name, size):
    """Batch norm folded or not, experts fused or one by one: the CUDA outputs are the CPU's."""
    model = _model(name)
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():
        model.fold_bn = False
        model.set_fused_experts(False)
        expected = model(x)
        expected_experts = model.forward_experts(x)
        model.cuda()
        for fold in (True, False):
            for fused in (True, False):
                model.fold_bn = fold
                model.set_fused_experts(fused)
                what = f"{name} fold_bn={fold} fused={fused}"
                _close(model(x.cuda()), expected, what)
                _close(model.forward_experts(x.cuda()), expected_experts, what + " forward_experts")
                x_cl = x.cuda().to(memory_format=torch.channels_last)
                _close(model(x_cl), expected, what + " channels_last")


@pytest.mark.parametrize("name, size", [("ride_resnet32_4e", 32), ("ride_resnet50_3e", 64)])
def test_routed_inference_on_cuda_equals_the_cpu(name, size):
    """The cascade on CUDA: the same decisions as on the CPU (away from the threshold), the same logits."""
    model = _model(name)
    model.router.set_trained()
    with torch.no_grad():  # a router that sends some samples on and stops others
        for p in model.router.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(32, 3, size, size)
    with torch.no_grad():
        # A threshold at the median of the first decision: about half the samples go on.
        threshold = torch.sigmoid(model.route(x).router_logits[:, 0]).median().item() + 1e-4
        expected = model.route(x, threshold)
        model.cuda()
        for fold in (True, False):
            model.fold_bn = fold
            out = model.route(x.cuda(), threshold)
            p_cpu = torch.sigmoid(expected.router_logits)
            # Samples none of whose decisions lies near the threshold (NaN: no decision, the sample stopped).
            clear = (((p_cpu - threshold).abs() > 1e-3) | p_cpu.isnan()).all(dim=1)
            assert clear.sum() >= 12, "too few samples decided away from the threshold to compare"
            assert torch.equal(out.num_experts.cpu()[clear], expected.num_experts[clear]), f"fold_bn={fold}"
            _close(out.logits[clear.cuda()], expected.logits[clear], f"{name} routed fold_bn={fold}")
            assert 1 < expected.num_experts.float().mean() < model.num_experts  # the cascade did branch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name, size", [("ride_resnet32_4e", 32), ("ride_resnet50_3e", 64)])
def test_cudnn_epilogue_equals_the_step_by_step_folding(name, size, channels_last, precision, monkeypatch):
    """Folded blocks with bias, ReLU and shortcut add in cuDNN's epilogue: the outputs of the computation
    without it (batch norms as modules where the blocks run one by one, folded step by step in the experts'
    fused pass). The epilogue must be taken in bf16 channels-last (the fast path the throughput figures are
    about); in the other configurations cuDNN may decline it (the library then computes step by step), which
    is reported as a warning rather than a failure."""
    from ride_models.models import fused_experts as fe

    monkeypatch.setattr(fe, "_EPILOGUE_DECLINED", set())  # this configuration's declines only
    calls = []
    for op in ("cudnn_convolution_relu", "cudnn_convolution_add_relu"):
        original = getattr(torch, op)
        monkeypatch.setattr(torch, op, lambda *a, _op=original, **k: calls.append(1) or _op(*a, **k))
    model = _model(name).cuda()
    x = torch.randn(8, 3, size, size, device="cuda")
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    bf16 = precision == "bf16"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        for fused in (True, False):
            model.set_fused_experts(fused)
            with fe.cudnn_epilogue(False):
                expected = model(x).float()
            calls.clear()
            out = model(x).float()
            what = f"{name} fused={fused} channels_last={channels_last} {precision}"
            assert calls, f"{what}: the epilogue was not tried"
            scale = expected.abs().max().item()
            err = (out - expected).abs().max().item()
            limit = (3e-2 if bf16 else 1e-4) * max(scale, 1.0)
            assert err <= limit, f"{what}: deviation {err:.3g} (largest value {scale:.3g})"
    declined = sorted(map(str, fe._EPILOGUE_DECLINED))
    if bf16 and channels_last:
        assert not declined, f"cuDNN declined the bf16 channels-last epilogue: {declined}"
    elif declined:
        where = f"{name} {precision} channels_last={channels_last}"
        warnings.warn(f"cuDNN declined the epilogue for {where}: {declined}", stacklevel=1)


def test_folding_pays_on_cuda_only_with_the_epilogue():
    from ride_models.models import fused_experts as fe

    x = torch.randn(2, 3, 8, 8, device="cuda")
    w = torch.randn(4, 3, 1, 1, device="cuda", requires_grad=True)
    assert not fe.folding_pays(x, w)  # autograd records: the epilogue has no backward
    with torch.no_grad():
        assert fe.folding_pays(x, w)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert fe.folding_pays(x, w)
        with fe.cudnn_epilogue(False):
            assert not fe.folding_pays(x, w)
        assert not fe.folding_pays(x.double(), w.double())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x + 1
            during_capture = fe.folding_pays(y, w)
        assert not during_capture


@pytest.mark.parametrize("fused", [True, False])
def test_grad_checkpointing_on_cuda_changes_neither_gradients_nor_running_stats(fused):
    model = _model("ride_resnet32_4e").cuda().train()
    model.set_expert_training(True)
    model.set_fused_experts(fused)
    x = torch.randn(16, 3, 32, 32, device="cuda")
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        trial = _model("ride_resnet32_4e").cuda().train()
        trial.load_state_dict(model.state_dict())
        trial.set_expert_training(True)
        trial.set_fused_experts(fused)
        trial.set_grad_checkpointing(checkpointing)
        out = trial(x)
        (out.logits.square().mean() + out.expert_logits.square().mean()).backward()
        grads = {n: p.grad.detach().clone() for n, p in trial.named_parameters() if p.grad is not None}
        buffers = {n: b.detach().clone() for n, b in trial.named_buffers()}
        results.append((grads, buffers))
    (g0, b0), (g1, b1) = results
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    for n in b0:
        torch.testing.assert_close(b1[n], b0[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


@pytest.fixture
def deterministic_algorithms(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
    yield
    torch.use_deterministic_algorithms(False)  # train.py --deterministic turned it on for the process


def test_train_py_fp16_amp_on_cuda_resumes_and_validates(tmp_path, deterministic_algorithms):
    """train.py on CUDA with float16 autocast (gradient scaling), resumed after one epoch: the same weights
    as an uninterrupted run (--deterministic, as docs/training.md says); then validate.py on CUDA reads its
    checkpoint."""
    from safetensors.torch import load_file

    flags = [*FAST, "--device", "cuda", "--amp", "--amp-dtype", "float16", "--deterministic"]
    flags += ["--output", str(tmp_path)]
    training.main([*flags, "--epochs", "2", "--experiment", "straight"])
    training.main([*flags, "--epochs", "1", "--experiment", "resumed"])
    training.main(["--resume", str(tmp_path / "resumed"), "--epochs", "2"])
    a = load_file(tmp_path / "straight" / "last.safetensors")
    b = load_file(tmp_path / "resumed" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    results_file = tmp_path / "results.json"
    validate.main(
        ["--model", "ride_resnet32_2e", "--checkpoint", str(tmp_path / "straight" / "last.safetensors")]
        + ["-j", "0", "--device", "cuda", "--routing", "all", "--results-file", str(results_file)]
    )
    result = json.loads(results_file.read_text())
    assert result["num_images"] == 300 and 0.0 <= result["top1"] <= 100.0


def _train_losses(tmp_path, name: str, *flags: str) -> list:
    training.main([*FAST, "--device", "cuda", "--output", str(tmp_path), "--experiment", name, *flags])
    with (tmp_path / name / "summary.csv").open() as f:
        return [float(row["train_loss"]) for row in csv.DictReader(f)]


def test_train_py_cuda_graph_trains_as_eager(tmp_path, deterministic_algorithms):
    """train.py --cuda-graph (bf16, channels-last): the training losses of the eager run, epoch by epoch."""
    flags = ["--epochs", "2", "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--deterministic"]
    eager = _train_losses(tmp_path, "eager", *flags)
    graphed = _train_losses(tmp_path, "graphed", *flags, "--cuda-graph")
    assert len(graphed) == 2 and all(math.isfinite(v) for v in graphed)
    assert graphed == pytest.approx(eager, rel=1e-3)


def test_train_py_torchcompile_on_cuda(tmp_path):
    """train.py --torchcompile (inductor) on CUDA: trains, and its loss is the eager run's up to the
    compiler's rounding."""
    eager = _train_losses(tmp_path, "eager", "--epochs", "1")
    compiled = _train_losses(tmp_path, "compiled", "--epochs", "1", "--torchcompile")
    assert compiled == pytest.approx(eager, rel=2e-2)
