"""The timm model API and RIDE's forward API, on one model of each family."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import get_graph_node_names

import ride_models  # noqa: F401
from ride_models import RIDEOutput

torch.manual_seed(0)

# One model of each family, at an input size that keeps 2 CPU cores quick (ImageNet-style models take any
# size; 64x64 still goes through every stage).
FAMILIES = {
    "ride_resnet32_3e": (3, 32, 32),
    "ride_resnet10_3e": (3, 64, 64),
    "ride_resnet50_2e": (3, 64, 64),
    "ride_resnext50_2e": (3, 64, 64),
}

EXPECTED_NAMES = [
    f"ride_{arch}_{e}e" for arch in ("resnet10", "resnet32", "resnet50", "resnext50") for e in (2, 3, 4, 6)
]


def test_registered_names():
    assert sorted(timm.list_models("ride_*")) == sorted(EXPECTED_NAMES)
    for name in EXPECTED_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        # The default tag's classes: CIFAR-100-LT, iNaturalist 2018 (ResNet-50 3/4/6e), else ImageNet-sized.
        inat = name in ("ride_resnet50_3e", "ride_resnet50_4e", "ride_resnet50_6e")
        assert cfg.num_classes == (100 if "resnet32" in name else 8142 if inat else 1000)
        assert cfg.input_size == ((3, 32, 32) if "resnet32" in name else (3, 224, 224))


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_batch1(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, *FAMILIES[name]))
    assert out.shape == (1, model.num_classes)
    assert not out.isnan().any()


@pytest.mark.parametrize("name", FAMILIES)
def test_backward_reaches_every_trainable_parameter(name):
    """timm's backward check, per training stage: stage 1 (classification) reaches every parameter but the
    router's, which are frozen; stage 2 (the router's path) reaches exactly the router's."""
    model = timm.create_model(name, num_classes=42).train()
    x = torch.randn(2, *FAMILIES[name])
    out = model(x)
    assert out.shape == (2, 42)
    out.mean().backward()
    for k, p in model.named_parameters():
        if k.startswith("router."):
            assert not p.requires_grad and p.grad is None, k
        else:
            assert p.grad is not None, f"no gradient for {k}"
    model.zero_grad(set_to_none=True)

    model.set_router_training(True)
    model.train()
    out = model.forward_router_train(x, torch.tensor([0, 1]))
    out.router_logits.sum().backward()
    for k, p in model.named_parameters():
        assert (p.grad is not None) == k.startswith("router."), k


