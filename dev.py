#!/usr/bin/env python3
"""Fresh machine, two commands: ``python3 dev.py serve`` and ``python3 dev.py test``.

Needs nothing but python3 (3.11+) and git. It creates ``.venv`` and installs the
project into it, installs the Debian packages the tests need with apt when run as
root (otherwise prints the exact command), and creates one virtualenv per tool
whose dependencies clash with the appliance's (``tools/venvs/NAME.txt`` becomes
``.venv-tools/NAME``).

What each part of the project needs from the system is declared in data files so
that adding a tool never means editing this script:

- ``tools/apt/*.txt``: lines ``COMMAND PACKAGE`` (``-`` as the command for a
  package that installs no command of its own, e.g. a library);
- ``tools/venvs/NAME.txt``: a pip requirements file for one tool virtualenv.

The appliance's own dependencies come from ``requirements/dev.lock`` (every version
pinned, with hashes); ``python3 dev.py lock`` writes it and ``requirements/server.lock``
(the Dockerfile's) again from ``pyproject.toml`` after a dependency changed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TOOL_VENVS = ROOT / ".venv-tools"
MIN_PYTHON = (3, 11)


def say(text: str) -> None:
    print(f"[dev] {text}", flush=True)


def run(cmd: list[str], **kwargs) -> None:
    subprocess.run(cmd, check=True, **kwargs)


def bin_of(env: Path, name: str) -> Path:
    return env / "bin" / name


def fingerprint(*paths: Path, extra: str = "") -> str:
    digest = hashlib.sha256((sys.version + extra).encode())
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv(
    env: Path, stamp_inputs: list[Path], install: list[str], label: str, then: list[str] | None = None
) -> None:
    """Create ``env`` and pip-install ``install`` (then ``then``) unless the inputs are unchanged since last time."""
    stamp = env / ".installed"
    wanted = fingerprint(*stamp_inputs, extra=" ".join(install + (then or [])))
    if stamp.exists() and stamp.read_text() == wanted and bin_of(env, "python").exists():
        return
    pip = [str(bin_of(env, "python")), "-m", "pip", "--disable-pip-version-check", "-q"]
    # A venv whose creation failed half-way has a python but no pip: build it again.
    if not bin_of(env, "python").exists() or subprocess.run([*pip, "--version"], capture_output=True).returncode:
        ensure_ensurepip()
        say(f"creating virtualenv {env.relative_to(ROOT)} ({label})")
        venv.EnvBuilder(with_pip=True, clear=True).create(env)
    say(f"installing {label} into {env.relative_to(ROOT)} (first run takes a minute or two)")
    run([*pip, "install", *install])
    if then:
        run([*pip, "install", *then])
    stamp.write_text(wanted)


def ensure_ensurepip() -> None:
    """Debian and Ubuntu ship venv's pip bootstrap separately, in python3-venv."""
    if importlib.util.find_spec("ensurepip") is not None:
        return
    package = f"python3.{sys.version_info.minor}-venv"
    install_with_apt([package], why="python cannot create virtualenvs without it")


#: One set of extras for both commands, so switching between them never reinstalls.
EXTRAS = "server,test,bench"

LOCKS = ROOT / "requirements"
#: lock file -> the extras it holds besides the base (client) dependencies.
LOCKED_EXTRAS = {"server.lock": ("server",), "dev.lock": tuple(EXTRAS.split(","))}
#: The resolver that writes the locks; only ``dev.py lock`` installs it (in .venv-tools/lock).
UV = "uv==0.13.8"


def _name(requirement: str) -> str:
    """A requirement's project name, normalized (PEP 503): ``"PyYAML==6.0"`` -> ``"pyyaml"``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", match.group(1)).lower() if match else requirement


def missing_from_lock(lock: Path, extras: tuple[str, ...]) -> list[str]:
    """pyproject.toml's requirements (base and ``extras``) that ``lock`` does not pin."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    pinned = {_name(line) for line in lock.read_text().splitlines() if "==" in line and not line.startswith(" ")}
    return [requirement for requirement in wanted if _name(requirement) not in pinned]


def ensure_project() -> None:
    """The locked dependencies (hash-checked), then the project itself without resolving again."""
    lock = LOCKS / "dev.lock"
    missing = missing_from_lock(lock, LOCKED_EXTRAS[lock.name])
    if missing:
        sys.exit(f"{lock.relative_to(ROOT)} lacks {', '.join(missing)}: run python3 dev.py lock and commit it")
    ensure_venv(
        VENV,
        [ROOT / "pyproject.toml", lock],
        ["--require-hashes", "-r", str(lock)],
        f"the appliance's locked dependencies ({lock.relative_to(ROOT)})",
        then=["--no-deps", "-e", str(ROOT)],
    )


def lock(args: list[str]) -> None:
    """Resolve pyproject.toml again into requirements/*.lock (universal: Linux and macOS, Python 3.11+)."""
    env = TOOL_VENVS / "lock"
    ensure_venv(env, [], [UV], "the lock resolver")
    for name, extras in LOCKED_EXTRAS.items():
        command = [str(bin_of(env, "uv")), "pip", "compile", "pyproject.toml", "--quiet", "--universal"]
        command += ["--python-version", f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}", "--generate-hashes"]
        command += ["--custom-compile-command", "python3 dev.py lock"]
        command += [arg for extra in extras for arg in ("--extra", extra)]
        run([*command, *args, "-o", str(LOCKS / name)], cwd=ROOT)
        say(f"wrote {(LOCKS / name).relative_to(ROOT)}")


