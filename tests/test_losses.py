"""Losses against the official RIDE fixtures (values and gradients, fp32 and fp64) and hand computations.

Expected numbers come from ``losses.safetensors`` / ``losses.json`` and the EA ``*_io.safetensors`` files of
the reference folder (official code run unmodified), or are computed by hand in the test with ``math``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ride_models.losses import LOSS_NAMES, RIDELoss, create_loss

# Official case -> (our loss name, our keyword arguments); the epoch comes from losses.json. The mapping is
# the one in docs/losses.md: additional_diversity_factor = -diversity_weight, reweight_factor =
# temperature_reweight, base_diversity_temperature = diversity_temperature, reweight_epoch = drw_epoch.
CASES: dict[str, tuple[str, dict]] = {
    **{
        f"ride_adf-{lam}_rf{rf}_ep{ep}": (
            "ldam_diversity",
            {"diversity_weight": float(lam), "temperature_reweight": float(rf)},
        )
        for lam in ("0.2", "0.45")
        for rf in ("0.05", "0.02")
        for ep in (100, 170)
    },
    "ride_adf-0.45_rf0.05_ep170_listform": ("ldam_diversity", {"diversity_weight": 0.45}),
    "ride_adf0.0_rf0.05_ep100": ("ldam_diversity", {"diversity_weight": 0.0}),
    "ride_adf0.0_rf0.05_ep170": ("ldam_diversity", {"diversity_weight": 0.0}),
    "ride_adf-0.2_rf0.02_T1.5_ep170": (
        "ldam_diversity",
        {"diversity_weight": 0.2, "temperature_reweight": 0.02, "diversity_temperature": 1.5},
    ),
    "ride_imagenetcfg_ep90": (
        "ldam_diversity",
        {"diversity_weight": 0.2, "temperature_reweight": 0.02, "drw_epoch": 80},
    ),
    "ride_no_cls_num_list_ep170": ("ce_diversity", {"diversity_weight": 0.2}),
    "ride_no_extra_info": ("ce", {}),  # the official validation call: plain CE on the mean logits
    "ldam_no_drw": ("ldam", {}),
    "ldam_drw160_ep100": ("ldam_drw", {}),
    "ldam_drw160_ep170": ("ldam_drw", {}),
    "ce_plain": ("ce", {}),
    "ce_reweight": ("ce", {"reweight": True}),
    "focal_gamma1.0": ("focal", {"gamma": 1.0}),
    "focal_gamma2.0": ("focal", {"gamma": 2.0}),
    "distill_cifarcfg_ep100": ("distill", {"official_scaling": True}),
    "distill_cifarcfg_ep170": ("distill", {"official_scaling": True}),
    "distill_imagenetcfg_ep90": (
        "distill",
        {"official_scaling": True, "diversity_weight": 0.2, "temperature_reweight": 0.02, "drw_epoch": 80},
    ),
}
OFFICIAL_CRASHES = {"ride_reweight_false", "ride_reweight_epoch_minus1"}  # quirk 1: no reference values


@pytest.fixture(scope="module")
def ref(reference_dir):
    tensors = load_file(reference_dir / "losses.safetensors")
    cases = {c["name"]: c for c in json.loads((reference_dir / "losses.json").read_text())["cases"]}
    return tensors, cases


def _run(tensors, case, name, kwargs, dtype, cls_num_list="default"):
    counts = tensors["inputs.cls_num_list"] if case["cls_num_list"] is not None else None
    loss = create_loss(name, counts if cls_num_list == "default" else cls_num_list, **kwargs).to(dtype)
    if case["hook_before_epoch"] is not None:
        loss.set_epoch(case["hook_before_epoch"])
    logits = tensors["inputs.expert_logits"].to(dtype, copy=True).requires_grad_()
    args = [list(logits.unbind(1)) if case["name"].endswith("listform") else logits, tensors["inputs.target"]]
    if name == "distill":
        args.append(tensors["inputs.teacher_logits"].to(dtype))
    value = loss(*args)
    value.backward()
    return value.detach(), logits.grad


def test_every_reference_case_is_covered(ref):
    _, cases = ref
    assert set(cases) == set(CASES) | OFFICIAL_CRASHES
    assert ref[0]["inputs.expert_logits"].shape == (16, 3, 100)  # [B, E, C]: the expert axis is dim 1


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_reference_case_fp32(ref, case_name):
    tensors, cases = ref
    value, grad = _run(tensors, cases[case_name], *CASES[case_name], torch.float32)
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value, tensors[f"{case_name}.loss_fp32"], rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, tensors[f"{case_name}.grad_expert_logits_fp32"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_reference_case_fp64(ref, case_name):
    tensors, cases = ref
    value, grad = _run(tensors, cases[case_name], *CASES[case_name], torch.float64)
    assert value.dtype == torch.float64
    # The fp64 references agree with ours to ~1e-13 (values up to 445) and ~1e-16 (gradients).
    torch.testing.assert_close(value, tensors[f"{case_name}.loss_fp64"], rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, tensors[f"{case_name}.grad_expert_logits_fp64"], rtol=0, atol=1e-12)


def test_per_expert_components(ref):
    """losses.json splits the 8 grid cases into base_e and diversity_term_e per expert."""
    tensors, cases = ref
    logits, target = tensors["inputs.expert_logits"], tensors["inputs.target"]
    for case_name, (name, kwargs) in CASES.items():
        components = cases[case_name].get("per_expert_components_fp32")
        if components is None:
            continue
        loss = create_loss(name, tensors["inputs.cls_num_list"], **kwargs)
        loss.set_epoch(cases[case_name]["hook_before_epoch"])
        base = torch.stack([loss.base(logits[:, e], target) for e in range(3)])
        diversity = -loss.diversity_weight * loss.diversity_per_expert(logits, target)
        torch.testing.assert_close(base, torch.tensor(components["base"]), rtol=1e-5, atol=0)
        torch.testing.assert_close(diversity, torch.tensor(components["diversity_term"]), rtol=1e-5, atol=0)


def test_class_buffers_match_official(ref, reference_dir):
    tensors, _ = ref
    counts = tensors["inputs.cls_num_list"]
    temperature_means = json.loads((reference_dir / "losses.json").read_text())
    for rf in ("0.05", "0.02"):
        loss = create_loss("ldam_diversity", counts, temperature_reweight=float(rf))
        official = f"buffers.ride_rf{rf}"
        torch.testing.assert_close(loss.base.margins, tensors[f"{official}.m_list"], rtol=0, atol=1e-7)
        torch.testing.assert_close(
            loss.base.drw_weight, tensors[f"{official}.per_cls_weights_enabled"], rtol=1e-7, atol=0
        )
        torch.testing.assert_close(
            loss.class_temperature,
            tensors[f"{official}.per_cls_weights_enabled_diversity"],
            rtol=0,
            atol=1e-7,
        )
        mean = temperature_means[f"diversity_temperature_mean_rf{rf}_T1"]
        assert float(loss.class_temperature.double().mean()) == pytest.approx(mean, abs=1e-7)
    ce = create_loss("ce", counts, reweight=True)
    torch.testing.assert_close(
        ce.drw_weight, tensors["buffers.ce_reweight.per_cls_weights"], rtol=1e-7, atol=0
    )


@pytest.mark.parametrize(
    "file, num_decisions",
    [("cifar_ea_resnet32_e3", 2), ("cifar_ea_resnet32_e4", 3), ("imagenet_ea_resnet10_e3", 2)],
)
def test_routing_loss_matches_ea_fixtures(reference_dir, file, num_decisions):
    io = load_file(reference_dir / f"{file}_io.safetensors")
    logits, targets = io["expert_help_logits_train_fp32"], io["expert_help_targets"]
    assert logits.shape[1] == num_decisions
    loss = create_loss("routing")
    value = loss(logits, targets.bool())
    assert value.shape == ()  # the official returned shape (1,)
    torch.testing.assert_close(value, io["train_routing_loss_fp32"][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(loss(logits, targets), value, rtol=0, atol=0)  # float 0/1 targets too
    if "bce_per_stage_fp32" in io:  # one decision at a time: the per-decision batch means
        per_stage = torch.stack([loss(logits[:, i], targets[:, i]) for i in range(num_decisions)])
        torch.testing.assert_close(per_stage, io["bce_per_stage_fp32"], rtol=1e-5, atol=0)


def test_official_crash_cases_give_the_unweighted_value(ref):
    """Quirk 1: official reweight=False / reweight_epoch=-1 crash. Ours (drw_epoch=None) never re-weights and
    keeps the scalar temperature, so at any epoch it equals the sum of the official per-expert components of
    the same loss before the re-weighting epoch (ride_adf-0.2_rf0.05_ep100; adf -0.2 is the official default).
    """
    tensors, cases = ref
    components = cases["ride_adf-0.2_rf0.05_ep100"]["per_expert_components_fp32"]
    expected = sum(components["base"]) + sum(components["diversity_term"])
    for case_name in OFFICIAL_CRASHES:
        case = {**cases[case_name], "hook_before_epoch": 170}
        value, grad = _run(
            tensors, case, "ldam_diversity", {"diversity_weight": 0.2, "drw_epoch": None}, torch.float32
        )
        assert math.isfinite(float(value)) and bool(grad.isfinite().all())
        assert float(value) == pytest.approx(expected, rel=1e-5)
        torch.testing.assert_close(
            value.detach(), tensors["ride_adf-0.2_rf0.05_ep100.loss_fp32"], rtol=1e-5, atol=0
        )


@pytest.mark.parametrize(
    "epoch, components_of", [(100, "ride_adf-0.2_rf0.05_ep100"), (170, "ride_adf-0.2_rf0.05_ep170")]
)
def test_zero_weight_without_the_ensemble_quirk(ref, epoch, components_of):
    """Quirk 3 off: diversity_weight=0 then gives sum_e base(expert e), the official per-expert base terms."""
    tensors, cases = ref
    case = {**cases["ride_adf0.0_rf0.05_ep100"], "hook_before_epoch": epoch}
    kwargs = {"diversity_weight": 0.0, "zero_weight_uses_ensemble": False}
    value, _ = _run(tensors, case, "ldam_diversity", kwargs, torch.float32)
    assert float(value) == pytest.approx(
        sum(cases[components_of]["per_expert_components_fp32"]["base"]), rel=1e-5
    )


@pytest.mark.parametrize(
    "case_name", ["distill_cifarcfg_ep100", "distill_cifarcfg_ep170", "distill_imagenetcfg_ep90"]
)
def test_distill_default_scaling(ref, case_name):
    """Default: RIDE loss once plus one T^2 * KL term (losses.json's decomposition of the official value)."""
    tensors, cases = ref
    kwargs = {k: v for k, v in CASES[case_name][1].items() if k != "official_scaling"}
    value, _ = _run(tensors, cases[case_name], "distill", kwargs, torch.float32)
    parts = cases[case_name]["decomposition"]
    expected = parts["ride_loss_once"] + 1.5**2 * parts["kl_teacher_student_mean_T"]
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_single_output_losses_accept_mean_logits_and_lists(ref):
    tensors, cases = ref
    target, counts = tensors["inputs.target"], tensors["inputs.cls_num_list"]
    expected = tensors["ldam_no_drw.loss_fp32"]
    loss = create_loss("ldam", counts)
    for logits in (
        tensors["inputs.output_logits_fp32"],  # [B, C] used as is
        tensors["inputs.expert_logits"],  # [B, E, C]: mean over experts
        list(tensors["inputs.expert_logits"].unbind(1)),  # E x [B, C]
    ):
        torch.testing.assert_close(loss(logits, target), expected, rtol=1e-5, atol=0)
    collaborative = create_loss("ldam_collaborative", counts)
    torch.testing.assert_close(
        collaborative(tensors["inputs.expert_logits"], target), expected, rtol=1e-5, atol=0
    )


def test_set_epoch_switches_strictly_after_drw_epoch(ref):
    tensors, _ = ref
    logits, target, counts = (
        tensors["inputs.expert_logits"],
        tensors["inputs.target"],
        tensors["inputs.cls_num_list"],
    )
    for name, kwargs, before, after in [
        ("ldam_drw", {}, "ldam_drw160_ep100", "ldam_drw160_ep170"),
        ("ldam_diversity", {}, "ride_adf-0.45_rf0.05_ep100", "ride_adf-0.45_rf0.05_ep170"),
    ]:
        loss = create_loss(name, counts, **kwargs)
        for epoch, case_name in [(1, before), (160, before), (161, after), (200, after)]:
            loss.set_epoch(epoch)
            torch.testing.assert_close(
                loss(logits, target), tensors[f"{case_name}.loss_fp32"], rtol=1e-5, atol=0
            )


# --- The paper's variants, by hand: C = 2 classes with counts [3, 1], gamma = temperature_reweight = 0.5 ---
# beta_c = gamma * C * n_c / N = [0.75, 0.25]; T_c = (beta_c + 1 - gamma) / max = [1.25, 0.75] / 1.25,
# so T = [1, 0.6] and mean_c T_c = 0.8. Sample A is of class 1 with experts z_1 = [1, 0], z_2 = [0, 1];
# sample B is of class 0 with the experts swapped; both ensembles are [0.5, 0.5]. Each sample's base loss is
# CE(z_1) + CE(z_2) = 2 log(1 + e) - 1, so the DRW-weighted batch mean is that value too.


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _both_ways(p, q):
    return _kl(p, q) + _kl(q, p)


_BASE = 2 * math.log(1 + math.e) - 1
_HAND = {
    # official: every class logit divided by its own T_c, KL(ensemble || expert), times mean(T)^2; by symmetry
    # samples A and B give the same value.
    ("per_class", "ensemble"): 0.8**2
    * (
        _kl(_softmax([0.5 / 1.0, 0.5 / 0.6]), _softmax([1 / 1.0, 0 / 0.6]))
        + _kl(_softmax([0.5 / 1.0, 0.5 / 0.6]), _softmax([0 / 1.0, 1 / 0.6]))
    ),
    ("per_class", "pairwise"): 0.8**2 * _both_ways(_softmax([1, 0]), _softmax([0, 1 / 0.6])),
    # paper, equation 3 per sample: the target class's temperature for all logits (A: 0.6, B: 1), times its
    # square; the batch mean of A and B.
    ("per_sample", "ensemble"): (
        0.6**2 * (_kl([0.5, 0.5], _softmax([1 / 0.6, 0])) + _kl([0.5, 0.5], _softmax([0, 1 / 0.6])))
        + 1.0**2 * (_kl([0.5, 0.5], _softmax([0, 1])) + _kl([0.5, 0.5], _softmax([1, 0])))
    )
    / 2,
    # paper, equation 2: 1/(E-1) sum_{j != e} KL(Q_e || Q_j) summed over e (E - 1 = 1 here)
    ("per_sample", "pairwise"): (
        0.6**2 * _both_ways(_softmax([1 / 0.6, 0]), _softmax([0, 1 / 0.6]))
        + 1.0**2 * _both_ways(_softmax([0, 1]), _softmax([1, 0]))
    )
    / 2,
}


@pytest.mark.parametrize("temperature_mode, kl_mode", sorted(_HAND))
def test_paper_variants_by_hand(temperature_mode, kl_mode):
    loss = create_loss(
        "ce_diversity",
        [3, 1],
        drw_epoch=0,
        diversity_weight=0.5,
        temperature_reweight=0.5,
        temperature_mode=temperature_mode,
        kl_mode=kl_mode,
    ).double()
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    target = torch.tensor([1, 0])
    loss.set_epoch(1)
    expected = _BASE - 0.5 * _HAND[temperature_mode, kl_mode]
    assert float(loss(logits, target)) == pytest.approx(expected, abs=1e-12)
    # Before the switch every mode uses the scalar base temperature 1: KL([.5, .5] || softmax([1, 0])) twice,
    # or the KL between softmax([1, 0]) and softmax([0, 1]) in both directions.
    loss.set_epoch(0)
    if kl_mode == "ensemble":
        before = 2 * _kl([0.5, 0.5], _softmax([1, 0]))
    else:
        before = _both_ways(_softmax([1, 0]), _softmax([0, 1]))
    assert float(loss(logits, target)) == pytest.approx(_BASE - 0.5 * before, abs=1e-12)


def test_pairwise_averages_over_the_other_experts():
    """E = 3, scalar T = 1, class 0, experts a = [1, 0], a, b = [0, 1]: experts 1 and 2 each get
    (KL(a || a) + KL(a || b)) / 2, expert 3 gets (KL(b || a) + KL(b || a)) / 2; base 3 log(1 + e) - 2."""
    a, b = _softmax([1, 0]), _softmax([0, 1])
    expected = 3 * math.log(1 + math.e) - 2 - (_kl(a, b) / 2 + _kl(a, b) / 2 + _kl(b, a))
    loss = create_loss("ce_diversity", None, kl_mode="pairwise", diversity_weight=1.0).double()
    logits = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    assert float(loss(logits, torch.tensor([0]))) == pytest.approx(expected, abs=1e-12)


def test_pairwise_gradient_flows_through_every_expert():
    loss = create_loss("ce_diversity", None, kl_mode="pairwise", diversity_weight=1.0).double()
    logits = torch.randn(4, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3])
    assert torch.autograd.gradcheck(lambda z: loss(z, target), (logits.requires_grad_(),))


