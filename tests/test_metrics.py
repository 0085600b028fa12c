"""ride_models.metrics against hand computations written out here."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import timm
import torch

import ride_models  # noqa: F401  (registers the models)
from ride_models.data import DIGITS_CONFIG, DeviceDataLoader, create_dataset, dataset_images
from ride_models.flops import MacsBreakdown, count_macs
from ride_models.metrics import (
    EvalResult,
    accuracy,
    evaluate,
    expected_calibration_error,
    experts_histogram,
    format_table,
    parse_routing,
    per_class_accuracy,
    shot_accuracy,
    topk_predictions,
)
from ride_models.models import RoutedOutput

# ------------------------------------------------------------------------------------------- accuracy


def test_accuracy_top1_top2_and_k_beyond_the_classes():
    logits = torch.tensor(
        [
            [0.1, 0.7, 0.2],  # ranking 1, 2, 0; target 1: top-1 right
            [0.5, 0.3, 0.2],  # ranking 0, 1, 2; target 2: right only in the top 3
            [0.2, 0.3, 0.5],  # ranking 2, 1, 0; target 1: right in the top 2
            [0.6, 0.3, 0.1],  # ranking 0, 1, 2; target 0: top-1 right
        ]
    )
    target = torch.tensor([1, 2, 1, 0])
    # top-1: samples 0 and 3 = 2/4; top-2: + sample 2 = 3/4; top-5 is top-3 here (3 classes) = 4/4.
    assert accuracy(logits, target, topk=(1, 2, 5)) == pytest.approx([50.0, 75.0, 100.0])


def test_ties_go_to_the_lower_class_index_as_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    # Classes 1, 2 and 4 tie at 3.0: ranked 1, 2, 4, then 0 (1.0), then 3 (0.0).
    assert topk_predictions(logits, 5).tolist() == [[1, 2, 4, 0, 3]]
    # Target 2 is in the tie but not first: top-1 wrong, top-2 right.
    assert accuracy(logits, torch.tensor([2]), topk=(1, 2)) == [0.0, 100.0]
    assert accuracy(logits, torch.tensor([1]), topk=(1,)) == [100.0]


def test_accuracy_takes_a_label_column_an_array_or_a_list():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.3, 0.3, 0.4]])  # argmax 1, 0, 2
    # targets 1, 2, 2: samples 0 and 2 right = 2/3; the top 2 of sample 1 are 0, then 1 (tie, lower index):
    # 2 is not among them, so top-2 is also 2/3.
    expected = pytest.approx([200 / 3, 200 / 3])
    assert accuracy(logits, torch.tensor([[1], [2], [2]]), topk=(1, 2)) == expected  # [B, 1]
    assert accuracy(logits, np.array([1, 2, 2]), topk=(1, 2)) == expected
    assert accuracy(logits, [1, 2, 2], topk=(1, 2)) == expected


def test_accuracy_refuses_bad_logits_and_targets():
    logits = torch.eye(3) * 5
    # Class 3 of 3 classes used to count as a plain miss.
    with pytest.raises(ValueError, match=r"class indices in \[1, 3\], but the logits have C = 3.*0\.\.2"):
        accuracy(logits, torch.tensor([1, 2, 3]), topk=(1,))
    with pytest.raises(ValueError, match=r"class indices in \[-1, 1\]"):
        accuracy(logits, torch.tensor([0, 1, -1]), topk=(1,))
    # Per-expert logits [B, E, C] (forward_experts), here with B == E == 3.
    with pytest.raises(ValueError, match=r"logits must be \[B, C\].*\(3, 3, 4\).*logits\.mean\(dim=1\)"):
        accuracy(torch.zeros(3, 3, 4), torch.tensor([0, 1, 2]), topk=(1,))
    with pytest.raises(
        ValueError, match=r"integer tensor of class indices.*torch\.float32.*target\.long\(\)"
    ):
        accuracy(logits, torch.tensor([0.0, 1.0, 2.0]), topk=(1,))
    with pytest.raises(ValueError, match=r"shape \(3, 3\).*not one-hot"):
        accuracy(logits, torch.eye(3, dtype=torch.long), topk=(1,))
    with pytest.raises(ValueError, match="target has 2 entries but the logits have batch size 3"):
        accuracy(logits, torch.tensor([0, 1]), topk=(1,))
    with pytest.raises(ValueError, match=r"topk must be whole numbers k >= 1.*\(0, 1\)"):
        accuracy(logits, torch.tensor([0, 1, 2]), topk=(0, 1))


# ------------------------------------------------------------------------------------ per-class, shots


def test_per_class_accuracy_with_an_absent_class():
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 1, 2, 2, 0])
    # class 0: samples 0 (right), 5 (wrong) -> 50; class 1: samples 1 (wrong), 2 (right) -> 50;
    # class 2: samples 3, 4 (both right) -> 100; class 3: no image -> NaN.
    acc = per_class_accuracy(pred, target, num_classes=4)
    np.testing.assert_allclose(acc, [50.0, 50.0, 100.0, np.nan])
    # numpy input gives the same
    np.testing.assert_allclose(per_class_accuracy(pred.numpy(), target.numpy(), 4), acc)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\].*valid indices 0\.\.2"):
        per_class_accuracy([0, 1], [0, 3], num_classes=3)


def test_per_class_accuracy_refuses_float_and_bool_labels():
    # 0.9 used to be truncated to class 0 (and counted right).
    with pytest.raises(
        ValueError, match=r"integer tensor of class indices.*torch\.float32.*target\.long\(\)"
    ):
        per_class_accuracy(torch.tensor([0]), torch.tensor([0.9]), 3)
    with pytest.raises(ValueError, match=r"torch\.bool"):
        per_class_accuracy(torch.tensor([0, 1]), torch.tensor([False, True]), 3)
    # A label column [N, 1] reads as [N]: class 0 right, class 2 wrong.
    np.testing.assert_allclose(per_class_accuracy([0, 1], torch.tensor([[0], [2]]), 3), [100.0, np.nan, 0.0])


def test_shot_accuracy_is_the_mean_over_classes_with_the_official_thresholds():
    counts = [500, 150, 101, 100, 50, 20, 19, 5]
    acc = np.array([80.0, 60.0, 40.0, 30.0, np.nan, 10.0, 20.0, 0.0])
    # many: > 100 images -> classes 0, 1, 2: (80 + 60 + 40) / 3 = 60
    # medium: 20..100 -> classes 3, 4, 5; class 4 has no eval image: (30 + 10) / 2 = 20
    # few: < 20 -> classes 6, 7: (20 + 0) / 2 = 10
    assert shot_accuracy(acc, counts) == pytest.approx({"many": 60.0, "medium": 20.0, "few": 10.0})


def test_shot_accuracy_of_an_empty_split_is_nan():
    shots = shot_accuracy(np.array([100.0, 0.0]), [200, 150])  # two many-shot classes, nothing else
    assert shots["many"] == 50.0
    assert math.isnan(shots["medium"]) and math.isnan(shots["few"])


def test_shot_accuracy_checks_the_class_count():
    with pytest.raises(ValueError, match="3 class counts for 2"):
        shot_accuracy(np.array([1.0, 2.0]), [1, 2, 3])


def test_shot_accuracy_refuses_negative_nan_and_fractional_counts():
    acc = np.array([10.0, 20.0, 30.0])
    for counts in ([200, -5, 5], [200, math.nan, 5], [200, 50.5, 5]):  # were filed under few / medium
        with pytest.raises(ValueError, match=r"training images per class \(whole numbers, >= 0\)"):
            shot_accuracy(acc, counts)


def test_shot_accuracy_files_a_class_without_training_images_as_few():
    # class 0: 200 -> many; classes 1 (0 images) and 2 (5) -> few: (20 + 30) / 2 = 25; no medium class.
    shots = shot_accuracy(np.array([10.0, 20.0, 30.0]), np.array([200.0, 0.0, 5.0]))  # whole floats are fine
    assert shots["many"] == 10.0 and shots["few"] == 25.0 and math.isnan(shots["medium"])


# ------------------------------------------------------------------------------------------------- ECE


def test_ece_hand_computed_15_bins():
    confidence = torch.tensor([0.95, 0.97, 0.55, 0.58, 0.30])
    correct = torch.tensor([True, False, True, True, False])
    # Bin width 1/15 = 0.0667; bin b holds (b/15, (b+1)/15].
    #   0.95, 0.97 -> bin 14 (0.933, 1]:     accuracy 1/2, confidence 0.96,  |0.5 - 0.96| * 2/5 = 0.184
    #   0.55, 0.58 -> bin 8 (0.533, 0.6]:    accuracy 1,   confidence 0.565, |1 - 0.565| * 2/5 = 0.174
    #   0.30       -> bin 4 (0.267, 0.333]:  accuracy 0,   confidence 0.3,   |0 - 0.3| * 1/5   = 0.060
    # ECE = 0.418 = 41.8 %
    assert expected_calibration_error(confidence, correct) == pytest.approx(41.8)


def test_ece_of_a_calibrated_bin_is_zero():
    # 10 predictions at confidence 0.7, 7 right: accuracy equals confidence.
    assert expected_calibration_error(torch.full((10,), 0.7), torch.arange(10) < 7) == pytest.approx(
        0.0, abs=1e-4
    )


def test_ece_bin_edges_belong_to_the_lower_bin():
    # 2 bins, [0, 0.5] and (0.5, 1]: 0.5 goes to the lower bin.
    #   bin 0: {0.5, right}  -> |1 - 0.5| * 1/2 = 0.25;  bin 1: {0.75, wrong} -> |0 - 0.75| * 1/2 = 0.375
    # (were 0.5 in the upper bin: |0.5 - 0.625| = 0.125)
    ece = expected_calibration_error(torch.tensor([0.5, 0.75]), torch.tensor([1, 0]), n_bins=2)
    assert ece == pytest.approx(62.5)


def test_ece_with_one_bin_is_the_gap_between_accuracy_and_mean_confidence():
    # accuracy 2/4 = 0.5, mean confidence (0.9 + 0.8 + 0.6 + 0.5) / 4 = 0.7: ECE 20 %
    ece = expected_calibration_error(torch.tensor([0.9, 0.8, 0.6, 0.5]), torch.tensor([1, 1, 0, 0]), n_bins=1)
    assert ece == pytest.approx(20.0)


def test_ece_takes_confidences_0_and_1_and_float_correct():
    # 15 bins: 0.0 goes to the first bin, 1.0 to the last.
    #   bin 14: {1.0 right, 1.0 wrong}: |0.5 - 1.0| * 2/4 = 0.25
    #   bin 0:  {0.0 wrong, 0.0 right}: |0.5 - 0.0| * 2/4 = 0.25;  ECE = 0.5 = 50 %
    ece = expected_calibration_error(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert ece == pytest.approx(50.0)


def test_ece_refuses_bad_input():
    conf, right = torch.tensor([0.5, 0.8]), torch.tensor([True, False])
    for n_bins in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"n_bins must be a whole number of bins >= 1.*got {n_bins}"):
            expected_calibration_error(conf, right, n_bins=n_bins)
    with pytest.raises(ValueError, match=r"probability in \[0, 1\], got values in \[0.5, 3.5\].*softmax"):
        expected_calibration_error(torch.tensor([0.5, 3.5]), right)
    with pytest.raises(ValueError, match=r"got values in \[-0.1, 0.8\]"):
        expected_calibration_error(torch.tensor([-0.1, 0.8]), right)
    with pytest.raises(ValueError, match="confidence must be finite; 1 of 2 values are NaN or inf"):
        expected_calibration_error(torch.tensor([math.nan, 0.8]), right)
    with pytest.raises(ValueError, match=r"correct must be bool or 0/1.*\[0, 2\].*pred == target"):
        expected_calibration_error(conf, torch.tensor([2, 0]))


# ------------------------------------------------------------------------------------ small utilities


def test_experts_histogram():
    assert experts_histogram(torch.tensor([1, 3, 3, 2, 3]), 4) == [1, 1, 3, 0]
    with pytest.raises(ValueError, match="1..2"):
        experts_histogram(torch.tensor([3]), 2)


def test_parse_routing():
    assert parse_routing("all") == "all"
    assert parse_routing("router") == "router"
    assert parse_routing("2") == 2
    for bad in ("0", "some", "-1"):
        with pytest.raises(ValueError, match="'all', 'router' or a number"):
            parse_routing(bad)


# ----------------------------------------------------------------------------------------- evaluate

# A 6-class, 3-expert case. Training counts: many (> 100) = classes 0, 1; medium (20..100) = 2, 4;
# few (< 20) = 3, 5 (not sorted by class index, on purpose: the splits follow the counts).
CLASS_COUNTS = [150, 120, 60, 10, 30, 5]
TARGETS = [0, 1, 2, 3, 4, 4]
# Routed softmax probabilities of each sample (rows sum to 1) and the experts the router used.
ROUTED_PROBS = [
    [0.90, 0.02, 0.02, 0.02, 0.02, 0.02],  # target 0: predicts 0 (right), confidence 0.90
    [0.07, 0.65, 0.07, 0.07, 0.07, 0.07],  # target 1: predicts 1 (right), confidence 0.65
    [0.03, 0.03, 0.85, 0.03, 0.03, 0.03],  # target 2: predicts 2 (right), confidence 0.85
    [0.20, 0.50, 0.15, 0.01, 0.09, 0.05],  # target 3: predicts 1 (wrong), 3 ranks last: not in the top 5
    [0.06, 0.06, 0.06, 0.06, 0.70, 0.06],  # target 4: predicts 4 (right), confidence 0.70
    [0.075, 0.075, 0.075, 0.075, 0.25, 0.45],  # target 4: predicts 5 (wrong), 4 ranks second
]
ROUTED_EXPERTS = [1, 2, 1, 3, 3, 2]
# With every expert (or the first k), every sample is right with confidence 0.9.
ALL_PROBS = [[0.9 if c == t else 0.02 for c in range(6)] for t in TARGETS]
# A made-up MACs breakdown: shared 1000, experts 300 each, classifiers 6 each, decisions 50 each.
MACS = MacsBreakdown(shared=1000, experts=(300, 300, 300), classifiers=(6, 6, 6), router=(50, 50))


@pytest.fixture()
def scripted_model():
    """A real 3-expert RIDE model whose outputs are replaced by the table above (the input's first pixel is
    the sample number), so evaluate's bookkeeping can be checked by hand."""
    model = timm.create_model("ride_resnet32_3e", num_classes=6)
    model.router.set_trained()
    routed_logits, all_logits = torch.tensor(ROUTED_PROBS).log(), torch.tensor(ALL_PROBS).log()

    def sample_ids(x):
        return x[:, 0, 0, 0].long()

    def route(x, threshold=None):
        i = sample_ids(x)
        return RoutedOutput(routed_logits[i], torch.tensor(ROUTED_EXPERTS)[i], torch.zeros(len(i), 2))

    model.route = route
    model.forward = lambda x: all_logits[sample_ids(x)]
    return model


