"""The model zoo table of docs/zoo.md matches the code: its rows are exactly the registered models and
pretrained tags, and its parameter and MAC columns are what the models and ``ride_models.flops`` give.

To refresh the table after a change to the models, run ``python tests/test_docs_zoo.py`` and paste its
output over the table.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import timm
import torch

import ride_models  # noqa: F401  (registers the models)
from ride_models.flops import count_macs
from ride_models.models.ride_resnet import PUBLISHED_CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "docs" / "zoo.md"
HEADER = (
    "| model | experts | classes | parameters | MACs, all experts | MACs, routed (1 to E experts) "
    "| dataset | top-1 (many / medium / few), reported | router | weights |"
)


FAMILIES = ("resnet32", "resnet10", "resnet50", "resnext50")


def _order(name: str) -> tuple:
    arch = name.split(".")[0]  # ride_{family}_{E}e
    _, family, experts = arch.split("_")
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), int(experts[:-1]), name


def zoo_names() -> list[str]:
    """Every pretrained tag (``name.tag``), and every registered model that has none, in table order."""
    tagged = timm.list_pretrained("ride_*")
    with_tags = {name.split(".")[0] for name in tagged}
    return sorted(tagged + [name for name in timm.list_models("ride_*") if name not in with_tags], key=_order)


def format_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def format_macs(n: float) -> str:
    return f"{n / 1e6:.1f} M" if n < 1e9 else f"{n / 1e9:.2f} G"


def _build(name: str):
    """The model and its MACs. Only shapes matter here: on the meta device no weights are allocated or
    initialised, which keeps the 8,142-class ResNet-50s cheap; the CPU if an operation has no meta kernel."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
        return model, count_macs(model)
    except (NotImplementedError, RuntimeError):
        model = timm.create_model(name)
        return model, count_macs(model)


def measured_cells(name: str) -> dict[str, str]:
    """The columns of ``name``'s row that the code determines."""
    model, macs = _build(name)
    experts = model.num_experts
    routed = f"{format_macs(macs.per_image(1))} to {format_macs(macs.per_image(experts))}"
    return {
        "model": f"`{name}`",
        "experts": str(experts),
        "classes": f"{model.num_classes:,}",
        "parameters": format_params(sum(p.numel() for p in model.parameters())),
        "MACs, all experts": format_macs(macs.all_experts),
        "MACs, routed (1 to E experts)": routed,
    }


def reported_cells(name: str) -> dict[str, str]:
    """The columns of ``name``'s row that come from the official model zoo (``PUBLISHED_CHECKPOINTS``)."""
    ckpt = PUBLISHED_CHECKPOINTS.get(name)
    if ckpt is None:
        return {
            "dataset": "none",
            "top-1 (many / medium / few), reported": "-",
            "router": "-",
            "weights": "none published",
        }
    return {
        "dataset": ckpt.dataset,
        "top-1 (many / medium / few), reported": f"{ckpt.top1} ({ckpt.many} / {ckpt.medium} / {ckpt.few})",
        "router": "trained" if ckpt.routed else "untrained",
        "weights": f"[official file]({ckpt.origin_url}); not on the Hub yet",
    }


def expected_row(name: str) -> str:
    cells = {**measured_cells(name), **reported_cells(name)}
    return "| " + " | ".join(cells.values()) + " |"


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The zoo table's rows by model name: ``{name: {column: cell}}``."""
    lines = text.splitlines()
    start = lines.index(HEADER)
    columns = [c.strip() for c in HEADER.strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        # Split on the cell separators only (a weights link holds no '|').
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == len(columns), f"docs/zoo.md: row with {len(cells)} cells: {line}"
        name = re.fullmatch(r"`([\w.]+)`", cells[0])
        assert name, f"docs/zoo.md: the first cell must be a model name in backticks: {line}"
        rows[name.group(1)] = dict(zip(columns, cells))
    return rows


@pytest.fixture(scope="module")
def rows() -> dict[str, dict[str, str]]:
    return table_rows(ZOO.read_text())


def test_the_zoo_lists_every_model_and_tag(rows):
    assert sorted(rows) == sorted(zoo_names())


def test_zoo_parameters_and_macs_are_recomputed_from_the_code(rows):
    wrong = []
    for name in zoo_names():
        expected = measured_cells(name)
        if any(rows[name][column] != cell for column, cell in expected.items()):
            wrong.append(expected_row(name))
    assert not wrong, "docs/zoo.md is out of date; these rows should read:\n" + "\n".join(wrong)


def test_zoo_reported_accuracies_are_the_registered_ones(rows):
    for name in zoo_names():
        for column, cell in reported_cells(name).items():
            assert rows[name][column] == cell, f"docs/zoo.md, {name}, {column}: {rows[name][column]!r}"


def test_zoo_figures_against_the_official_counts(rows):
    # Independent of the code under test: the official EA model with 3 experts and 100 classes has 785,471
    # parameters, router included (reference cifar_models_summary.json), and the independent convolution +
    # linear MAC count of the RIDE model with 3 experts is 100,358,208 (reference flops.json).
    row = rows["ride_resnet32_3e.cifar100_lt_r100"]
    assert row["parameters"] == format_params(785_471)
    assert row["MACs, all experts"] == format_macs(100_358_208)


if __name__ == "__main__":
    print(HEADER)
    print("| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | --- |")
    for model_name in zoo_names():
        print(expected_row(model_name))
    sys.exit(0)
