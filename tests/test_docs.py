"""The Python examples of the README and docs run as written (in order, one namespace per file)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["README.md", "docs/models.md", "docs/validate.md"])
def test_python_examples_run(path):
    text = (ROOT / path).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"no python examples in {path}"
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # set_routing("router") on an untrained router warns
        for block in blocks:
            exec(compile(block, path, "exec"), namespace)
