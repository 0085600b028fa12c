"""Shared test fixtures.

Tests that need the project's reference folder (``../shared`` beside the repository: the official RIDE
fixtures and real data) take the ``reference_dir`` / ``shared_data_dir`` fixtures, which skip with a
reason on machines that do not have it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DIR = Path(os.environ.get("RIDE_SHARED_DIR", Path(__file__).resolve().parents[1].parent / "shared"))
REFERENCE_DIR = SHARED_DIR / "reference" / "official_ride"
DATA_DIR = SHARED_DIR / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official RIDE reference fixtures, or a skip where they are absent (a user's machine)."""
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"official RIDE reference fixtures not found at {REFERENCE_DIR} (set RIDE_SHARED_DIR)")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real data folder (CIFAR-10 JPEGs, CIFAR-100 labels, LT split files), or a skip."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data folder not found at {DATA_DIR} (set RIDE_SHARED_DIR)")
    return DATA_DIR