def test_focal_drw_weighting_by_hand():
    """Our convention for re-weighted focal: sum_b w_{y_b} f_b / sum_b w_{y_b} with unweighted f_b."""
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in (3, 1)]
    weights = [2 * r / sum(raw) for r in raw]  # normalised to sum to C = 2
    ce = [
        math.log(1 + math.exp(-2.0)),
        math.log(1 + math.exp(-1.0)),
    ]  # class 0 with [2, 0], class 1 with [0, 1]
    focal = [(1 - math.exp(-c)) * c for c in ce]  # gamma = 1
    expected = (weights[0] * focal[0] + weights[1] * focal[1]) / (weights[0] + weights[1])
    loss = create_loss("focal", [3, 1], gamma=1.0, drw_epoch=0).double()
    loss.set_epoch(1)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert float(loss(logits, torch.tensor([0, 1]))) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["ce", "ldam_drw", "ldam_diversity", "distill"])
def test_bf16_autocast_computes_in_float32(ref, name):
    tensors, _ = ref
    logits_bf16 = tensors["inputs.expert_logits"].bfloat16()
    args = [tensors["inputs.target"]] + (
        [tensors["inputs.teacher_logits"].bfloat16()] if name == "distill" else []
    )
    kwargs = {"kl_mode": "pairwise"} if name == "ldam_diversity" else {}
    loss = create_loss(name, tensors["inputs.cls_num_list"], **kwargs)
    loss.set_epoch(170)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits_bf16, *args)
    assert value.dtype == torch.float32
    fp32_args = [a.float() if a.is_floating_point() else a for a in args]
    torch.testing.assert_close(value, loss(logits_bf16.float(), *fp32_args), rtol=1e-6, atol=0)
    # bf16 rounding of logits up to 30 moves them by up to 0.06; the loss stays within 1 %.
    assert float(value) == pytest.approx(float(loss(tensors["inputs.expert_logits"], *fp32_args)), rel=1e-2)


