"""The supported versions of torch, torchvision and timm: the same in pyproject.toml and in the check that
runs on import (for ways in that bypass pip, such as torch.hub.load)."""

import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from ride_models import _compat

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_check_has_the_bounds_of_pyproject():
    # (No tomllib: Python 3.10 has none.) The quoted requirements of the [project] dependencies list.
    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    dependencies = re.findall(r'"([^"]+)"', block.group(1))
    assert "safetensors>=0.4" in dependencies  # the list was found
    for name in _compat.MIN_VERSIONS:
        assert _compat._requirement(name) in dependencies


def test_the_installed_versions_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.check_versions()


def test_too_old_versions_are_refused_with_the_command_that_fixes_them(monkeypatch):
    monkeypatch.setattr(timm, "__version__", "1.0.15")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(ImportError) as error:
        _compat.check_versions()
    message = str(error.value)
    assert "torch 2.5.1+cu124, timm 1.0.15" in message and "torchvision" not in message
    assert message.endswith("pip install -U 'torch>=2.6' 'timm>=1.0.26,<1.1'")
    monkeypatch.setattr(torchvision, "__version__", "0.20.1")
    with pytest.raises(ImportError, match=r"torchvision 0\.20\.1.*'torchvision>=0\.21'"):
        _compat.check_versions()


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0a0+git1234", "2.6.0.dev20250101", "10.0"])
def test_release_numbers_are_compared_as_numbers(version):
    assert _compat._release(version) >= _compat.MIN_VERSIONS["torch"]
    assert _compat._release("2.10.0") > _compat._release("2.9.1")


def test_an_untested_newer_timm_warns(monkeypatch):
    monkeypatch.setattr(timm, "__version__", "1.1.0")
    with pytest.warns(UserWarning, match=r"tested with timm below 1\.1, found timm 1\.1\.0"):
        _compat.check_versions()
