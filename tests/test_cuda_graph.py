"""CUDA-graph training steps: the same training as eager steps (on a GPU), a clear error without one."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import ride_models  # noqa: F401
from ride_models.engine import RouterTrainStep, make_step
from ride_models.losses import LOSS_NAMES, create_loss

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_without_cuda_the_error_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from ride_models.cuda_graph import GraphedTrainStep

    model = timm.create_model("ride_resnet32_2e", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        GraphedTrainStep(lambda x, y: model(x).sum(), optimizer)


def test_losses_report_their_schedule_state():
    loss = create_loss("ldam_diversity", [50, 20, 5], drw_epoch=2)
    loss.set_epoch(1)
    before = loss.schedule_state()
    loss.set_epoch(2)
    assert loss.schedule_state() == before  # DRW starts after epoch drw_epoch
    loss.set_epoch(3)
    assert loss.schedule_state() != before
    assert create_loss("routing").schedule_state() is None


@pytest.fixture
def deterministic_cudnn():
    # cuDNN's default weight-gradient kernels add in a varying order: two eager runs drift apart by 1e-6
    # after one step, and training on random labels amplifies that to whole units of loss within ten
    # steps. With deterministic kernels, graph replays and eager steps agree (on an H200: every loss of
    # this test equal to 5 decimals).
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@needs_cuda
@pytest.mark.parametrize("fused", [True, False])
def test_graphed_steps_train_as_eager_steps(fused, deterministic_cudnn):
    from ride_models.cuda_graph import GraphedTrainStep

    torch.manual_seed(0)
    counts = [100, 40, 20, 10, 5]
    eager = timm.create_model("ride_resnet32_3e", num_classes=5).cuda().train()
    eager.set_expert_training(True)
    eager.set_fused_experts(fused)
    graphed = copy.deepcopy(eager)
    runs = []
    for model, use_graph in ((eager, False), (graphed, True)):
        loss_fn = create_loss("ldam_diversity", counts, drw_epoch=1).cuda()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        step = make_step("experts", model, loss_fn)
        graph_step = GraphedTrainStep(step, optimizer, model=model, key_fn=loss_fn.schedule_state)
        gen = torch.Generator(device="cuda").manual_seed(1)
        losses = []
        for epoch in (1, 2):  # DRW off, then on: a second recording
            loss_fn.set_epoch(epoch)
            for group in optimizer.param_groups:
                group["lr"] = 0.1 * epoch
            for batch in (16, 16, 16, 16, 16, 12):  # the last, smaller batch: a shape of its own
                x = torch.randn(batch, 3, 32, 32, device="cuda", generator=gen)
                y = torch.randint(0, 5, (batch,), device="cuda", generator=gen)
                if use_graph:
                    losses.append(graph_step(x, y).clone())
                else:
                    loss = step(x, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.detach())
        runs.append(torch.stack(losses))
        if use_graph:
            assert graph_step.recordings >= 2
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    for (k, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5, msg=k)


@needs_cuda
def test_eval_forwards_between_replays_see_the_replayed_weights():
    # Replays move weights without moving their version counters; a model trained in eval mode (frozen
    # batch norm) and evaluated between steps must not reuse the batch-norm folds of the last evaluation.
    from ride_models.cuda_graph import GraphedTrainStep

    torch.manual_seed(0)
    # float64: no TF32 convolutions, so folded and unfolded agree to rounding while a stale fold is far off.
    model = timm.create_model("ride_resnet32_2e", num_classes=5).cuda().double().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = GraphedTrainStep(lambda x, y: F.cross_entropy(model(x), y), optimizer, model=model)
    x = torch.randn(8, 3, 32, 32, device="cuda", dtype=torch.float64)
    y = torch.randint(0, 5, (8,), device="cuda")
    plain = copy.deepcopy(model)
    plain.fold_bn = False
    for _ in range(step.warmup_steps + 3):  # eager steps, a recording, then replays
        step(x, y)
        with torch.no_grad():
            plain.load_state_dict(model.state_dict())
            torch.testing.assert_close(model(x), plain(x), rtol=1e-9, atol=1e-9)
    assert step.recordings == 1


# A CUDA graph records a step only if the step never waits on the device: no ``.item()``, no ``bool(t)``,
# no shape read off a tensor's values. The same operations make torch.compile break its graph, so tracing
# with ``fullgraph=True`` (the "eager" backend: tracing only, nothing compiled) checks, on the CPU, that
# every stage's forward pass and loss would record. One loss per step function, each past its DRW epoch.
_CLASS_COUNTS = [100, 50, 20, 10, 5]
_EXPERT_LOSSES = [n for n in LOSS_NAMES if n not in ("routing", "distill")]


def _traces_as_one_graph(step, x, y) -> None:
    torch._dynamo.reset()
    try:
        traced = torch.compile(step, backend="eager", fullgraph=True)
        eager_loss = step(x, y)
        torch.testing.assert_close(traced(x, y), eager_loss)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("loss_name", [*_EXPERT_LOSSES, "routing", "distill"])
def test_training_steps_do_not_wait_on_the_device(loss_name):
    torch.manual_seed(0)
    model = timm.create_model("ride_resnet32_2e", num_classes=len(_CLASS_COUNTS)).train()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    if loss_name == "routing":
        model.set_router_training(True)
        step = make_step("router", RouterTrainStep(model), create_loss("routing"))
    else:
        model.set_expert_training(True)
        teacher = None
        if loss_name == "distill":
            teacher = timm.create_model("ride_resnet32_2e", num_classes=len(_CLASS_COUNTS)).eval()
        loss_fn = create_loss(loss_name, _CLASS_COUNTS, drw_epoch=1)
        loss_fn.set_epoch(2)
        step = make_step("distill" if teacher is not None else "experts", model, loss_fn, teacher)
    _traces_as_one_graph(step, x, y)


# Routed inference from bucketed graphs. An untrained router sends every sample the same way; this one
# decides per sample from the expert's features and the running mean of the logits (padded rows cannot
# change another sample's route) and spreads the samples over every possible number of experts.
def _per_sample_router(model: torch.nn.Module) -> None:
    model.router.decision = lambda i, features, mean_logits: (
        10 * torch.sin(100 * (i + 1) * features.float().sum(1)) + mean_logits.float().amax(1)
    )


def _assert_same_routing(got, ref) -> None:
    assert torch.equal(got.num_experts, ref.num_experts)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.router_logits, ref.router_logits, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize(
    "name, size, granularity",
    [("ride_resnet32_4e", 32, 1), ("ride_resnet32_4e", 32, 5), ("ride_resnet32_4e", 32, None),
     ("ride_resnet32_4e", 32, 100), ("ride_resnet32_2e", 32, 4), ("ride_resnet50_3e", 64, 6)],
)  # fmt: skip
def test_bucketed_routing_equals_the_eager_cascade(name, size, granularity):
    from ride_models.cuda_graph import GraphedRouting

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    _per_sample_router(model)
    routing = GraphedRouting(model, threshold=0.5, granularity=granularity, record=False)
    for _ in range(2):  # the second batch reuses the first one's buffers
        x = torch.randn(37, 3, size, size)
        with torch.no_grad():
            ref = model.route(x, threshold=0.5)
        _assert_same_routing(routing(x), ref)
    if model.num_experts > 2:
        assert len(ref.num_experts.unique()) > 2, "the test router should spread samples over the experts"


def test_bucketed_routing_errors():
    from ride_models.cuda_graph import GraphedRouting

    model = timm.create_model("ride_resnet32_2e", num_classes=5)
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(RuntimeError, match="model.eval"):
        GraphedRouting(model, record=False)(x)
    with pytest.raises(ValueError, match="granularity"):
        GraphedRouting(model, granularity=0)
    with pytest.raises(RuntimeError, match="num_classes=0"):
        GraphedRouting(timm.create_model("ride_resnet32_2e", num_classes=0))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="record=False"):
            GraphedRouting(model.eval(), record=True)(x)


@needs_cuda
@pytest.mark.parametrize("name, size", [("ride_resnet32_4e", 32), ("ride_resnet50_3e", 64)])
def test_graphed_routing_replays_the_bucketed_cascade(name, size, deterministic_cudnn):
    # Against the same padded cascade run eagerly on the same GPU: the same kernels on the same shapes, so
    # any difference is the recording's. (Against model.route, whose batches have other sizes, cuDNN's
    # kernels differ in the last bits, and this test's router is built to be sensitive to those.)
    from ride_models.cuda_graph import GraphedRouting

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).cuda().eval()
    _per_sample_router(model)
    graphed = GraphedRouting(model, threshold=0.5, granularity=8)
    eager = GraphedRouting(model, threshold=0.5, granularity=8, record=False)
    for _ in range(3):
        x = torch.randn(64, 3, size, size, device="cuda")
        got, ref = graphed(x), eager(x)
        assert torch.equal(got.num_experts, ref.num_experts)
        torch.testing.assert_close(got.logits, ref.logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.router_logits, ref.router_logits, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert len(ref.num_experts.unique()) > 2
    assert graphed.recordings == 1 + (model.num_experts - 1) * 8  # the trunk, then 8 buckets per expert