def apt_requirements() -> list[tuple[str, str]]:
    wanted = []
    for path in sorted((ROOT / "tools" / "apt").glob("*.txt")):
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                command, package = line.split()
                wanted.append((command, package))
    return wanted


def apt_installed(package: str) -> bool:
    probe = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return probe.returncode == 0 and "install ok installed" in probe.stdout


def ensure_system_packages() -> None:
    missing = sorted(
        {
            package
            for command, package in apt_requirements()
            if (shutil.which(command) is None if command != "-" else not apt_installed(package))
        }
    )
    if not missing:
        return
    install_with_apt(missing, why="the tests need them")


def install_with_apt(packages: list[str], why: str) -> None:
    """As root, apt-get install; otherwise print the exact command and stop."""
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"missing system packages ({why}); install them and run again:")
        print(f"    sudo apt-get update && sudo {' '.join(command)}")
        sys.exit(1)
    say(f"installing system packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(command, env=env, stdout=subprocess.DEVNULL)


def ensure_tool_venvs() -> None:
    for requirements in sorted((ROOT / "tools" / "venvs").glob("*.txt")):
        env = TOOL_VENVS / requirements.stem
        ensure_venv(env, [requirements], ["-r", str(requirements)], requirements.stem)


def check_python() -> None:
    if sys.version_info < MIN_PYTHON:
        sys.exit(f"python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ is needed, this is {sys.version.split()[0]}")


def serve(args: list[str]) -> None:
    # The embedded default needs no system package, so serving installs none.
    ensure_project()
    os.execv(str(bin_of(VENV, "wsbridge")), ["wsbridge", "serve", *args])


#: Test folders that need neither system packages nor tool virtualenvs (pure code, no sockets).
LIGHT_TEST_PATHS = ("tests/unit",)

#: pytest options whose value is the next argument (so ``-k tests/unit`` is not taken for a path).
PYTEST_OPTIONS_WITH_VALUE = frozenset(
    [
        "-k",
        "-m",
        "-p",
        "-c",
        "-o",
        "-W",
        "-r",
        "--deselect",
        "--ignore",
        "--ignore-glob",
        "--rootdir",
        "--basetemp",
        "--confcutdir",
        "--junitxml",
        "--junit-xml",
        "--maxfail",
        "--durations",
        "--tb",
        "--timeout",
        "--import-mode",
        "--log-level",
        "--override-ini",
    ]
)


def needs_everything(pytest_args: list[str]) -> bool:
    """False only when every test path given lies under ``LIGHT_TEST_PATHS``.

    No path means the whole suite; an argument that is neither an option nor an
    existing path is taken to need everything too (installing more is the safe mistake).
    """
    paths, skip_value = [], False
    for arg in pytest_args:
        if skip_value:
            skip_value = False
        elif arg.startswith("-"):
            skip_value = arg in PYTEST_OPTIONS_WITH_VALUE
        else:
            paths.append(arg)
    if not paths:
        return True
    light = [(ROOT / folder).resolve() for folder in LIGHT_TEST_PATHS]
    for arg in paths:
        path = (ROOT / arg.split("::", 1)[0]).resolve()
        if not path.exists() or not any(path == folder or folder in path.parents for folder in light):
            return True
    return False


def test_workers() -> int:
    """Workers for a whole-suite run: one per core, at least two (most tests wait on servers, not the CPU).

    ``WSBRIDGE_TEST_WORKERS=1`` runs everything in one process.
    """
    return int(os.environ.get("WSBRIDGE_TEST_WORKERS", max(2, os.cpu_count() or 1)))


def pytest_options(args: list[str]) -> list[str]:
    """The slowest 25 tests are listed after every run (the suite's time budget), unless asked otherwise.

    With no test path given, the suite runs on ``test_workers()`` pytest-xdist workers, one
    test file at a time per worker (a file's module fixtures start once). A path or an
    explicit ``-n`` runs as asked.
    """
    options = []
    if not any(arg == "--durations" or arg.startswith("--durations=") for arg in args):
        options.append("--durations=25")
    explicit_workers = any(arg in ("-n", "--numprocesses") or arg.startswith(("-n", "--numprocesses=")) for arg in args)
    paths = [arg for arg in args if not arg.startswith("-") and (ROOT / arg.split("::", 1)[0]).exists()]
    workers = test_workers()
    if not paths and not explicit_workers and workers > 1:
        options += ["-n", str(workers), "--dist", "loadfile"]
    return options


def test(args: list[str]) -> None:
    if needs_everything(args):
        ensure_system_packages()
        ensure_project()
        ensure_tool_venvs()
    else:
        say("unit tests only: no system packages or tool virtualenvs needed")
        ensure_project()
    env = {**os.environ, "WSBRIDGE_TOOL_VENVS": str(TOOL_VENVS), "PYTHONDONTWRITEBYTECODE": "1"}
    say("running the test suite")
    result = subprocess.run(
        [str(bin_of(VENV, "python")), "-m", "pytest", *pytest_options(args), *args], cwd=ROOT, env=env
    )
    sys.exit(result.returncode)


def main() -> None:
    check_python()
    commands = {"serve": serve, "test": test, "lock": lock}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit("usage: python3 dev.py serve [--host H] [--port P] | test [pytest args] | lock [uv pip compile args]")
    commands[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    main()
