"""Write the missing Unity .meta files of the package (new GUIDs); existing ones are never changed.

Packages installed from git are read-only in Unity, so every file and folder needs a committed .meta
with a GUID that never changes. Run after adding a file: python3 tests/integration/unity/add_meta.py
"""

from __future__ import annotations

import uuid
from pathlib import Path

__all__ = ["PACKAGE", "meta_text", "needs_meta", "main"]

PACKAGE = Path(__file__).resolve().parents[3] / "unity_project" / "Packages" / "com.wsbridge.client"

_TAIL = "  userData: \n  assetBundleName: \n  assetBundleVariant: \n"
_IMPORTERS = {
    ".cs": "MonoImporter:\n  externalObjects: {}\n  serializedVersion: 2\n  defaultReferences: []\n"
    "  executionOrder: 0\n  icon: {instanceID: 0}\n",
    ".asmdef": "AssemblyDefinitionImporter:\n  externalObjects: {}\n",
    ".md": "TextScriptImporter:\n  externalObjects: {}\n",
    ".json": "PackageManifestImporter:\n  externalObjects: {}\n",
    # The plugin is for WebGL players only.
    ".jslib": "PluginImporter:\n  externalObjects: {}\n  serializedVersion: 2\n  iconMap: {}\n  executionOrder: {}\n"
    "  defineConstraints: []\n  isPreloaded: 0\n  isOverridable: 0\n  isExplicitlyReferenced: 0\n"
    "  validateReferences: 1\n  platformData:\n  - first:\n      Any: \n    second:\n      enabled: 0\n"
    "      settings: {}\n  - first:\n      WebGL: WebGL\n    second:\n      enabled: 1\n      settings: {}\n",
}


def needs_meta(path: Path) -> bool:
    """Every file and folder of the package, except .meta files, hidden ones and folders Unity ignores (name~)."""
    relative = path.relative_to(PACKAGE)
    if path.suffix == ".meta" or any(part.startswith(".") for part in relative.parts):
        return False
    return not (path.is_dir() and path.name.endswith("~"))


def meta_text(path: Path, guid: str) -> str:
    if path.is_dir():
        return (
            f"fileFormatVersion: 2\nguid: {guid}\nfolderAsset: yes\nDefaultImporter:\n  externalObjects: {{}}\n{_TAIL}"
        )
    importer = _IMPORTERS.get(path.suffix, "DefaultImporter:\n  externalObjects: {}\n")
    return f"fileFormatVersion: 2\nguid: {guid}\n{importer}{_TAIL}"


def main() -> None:
    for path in sorted(PACKAGE.rglob("*")):
        meta = path.with_name(path.name + ".meta")
        if needs_meta(path) and not meta.exists():
            meta.write_text(meta_text(path, uuid.uuid4().hex))
            print(f"created {meta.relative_to(PACKAGE)}")


if __name__ == "__main__":
    main()
