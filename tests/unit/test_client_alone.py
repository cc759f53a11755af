"""The Python client installs and imports without the server's dependencies.

The base distribution's dependencies (``[project] dependencies``) are the client's;
everything the appliance needs is the ``server`` extra. A subprocess imports the
client with every module *outside* the standard library and the base dependencies
(and their own dependencies) blocked, builds each client object, and lists what got
imported: it fails if the client reaches for Litestar, uvicorn, boto3, mcp, Redis,
pydantic, ... directly or through ``appliance/__init__.py`` or ``appliance.core``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

PROBE = r"""
import importlib.abc, json, sys
allowed = set(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in allowed or top in sys.stdlib_module_names:
            return None
        raise ModuleNotFoundError(f"{name} is not a dependency of the client", name=name)

sys.meta_path.insert(0, Block())

from appliance.client import BridgeClient, BridgeClosed
from appliance.controller import Controller, HttpController, CommandError

BridgeClient("ws://127.0.0.1:9", "LLM", "token")
Controller("ws://127.0.0.1:9", "LLM", "token")
HttpController("http://127.0.0.1:9", "token")
print(json.dumps(sorted({name.partition(".")[0] for name in sys.modules})))
"""


def distribution_closure(requirements: list[str]) -> set[str]:
    """Top-level import names of these distributions and all they depend on (installed here)."""
    from importlib.metadata import PackageNotFoundError, distribution

    seen: set[str] = set()
    names: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = requirement.name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            continue  # a platform-only dependency not installed here
        top_level = dist.read_text("top_level.txt")
        if top_level:
            names.update(top_level.split())
        for file in dist.files or []:
            first = file.parts[0]
            if first.endswith(".py"):
                names.add(first.removesuffix(".py"))
            elif "." not in first and first != "__pycache__":
                names.add(first)
        todo += [Requirement(r) for r in dist.requires or []]
    return names


def test_the_base_dependencies_are_the_clients_alone() -> None:
    base = {Requirement(r).name for r in PROJECT["dependencies"]}
    assert base == {"websockets", "httpx", "msgspec"}
    for requirement in PROJECT["dependencies"]:
        assert "==" not in requirement, f"the client's {requirement} should be a range, not a pin"
    server = {Requirement(r).name for r in PROJECT["optional-dependencies"]["server"]}
    assert {"litestar", "uvicorn", "boto3", "mcp"} <= server


def test_the_client_imports_with_nothing_but_its_base_dependencies() -> None:
    allowed = distribution_closure(PROJECT["dependencies"]) | {"appliance"}
    for server_only in ("litestar", "uvicorn", "boto3", "botocore", "mcp", "redis", "pydantic", "prometheus_client"):
        assert server_only not in allowed
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(sorted(allowed))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    imported = set(json.loads(probe.stdout.splitlines()[-1]))
    assert "appliance" in imported and "websockets" in imported and "httpx" in imported
    assert not imported & {"litestar", "uvicorn", "boto3", "mcp", "redis", "pydantic", "jinja2", "ui"}


def test_the_package_ships_its_type_hints() -> None:
    assert (ROOT / "appliance" / "py.typed").is_file()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["appliance"]