def scripted_loader():
    x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 32, 32)
    y = torch.tensor(TARGETS)
    return [(x[:4], y[:4]), (x[4:], y[4:])]  # two batches


def test_evaluate_routed_hand_computed(scripted_model):
    r = evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing="router", macs=MACS)
    assert r.routing == "router" and r.num_images == 6 and r.num_experts == 3
    # top-1: samples 0, 1, 2, 4 right = 4/6; top-5: all but sample 3 = 5/6
    assert r.top1 == pytest.approx(400 / 6)
    assert r.top5 == pytest.approx(500 / 6)
    # per class: 0: 100, 1: 100, 2: 100, 3: 0, 4: 1 of 2 = 50, 5: no image
    np.testing.assert_allclose(r.per_class_top1, [100, 100, 100, 0, 50, np.nan])
    np.testing.assert_array_equal(r.per_class_images, [1, 1, 1, 1, 2, 0])
    # many (0, 1): 100; medium (2, 4): (100 + 50) / 2 = 75; few (3, 5): class 3 only = 0
    assert (r.many_top1, r.medium_top1, r.few_top1) == pytest.approx((100.0, 75.0, 0.0))
    # ECE: the six confidences 0.90, 0.65, 0.85, 0.50, 0.70, 0.45 each sit in a bin of their own
    # (bins 13, 9, 12, 7, 10, 6), so ECE = mean |right - confidence|
    #   = (0.10 + 0.35 + 0.15 + 0.50 + 0.30 + 0.45) / 6 = 1.85 / 6 = 30.833 %
    assert r.ece == pytest.approx(185 / 6, abs=1e-4)
    # experts: (1 + 2 + 1 + 3 + 3 + 2) / 6 = 2; by the sample's class: many (samples 0, 1) 1.5,
    # medium (samples 2, 4, 5) 2, few (sample 3) 3
    assert r.experts_mean == pytest.approx(2.0)
    assert r.experts_per_split == pytest.approx({"many": 1.5, "medium": 2.0, "few": 3.0})
    assert r.experts_counts == {"all": [2, 2, 2], "many": [1, 1, 0], "medium": [1, 1, 1], "few": [0, 0, 1]}
    np.testing.assert_allclose(r.per_class_experts, [1, 2, 1, 3, 2.5, np.nan])
    # MACs of an image that used n experts (n decisions, at most E - 1 = 2):
    #   1: 1000 + 300 + 6 + 50 = 1356;  2: 1000 + 600 + 12 + 100 = 1712;  3: 1000 + 900 + 18 + 100 = 2018
    # two images each: (1356 + 1712 + 2018) / 3 = 1695.33 MACs
    assert r.gmacs_per_image == pytest.approx(5086 / 3 / 1e9)