def test_router_training_path_refuses_targets_that_do_not_fit():
    model = timm.create_model("ride_resnet32_2e", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    for target, message in (
        (torch.tensor([0, 50]), r"class indices in \[0, 50\], but the logits have C = 10 classes"),
        (torch.tensor([0]), "target has 1 entries but the logits have batch size 2"),
        (torch.tensor([[0.0, 1.0]]), "target must be a 1-D integer tensor of class indices"),
    ):
        with pytest.raises(ValueError, match=message):
            model.forward_router_train(x, target)


@pytest.mark.parametrize("name", FAMILIES)
def test_features_and_head_shapes(name):
    """timm's default-cfg checks: forward_features keeps the spatial pool size, forward_head(pre_logits)
    gives num_features, reset_classifier(0) and (0, '') behave as in timm."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, model.num_features, *cfg["pool_size"])
        assert model.forward_head(features, pre_logits=True).shape == (1, model.num_features)
        assert model.num_features == model.num_experts * model.expert_dim
        model.reset_classifier(0)
        out = model(x)
        assert out.shape == (1, model.num_features)
        model.reset_classifier(0, "")
        out = model(x)
        assert out.shape == (1, model.num_features, *cfg["pool_size"])
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    full = timm.create_model(name).state_dict()
    assert all(c + ".weight" in full for c in cfg["classifier"])
    assert len(cfg["classifier"]) == model.num_experts


@pytest.mark.parametrize("name", FAMILIES)
def test_num_classes_and_reset_classifier(name):
    model = timm.create_model(name, num_classes=42).eval()
    x = torch.randn(2, *FAMILIES[name])
    assert model(x).shape == (2, 42)
    assert len(model.get_classifier()) == model.num_experts
    model.reset_classifier(7)
    assert all(head.weight.shape == (7, model.expert_dim) for head in model.get_classifier())
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.forward_experts(x).shape == (2, model.num_experts, 7)
    assert model.router.top_k == 7  # capped at the class count


@pytest.mark.parametrize("name", FAMILIES)
def test_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    channels = model.feature_info.channels()
    reductions = model.feature_info.reduction()
    assert len(channels) >= 4
    size = FAMILIES[name]
    with torch.no_grad():
        outs = model(torch.randn(1, *size))
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape == (1, c, size[1] // r, size[2] // r)
    # the experts' levels are their maps concatenated along channels
    experts = timm.create_model(name).num_experts
    assert channels[-1] % experts == 0

    last_two = timm.create_model(name, features_only=True, out_indices=(-2, -1)).eval()
    with torch.no_grad():
        tail = last_two(torch.randn(1, *size))
    assert [t.shape[1] for t in tail] == channels[-2:]


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_intermediates(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *FAMILIES[name])
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(intermediates[-1], final)
        assert len(intermediates) == len(model.feature_info)


@pytest.mark.parametrize("name", FAMILIES)
def test_torchscript(name):
    with timm.layers.set_layer_config(scriptable=True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *FAMILIES[name])
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("name", FAMILIES)
def test_fx(name):
    model = timm.create_model(name).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes and eval_nodes
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(2, *FAMILIES[name])
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x))
    extractor = timm.layers.create_feature_extractor(model, return_nodes={eval_nodes[-1]: "out"})
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["out"], model(x))
    # FX traces the modules' own computation: the same numbers, bit for bit, as eager mode running it
    plain = timm.create_model(name, fold_bn=False, fused_experts=False).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(plain)(x), plain(x))


@pytest.mark.parametrize("capture", ["jit.trace", "fx"])
def test_traced_models_read_the_live_weights(capture):
    # Eval forwards keep derived weights (the folded convolutions, the heads' unit-length class vectors)
    # between calls; a trace taken under no_grad must compute them from the parameters, not record the kept
    # tensors as constants (torch.jit.trace did, before the kept weights checked for tracing).
    model = timm.create_model("ride_resnet32_2e", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # the kept weights exist before the trace
        traced = torch.jit.trace(model, x) if capture == "jit.trace" else torch.fx.symbolic_trace(model)
        model.heads[0].weight.mul_(-1.0)
        model.bn1.running_mean.add_(0.3)
        model.experts[1].layer3[0].bn2.running_var.mul_(2.0)
        torch.testing.assert_close(traced(x), model(x))


def test_cosine_heads_keep_their_unit_weights_only_while_they_are_unchanged():
    from ride_models.models.fused_experts import forget_folded_weights

    torch.manual_seed(0)
    model = timm.create_model("ride_resnet32_2e", num_classes=7).eval()
    head = model.heads[1]
    features = torch.randn(4, head.in_features)

    def direct():
        return head.scale * torch.nn.functional.linear(
            torch.nn.functional.normalize(features, dim=1), torch.nn.functional.normalize(head.weight, dim=1)
        )

    with torch.no_grad():
        assert torch.equal(head(features), direct())
        kept = head._unit_weight(features)
        assert head._unit_weight(features) is kept  # kept between calls
        head.weight.mul_(torch.linspace(0.5, 2.0, 7).view(7, 1)).add_(0.1)  # in place: seen
        assert torch.equal(head(features), direct())
        other = timm.create_model("ride_resnet32_2e", num_classes=7)
        model.load_state_dict(other.state_dict())
        assert torch.equal(head(features), direct())
        head.weight.data.mul_(-1.0)  # bypasses the version counter: seen after forget_folded_weights
        forget_folded_weights()
        assert torch.equal(head(features), direct())
    # With gradients recorded, the normalisation is part of the graph and the weight gets its gradient.
    head(features).sum().backward()
    expected = torch.autograd.grad(direct().sum(), head.weight)[0]
    torch.testing.assert_close(head.weight.grad, expected)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    # Checkpointing runs the experts one by one; compare it with the same loop without checkpointing (in
    # turn, as checkpointing runs them: side by side, each kernel on one thread, can round differently).
    model = timm.create_model("ride_resnet32_2e", fused_experts=False, parallel_experts=False).train()
    x = torch.randn(4, 3, 32, 32)
    model(x).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for k, g in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g, msg=k)


@pytest.mark.parametrize("path", ["forward", "forward_intermediates"])
def test_grad_checkpointing_moves_batch_norm_statistics_once_per_step(path):
    # The backward pass recomputes each checkpointed block in training mode; its batch norms must not take a
    # second momentum step (nor count a second batch): the statistics after one step are those of the same
    # step without checkpointing (timm's checkpoint_seq updated them twice).
    torch.manual_seed(0)
    plain = timm.create_model("ride_resnet10_2e", num_classes=5, fused_experts=False).double().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for model in (plain, checkpointed):
        out = model(x) if path == "forward" else model.forward_intermediates(x)[0]
        out.square().mean().backward()
    expected = plain.state_dict()
    for key, value in checkpointed.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-12, atol=1e-12, msg=key)
    assert int(checkpointed.experts[1].layer4[0].bn2.num_batches_tracked) == 1


def _count_checkpoints(monkeypatch) -> list:
    """Record each checkpointed segment: checkpoint_blocks (modules, per stage) and torch's checkpoint (each
    checkpointed block)."""
    from ride_models.models import ride_resnet

    calls = []

    def spy(function, name):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ride_resnet, "checkpoint_blocks", spy(ride_resnet.checkpoint_blocks, "seq"))
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy(torch.utils.checkpoint.checkpoint, "block"))
    return calls


@pytest.mark.parametrize("fused", [True, False])
def test_grad_checkpointing_in_eval_mode_changes_no_number(fused, monkeypatch):
    # Eval mode folds batch norm; checkpointing must not switch that off (the outputs would move by float
    # rounding, and inference under no_grad would lose the folding), only recompute in the backward pass.
    torch.manual_seed(0)
    model = timm.create_model("ride_resnet32_2e", num_classes=10, fused_experts=fused).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        ref_final, ref_levels = model.forward_intermediates(x)
    out = model(x)
    out.sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    model.set_grad_checkpointing(True)
    calls = _count_checkpoints(monkeypatch)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        final, levels = model.forward_intermediates(x)
    assert torch.equal(final, ref_final) and all(map(torch.equal, levels, ref_levels))
    assert calls == []  # nothing to recompute without autograd
    out = model(x)
    assert torch.equal(out, ref) and calls  # same numbers, checkpointed
    out.sum().backward()
    for k, g in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g, msg=k)
    calls.clear()
    final, levels = model.forward_intermediates(x)
    assert torch.equal(final, ref_final) and all(map(torch.equal, levels, ref_levels)) and calls


def test_forward_intermediates_checkpoints_in_training(monkeypatch):
    # A features_only backbone trains through forward_intermediates: checkpointing must act there too.
    # (Checkpointing in training runs the experts one by one: so does the reference.)
    torch.manual_seed(0)
    model = timm.create_model("ride_resnet32_2e", num_classes=10, fused_experts=False).train()
    x = torch.randn(4, 3, 32, 32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    final, _ = model.forward_intermediates(x)
    final.square().mean().backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)

    model.set_grad_checkpointing(True)
    calls = _count_checkpoints(monkeypatch)
    final, _ = model.forward_intermediates(x)
    final.square().mean().backward()
    assert calls.count("seq") == 1 + 2 * 2  # layer1 (shared), then each expert's two stages
    for k, g in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g, msg=k)


# ------------------------------------------------------------------------------------------ RIDE's API
def test_expert_training_output():
    model = timm.create_model("ride_resnet32_3e").train()
    x = torch.randn(4, 3, 32, 32)
    assert isinstance(model(x), torch.Tensor)  # plain timm training by default
    model.set_expert_training(True)
    out = model(x)
    assert isinstance(out, RIDEOutput)
    assert out.expert_logits.shape == (4, 3, 100)
    torch.testing.assert_close(out.logits, out.expert_logits.mean(1))
    model.eval()
    assert isinstance(model(x), torch.Tensor)  # eval always returns the prediction


def test_forward_experts_and_scale():
    model = timm.create_model("ride_resnet32_2e").eval()
    with torch.no_grad():
        z = model.forward_experts(torch.randn(3, 3, 32, 32))
    assert z.shape == (3, 2, 100)
    assert z.abs().max() <= 30.0 + 1e-4  # cosine logits times s = 30
    plain = timm.create_model("ride_resnet32_2e", use_norm=False)
    assert isinstance(plain.heads[0], torch.nn.Linear) and plain.heads[0].bias is not None
    assert plain.scale == 1.0


def test_fixed_k_routing_runs_only_k_experts():
    model = timm.create_model("ride_resnet32_4e").eval()
    x = torch.randn(5, 3, 32, 32)
    calls = [0] * 4
    for i, expert in enumerate(model.experts):
        expert.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    model.set_routing(2)
    assert model.routing == 2
    with torch.no_grad():
        y = model(x)
        assert calls == [1, 1, 0, 0]
        torch.testing.assert_close(y, model.forward_experts(x)[:, :2].mean(1))
    model.set_routing("all")
    assert model.routing == "all"


def _router_model(name="ride_resnet32_4e", bias=0.0):
    """A model whose router always gives the logit ``bias`` (zero weights), marked trained."""
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for p in model.router.parameters():
            p.zero_()
        model.router.fc.bias.fill_(bias)
    model.router.set_trained()
    return model


def test_routing_extremes_and_batch_size_one():
    x = torch.randn(6, 3, 32, 32)
    everyone = _router_model(bias=5.0)  # sigmoid(5) > 0.5: every sample uses every expert
    assert everyone.routing == "router"
    with torch.no_grad():
        y, n = everyone.forward_routed(x)
        torch.testing.assert_close(y, everyone.forward_experts(x).mean(1), atol=1e-5, rtol=1e-6)
    assert n.tolist() == [4] * 6
    nobody = _router_model(bias=-5.0)
    with torch.no_grad():
        y, n = nobody.forward_routed(x)
        torch.testing.assert_close(y, nobody.forward_experts(x, 1)[:, 0])
        out = nobody.route(x)
    assert n.tolist() == [1] * 6
    assert out.router_logits[:, 0].eq(-5.0).all() and out.router_logits[:, 1:].isnan().all()
    with torch.no_grad():
        y1, n1 = everyone.forward_routed(x[:1])
    assert y1.shape == (1, 100) and n1.tolist() == [4]
    # sigmoid(0) = 0.5 is not above the threshold: a zero logit stops, as in the official code
    with torch.no_grad():
        assert _router_model(bias=0.0).forward_routed(x)[1].tolist() == [1] * 6


def test_routed_inference_skips_work_for_stopped_samples():
    """Later experts run only on the samples that continue, and each sample's prediction is the mean of
    the experts it used."""
    model = _router_model()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expert_logits = model.forward_experts(x)  # [8, 4, C]
        top1 = expert_logits[:, 0].max(dim=1).values
        middle = top1.sort().values[3:5]
        cut = middle.mean()  # between two samples: no sample's decision rests on rounding
        model.router.fc.weight[0, 0] = 1.0  # z = (largest mean logit) - cut
        model.router.fc.bias.fill_(-cut)
    seen = [[] for _ in range(4)]
    for i, expert in enumerate(model.experts):
        expert.register_forward_hook(lambda m, inp, out, i=i: seen[i].append(inp[0].shape[0]))
    with torch.no_grad():
        y, n = model.forward_routed(x)
    passing = int((top1 > cut).sum())
    assert 0 < passing < 8
    assert seen[0] == [8] and seen[1] == [passing]
    assert all(sum(s) <= passing for s in seen[2:])
    assert int((n > 1).sum()) == passing
    for i in range(8):
        torch.testing.assert_close(y[i], expert_logits[i, : n[i]].mean(0), atol=1e-5, rtol=1e-6)


def test_routed_experts_keep_the_channels_last_layout():
    # The samples that go on are gathered in the maps' own memory format (index_select gave NCHW maps, which
    # every later expert's first convolutions converted back).
    model = _router_model().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        model.route(x, threshold=0.0)  # every decision sends every sample on
    layouts = []
    for expert in model.experts:
        expert.register_forward_pre_hook(
            lambda m, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last))
        )
    with torch.no_grad():
        out = model.route(x, threshold=0.0)  # with hooks inside, the experts run as modules
    assert out.num_experts.tolist() == [4] * 8 and layouts == [True] * 4


def test_routing_threshold():
    model = _router_model(bias=0.5)  # p = sigmoid(0.5) = 0.62
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_routed(x)[1].tolist() == [4, 4, 4]
        model.set_routing("router", threshold=0.7)
        assert model.forward_routed(x)[1].tolist() == [1, 1, 1]


def test_router_trained_flag_lives_in_the_state_dict(tmp_path):
    trained = _router_model("ride_resnet32_2e")
    path = tmp_path / "model.safetensors"
    save_file(trained.state_dict(), str(path))
    fresh = timm.create_model("ride_resnet32_2e")
    assert fresh.routing == "all"
    fresh.load_state_dict(load_file(str(path)))
    assert fresh.routing == "router" and bool(fresh.router.trained)
    fresh.set_routing("all")  # an explicit choice wins over the flag
    assert fresh.routing == "all"
    fresh.set_routing(None)
    assert fresh.routing == "router"


def test_ten_classes_cap_router_top_k():
    model = timm.create_model("ride_resnet32_4e", num_classes=10).eval()
    assert model.router.top_k == 10 and model.router.fc.in_features == 10 + 16
    model.router.set_trained()
    with torch.no_grad():
        y, n = model.forward_routed(torch.randn(4, 3, 32, 32))
    assert y.shape == (4, 10) and n.shape == (4,)
    assert timm.create_model("ride_resnet50_2e", num_classes=10, router_top_k=5).router.top_k == 5


def test_in_chans_and_any_input_size():
    model = timm.create_model("ride_resnet10_2e", in_chans=1, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 97, 131)).shape == (2, 5)


def test_set_router_training_freezes_and_restores():
    model = timm.create_model("ride_resnet32_2e")
    model.set_router_training(True)
    model.train()
    assert all(p.requires_grad == k.startswith("router.") for k, p in model.named_parameters())
    assert not model.layer1.training and not model.experts.training and model.router.training
    model.set_router_training(False)
    model.train()
    assert all(p.requires_grad != k.startswith("router.") for k, p in model.named_parameters())
    assert model.layer1.training


# ------------------------------------------------------------------------------------------- bad input
def test_wrong_channel_count_is_explained():
    model = timm.create_model("ride_resnet32_2e")
    with pytest.raises(
        ValueError, match=r"expected an image batch of shape \[B, 3, H, W\], got \[2, 1, 32, 32\]"
    ):
        model(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("mode", ["fastest", 0, 5, True, 2.0])
def test_set_routing_rejects_bad_modes(mode):
    model = timm.create_model("ride_resnet32_4e")
    with pytest.raises(ValueError, match="4 experts|'all', 'router'"):
        model.set_routing(mode)


def test_set_routing_k_too_large_names_the_expert_count():
    with pytest.raises(ValueError, match=r"k=5 is out of range: this model has 4 experts"):
        timm.create_model("ride_resnet32_4e").set_routing(5)


def test_set_routing_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        timm.create_model("ride_resnet32_2e").set_routing("router", threshold=1.5)


def test_untrained_router_warns():
    with pytest.warns(UserWarning, match="untrained router"):
        timm.create_model("ride_resnet32_2e").set_routing("router")


def test_load_state_dict_explains_expert_and_class_mismatch():
    other = timm.create_model("ride_resnet32_3e", num_classes=10).state_dict()
    model = timm.create_model("ride_resnet32_4e")
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(other)
    msg = str(err.value)
    assert "experts: the state dict has 3, the model has 4" in msg
    assert "classes: the state dict has 10, the model has 100" in msg
    assert "num_classes=10" in msg


def test_load_state_dict_explains_family_mismatch():
    with torch.device("meta"):
        other = timm.create_model("ride_resnext50_2e").state_dict()
        model = timm.create_model("ride_resnet50_2e")
    with pytest.raises(
        RuntimeError, match="architecture: the state dict has resnext50, the model has resnet50"
    ):
        model.load_state_dict(other)


def test_bad_global_pool():
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("ride_resnet32_2e", global_pool="max")


# --------------------------------------------------------------------- what timm users do with a model
def test_the_router_flag_follows_in_place_copies_at_the_next_mode_switch():
    """timm's ModelEma (and SWA's AveragedModel) copy buffers in place, past set_trained: eval() re-reads
    the flag, as timm's validate does before evaluating the EMA weights."""
    model = timm.create_model("ride_resnet32_4e", num_classes=10)
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    model.router.set_trained()
    ema.update(model, step=1)
    assert bool(ema.module.router.trained) and ema.module.eval().routing == "router"
    copy = timm.create_model("ride_resnet32_4e", num_classes=10)
    copy.router.trained.fill_(True)
    assert copy.eval().routing == "router"
    copy.router.trained.fill_(False)
    assert copy.train().eval().routing == "all"


