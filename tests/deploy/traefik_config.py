"""Traefik's configuration of the stack, as Traefik itself would assemble it.

Compose labels are turned into Traefik's dynamic configuration (the same tree the
file provider reads), the file provider's files are read as they are, and the
static configuration is the ``traefik`` service's command flags. Label keys are
case-insensitive in Traefik; they are matched to the schema's property names, and
values converted to the schema's types, so that the whole can be validated against
the JSON schema and fed to the real binary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["SCHEMA_FILE", "dynamic_from_labels", "file_provider_config", "load_schema", "merge", "static_flags"]

SCHEMA_FILE = Path(__file__).with_name("schemas") / "traefik-v3-dynamic.schema.json"
# Labels that configure the Docker provider itself, not the dynamic configuration.
DOCKER_ONLY = ("traefik.enable", "traefik.docker.")


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def _subschema(schema: dict[str, Any] | None, key: str) -> tuple[str, dict[str, Any] | None]:
    """The canonical spelling of ``key`` below ``schema`` and its schema (None when unknown)."""
    if not schema:
        return key, None
    for name, sub in schema.get("properties", {}).items():
        if name.lower() == key.lower():
            return name, sub
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        return key, extra
    return key, None


def _typed(value: str, schema: dict[str, Any] | None) -> Any:
    if not schema:
        return value
    kind = schema.get("type")
    if kind == "integer" and value.lstrip("-").isdigit():
        return int(value)
    if kind == "boolean" and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind == "array":
        return [part.strip() for part in value.split(",")]
    return value


def dynamic_from_labels(labels: dict[str, str], service_host: str) -> dict[str, Any]:
    """``traefik.http.routers.x.rule=...`` labels to ``{"http": {"routers": {"x": {"rule": ...}}}}``.

    The Docker provider's shorthand ``loadbalancer.server.port`` becomes a server URL
    on ``service_host``, as the provider does with the container's address.
    """
    schema = load_schema()
    tree: dict[str, Any] = {}
    for key, value in sorted(labels.items()):
        if not key.startswith("traefik.") or key.startswith(DOCKER_ONLY):
            continue
        parts = key.split(".")[1:]
        node: dict[str, Any] = tree
        sub: dict[str, Any] | None = schema
        path = parts
        # traefik.http.services.<name>.loadbalancer.server.<port|scheme>
        if len(parts) == 6 and parts[3].lower() == "loadbalancer" and parts[4].lower() == "server":
            name = parts[2]
            balancer = tree.setdefault("http", {}).setdefault("services", {}).setdefault(name, {})
            balancer = balancer.setdefault("loadBalancer", {})
            server = balancer.setdefault("servers", [{}])[0]
            server.setdefault("_", {})[parts[5].lower()] = value
            continue
        for index, part in enumerate(path):
            name, sub = _subschema(sub, part)
            if index == len(path) - 1:
                node[name] = _typed(value, sub)
            else:
                node = node.setdefault(name, {})
    # Resolve the server shorthand into a URL.
    for service in tree.get("http", {}).get("services", {}).values():
        for server in service.get("loadBalancer", {}).get("servers", []):
            shorthand = server.pop("_", None)
            if shorthand is not None:
                scheme = shorthand.get("scheme", "http")
                server["url"] = f"{scheme}://{service_host}:{shorthand['port']}"
    return tree


def merge(*trees: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merge(result[key], value)
            else:
                result[key] = value
    return result


def file_provider_config(directory: Path) -> dict[str, Any]:
    return merge(*(yaml.safe_load(path.read_text()) or {} for path in sorted(directory.glob("*.yml"))))


def static_flags(command: list[str]) -> dict[str, str]:
    """``--a.b=c`` flags to ``{"a.b": "c"}``; a bare ``--ping`` is ``"true"``, as Traefik reads it."""
    flags: dict[str, str] = {}
    for arg in command:
        assert arg.startswith("--"), f"not a flag: {arg}"
        name, _, value = arg[2:].partition("=")
        flags[name.lower()] = value if "=" in arg else "true"
    return flags