def test_evaluate_all_and_k_experts(scripted_model):
    r = evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing="all", macs=MACS)
    # every sample right at confidence 0.9 (one bin): ECE = |1 - 0.9| = 10 %; every sample uses 3 experts
    assert (r.top1, r.top5, r.ece) == pytest.approx((100.0, 100.0, 10.0), abs=1e-4)
    assert r.experts_mean == 3 and r.experts_counts["all"] == [0, 0, 6]
    assert r.gmacs_per_image == pytest.approx(1918 / 1e9)  # 1000 + 900 + 18, no router
    r2 = evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing=2, macs=MACS)
    assert r2.routing == 2 and r2.experts_per_split == {"many": 2.0, "medium": 2.0, "few": 2.0}
    assert r2.gmacs_per_image == pytest.approx(1612 / 1e9)  # 1000 + 600 + 12
    assert evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS).gmacs_per_image is None


def test_evaluate_restores_routing_and_mode():
    model = timm.create_model("ride_resnet32_2e", num_classes=3)
    loader = [(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]))]
    counts = [200, 50, 5]
    model.train()
    assert evaluate(model, loader, class_counts=counts, routing=1).routing == 1
    assert model.training
    # The default mode survives: once the router is trained, the model routes again.
    model.router.set_trained()
    assert model.routing == "router"
    model.set_routing(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert evaluate(model, loader, class_counts=counts, routing="all").routing == "all"
    assert model.routing == 1
    assert evaluate(model, loader, class_counts=counts).routing == 1  # None: the model's own


def test_evaluate_a_real_router_set_by_hand():
    """Router weights chosen so that decision 0 says "continue" and decision 1 "stop" for every image.

    Decision i's logit is fc([top-k mean logits, relu(hidden_i(features))]). With zero weights on the top-k
    part and in the hidden layers, hidden_i outputs relu(bias_i): 16 ones for decision 0, 16 zeros for
    decision 1; fc weights 1/16 on the hidden part and bias 0 give z_0 = 1 (sigmoid 0.73 > 0.5: continue)
    and z_1 = 0 (sigmoid 0.5, not > 0.5: stop). So every image uses exactly 2 of the 3 experts.
    """
    torch.manual_seed(0)
    model = timm.create_model("ride_resnet32_3e", num_classes=10)
    router = model.router
    with torch.no_grad():
        for i, hidden in enumerate(router.hidden):
            hidden.weight.zero_()
            hidden.bias.fill_(1.0 if i == 0 else -1.0)
        router.fc.weight.zero_()
        router.fc.weight[0, router.top_k :] = 1.0 / 16
        router.fc.bias.zero_()
    router.set_trained()
    test = create_dataset("digits_lt", split="test")
    # The first 100 test images (every class among them), in batches of 50, already on the device.
    loader = DeviceDataLoader(dataset_images(test)[:100], test.targets[:100], 50, DIGITS_CONFIG, train=False)
    macs = count_macs(model, (3, 32, 32))
    routed = evaluate(model, loader, class_counts=test.class_counts, routing="router", macs=macs)
    first_two = evaluate(model, loader, class_counts=test.class_counts, routing=2, macs=macs)
    assert routed.num_images == 100
    assert routed.experts_counts["all"] == [0, 100, 0]
    assert routed.experts_per_split == {"many": 2.0, "medium": 2.0, "few": 2.0}
    # The same two experts decide, so the routed predictions are those of the first two experts.
    assert routed.top1 == pytest.approx(first_two.top1)
    np.testing.assert_allclose(routed.per_class_top1, first_two.per_class_top1)
    # Realized cost by hand (ride_resnet32_3e at 32x32; flops.json's conv counts: shared trunk 24,035,328 =
    # conv(2 experts) 74,907,648 - 2 x one expert 25,436,160 = conv(3) 100,343,808 - conv(2)); with 10
    # classes each classifier is 48 x 10 = 480 and each decision 48 x 16 (hidden) + (10 + 16) (fc, top-k
    # capped at the 10 classes) = 794. Every image used 2 experts and took 2 decisions (continue, stop):
    #   routed:    24,035,328 + 2 x 25,436,160 + 2 x 480 + 2 x 794 = 74,910,196
    #   first two: 24,035,328 + 2 x 25,436,160 + 2 x 480            = 74,908,608 (no router)
    assert routed.gmacs_per_image == pytest.approx(74_910_196 / 1e9, rel=1e-12)
    assert first_two.gmacs_per_image == pytest.approx(74_908_608 / 1e9, rel=1e-12)


def test_evaluate_under_autocast_in_channels_last():
    model = timm.create_model("ride_resnet32_2e", num_classes=5).to(memory_format=torch.channels_last)
    loader = [(torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 4]))]
    r = evaluate(
        model, loader, class_counts=[300, 40, 40, 3, 3], amp_dtype=torch.bfloat16, channels_last=True
    )
    assert r.routing == "all" and r.num_images == 3 and r.experts_counts["few"] == [0, 2]