def test_routing_under_autocast():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]]).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = create_loss("routing")(logits, torch.tensor([[True, False], [False, True]]))
    assert value.dtype == torch.float32
    # By hand: BCE-with-logits, pos_weight 100: target 1 -> 100 * softplus(-z), target 0 -> softplus(z);
    # mean over the 2 x 2 entries. bfloat16 keeps 8 significant bits: 0.3 = 1.0011001|1001.. x 2^-2 rounds
    # up to 1.0011010 x 2^-2 = 0.30078125; -1, 2 and 0.5 are exact.
    #   decision 0: (100 * softplus(-0.30078125) + softplus(2)) / 2 = 28.764607
    #   decision 1: (softplus(-1) + 100 * softplus(-0.5)) / 2     = 23.860480
    # mean 26.312543 (with 0.3 unrounded it would be 26.320853).
    assert float(value) == pytest.approx(26.312543, rel=1e-6)


def test_buffers_follow_dtype_and_device(ref):
    tensors, _ = ref
    loss = create_loss("distill", tensors["inputs.cls_num_list"])
    ride = loss.base
    fp32_margins = ride.base.margins.clone()
    assert isinstance(ride, RIDELoss) and fp32_margins.dtype == torch.float32
    loss.to(torch.float64)
    assert {b.dtype for b in (ride.base.margins, ride.base.drw_weight, ride.class_temperature)} == {
        torch.float64
    }
    # Re-derived from the counts, not up-cast float32 values: the float64 margins of n_c^(-1/4), rarest 0.5.
    assert float(ride.base.margins[0]) == pytest.approx(0.5 * (5 / 500) ** 0.25, rel=1e-15, abs=0)
    loss.to(torch.float32)
    assert torch.equal(ride.base.margins, fp32_margins)
    loss.to("meta")
    assert {b.device.type for b in loss.buffers()} == {"meta"}