def test_hooks_of_every_kind_see_their_modules_run():
    """The fused pass and batch-norm folding call no submodule; a hook anywhere makes the modules run."""
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    model = timm.create_model("ride_resnet32_3e", num_classes=10).train()
    model.set_fused_experts(True)
    calls = []
    model.experts[0].layer3[0].conv1.register_full_backward_hook(lambda *a: calls.append("expert"))
    model(x).sum().backward()
    assert calls == ["expert"]
    model.eval()  # batch norm folded into the trunk's convolutions
    model.layer1[0].conv1.register_full_backward_hook(lambda *a: calls.append("trunk"))
    model(x).sum().backward()
    assert calls == ["expert", "expert", "trunk"]

    seen = []
    plain = timm.create_model("ride_resnet32_3e", num_classes=10).eval()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(type(module).__name__)
    )
    try:
        with torch.no_grad():
            plain(x)
    finally:
        handle.remove()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in plain.modules())
    assert seen.count("Conv2d") == convs and seen.count("BatchNorm2d") == convs


@pytest.mark.parametrize("k", [0, -1, 5])
def test_forward_experts_refuses_an_expert_count_out_of_range(k):
    model = timm.create_model("ride_resnet32_4e", num_classes=10).eval()
    with pytest.raises(ValueError, match=f"num_experts={k} is out of range: this model has 4 experts"):
        model.forward_experts(torch.randn(2, 3, 32, 32), k)