def test_evaluate_refuses_bad_input(scripted_model):
    with pytest.raises(ValueError, match="5 training class counts for a model with 6 classes"):
        evaluate(scripted_model, scripted_loader(), class_counts=[1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match=r"whole numbers, >= 0\).*got \[150, 120, 60, -5, 30, 5\]"):
        evaluate(scripted_model, scripted_loader(), class_counts=[150, 120, 60, -5, 30, 5])
    with pytest.raises(ValueError, match=r"the loader yielded no images \(no batch\)"):
        evaluate(scripted_model, [], class_counts=CLASS_COUNTS)
    with pytest.raises(ValueError, match="not a RIDE model.*ride_"):
        evaluate(timm.create_model("resnet18", num_classes=6), scripted_loader(), class_counts=CLASS_COUNTS)


def test_evaluate_refuses_the_macs_of_another_expert_count(scripted_model):
    # A 2-expert breakdown for the 3-expert model: an image that used 3 experts was costed as one with 2.
    two_experts = MacsBreakdown(shared=1000, experts=(300, 300), classifiers=(6, 6), router=(50,))
    with pytest.raises(
        ValueError, match=r"2-expert model, but the model has 3 experts; pass count_macs\(model"
    ):
        evaluate(
            scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing="router", macs=two_experts
        )
    # The model's own: (1356 + 1712 + 2018) x 2 images / 6 MACs, as in test_evaluate_routed_hand_computed.
    r = evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing="router", macs=MACS)
    assert r.gmacs_per_image == pytest.approx(5086 / 3 / 1e9)


