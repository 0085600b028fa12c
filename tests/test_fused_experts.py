"""The fused expert pass (grouped convolutions) against the per-expert loop it replaces."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import ride_models  # noqa: F401
from ride_models.models import fused_experts as fe

FAMILIES = {
    "ride_resnet32_4e": (3, 32, 32),
    "ride_resnet10_3e": (3, 64, 64),
    "ride_resnet50_2e": (3, 64, 64),
    "ride_resnext50_2e": (3, 64, 64),
}


def _pair(name: str, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    fused = timm.create_model(name, num_classes=7, fused_experts=True, **kwargs).to(dtype)
    loop = copy.deepcopy(fused)
    loop.set_fused_experts(False)
    assert fused.fused_experts and not loop.fused_experts
    return fused, loop


@pytest.mark.parametrize(
    "name, kwargs",
    [(name, {}) for name in FAMILIES] + [("ride_resnet32_4e", {"num_experts": 1})],  # one: no concatenation
)
def test_fused_training_step_equals_the_loop(name, kwargs):
    # float64: the two passes differ only by summation order, far below 1e-10.
    fused, loop = _pair(name, **kwargs)
    x = torch.randn(3, *FAMILIES[name], dtype=torch.float64)
    for model in (fused, loop):
        model.train().set_expert_training(True)
        out = model(x)
        (out.expert_logits * torch.linspace(-1, 1, 7, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(fused(x).expert_logits, loop(x).expert_logits, rtol=1e-10, atol=1e-10)
    loop_params = dict(loop.named_parameters())
    for key, p in fused.named_parameters():
        if p.grad is not None or loop_params[key].grad is not None:
            torch.testing.assert_close(p.grad, loop_params[key].grad, rtol=1e-9, atol=1e-10, msg=key)
    # Batch norm's running statistics (and its step counter) were updated in every expert's own buffers.
    loop_state = loop.state_dict()
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, loop_state[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_inference_equals_the_loop(name):
    fused, loop = _pair(name)
    x = torch.randn(2, *FAMILIES[name], dtype=torch.float64)
    with torch.no_grad():
        fused.train()(x)  # non-trivial running statistics
        loop.load_state_dict(fused.state_dict())
        fused.eval(), loop.eval()
        torch.testing.assert_close(fused(x), loop(x), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            fused.forward_features(x), loop.forward_features(x), rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(
            fused.forward_experts(x, 1), loop.forward_experts(x, 1), rtol=1e-10, atol=1e-10
        )
        final, levels = fused.forward_intermediates(x)
        final_loop, levels_loop = loop.forward_intermediates(x)
        torch.testing.assert_close(final, final_loop, rtol=1e-10, atol=1e-10)
        for a, b in zip(levels, levels_loop):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_float32_is_within_rounding_of_the_loop():
    fused, loop = _pair("ride_resnet32_4e", torch.float32)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = fused.eval()(x), loop.eval()(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_hooks_inside_the_experts_fall_back_to_the_loop():
    # A hook on an expert's module must fire: the fused pass calls no submodule, so it steps aside.
    model = timm.create_model("ride_resnet32_2e", fused_experts=True).eval()
    calls = []
    model.experts[1].layer3[4].conv2.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == [1]


def test_stochastic_depth_in_training_uses_the_loop():
    from ride_models.models.fused_experts import can_fuse

    model = timm.create_model("ride_resnet32_2e", drop_path_rate=0.1)
    assert not can_fuse(list(model.experts), training=True)
    assert can_fuse(list(model.experts), training=False)  # DropPath is the identity in eval mode


def test_other_batch_norm_kinds_run_their_own_forward_in_training():
    # Swapped in after building, FrozenBatchNorm2d always normalises with the running statistics and never
    # updates them, and SyncBatchNorm takes its statistics over every process: the fused pass (plain batch
    # norm, batch statistics) would compute something else, so such experts run as modules.
    from timm.layers import freeze_batch_norm_2d

    torch.manual_seed(0)
    model = timm.create_model("ride_resnet32_2e", num_classes=7).double()
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32, dtype=torch.float64))  # non-trivial running statistics
    frozen = freeze_batch_norm_2d(model)
    fused, loop = copy.deepcopy(frozen), copy.deepcopy(frozen)
    fused.set_fused_experts(True), loop.set_fused_experts(False)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = loop.train()(x)
        torch.testing.assert_close(fused.train()(x), expected, rtol=1e-10, atol=1e-10)
    for key, value in fused.state_dict().items():  # the running statistics stayed as they were
        torch.testing.assert_close(value, frozen.state_dict()[key], rtol=0, atol=0, msg=key)

    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model("ride_resnet32_2e"))
    synced.set_fused_experts(True)
    calls = []
    original = torch.nn.SyncBatchNorm.forward

    def counting(self, input):
        calls.append(self)
        return original(self, input)

    torch.nn.SyncBatchNorm.forward = counting
    try:
        synced.train()(torch.randn(2, 3, 32, 32))
    finally:
        torch.nn.SyncBatchNorm.forward = original
    expert_norms = [m for m in synced.experts.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert expert_norms and all(any(m is c for c in calls) for m in expert_norms)


def test_state_dict_layout_does_not_depend_on_fusing():
    fused = timm.create_model("ride_resnet32_3e", fused_experts=True)
    loop = timm.create_model("ride_resnet32_3e", fused_experts=False)
    assert list(fused.state_dict()) == list(loop.state_dict())
    assert any(k.startswith("experts.2.layer3.4.conv2") for k in fused.state_dict())


def test_the_default_fuses_where_it_was_measured_faster():
    from ride_models.models.fused_experts import fusing_pays

    cifar = list(timm.create_model("ride_resnet32_2e").experts)
    imagenet = list(timm.create_model("ride_resnet50_2e").experts)
    assert fusing_pays(cifar, "cuda", training=True) and fusing_pays(cifar, "cuda", training=False)
    assert not fusing_pays(imagenet, "cuda", training=True)
    assert fusing_pays(cifar, "cpu", training=True) and fusing_pays(cifar, "cpu", training=False)
    assert fusing_pays(imagenet, "cpu", training=True)
    assert not fusing_pays(cifar, "cpu", training=True, channels_last=True)
    assert fusing_pays(cifar, "cuda", training=True, channels_last=True)
    model = timm.create_model("ride_resnet32_2e")
    assert model.fused_experts is None  # the default: decided per call
    maps = torch.randn(2, 16, 8, 8)
    assert model.uses_fused_experts(maps)
    assert not model.uses_fused_experts(maps.contiguous(memory_format=torch.channels_last))
    model.set_fused_experts(False)
    assert model.fused_experts is False and not model.uses_fused_experts(maps)
    model.set_fused_experts(True)
    assert model.uses_fused_experts(maps.contiguous(memory_format=torch.channels_last))
    model.set_grad_checkpointing(True)
    assert not model.uses_fused_experts(maps)  # training: checkpoint_blocks runs the experts' modules
    assert model.eval().uses_fused_experts(maps)  # eval mode: nothing to recompute


# ------------------------------------------------------------------ batch norm folded in eval mode
def _fold_pair(name: str, fused, dtype=torch.float64):
    """A model with non-trivial running statistics and its copy that does not fold."""
    torch.manual_seed(0)
    folded = timm.create_model(name, num_classes=7, fused_experts=fused).to(dtype)
    with torch.no_grad():
        folded.train()(torch.randn(4, *FAMILIES[name], dtype=dtype))  # running statistics move
    plain = copy.deepcopy(folded)
    plain.fold_bn = False
    return folded.eval(), plain.eval()


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_folded_inference_equals_the_modules(name, fused):
    # float64: folding only changes the rounding (1e-15 here), far below these tolerances.
    folded, plain = _fold_pair(name, fused)
    x = torch.randn(6, *FAMILIES[name], dtype=torch.float64)
    close = dict(rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), **close)
        torch.testing.assert_close(folded.forward_shared(x), plain.forward_shared(x), **close)
        torch.testing.assert_close(folded.forward_experts(x, 2), plain.forward_experts(x, 2), **close)
        final, levels = folded.forward_intermediates(x)
        final_plain, levels_plain = plain.forward_intermediates(x)
        torch.testing.assert_close(final, final_plain, **close)
        for a, b in zip(levels, levels_plain):
            torch.testing.assert_close(a, b, **close)
        torch.testing.assert_close(final, folded.forward_features(x), **close)
        # A threshold between the middle two first decisions: half the samples go on, half stop there.
        # (Not at a sample's own value: folding moves a decision by rounding, which would decide a tie.)
        p = torch.sigmoid(folded.route(x, threshold=1.0).router_logits[:, 0]).sort().values
        threshold = ((p[2] + p[3]) / 2).item()
        a, b = folded.route(x, threshold=threshold), plain.route(x, threshold=threshold)
    torch.testing.assert_close(a.logits, b.logits, **close)
    torch.testing.assert_close(a.router_logits, b.router_logits, equal_nan=True, **close)
    assert torch.equal(a.num_experts, b.num_experts)
    assert 1 < a.num_experts.float().mean() < folded.num_experts  # the cascade both stopped and went on


def test_folded_float32_is_within_rounding_of_the_modules():
    folded, plain = _fold_pair("ride_resnet50_2e", False, torch.float32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-4, atol=1e-4)


def _batch_norm_calls(model, x) -> int:
    calls = []
    original = torch.nn.functional.batch_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.nn.functional.batch_norm = counting
    try:
        with torch.no_grad():
            model(x)
            if not model.training:
                model.route(x)
    finally:
        torch.nn.functional.batch_norm = original
    return len(calls)


@pytest.mark.parametrize("fused", [None, True, False])
def test_eval_runs_no_batch_norm_unless_told_not_to_fold(fused):
    folded, plain = _fold_pair("ride_resnet50_2e", fused, torch.float32)
    x = torch.randn(2, 3, 64, 64)
    assert _batch_norm_calls(folded, x) == 0  # every batch norm folded: trunk, experts, routed cascade
    assert _batch_norm_calls(plain, x) > 0
    assert _batch_norm_calls(folded.train(), x) > 0  # training normalises with the batch's statistics


def test_hooks_in_the_trunk_or_an_expert_run_the_modules():
    model = timm.create_model("ride_resnet50_2e", num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    handle = model.layer1[0].bn2.register_forward_hook(lambda *a: calls.append("trunk"))
    model.experts[1].layer4[2].conv3.register_forward_hook(lambda *a: calls.append("expert"))
    with torch.no_grad():
        model(x)
        assert calls == ["trunk", "expert"]
        handle.remove()
        model.route(x, threshold=0.0)  # every sample goes on to expert 1
    assert calls == ["trunk", "expert", "expert"]


def _assert_folded_matches(folded, plain, x):
    tol = 1e-9 if x.dtype == torch.float64 else 1e-4  # float rounding only
    with torch.no_grad():
        plain.load_state_dict(folded.state_dict())
        torch.testing.assert_close(folded(x), plain(x), rtol=tol, atol=tol)
        a, b = folded.route(x, threshold=0.0), plain.route(x, threshold=0.0)
    torch.testing.assert_close(a.logits, b.logits, rtol=tol, atol=tol)


@pytest.mark.parametrize("fused", [None, True])
def test_kept_folded_weights_follow_every_change_of_the_model(fused):
    # Without gradients the folded weights are kept between forwards; every way a model changes must
    # reach them: in place, by a training step (parameters and running statistics), by loading weights,
    # by a dtype conversion (new tensors), and under inference_mode.
    folded, plain = _fold_pair("ride_resnet32_4e", fused)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    _assert_folded_matches(folded, plain, x)  # fills the kept weights
    with torch.no_grad():
        folded.experts[1].layer3[2].conv1.weight.mul_(1.5)
        folded.layer1[0].bn2.running_var.mul_(2.0)
    _assert_folded_matches(folded, plain, x)

    optimizer = torch.optim.SGD(folded.parameters(), lr=0.1)
    folded.train().set_expert_training(True)
    folded(x).expert_logits.sum().backward()
    optimizer.step()
    folded.eval()
    _assert_folded_matches(folded, plain, x)

    other = timm.create_model("ride_resnet32_4e", num_classes=7).double()
    folded.load_state_dict(other.state_dict())
    _assert_folded_matches(folded, plain, x)

    folded.float(), plain.float()
    _assert_folded_matches(folded, plain, x.float())
    with torch.no_grad():
        folded.layer1[0].bn1.running_mean.add_(0.1)  # the next forward folds anew ...
    with torch.inference_mode():
        first = folded(x.float())  # ... under inference_mode
    x.requires_grad_(True)  # input gradients (saliency) after the weights were kept under inference_mode
    for p in folded.parameters():
        p.requires_grad_(False)
    saliency = torch.autograd.grad(folded(x.float()).sum(), x)[0]
    assert saliency.abs().sum() > 0
    torch.testing.assert_close(folded(x.float()), first)


@pytest.mark.parametrize("fused", [None, True])
def test_writes_that_bypass_version_counters_are_seen_after_eval_or_forget(fused):
    # ``.data`` writes (and CUDA-graph replays) do not move version counters: the kept folds are dropped by
    # a switch of mode (evaluate() calls eval()) or by forget_folded_weights().
    from ride_models.models.fused_experts import forget_folded_weights

    folded, plain = _fold_pair("ride_resnet32_4e", fused)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    _assert_folded_matches(folded, plain, x)
    folded.experts[2].layer3[0].conv2.weight.data.mul_(-1.0)
    folded.bn1.running_mean.data.add_(0.5)
    folded.eval()
    _assert_folded_matches(folded, plain, x)
    folded.layer1[1].bn2.weight.data.mul_(3.0)
    forget_folded_weights()
    _assert_folded_matches(folded, plain, x)


def test_eval_mode_gradients_reach_the_weights_and_batch_norms():
    # With gradients recorded (eval-mode fine-tuning, saliency), the fold is part of the autograd graph.
    folded, plain = _fold_pair("ride_resnet50_2e", False)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for model in (folded, plain):
        model(x).sum().backward()
    plain_params = dict(plain.named_parameters())
    checked = 0
    for name, p in folded.named_parameters():
        if p.grad is not None or plain_params[name].grad is not None:
            torch.testing.assert_close(p.grad, plain_params[name].grad, rtol=1e-8, atol=1e-10, msg=name)
            checked += "bn" in name or "conv" in name
    assert checked > 100


def test_sync_batch_norm_folds_in_eval_mode():
    # In eval mode SyncBatchNorm normalises with its running statistics, as BatchNorm2d does, so a DDP run's
    # validation with --sync-bn keeps the folded path; in training its own forward must run.
    from ride_models.models.fused_experts import can_fuse

    torch.manual_seed(0)
    model = timm.create_model("ride_resnet32_2e", num_classes=7)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))  # non-trivial running statistics
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    model.eval()
    assert can_fuse(list(synced.experts), training=False) and not can_fuse(
        list(synced.experts), training=True
    )
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(synced(x), model(x))  # the same folded computation, bit for bit


@pytest.mark.parametrize("fused", [None, True, False])
def test_fold_bn_false_folds_nothing(fused, monkeypatch):
    """fold_bn=False is the modules' own computation everywhere, in the fused experts' pass too (it used to
    fold there regardless)."""
    _, plain = _fold_pair("ride_resnet32_4e", fused, torch.float32)

    def no_folding(*args):
        raise AssertionError("fold_bn=False, yet a batch norm was folded")

    monkeypatch.setattr(fe, "_folded_weights", no_folding)
    with torch.no_grad():
        plain(torch.randn(2, 3, 32, 32))
        plain.route(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("shared_input", [True, False])
def test_option_a_shortcut_keeps_the_channels_last_layout(shared_input):
    """The fused pass's option-A shortcut on channels-last maps: the same values and gradients as on NCHW
    maps, in channels-last (the NCHW result made every block's shortcut add a mixed-layout one)."""
    model = timm.create_model("ride_resnet32_4e", num_classes=10)
    stage = "layer2" if shared_input else "layer3"
    blocks = [getattr(expert, stage)[0] for expert in model.experts]
    channels = blocks[0].conv1.in_channels * (1 if shared_input else len(blocks))
    x = torch.randn(3, channels, 8, 8, dtype=torch.float64, requires_grad=True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    expected = fe._shortcut(x, blocks, shared_input, True)
    got = fe._shortcut(x_cl, blocks, shared_input, True)
    assert expected.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)
    weights = torch.randn_like(expected)
    (grad,) = torch.autograd.grad((expected * weights).sum(), x)
    (grad_cl,) = torch.autograd.grad((got * weights).sum(), x_cl)
    assert torch.equal(grad_cl, grad)


@pytest.mark.parametrize("fused", [True, False])
def test_blocks_run_one_by_one_fold_only_where_folding_pays(fused, monkeypatch):
    """Where ``folding_pays`` says no (on CUDA: without cuDNN's epilogue), the trunk and the experts run one
    by one run their batch norms as modules: bit for bit the fold_bn=False computation. The fused experts'
    pass folds anyway (it spares concatenating the batch norms' parameters)."""
    from ride_models.models import ride_resnet

    folded, plain = _fold_pair("ride_resnet50_2e", fused, torch.float32)
    assert fe.folding_pays(torch.randn(1), torch.randn(1))  # the CPU: always
    x = torch.randn(2, 3, 64, 64)
    asked = []
    monkeypatch.setattr(ride_resnet, "folding_pays", lambda x, w: asked.append(w.shape) or False)
    folds = []
    original = fe._folded_weights
    monkeypatch.setattr(fe, "_folded_weights", lambda *a: folds.append(1) or original(*a))
    with torch.no_grad():
        out, routed = folded(x), folded.route(x, threshold=0.5)
        expected, expected_routed = plain(x), plain.route(x, threshold=0.5)
    assert asked
    if fused:
        assert folds  # the experts' pass
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    else:
        assert not folds
        assert torch.equal(out, expected)
        assert torch.equal(routed.logits, expected_routed.logits)


def _fake_cudnn_epilogue(monkeypatch, decline: bool = False) -> list:
    """cuDNN's fused operators as their step-by-step definition, taken as available on the CPU: the library's
    wiring of weights, bias, geometry and shortcut into them is then checked without a GPU. With
    ``decline``, they raise as cuDNN does for a configuration it has no engine for."""
    calls = []

    def conv_relu(x, weight, bias, stride, padding, dilation, groups):
        calls.append("conv+bias+relu")
        if decline:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups).relu_()

    def conv_add_relu(x, weight, z, alpha, bias, stride, padding, dilation, groups):
        calls.append("conv+bias+add+relu")
        if decline:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups).add_(z, alpha=alpha).relu_()

    monkeypatch.setattr(torch, "cudnn_convolution_relu", conv_relu)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", conv_add_relu)
    monkeypatch.setattr(fe, "_on_cudnn", lambda x: True)
    monkeypatch.setattr(fe, "_EPILOGUE_DTYPES", (torch.float64,))
    monkeypatch.setattr(fe, "_EPILOGUE_DECLINED", set())
    return calls


