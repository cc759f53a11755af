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
    assert "--durations=25" in dev.pytest_options(args)


@pytest.mark.parametrize("args", [["--durations=5"], ["--durations", "0", "tests/unit"]])
def test_a_durations_option_given_is_kept(args):
    assert not any(option.startswith("--durations") for option in dev.pytest_options(args))


@pytest.mark.parametrize("args", [[], ["-q"], ["-k", "durations"], ["--durations=5"]])
def test_the_whole_suite_runs_one_file_per_worker_on_every_core(args, monkeypatch):
    monkeypatch.delenv("WSBRIDGE_TEST_WORKERS", raising=False)
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    options = dev.pytest_options(args)
    assert options[options.index("-n") :][:4] == ["-n", "2", "--dist", "loadfile"]


@pytest.mark.parametrize(
    "args", [["tests/unit"], ["tests/integration/test_mcp.py::test_x"], ["-n", "4"], ["-n3"], ["--numprocesses=1"]]
)
def test_a_path_or_a_worker_count_given_runs_as_asked(args, monkeypatch):
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 8)
    assert "--dist" not in dev.pytest_options(args)


def test_one_worker_runs_the_suite_in_one_process(monkeypatch):
    monkeypatch.setenv("WSBRIDGE_TEST_WORKERS", "1")
    assert "-n" not in dev.pytest_options([])
