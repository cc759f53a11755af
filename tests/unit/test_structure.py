"""The shape of the code stays visible: layers without circles, modules and classes of a readable size.

The layers contract lives in pyproject.toml (``[tool.importlinter]``); ``lint-imports`` checks
it in tests/unit/test_code_quality.py, so the test command fails on the first upward import.
grimp, which builds import-linter's graph, counts imports inside functions and under
``if TYPE_CHECKING:`` like any other: a circle cannot hide there (proved here on a copy of the tree).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

#: Issue 19: no module in appliance/ over 600 lines, no class over 400.
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
    )


def test_imports_under_type_checking_count():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert not config.get("exclude_type_checking_imports"), "imports under TYPE_CHECKING must count"


def test_an_upward_import_inside_a_function_or_under_type_checking_breaks_the_contract(tmp_path):
    for name in ("appliance", "ui"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    hidden = tmp_path / "appliance" / "registry.py"
    hidden.write_text(
        hidden.read_text()
        + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .commands import CommandService\n"
        + "\n\ndef _late() -> None:\n    from .relay import Relay\n"
    )
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "appliance.registry -> appliance.commands" in result.stdout
    assert "appliance.registry -> appliance.relay" in result.stdout


def test_no_module_imports_itself_back_through_others():
    """No circle at all, between listed layers or not (a package importing its own submodules aside)."""
    graph = grimp.build_graph("appliance", "ui", cache_dir=None)
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith(module + "."):
                continue  # A package's __init__ re-exporting its parts.
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None and not any(m.startswith(imported + ".") for m in chain[1:]):
                circles.append(" -> ".join((module, *chain)))
    assert circles == []


def _python_files() -> list[Path]:
    return sorted(p for p in (ROOT / "appliance").rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_in_appliance_is_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _python_files()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_class_in_appliance_is_over_400_lines():
    long = {}
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert long == {}


def test_metrics_py_declares_every_metric_or_names_the_module_that_does():
    import re

    from appliance import metrics

    declared_here = set(re.findall(r'"(wsbridge_[a-z_]+)"', (ROOT / "appliance" / "metrics.py").read_text()))
    elsewhere = {}
    for path in _python_files():
        if path.name != "metrics.py":
            for name in re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(wsbridge_[a-z_]+)"', path.read_text()):
                elsewhere[name] = str(path.relative_to(ROOT / "appliance").with_suffix(".py"))
    assert elsewhere, "the guards' own metrics are found"
    undeclared = {name: module for name, module in elsewhere.items() if name in declared_here}
    assert undeclared == {}, "declared twice"
    unnamed = {
        name: module
        for name, module in elsewhere.items()
        if f"``{name}``" not in (metrics.__doc__ or "") or f"appliance/{module}" not in (metrics.__doc__ or "")
    }
    assert unnamed == {}, "metrics.py's docstring must say where these live"
