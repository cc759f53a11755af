"""dev.py installs system packages and tool virtualenvs only when the selected tests need them."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
assert _spec is not None and _spec.loader is not None
dev = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dev)


@pytest.mark.parametrize(
    "args",
    [
        ["tests/unit"],
        ["tests/unit/", "-q"],
        ["-q", "tests/unit/test_session.py"],
        ["tests/unit/test_session.py::test_authorize", "tests/unit/test_protocol.py"],
        ["-k", "authorize", "tests/unit"],
        ["tests/unit", "-x", "--timeout", "30"],
    ],
)
def test_unit_paths_alone_need_no_system_packages_or_tool_venvs(args):
    assert dev.needs_everything(args) is False


@pytest.mark.parametrize(
    "args",
    [
        [],  # The whole suite.
        ["-q"],
        ["-k", "tests/unit"],  # An expression, not a path: pytest runs every test path.
        ["tests/integration"],
        ["tests/unit", "tests/deploy"],
        ["tests"],
        ["."],
        ["tests/unit/../integration"],
        ["tests/unit/no_such_file.py"],  # Unknown: install more rather than fail for a missing package.
    ],
)
def test_anything_else_installs_everything(args):
    assert dev.needs_everything(args) is True


@pytest.mark.parametrize("args", [[], ["tests/unit", "-q"], ["-k", "durations"]])
def test_the_test_command_lists_the_25_slowest_tests(args):
    assert dev.pytest_options(args) == ["--durations=25"]


@pytest.mark.parametrize("args", [["--durations=5"], ["--durations", "0", "tests/unit"]])
def test_a_durations_option_given_is_kept(args):
    assert dev.pytest_options(args) == []
