"""The locks in requirements/ agree with pyproject.toml, and the installers use them.

Which test fails if one word is wrong: a dependency added to or re-pinned in
pyproject.toml without ``python3 dev.py lock`` (the lock lacks it or pins another
version); a lock entry without hashes; the two locks pinning one package differently;
the Dockerfile or dev.py installing anything but their lock, or resolving again.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
LOCKS = ROOT / "requirements"

_spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
assert _spec is not None and _spec.loader is not None
dev = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dev)


def locked(name: str) -> dict[str, tuple[str, str, list[str]]]:
    """package -> (version, marker, hashes) of one lock file."""
    text = re.sub(r"\\\n\s*", " ", (LOCKS / name).read_text())
    found = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        requirement = line.partition(" --hash=")[0]
        spec, _, marker = requirement.partition(";")
        package, _, version = spec.strip().partition("==")
        hashes = re.findall(r"sha256:[0-9a-f]{64}", line)
        found[canonicalize_name(package.split("[")[0])] = (version, marker.strip(), hashes)
    return found


def wanted(extras: tuple[str, ...]) -> list[Requirement]:
    requirements = [Requirement(r) for r in PYPROJECT["dependencies"]]
    for extra in extras:
        requirements += [Requirement(r) for r in PYPROJECT["optional-dependencies"][extra]]
    return requirements


@pytest.mark.parametrize("lock", sorted(dev.LOCKED_EXTRAS))
def test_every_direct_dependency_is_locked_at_a_version_pyproject_allows(lock: str) -> None:
    pins = locked(lock)
    for requirement in wanted(dev.LOCKED_EXTRAS[lock]):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements/{lock}: run python3 dev.py lock"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements/{lock} pins {name}=={version}, pyproject.toml wants {requirement}: run python3 dev.py lock"
        )


@pytest.mark.parametrize("lock", sorted(dev.LOCKED_EXTRAS))
def test_every_locked_package_is_pinned_exactly_with_its_hashes(lock: str) -> None:
    pins = locked(lock)
    assert len(pins) > 20
    for name, (version, _, hashes) in pins.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!]*", version), f"{name} is not pinned: {version!r}"
        assert hashes, f"{name} has no --hash in requirements/{lock}"


def test_the_two_locks_pin_every_shared_package_alike() -> None:
    server, full = locked("server.lock"), locked("dev.lock")
    assert set(server) <= set(full)
    assert {name: server[name][0] for name in server} == {name: full[name][0] for name in server}


def test_the_server_lock_holds_no_test_or_bench_tool() -> None:
    server = locked("server.lock")
    assert not {"pytest", "hypothesis", "ruff", "mypy", "playwright", "picows"} & set(server)


def test_this_venv_runs_the_locked_versions() -> None:
    """``python3 dev.py test`` installed the dev lock (the stamp includes it, so an edit reinstalls)."""
    from importlib.metadata import version

    environment = default_environment()
    for name, (pinned, marker, _) in locked("dev.lock").items():
        if marker and not _applies(marker, environment):
            continue
        assert version(name) == pinned, name


def _applies(marker: str, environment: dict[str, str]) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate(environment)


def test_dev_py_installs_the_lock_with_hashes_then_the_project_without_resolving(monkeypatch, tmp_path) -> None:
    calls: list[tuple[list[Path], list[str], list[str] | None]] = []
    monkeypatch.setattr(
        dev, "ensure_venv", lambda env, inputs, install, label, then=None: calls.append((inputs, install, then))
    )
    dev.ensure_project()
    ((inputs, install, then),) = calls
    assert LOCKS / "dev.lock" in inputs and ROOT / "pyproject.toml" in inputs  # the stamp: either edit reinstalls
    assert install == ["--require-hashes", "-r", str(LOCKS / "dev.lock")]
    assert then == ["--no-deps", "-e", str(ROOT)]
    assert set(dev.LOCKED_EXTRAS["dev.lock"]) == set(dev.EXTRAS.split(","))


def test_the_fingerprint_changes_with_the_lock(tmp_path) -> None:
    lock = tmp_path / "dev.lock"
    lock.write_text("a==1\n")
    before = dev.fingerprint(lock)
    lock.write_text("a==2\n")
    assert dev.fingerprint(lock) != before


def test_the_dockerfile_installs_the_server_lock_with_hashes_and_the_project_without_its_dependencies() -> None:
    dockerfile = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    installs = [line for line in dockerfile.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert len(installs) == 2, installs
    assert "--require-hashes -r requirements/server.lock" in installs[0]
    assert re.search(r"pip install [^&]*--no-deps \.(\s|$)", installs[1]), installs[1]
    assert "COPY requirements/server.lock" in dockerfile


def test_the_hosts_image_build_gets_the_lock() -> None:
    """Ansible copies the build context to the EC2 host and builds the image there."""
    import yaml

    variables = yaml.safe_load((ROOT / "ansible" / "roles" / "appliance" / "vars" / "main.yml").read_text())
    assert "requirements" in variables["appliance_build_context"]


def test_dev_py_stops_with_the_command_to_run_when_the_lock_lacks_a_dependency(tmp_path, monkeypatch) -> None:
    assert dev.missing_from_lock(LOCKS / "dev.lock", dev.LOCKED_EXTRAS["dev.lock"]) == []
    stale = tmp_path / "dev.lock"
    stale.write_text(re.sub(r"(?m)^litestar==.*$", "", (LOCKS / "dev.lock").read_text()))
    litestar = [r for r in PYPROJECT["optional-dependencies"]["server"] if r.startswith("litestar")]
    assert dev.missing_from_lock(stale, ("server",)) == litestar
    assert dev._name("uvicorn[standard]==0.54.0") == "uvicorn" and dev._name("PyYAML==6.0.4") == "pyyaml"