def test_a_refused_routing_call_changes_nothing():
    model = timm.create_model("ride_resnet32_4e", num_classes=10)
    model.set_routing(2, threshold=0.4)
    for mode, threshold in [("foo", 0.9), (7, 0.8), (2, 1.5), (2, "high")]:
        with pytest.raises(ValueError):
            model.set_routing(mode, threshold=threshold)
        assert model.routing == 2 and model.routing_threshold == 0.4
    backbone = timm.create_model("ride_resnet32_4e", num_classes=0)
    with pytest.raises(ValueError, match="k=1 needs classifier logits"):
        backbone.set_routing(1)
    assert backbone.routing == "all"


def test_integers_of_any_kind_are_routing_counts():
    model = timm.create_model("ride_resnet32_4e", num_classes=10)
    model.set_routing(np.int64(2))
    assert model.routing == 2 and isinstance(model.routing, int)
    model.set_routing(torch.tensor(3))
    assert model.routing == 3


def test_route_thresholds_are_checked():
    """route() takes the closed interval: 0 sends every sample on, 1 stops every sample."""
    model = timm.create_model("ride_resnet32_4e", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.route(x, threshold=1.0).num_experts.tolist() == [1, 1]
        assert model.route(x, threshold=0.0).num_experts.tolist() == [4, 4]
        for bad in (5.0, -0.1, float("nan"), "a"):
            with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\]"):
                model.route(x, threshold=bad)


