"""The README and the packaging metadata say what the code does, nothing more."""

import re
import tomllib
from pathlib import Path

from appliance.app import create_app
from appliance.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_quick_start_has_one_run_command_and_one_test_command():
    block = re.search(r"```bash\n(.*?)```", _section("Quick start"), re.S)
    assert block is not None
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ["python3 dev.py serve", "python3 dev.py test"]


def test_every_folder_in_the_layout_exists():
    layout = re.search(r"```\n(.*?)```", _section("Layout"), re.S)
    assert layout is not None
    missing = []
    for line in layout.group(1).splitlines():
        top = line.split()[0] if line and not line[0].isspace() else None
        if top and top.endswith("/"):
            folder = ROOT / top
            missing += [] if folder.is_dir() else [top]
            # Sub-folders named on the same line ("unit/ (no sockets), integration/ ...").
            missing += [
                f"{top}{sub}" for sub in re.findall(r"\b([a-z_]+)/", line[len(top) :]) if not (folder / sub).is_dir()
            ]
    assert not missing, f"README's layout names folders that do not exist: {missing}"


def test_the_dashboard_is_promised_only_once_the_app_serves_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # No .env from the developer's tree.
    settings = Settings(llm_secret_token="c" * 32, unity_client_token="u" * 32)
    serves_ui = any(route.path.startswith(("/ui", "/admin")) for route in create_app(settings).routes)
    if not serves_ui:
        text = README.lower()
        assert "/ui/" not in text and "admin dashboard" not in text  # (Grafana's dashboards exist.)
        assert "dashboard" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["description"]


def test_setuptools_floor_supports_the_license_field():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (requirement,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    floor = tuple(int(part) for part in re.fullmatch(r"setuptools>=([\d.]+)", requirement).group(1).split("."))
    if isinstance(pyproject["project"]["license"], str):  # PEP 639 SPDX expression: setuptools 77 reads it.
        assert floor >= (77,), requirement


def _layout_modules() -> tuple[set[str], list[str]]:
    """The modules the Layout section names (paths from the root) and the names it gives that resolve nowhere.

    A line that starts with ``name/`` under ``appliance/`` (or a top-level ``ui/``) sets the folder for
    itself and the indented lines after it; a line that starts with a module goes back to ``appliance/``.
    A ``name/`` later in a line descends into that sub-folder, for the rest of the entry (its indented
    lines too); ``dir/file.py`` is relative to ``appliance/``.
    """
    layout = re.search(r"```\n(.*?)```", _section("Layout"), re.S)
    assert layout is not None
    named: set[str] = set()
    unknown: list[str] = []
    context = "appliance/"
    for line in layout.group(1).splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        first = stripped.split()[0]
        if indent == 0:
            context = first if first.endswith("/") else ""
        elif indent == 2:
            context = f"appliance/{first}" if first.endswith("/") else "appliance/"
        for token in re.findall(r"[\w./]+", stripped):
            if token.endswith(".py"):
                path = f"appliance/{token}" if "/" in token else f"{context}{token}"
                (named.add(path) if (ROOT / path).is_file() else unknown.append(path))
            elif token.endswith("/") and "/" not in token[:-1] and token != first and context:
                if (ROOT / context / token).is_dir():
                    context = f"{context}{token}"
    return named, unknown


def test_the_layout_names_every_module_and_only_modules_that_exist():
    named, unknown = _layout_modules()
    assert unknown == [], f"README's layout names modules that are not there: {unknown}"
    on_disk = {
        str(p.relative_to(ROOT))
        for folder in ("appliance", "ui")
        for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts and p.name != "__init__.py"
    }
    assert sorted(on_disk - named) == [], "README's layout omits these modules"
