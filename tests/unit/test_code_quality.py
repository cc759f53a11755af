"""The tree stays lint-clean, formatted, type-checked and layered: ruff, mypy and lint-imports run in the test command.

They are pinned in the ``test`` extra and configured in ``pyproject.toml``; they run from
the test interpreter's environment, so ``python3 dev.py test`` (and CI) needs nothing else.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _lint_imports() -> subprocess.CompletedProcess[str]:
    """import-linter's command; its contracts are in pyproject.toml (tests/unit/test_structure.py proves they bite)."""
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "--no-cache", "."), ("ruff", "format", "--check", "--no-cache", "."), ("mypy",)],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_tree_passes(command):
    result = _run(*command)
    assert result.returncode == 0, f"`{' '.join(command)}` failed:\n{result.stdout}{result.stderr}"


def test_the_layers_contract_holds():
    result = _lint_imports()
    assert result.returncode == 0, f"`lint-imports` failed:\n{result.stdout}{result.stderr}"
    assert "0 broken" in result.stdout