def test_evaluate_refuses_the_macs_of_another_class_count_or_input_size(scripted_model):
    # Counted for 1,000 classes, the classifiers' MACs are wrong for the 6-class model; counted at 64x64,
    # every convolution's MACs are 4x those of the 32x32 images evaluated.
    other_classes = dataclasses.replace(MACS, input_size=(3, 32, 32), num_classes=1000)
    with pytest.raises(ValueError, match=r"model with 1000 classes, but the model has 6; pass count_macs"):
        evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, macs=other_classes)
    other_size = dataclasses.replace(MACS, input_size=(3, 64, 64), num_classes=6)
    with pytest.raises(
        ValueError,
        match=r"counted for \[3, 64, 64\] images, but batch 0 holds \[3, 32, 32\] images; "
        r"pass count_macs\(model, input_size=\(3, 32, 32\)\)",
    ):
        evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, macs=other_size)
    right = dataclasses.replace(MACS, input_size=(3, 32, 32), num_classes=6)
    r = evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing="router", macs=right)
    assert r.gmacs_per_image == pytest.approx(5086 / 3 / 1e9)  # as in the test above


def test_evaluate_takes_a_label_column_as_accuracy_does(scripted_model):
    loader = [(x, y.view(-1, 1)) for x, y in scripted_loader()]  # labels [B, 1]
    r = evaluate(scripted_model, loader, class_counts=CLASS_COUNTS, routing="router")
    assert r.num_images == 6 and r.top1 == pytest.approx(400 / 6)  # samples 0, 1, 2, 4 right, as above


