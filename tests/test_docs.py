"""The documentation is true to the code: the README's and every docs page's Python examples run as written
(in order, one namespace per page), the train.py / validate.py / ride_models.hub commands use flags that
exist, and the site builds with warnings as errors.

An example that cannot run offline (it downloads weights, or needs a dataset or a checkpoint on disk) says
so in its first line, ``# needs: <what>``, which the reader sees; it is compiled but not run. Such examples
must stay rare.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
NEEDS = "# needs:"
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", flags=re.S | re.M)


def code_blocks(path: str, languages: set[str]) -> list[str]:
    """The fenced blocks of a Markdown file whose language is one of ``languages`` ("" = no language)."""
    return [body for lang, body in FENCE.findall((ROOT / path).read_text()) if lang in languages]


def python_blocks(path: str) -> list[str]:
    return code_blocks(path, {"python"})


def needs_network_or_data(block: str) -> bool:
    return block.lstrip().startswith(NEEDS)


@pytest.mark.parametrize("path", [path for path in PAGES if python_blocks(path)])
def test_python_examples_run(path, tmp_path, monkeypatch):
    blocks = python_blocks(path)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # set_routing("router") on an untrained router warns
        for block in blocks:
            code = compile(block, path, "exec")  # every block must at least be valid Python
            if not needs_network_or_data(block):
                exec(code, namespace)


def test_examples_that_do_not_run_are_rare():
    blocks = [(path, block) for path in PAGES for block in python_blocks(path)]
    skipped = [(path, block.splitlines()[0]) for path, block in blocks if needs_network_or_data(block)]
    assert len(blocks) >= 30, "the docs should have plenty of runnable examples"
    assert len(skipped) <= len(blocks) // 6, f"too many examples that are not run: {skipped}"
    for path in PAGES:
        page = python_blocks(path)
        not_run = [b for b in page if needs_network_or_data(b)]
        assert len(not_run) <= max(1, len(page) // 3), (
            f"{path}: more than a third of its examples are not run"
        )
    for path, first_line in skipped:
        assert len(first_line) > len(NEEDS) + 5, f"{path}: say what the example needs: {first_line!r}"


# --------------------------------------------------------------------------------------- command flags


def _load_validate_script():
    spec = importlib.util.spec_from_file_location("validate_script", ROOT / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hub_flags() -> dict[str, set[str]]:
    """The flags of each ``python -m ride_models.hub`` sub-command, read from its --help."""
    from ride_models import hub

    flags = {}
    for command in ("convert", "export", "push"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            hub.main([command, "--help"])
        flags[command] = set(re.findall(r"(?<![\w-])(-{1,2}[a-z][\w-]*)", out.getvalue()))
    return flags


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


def shell_commands(path: str) -> list[list[str]]:
    """The commands of a page's shell and plain code blocks (continuation lines joined, comments cut) and of
    its inline code that starts with ``python`` or ``torchrun``, split into tokens."""
    lines = []
    for block in code_blocks(path, {"bash", "sh", "shell", "console", ""}):
        lines += block.replace("\\\n", " ").splitlines()
    text = FENCE.sub("", (ROOT / path).read_text())
    lines += re.findall(r"`((?:python|torchrun) [^`]*)`", text.replace("\n", " "))
    commands = []
    for line in lines:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not a command (an error message quoted in a plain block)
            continue
        if tokens:
            commands.append(tokens)
    return commands


def command_flags() -> list[tuple[str, str, str, list[str]]]:
    """(page, script, sub-command, flags) of every train.py / validate.py / ride_models.hub command."""
    found = []
    for path in PAGES:
        for tokens in shell_commands(path):
            for i, token in enumerate(tokens):
                script, sub, rest = None, "", []
                if Path(token).name in ("train.py", "validate.py") and i > 0:
                    script, rest = Path(token).name, tokens[i + 1 :]
                elif token == "ride_models.hub" and i > 0 and tokens[i - 1] == "-m" and len(tokens) > i + 1:
                    script, sub, rest = "ride_models.hub", tokens[i + 1], tokens[i + 2 :]
                if script:
                    flags = [t.split("=", 1)[0] for t in rest if re.match(r"-{1,2}[a-zA-Z]", t)]
                    found.append((path, script, sub, flags))
                    break
    return found


def test_documented_commands_use_existing_flags():
    from ride_models.training import build_parser

    known = {
        "train.py": _options(build_parser()),
        "validate.py": _options(_load_validate_script().build_parser()),
    }
    hub = _hub_flags()
    commands = command_flags()
    scripts = {script for _, script, _, _ in commands}
    assert {"train.py", "validate.py", "ride_models.hub"} <= scripts, scripts
    assert len(commands) >= 30, f"only {len(commands)} commands found in the docs"
    unknown = []
    for path, script, sub, flags in commands:
        options = hub.get(sub, set()) if script == "ride_models.hub" else known[script]
        unknown += [
            f"{path}: {script} {sub} {flag}".replace("  ", " ") for flag in flags if flag not in options
        ]
    assert not unknown, "flags that do not exist:\n" + "\n".join(unknown)


# ------------------------------------------------------------------------------------------------- site


def test_every_page_is_in_the_site_navigation():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert re.search(rf":\s+{re.escape(page.name)}\s*$", config, flags=re.M), (
            f"{page.name} not in the nav"
        )


def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install '.[docs]' to build the documentation site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # only a notice about the theme's future
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