def test_reset_classifier_ends_an_explicit_router_setting():
    model = timm.create_model("ride_resnet32_4e", num_classes=10)
    model.router.set_trained()
    model.set_routing("router")
    model.reset_classifier(5)  # a new, untrained router
    assert model.routing == "all"
    model.set_routing(2)
    model.reset_classifier(0)  # a fixed k needs classifiers
    assert model.routing == "all"


def test_scripted_or_traced_routing_says_what_to_do():
    model = timm.create_model("ride_resnet32_3e", num_classes=10).eval()
    model.router.set_trained()
    x = torch.randn(2, 3, 32, 32)
    scripted = torch.jit.script(model)
    with pytest.raises(Exception, match=r"does not run under TorchScript; call model.set_routing\('all'\)"):
        scripted(x)
    with pytest.raises(RuntimeError, match=r"cannot be traced with FX .* call model.set_routing\('all'\)"):
        torch.fx.symbolic_trace(model)
    model.set_routing("all")
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


@pytest.mark.parametrize("name", ["ride_resnet32_3e", "ride_resnet50_2e"])
def test_torch_export(name):
    # torch.export (the path to ONNX and AOTInductor) covers the all-experts forward, batch norm folded.
    model = timm.create_model(name).eval()
    x = torch.randn(2, *FAMILIES[name])
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.skipif(
    not hasattr(torch.compiler, "is_exporting"), reason="torch 2.6 cannot tell an export apart"
)
def test_exported_routing_says_what_to_do():
    model = timm.create_model("ride_resnet32_3e", num_classes=10).eval()
    model.router.set_trained()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match=r"exported with torch.export .* call model.set_routing\('all'\)"):
        torch.export.export(model, (x,))
    model.set_routing(2)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))