# --- Bad input: a clear error naming what was expected, what was given, how to fix it ---


def test_unknown_loss_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        create_loss("nope")
    assert "'nope'" in str(error.value)
    assert all(name in str(error.value) for name in LOSS_NAMES)


def test_unknown_keyword_lists_the_accepted_ones():
    with pytest.raises(TypeError, match=r"'ce' accepts: reweight=False, drw_epoch=None"):
        create_loss("ce", gamma=2.0)


@pytest.mark.parametrize(
    "counts, match",
    [
        ([10, 0, 5], r"positive count for every class; class\(es\) \[1\] have \[0\]"),
        ([10, -3, 5], r"class\(es\) \[1\] have \[-3\]"),
        ([[10, 5]], r"flat list of per-class"),
    ],
)
def test_bad_class_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        create_loss("ldam", counts)


def test_class_count_length_must_match_the_logits():
    loss = create_loss("ldam_diversity", [10, 5, 2])
    with pytest.raises(ValueError, match=r"cls_num_list has 3 classes but the logits have C = 4"):
        loss(torch.zeros(2, 3, 4), torch.tensor([0, 1]))


def test_temperature_reweight_too_large(ref):
    counts = ref[0]["inputs.cls_num_list"]
    create_loss("ldam_diversity", counts, temperature_reweight=1.0)  # still positive for every class
    # T_c > 0 needs gamma < 1 / (1 - C * n_min / N) = 1 / (1 - 100 * 5 / 10847) = 1.0483.
    with pytest.raises(ValueError, match=r"temperature_reweight=2.0 .* non-positive .* \(-.*, 1.048\)"):
        create_loss("ldam_diversity", counts, temperature_reweight=2.0)


