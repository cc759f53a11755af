"""The bridge as Model Context Protocol tools: ``list_clients``, ``send_command``, ``broadcast``.

One tool set, two transports: ``wsbridge mcp`` serves it over stdio and reaches the
appliance through the HTTP API (:class:`~appliance.controller.HttpController`); the
appliance serves it itself at ``/mcp`` over streamable HTTP, calling its command
service directly. Either way the tools talk to a :class:`Backend`.

Descriptions and errors are written for a language model: each error says what went
wrong and what to do next, and ``send_command`` never picks a target on its own.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from . import __version__
from .controller import (
    ClientOffline,
    CommandError,
    DeliveryFailed,
    DuplicateId,
    InvalidCommand,
    MessageTooLarge,
    QueueFull,
    RateLimited,
    ReplyTimeout,
)
from .core.protocol import CLIENT_ID_PATTERN

__all__ = ["Backend", "build_mcp_server", "explain", "serve_stdio"]

INSTRUCTIONS = (
    "WebSocket Bridge relays text commands to connected game and device clients (for example Unity "
    "scenes) and returns their replies. Call list_clients first to learn which client ids are connected; "
    "then send_command to one client id to get that client's reply, or broadcast to reach every client "
    "or one group. Commands are plain text whose meaning is defined by the client (for example "
    '"MoveForward 10").'
)


class Backend(Protocol):
    """What the tools need: the HTTP API's two operations, raising :class:`CommandError`."""

    async def clients(self, **filters: Any) -> dict[str, Any]: ...

    async def command(self, target: str, message: str, **fields: Any) -> dict[str, Any]: ...


def explain(exc: CommandError, target: str) -> str:
    """An error text a model can act on: what happened, then what to try."""
    if isinstance(exc, ClientOffline):
        return (
            f"Client '{target}' is not connected. Call list_clients to see the connected client ids and use "
            "one of them exactly, or call send_command again with queue=true to deliver the command when "
            f"'{target}' connects."
        )
    if isinstance(exc, ReplyTimeout):
        return (
            f"The command reached '{target}' (or its queue) but no reply came in time. The client may still "
            "be working: call send_command again with a larger timeout_seconds, or with wait=false if no "
            "reply is needed."
        )
    if isinstance(exc, RateLimited):
        wait = exc.retry_after_ms
        return f"Too many commands: wait {wait or 1000} ms, then retry the same call."
    if isinstance(exc, MessageTooLarge):
        return f"The message is too large (the limit is {exc.limit} bytes). Send a shorter message."
    if isinstance(exc, QueueFull):
        return f"Too many commands are already waiting for '{target}'. Wait for earlier replies, then retry."
    if isinstance(exc, DuplicateId):
        return "A command with this id is still in flight. Wait for its outcome or use another id."
    if isinstance(exc, DeliveryFailed):
        return "The bridge cannot reach the client's server right now (internal outage). Retry in a few seconds."
    if isinstance(exc, InvalidCommand):
        return f"The command was refused as invalid: {exc.detail}. Fix the arguments and retry."
    return f"The bridge refused the command ({exc.code}): {exc.detail}"


def _check_client_id(target: str) -> None:
    if target in ("*", "") or target.startswith("group:"):
        raise ToolError(
            f"send_command needs one client id, not '{target}'. Use broadcast to reach every client or a group, "
            "or call list_clients to pick a client id."
        )
    if CLIENT_ID_PATTERN.fullmatch(target) is None:
        raise ToolError(
            f"'{target}' is not a valid client id (letters, digits, _ and -, at most 50). Call list_clients "
            "and copy a client id exactly."
        )


def build_mcp_server(backend: Backend) -> MCPServer:
    """The MCP server with the bridge's three tools, bound to ``backend``."""
    server = MCPServer(name="websocket-bridge", version=__version__, instructions=INSTRUCTIONS)

    @server.tool()
    async def list_clients(
        role: Literal["client", "controller", "any"] = "client",
        group: str | None = None,
        id_prefix: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """List the connections of the bridge, by default the clients (games, devices) that accept commands.

        Returns {"clients": [{"id", "role", "groups", "instance", "connected_since", ...}], "next_cursor"}.
        Use an "id" from this list as the target of send_command. Filter with group (a group name the
        clients joined) or id_prefix; when next_cursor is not null, call again with cursor=next_cursor
        for the next page.
        """
        filters = {"role": None if role == "any" else role, "group": group, "prefix": id_prefix, "limit": limit}
        try:
            page = await backend.clients(**filters, cursor=cursor)
        except CommandError as exc:
            raise ToolError(f"Could not list clients ({exc.code}): {exc.detail}") from None
        return {"clients": page.get("clients", []), "next_cursor": page.get("next_cursor")}

    @server.tool()
    async def send_command(
        target: str,
        message: str,
        wait: bool = True,
        timeout_seconds: float = 10.0,
        queue: bool = False,
    ) -> dict[str, Any]:
        """Send a text command to ONE client and, with wait=true (the default), return that client's reply.

        target: the exact client id, as listed by list_clients (no wildcards; use broadcast for many).
        message: the command text the client understands, e.g. "MoveForward 10".
        wait: true returns {"status": "replied", "reply": ..., "rtt_ms": ...}; false returns as soon as
        the command is delivered ({"status": "delivered"}).
        timeout_seconds: how long to wait for the reply (1 ms to the bridge's maximum).
        queue: true keeps the command for a client that is not connected yet and delivers it when it
        connects ({"status": "queued"} with wait=false).
        """
        _check_client_id(target)
        timeout_ms = max(1, round(timeout_seconds * 1000))
        fields: dict[str, Any] = {"queue": True} if queue else {}
        if wait:
            fields["wait_ms"] = timeout_ms
        else:
            fields["timeout_ms"] = timeout_ms
        try:
            answer = await backend.command(target, message, **fields)
        except CommandError as exc:
            raise ToolError(explain(exc, target)) from None
        if answer.get("status") == "replied":
            return {
                "status": "replied",
                "target": target,
                "reply": answer.get("message"),
                "rtt_ms": answer.get("rtt_ms"),
            }
        return {k: v for k, v in answer.items() if k in ("status", "target", "id", "expires_in_ms")}

    @server.tool()
    async def broadcast(message: str, group: str | None = None) -> dict[str, Any]:
        """Send a text command to every connected client, or to the clients in one group; no replies are awaited.

        Returns {"status": "delivered", "count": N}: how many clients received it across the cluster
        (0 means nobody was connected or in the group). Use send_command to get replies.
        """
        target = "*" if group is None else f"group:{group}"
        if group is not None and CLIENT_ID_PATTERN.fullmatch(group) is None:
            raise ToolError(f"'{group}' is not a valid group name (letters, digits, _ and -, at most 50).")
        try:
            answer = await backend.command(target, message)
        except CommandError as exc:
            raise ToolError(explain(exc, target)) from None
        return {"status": answer.get("status", "delivered"), "target": target, "count": answer.get("count", 0)}

    return server


async def serve_stdio(url: str, token: str) -> None:
    """``wsbridge mcp``: the tools over stdio, reaching the appliance through its HTTP API."""
    from .controller import HttpController

    async with HttpController(url, token) as api:
        await build_mcp_server(api).run_stdio_async()