def test_evaluate_refuses_malformed_batches(scripted_model):
    x = torch.zeros(2, 3, 32, 32)  # samples 0 and 0

    def refused(loader, match):
        with pytest.raises(ValueError, match=match):
            evaluate(scripted_model, loader, class_counts=CLASS_COUNTS)

    # float labels used to be truncated (0.7 -> class 0)
    refused(
        [(x, torch.tensor([0.7, 1.7]))], r"batch 0 of the loader \(2 images\).*torch\.float32.*\.long\(\)"
    )
    refused([(x, torch.tensor([0, 1])), (x, torch.tensor([0, 1, 2]))], r"batch 1 .*target has 3 entries")
    refused([(x, torch.eye(6)[:2])], r"shape \(2, 6\).*not one-hot")
    refused([(x, torch.tensor([0, 6]))], r"class indices in \[0, 6\].*C = 6 classes")
    refused(
        [{"image": x, "label": torch.tensor([0, 1])}], r"a dict with the keys \['image', 'label'\].*pairs"
    )
    refused([(x, torch.tensor([0, 1]), torch.tensor([5, 6]))], r"a tuple of 3 \(Tensor, Tensor, Tensor\)")
    empty = (torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    refused([empty, empty], r"the loader yielded no images \(2 empty batches\)")


def test_evaluate_refuses_nan_logits(scripted_model):
    logits = torch.tensor(ALL_PROBS).log()
    logits[3, 2] = math.nan  # sample 3
    scripted_model.forward = lambda x: logits[x[:, 0, 0, 0].long()]
    with pytest.raises(
        ValueError, match="NaN or inf logits for 1 of 6 images; its weights may have diverged"
    ):
        evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing="all")


