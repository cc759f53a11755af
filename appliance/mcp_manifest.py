"""What a client accepts, for MCP: the ``describe_client`` tool, a resource per client's manifest, and the
check ``send_command`` makes against a manifest before sending.

A version-2 client may declare its commands (appliance/core/manifest.py); an LLM reads them
here instead of guessing command strings, and a command a client did not declare is refused
with the reason and the declared commands, before it reaches the device. Clients without a
manifest are unchanged: every command goes through.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, NotRequired, Protocol

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict

from .controller import CommandError
from .core.manifest import check_command
from .core.protocol import CLIENT_ID_PATTERN

#: The annotations of a tool that only reads: every read-only tool here (mcp_tools too) uses these.
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)

__all__ = ["READ_ONLY", "ClientBackend", "check_against_manifest", "register_manifest_tools"]


class ClientBackend(Protocol):
    async def client(self, client_id: str) -> dict[str, Any] | None:
        """The presence record of ``client_id`` (with ``manifest`` when it declared one), None when not connected."""


class Description(TypedDict):
    id: str
    connected: bool
    protocol: NotRequired[int]
    groups: NotRequired[list[str]]
    manifest: NotRequired[dict[str, Any] | None]
    usage: NotRequired[list[str]]


def _refuse(code: str, text: str) -> ToolError:
    return ToolError(f"[{code}] {text}")


async def _record(backend: ClientBackend, client_id: str) -> dict[str, Any] | None:
    if CLIENT_ID_PATTERN.fullmatch(client_id) is None:
        raise _refuse(
            "invalid_target",
            f"'{client_id}' is not a valid client id (letters, digits, _ and -, at most 50). Call list_clients "
            "and copy a client id exactly.",
        )
    try:
        return await backend.client(client_id)
    except CommandError as exc:
        raise _refuse(exc.code, f"Could not read the client: {exc.detail}. Retry in a few seconds.") from None
    except OSError as exc:
        raise _refuse(
            "unreachable", f"The bridge cannot be reached ({type(exc).__name__}). Retry in a few seconds."
        ) from None


def _usage(manifest: dict[str, Any]) -> list[str]:
    """One line per command: ``MoveForward <distance:number> [speed:number] — Moves forward``."""
    lines = []
    for spec in manifest["commands"]:
        schema = spec["arguments"]
        words = [spec["name"]]
        for name, prop in schema["properties"].items():
            word = f"{name}:{prop['type']}"
            words.append(f"<{word}>" if name in schema["required"] else f"[{word}]")
        lines.append(" ".join(words) + (f" — {spec['description']}" if spec["description"] else ""))
    return lines


async def check_against_manifest(backend: ClientBackend, target: str, message: str) -> None:
    """Refuse ``message`` when ``target`` declared a manifest it does not fit; otherwise do nothing.

    A target that is not connected, or declared no manifest, is left to the command itself
    (offline errors and queueing stay as they were).
    """
    record = await _record(backend, target)
    manifest = None if record is None else record.get("manifest")
    if manifest is None:
        return
    error = check_command(manifest, message)
    if error is not None:
        raise _refuse(
            error.code,
            f"{target} did not declare this command: {error.detail} Call describe_client with target='{target}' "
            "to see its commands and their arguments, then send one of them. Nothing was sent.",
        )


def register_manifest_tools(server: MCPServer, backend: ClientBackend) -> None:
    """Add ``describe_client`` and the ``wsbridge://clients/{client_id}/manifest`` resource to ``server``."""

    @server.tool(
        title="Describe a client's commands",
        annotations=READ_ONLY,
    )
    async def describe_client(
        target: Annotated[
            str,
            Field(
                description="The exact client id, as listed by list_clients.",
                json_schema_extra={"pattern": CLIENT_ID_PATTERN.pattern},
            ),
        ],
    ) -> Description:
        """Tell which commands one client accepts: each command's name, description and arguments.

        Call it before send_command to learn the exact command texts a client understands. A command is
        its name followed by its arguments as words, in order ("usage" shows them: <required>, [optional]).
        "manifest": null means the client declared nothing: its commands are not known here.
        """
        record = await _record(backend, target)
        if record is None:
            raise _refuse(
                "target_offline",
                f"Client '{target}' is not connected. Call list_clients to see the connected client ids.",
            )
        manifest = record.get("manifest")
        described: Description = {"id": target, "connected": True, "protocol": int(record.get("protocol", 1))}
        if record.get("groups"):
            described["groups"] = list(record["groups"])
        described["manifest"] = manifest
        if manifest is not None:
            described["usage"] = _usage(manifest)
        return described

    @server.resource(
        "wsbridge://clients/{client_id}/manifest",
        name="client_manifest",
        title="A client's commands",
        description="The commands a connected client declared (name, description, JSON Schema of its arguments); "
        "null when it declared none.",
        mime_type="application/json",
    )
    async def client_manifest(client_id: str) -> str:
        record = await _record(backend, client_id)
        if record is None:
            raise ValueError(f"Client '{client_id}' is not connected; call list_clients for the connected ids.")
        return json.dumps({"id": client_id, "manifest": record.get("manifest")})
