"""The tree stays lint-clean, formatted and type-checked: ruff and mypy run as part of the test command.

Both are pinned in the ``test`` extra and configured in ``pyproject.toml``; they run from
the test interpreter's environment, so ``python3 dev.py test`` (and CI) needs nothing else.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "--no-cache", "."), ("ruff", "format", "--check", "--no-cache", "."), ("mypy",)],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_tree_passes(command):
    result = _run(*command)
    assert result.returncode == 0, f"`{' '.join(command)}` failed:\n{result.stdout}{result.stderr}"