@pytest.mark.parametrize("bad", [[0, 4], [-1, 0]])
def test_target_out_of_range(bad):
    for name in ("ce", "ce_diversity"):
        with pytest.raises(ValueError, match=r"logits have C = 4 classes \(valid indices 0..3\)"):
            create_loss(name)(torch.zeros(2, 3, 4), torch.tensor(bad))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype_gives_the_reference_value(ref, dtype):
    tensors, cases = ref
    for case_name in ("ce_plain", "ldam_drw160_ep170", "ride_adf-0.45_rf0.05_ep170"):
        name, kwargs = CASES[case_name]
        loss = create_loss(name, tensors["inputs.cls_num_list"], **kwargs)
        loss.set_epoch(cases[case_name]["hook_before_epoch"] or 1)
        value = loss(tensors["inputs.expert_logits"], tensors["inputs.target"].to(dtype))
        torch.testing.assert_close(value, tensors[f"{case_name}.loss_fp32"], rtol=1e-5, atol=0)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match=r"need every expert's logits \[B, E, C\].*shape \(2, 4\)"):
        create_loss("ce_diversity")(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"1-D integer tensor of class indices"):
        create_loss("ce")(torch.zeros(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"target must be a tensor of class indices \[B\]; got list"):
        create_loss("ce")(torch.zeros(2, 4), [0, 1])
    with pytest.raises(ValueError, match=r"LDAM needs cls_num_list"):
        create_loss("ldam_diversity")
    with pytest.raises(ValueError, match=r"reweight_epoch=-1 means 'never', which is drw_epoch=None"):
        create_loss("ldam", [3, 1], drw_epoch=-1)
    with pytest.raises(ValueError, match=r"same shape \[B, E-1\]"):
        create_loss("routing")(torch.zeros(4, 2), torch.zeros(4, 3))


def test_every_loss_has_set_epoch():
    for name in LOSS_NAMES:
        loss = create_loss(name, [3, 1])
        loss.set_epoch(5)
        assert isinstance(loss, torch.nn.Module)