# ------------------------------------------------------------------------------------- EvalResult


def test_result_dict_is_json_with_nan_as_null(scripted_model):
    r = evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing="router", macs=MACS)
    r.few_top1 = math.nan  # as for an eval set without few-shot images
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    for key in ("model", "dataset", "routing", "top1", "top5", "many_top1", "medium_top1", "few_top1", "ece"):
        assert key in d
    assert d["few_top1"] is None
    assert d["experts_per_split"] == {"many": 1.5, "medium": 2.0, "few": 3.0}
    assert d["num_images"] == 6 and d["model"] == "ride_resnet32_3e"
    assert d["classes_per_split"] == {"many": 2, "medium": 2, "few": 2}
    rows = r.per_class_rows(["a", "b", "c", "d", "e", "f"])
    assert rows[4] == {
        "routing": "router",
        "class": 4,
        "name": "e",
        "train_images": 30,
        "eval_images": 2,
        "top1": 50.0,
        "split": "medium",
        "experts_mean": 2.5,
    }
    assert rows[5]["top1"] is None and rows[5]["eval_images"] == 0


def test_table(scripted_model):
    r = evaluate(scripted_model, scripted_loader(), class_counts=CLASS_COUNTS, routing="router", macs=MACS)
    header, row = format_table([r]).splitlines()
    assert header.split() == [
        *("routing", "top1", "top5", "many", "medium", "few", "ECE"),
        *("experts", "e_many", "e_med", "e_few", "GMACs", "images"),
    ]
    assert row.split() == [
        *("router", "66.67", "83.33", "100.00", "75.00", "0.00", "30.83"),
        *("2.000", "1.500", "2.000", "3.000", "0.0000", "6"),
    ]
    assert len(header) == len(row) == len(EvalResult.header()) and str(r) == format_table([r])