@pytest.mark.parametrize("fused", [None, True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_cudnn_epilogue_computes_the_folded_blocks(name, fused, monkeypatch):
    """Bias, ReLU and the shortcut's add in the convolution's epilogue: the outputs of the step-by-step
    folded computation (float64, up to rounding), routed inference included."""
    folded, _ = _fold_pair(name, fused)
    x = torch.randn(6, *FAMILIES[name], dtype=torch.float64)
    close = dict(rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        expected, expected_routed = folded(x), folded.route(x, threshold=0.5)
        calls = _fake_cudnn_epilogue(monkeypatch)
        out, routed = folded(x), folded.route(x, threshold=0.5)
    assert {"conv+bias+relu", "conv+bias+add+relu"} <= set(calls)
    torch.testing.assert_close(out, expected, **close)
    torch.testing.assert_close(routed.logits, expected_routed.logits, **close)
    assert torch.equal(routed.num_experts, expected_routed.num_experts)
    calls.clear()
    with torch.no_grad(), fe.cudnn_epilogue(False):
        torch.testing.assert_close(folded(x), expected, **close)
    assert calls == []


def test_a_configuration_cudnn_declines_runs_step_by_step_from_then_on(monkeypatch):
    folded, _ = _fold_pair("ride_resnet50_2e", False)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = folded(x)
        calls = _fake_cudnn_epilogue(monkeypatch, decline=True)
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)
        assert len(calls) == len(fe._EPILOGUE_DECLINED) > 0  # each configuration tried once
        calls.clear()
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)
    assert calls == []


def test_the_epilogue_applies_only_on_cuda_without_autograd():
    x, w = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 1, 1, requires_grad=True)
    assert fe._epilogue_dtype(x, [w.detach()]) is None  # not CUDA
    if torch.cuda.is_available():
        assert fe._epilogue_dtype(x.cuda(), [w.detach().cuda()]) == torch.float32
        assert fe._epilogue_dtype(x.cuda(), [w.cuda()]) is None  # autograd records: no backward for it
        with torch.no_grad():
            assert fe._epilogue_dtype(x.cuda(), [w.cuda()]) == torch.float32
            assert fe._epilogue_dtype(x.cuda().double(), [w.cuda().double()]) is None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                assert fe._epilogue_dtype(x.cuda(), [w.cuda()]) == torch.bfloat16