@pytest.mark.parametrize("feature_cls", ["hook", "fx"])
def test_features_only_names_the_feature_class_it_supports(feature_cls):
    with pytest.raises(ValueError, match=f"feature_cls='{feature_cls}' is not supported.*'getter'"):
        timm.create_model("ride_resnet32_3e", features_only=True, feature_cls=feature_cls)


@pytest.mark.parametrize("entry", ["route", "forward_features", "forward_experts", "forward_intermediates"])
def test_every_entry_point_explains_a_wrong_input(entry):
    model = timm.create_model("ride_resnet32_3e", num_classes=10).eval()
    for bad, message in [((2, 1, 32, 32), "create the model with in_chans=1"), ((3, 32, 32), r"got \[3, 32")]:
        with pytest.raises(ValueError, match=message):
            getattr(model, entry)(torch.randn(*bad))


@pytest.mark.parametrize("fold_bn", [True, False])
@pytest.mark.parametrize("entry", ["__call__", "route", "forward_features", "forward_intermediates"])
def test_an_input_of_another_dtype_is_named_with_the_fix(entry, fold_bn):
    """PyTorch's own message named a "bias type" (the folded batch norm's) the user never made."""
    model = timm.create_model("ride_resnet32_3e", num_classes=10, fold_bn=fold_bn).eval()
    cases = [
        (torch.float64, r"images are torch.float64, the model.s weights torch.float32: .*\(x.to"),
        (torch.bfloat16, r"model.to\(torch.bfloat16\)\), or run under torch.autocast"),
        (torch.uint8, "convert the images to floats and normalise them"),
    ]
    with torch.no_grad():
        for dtype, message in cases:
            with pytest.raises(ValueError, match=message):
                getattr(model, entry)(torch.zeros(2, 3, 32, 32, dtype=dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no refusal
            getattr(model, entry)(torch.zeros(2, 3, 32, 32, dtype=torch.bfloat16))
        model.double()
        getattr(model, entry)(torch.zeros(2, 3, 32, 32, dtype=torch.float64))
