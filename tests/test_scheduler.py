"""Learning rates against the official schedules recorded in ``lr_schedules.json``."""

from __future__ import annotations

import json

import pytest

from ride_models.scheduler import lr_at_epoch


def _schedules(reference_dir):
    return json.loads((reference_dir / "lr_schedules.json").read_text())["schedules"]


def test_every_official_schedule(reference_dir):
    checked = 0
    for name, s in _schedules(reference_dir).items():
        if s["type"] == "CustomLR":
            kwargs = dict(
                schedule="step",
                milestones=(s["args"]["step1"], s["args"]["step2"]),
                gamma=s["args"]["gamma"],
                warmup_epochs=s["args"]["warmup_epoch"],
            )
        else:
            assert s["type"] == "CosineAnnealingLR" and s["args"]["eta_min"] == 0.0
            kwargs = dict(schedule="cosine")
        ours = [
            lr_at_epoch(e, base_lr=s["base_lr"], epochs=s["epochs"], **kwargs)
            for e in range(1, s["epochs"] + 1)
        ]
        assert ours == pytest.approx(s["lr_per_epoch"], rel=1e-12, abs=0), name
        checked += 1
    assert checked == 5


def test_cifar_schedule_by_hand():
    cifar = dict(schedule="step", base_lr=0.1, epochs=200, milestones=(160, 180), gamma=0.01, warmup_epochs=5)
    lr = [lr_at_epoch(e, **cifar) for e in (1, 5, 6, 160, 161, 180, 181, 200)]
    assert lr == pytest.approx([0.02, 0.1, 0.1, 0.1, 0.001, 0.001, 1e-5, 1e-5])


def test_bad_arguments():
    with pytest.raises(ValueError, match="numbered from 1"):
        lr_at_epoch(0, schedule="step", base_lr=0.1, epochs=10)
    # Past its end a cosine schedule would climb back to base_lr (epoch 21 of 10: cos(2 pi) = 1): refused.
    with pytest.raises(ValueError, match=r"epoch 21 is outside the schedule's epochs 1..10"):
        lr_at_epoch(21, schedule="cosine", base_lr=0.1, epochs=10)
    with pytest.raises(ValueError, match=r"epoch 1 is outside the schedule's epochs 1..0"):
        lr_at_epoch(1, schedule="cosine", base_lr=0.1, epochs=0)
    step = dict(schedule="step", base_lr=0.1, epochs=200)
    with pytest.raises(ValueError, match=r"warmup_epochs must be a whole number of epochs >= 0; got 2.5"):
        lr_at_epoch(3, **step, warmup_epochs=2.5)  # would give 0.12 > base_lr at epoch 3
    with pytest.raises(ValueError, match=r"milestones must be a list of epochs, e.g. \[160, 180\]; got 160"):
        lr_at_epoch(3, **step, milestones=160)
    with pytest.raises(ValueError, match="gamma .* must be above 0"):
        lr_at_epoch(3, **step, milestones=[2], gamma=-0.1)
    with pytest.raises(ValueError, match="learning rates cannot be negative"):
        lr_at_epoch(3, schedule="step", base_lr=-0.1, epochs=200)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at_epoch(1, schedule="linear", base_lr=0.1, epochs=10)
