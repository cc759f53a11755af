"""The bridge as Model Context Protocol tools: ``list_clients``, ``send_command``, ``broadcast``, ``get_command``.

One tool set, two transports: ``wsbridge mcp`` serves it over stdio and reaches the
appliance through the HTTP API (:class:`~appliance.controller.HttpController`); the
appliance serves it itself at ``/mcp`` over streamable HTTP, calling its command
service directly. Either way the tools talk to a :class:`Backend`.

Descriptions and errors are written for a language model: each error says what went
wrong and what to do next, and ``send_command`` never picks a target on its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,  # pydantic needs these on Python < 3.12
    Protocol,
    TypeVar,
)

import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field
from typing_extensions import TypedDict

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
from .core.protocol_v2 import MAX_COMMAND_ID_LENGTH
from .mcp_manifest import READ_ONLY, check_against_manifest, register_manifest_tools

__all__ = ["Backend", "build_mcp_server", "explain", "serve_stdio"]

INSTRUCTIONS = (
    "WebSocket Bridge relays text commands to connected game and device clients (for example Unity "
    "scenes) and returns their replies. Call list_clients first to learn which client ids are connected; "
    "then send_command to one client id to get that client's reply, or broadcast to reach every client "
    "or one group. Commands are plain text whose meaning is defined by the client (for example "
    '"MoveForward 10"); describe_client lists the commands a client declared, with their arguments.'
)


class Backend(Protocol):
    """What the tools need: the HTTP API's two operations, raising :class:`CommandError`."""

    async def clients(self, **filters: Any) -> dict[str, Any]: ...

    async def command(self, target: str, message: str, **fields: Any) -> dict[str, Any]: ...

    async def command_status(self, command_id: str, wait_ms: int | None = None) -> dict[str, Any]: ...

    async def client(self, client_id: str) -> dict[str, Any] | None: ...


def explain(exc: CommandError, target: str) -> str:
    """An error text a model can act on: what happened, then what to try."""
    if isinstance(exc, ClientOffline):
        return (
            f"Client '{target}' is not connected. Call list_clients to see the connected client ids and use "
            "one of them exactly, or call send_command again with queue=true to deliver the command when "
            f"'{target}' connects."
        )
    if isinstance(exc, ReplyTimeout):
        return explain_timeout(exc, target)
    if exc.code == "too_many_keys":
        return explain_too_many_keys(exc)
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


def explain_too_many_keys(exc: CommandError) -> str:
    """A new idempotency_key beyond the token's budget of live keys: when to retry, or how to do without."""
    seconds = max(1, -(-int(exc.extra.get("retry_after_ms") or 1000) // 1000))
    return (
        f"Nothing was sent: your token already holds its limit of {exc.extra.get('limit', 'its')} live idempotency "
        f"keys (each is kept for the idempotency window). Retry with the same idempotency_key in {seconds} s, when "
        "the oldest expires, or call send_command without idempotency_key (a retry of that call may then run the "
        "command twice)."
    )


#: Bounds of the tools' arguments, checked by the tools themselves so that stdio and /mcp
#: answer a bad value with the same words (the HTTP API behind stdio has its own limits).
_T = TypeVar("_T")

LIMIT_RANGE = (1, 1000)
TIMEOUT_RANGE = (0.1, 300.0)


def _refuse(code: str, text: str) -> ToolError:
    """Every tool failure names a code first, then says what to do next."""
    return ToolError(f"[{code}] {text}")


def _check_client_id(target: str) -> None:
    if target in ("*", "") or target.startswith("group:"):
        raise _refuse(
            "not_one_client",
            f"send_command needs one client id, not '{target}'. Use broadcast to reach every client or a group "
            "(with wait_seconds to collect their replies), or call list_clients to pick a client id.",
        )
    if CLIENT_ID_PATTERN.fullmatch(target) is None:
        raise _refuse(
            "invalid_target",
            f"'{target}' is not a valid client id (letters, digits, _ and -, at most 50). Call list_clients "
            "and copy a client id exactly.",
        )


def _check_range(name: str, value: float, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise _refuse("invalid_argument", f"{name} must be between {low:g} and {high:g}; {value:g} was given.")


async def _reach(call: Callable[[], Awaitable[_T]]) -> _T:
    """A backend that cannot be reached (stdio's HTTP hop) is a tool failure the model can act on."""
    try:
        return await call()
    except (OSError, httpx.TransportError) as exc:
        raise _refuse(
            "unreachable", f"The bridge cannot be reached ({type(exc).__name__}). Retry in a few seconds."
        ) from None


class ClientInfo(TypedDict):
    id: str
    role: str
    instance: str
    connected_since: str
    groups: NotRequired[list[str]]
    protocol: NotRequired[int]
    last_activity: NotRequired[str]


class ClientList(TypedDict):
    clients: list[ClientInfo]
    next_cursor: str | None


class CommandOutcome(TypedDict):
    status: Literal["replied", "delivered", "queued"]
    target: str
    id: NotRequired[str]
    reply: NotRequired[str]
    rtt_ms: NotRequired[float]
    expires_in_ms: NotRequired[int]
    replayed: NotRequired[bool]


class BroadcastReply(TypedDict):
    client: str
    message: str
    rtt_ms: float


class BroadcastOutcome(TypedDict):
    status: Literal["delivered", "replied"]
    target: str
    count: int
    # With wait_seconds: each version-2 client's reply, and the ones that did not answer in time.
    replies: NotRequired[list[BroadcastReply]]
    no_reply: NotRequired[list[str]]


_CLIENT_FIELDS = tuple(ClientInfo.__annotations__)
_KEY_SCHEMA = {"minLength": 1, "maxLength": MAX_COMMAND_ID_LENGTH}
IDEMPOTENCY_KEY_HELP = (
    "A key of your choosing (e.g. a UUID) that makes this call safe to retry: calling again with the same "
    "key returns the first call's outcome and never runs the command twice. Each token keeps a limited number "
    "of live keys (10,000 by default, for the idempotency window): beyond, a new key is refused (too_many_keys)."
)


def _keyed(idempotency_key: str | None) -> dict[str, Any]:
    """The key travels as the command's id, which the HTTP API and the command service deduplicate by."""
    if idempotency_key is None:
        return {}
    if not 1 <= len(idempotency_key) <= MAX_COMMAND_ID_LENGTH:
        raise _refuse(
            "invalid_argument",
            f"idempotency_key must have 1 to {MAX_COMMAND_ID_LENGTH} characters; {len(idempotency_key)} were given.",
        )
    return {"id": idempotency_key}


_TARGET_SCHEMA = {"pattern": CLIENT_ID_PATTERN.pattern}

DRIVE_A_DEVICE = """You are driving devices (games, robots, kiosks) through WebSocket Bridge.

1. Call list_clients to see which client ids are connected (role "client"). Use an id exactly as listed.
2. Call send_command with that id as target and a command text the device understands, for example
   "MoveForward 10". It returns the device's reply.
3. If the reply does not come in time, do not send the same command again: the device may still be
   working, and a second send runs it twice. Wait, or send a different command that asks for its state.
4. To reach every device or one group at once, call broadcast; it reports how many received it, and
   with wait_seconds each device's reply (devices on protocol version 2) and which did not answer.
{goal}"""


def build_mcp_server(backend: Backend, subscriptions: Any = None) -> MCPServer:
    """The MCP server with the bridge's three tools, bound to ``backend``; ``subscriptions``: the SDK's
    subscription bus (/mcp passes the event feed's, appliance/mcp_events.py; stdio keeps the default)."""
    server = MCPServer(
        name="websocket-bridge", version=__version__, instructions=INSTRUCTIONS, subscriptions=subscriptions
    )

    @server.tool(
        title="List connected clients",
        annotations=READ_ONLY,
    )
    async def list_clients(
        role: Annotated[
            Literal["client", "controller", "any"],
            Field(description='Which connections: "client" (devices that accept commands), "controller" or "any".'),
        ] = "client",
        group: Annotated[str | None, Field(description="Only clients that joined this group.")] = None,
        id_prefix: Annotated[str | None, Field(description="Only ids that start with this text.")] = None,
        limit: Annotated[
            int,
            Field(
                description="At most this many entries per page.",
                json_schema_extra={"minimum": LIMIT_RANGE[0], "maximum": LIMIT_RANGE[1]},
            ),
        ] = 100,
        cursor: Annotated[
            str | None, Field(description="next_cursor of the previous page, to get the page after it.")
        ] = None,
    ) -> ClientList:
        """List the connections of the bridge, by default the clients (games, devices) that accept commands.

        Use an "id" from this list as the target of send_command. When next_cursor is not null, call
        again with cursor=next_cursor for the next page.
        """
        _check_range("limit", limit, LIMIT_RANGE)
        filters = {"role": None if role == "any" else role, "group": group, "prefix": id_prefix, "limit": limit}
        try:
            page = await _reach(lambda: backend.clients(**filters, cursor=cursor))
        except (InvalidCommand, ValueError) as exc:
            if cursor:
                raise _refuse(
                    "invalid_cursor", "The cursor is not one this bridge gave out. Call list_clients without cursor."
                ) from None
            raise _refuse("invalid_argument", f"The listing was refused: {exc}. Fix the arguments and retry.") from None
        except CommandError as exc:
            raise _refuse(exc.code, f"Could not list clients: {exc.detail}. Retry in a few seconds.") from None
        clients = [{k: c[k] for k in _CLIENT_FIELDS if k in c} for c in page.get("clients", [])]
        return {"clients": clients, "next_cursor": page.get("next_cursor")}  # type: ignore[typeddict-item]

    @server.tool(
        title="Send a command to one client",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True
        ),
    )
    async def send_command(
        target: Annotated[
            str,
            Field(
                description="The exact client id, as listed by list_clients (no wildcards; use broadcast for many).",
                json_schema_extra=_TARGET_SCHEMA,
            ),
        ],
        message: Annotated[str, Field(description='The command text the client understands, e.g. "MoveForward 10".')],
        wait: Annotated[
            bool, Field(description="true: return the client's reply; false: return once the command is delivered.")
        ] = True,
        timeout_seconds: Annotated[
            float,
            Field(
                description="How long to wait for the reply (or, with wait=false, for delivery), in seconds.",
                json_schema_extra={"minimum": TIMEOUT_RANGE[0], "maximum": TIMEOUT_RANGE[1]},
            ),
        ] = 10.0,
        queue: Annotated[
            bool, Field(description="true: keep the command for a client that is not connected yet.")
        ] = False,
        idempotency_key: Annotated[
            str | None, Field(description=IDEMPOTENCY_KEY_HELP, json_schema_extra=_KEY_SCHEMA)
        ] = None,
        ctx: Context | None = None,
    ) -> CommandOutcome:
        """Send a text command to ONE client and, with wait=true (the default), return that client's reply.

        Take the target from list_clients; use broadcast to reach many clients.

        Returns {"status": "replied", "reply", "rtt_ms"} with wait=true; {"status": "delivered"} (or
        "queued" with queue=true for a client not connected yet) with wait=false.
        """
        _check_client_id(target)
        _check_range("timeout_seconds", timeout_seconds, TIMEOUT_RANGE)
        await check_against_manifest(backend, target, message)  # Only clients that declared their commands.
        timeout_ms = round(timeout_seconds * 1000)
        fields: dict[str, Any] = {"queue": True} if queue else {}
        fields.update(_keyed(idempotency_key))
        fields["wait_ms" if wait else "timeout_ms"] = timeout_ms
        try:
            answer = await _reach(
                lambda: with_progress(
                    ctx, f"waiting for {target}", timeout_seconds, backend.command(target, message, **fields)
                )
            )
        except CommandError as exc:
            raise _refuse(exc.code, explain(exc, target)) from None
        if answer.get("status") == "replied":
            answer = {**answer, "reply": answer.get("message", ""), "rtt_ms": answer.get("rtt_ms", 0.0)}
        kept = {k: answer[k] for k in ("status", "id", "reply", "rtt_ms", "expires_in_ms", "replayed") if k in answer}
        return {"target": target, **kept}  # type: ignore[typeddict-item]

    @server.tool(
        title="Broadcast a command",
        annotations=ToolAnnotations(
            read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True
        ),
    )
    async def broadcast(
        message: Annotated[str, Field(description="The command text every receiving client gets.")],
        idempotency_key: Annotated[
            str | None, Field(description=IDEMPOTENCY_KEY_HELP, json_schema_extra=_KEY_SCHEMA)
        ] = None,
        group: Annotated[
            str | None,
            Field(
                description="Only the clients that joined this group; absent: every client.",
                json_schema_extra=_TARGET_SCHEMA,
            ),
        ] = None,
        wait_seconds: Annotated[
            float | None,
            Field(
                description="Collect the replies of clients that speak protocol version 2 for up to this many "
                "seconds (returns early when all answered); absent: no replies are awaited.",
                json_schema_extra={"minimum": TIMEOUT_RANGE[0], "maximum": TIMEOUT_RANGE[1]},
            ),
        ] = None,
    ) -> BroadcastOutcome:
        """Send a text command to every connected client, or to the clients in one group.

        Returns {"status": "delivered", "count": N}: how many clients received it across the cluster
        (0 means nobody was connected or in the group). With wait_seconds it also returns "replies"
        (client, message, rtt_ms per client) and "no_reply" (clients that did not answer in time);
        status "replied" when every awaited client answered. Version-1 clients are counted, never awaited.
        """
        target = "*" if group is None else f"group:{group}"
        if group is not None and CLIENT_ID_PATTERN.fullmatch(group) is None:
            raise _refuse(
                "invalid_target", f"'{group}' is not a valid group name (letters, digits, _ and -, at most 50)."
            )
        fields = _keyed(idempotency_key)
        if wait_seconds is not None:
            _check_range("wait_seconds", wait_seconds, TIMEOUT_RANGE)
            fields["wait_ms"] = round(wait_seconds * 1000)
        try:
            answer = await _reach(lambda: backend.command(target, message, **fields))
        except CommandError as exc:
            raise _refuse(exc.code, explain(exc, target)) from None
        outcome: BroadcastOutcome = {"status": "delivered", "target": target, "count": int(answer.get("count", 0))}
        if "replies" in answer:
            outcome["status"] = "replied" if answer.get("status") == "replied" else "delivered"
            outcome["replies"] = [
                {"client": str(r["client"]), "message": str(r["message"]), "rtt_ms": float(r["rtt_ms"])}
                for r in answer["replies"]
            ]
            outcome["no_reply"] = [str(c) for c in answer.get("no_reply", [])]
        return outcome

    @server.resource(
        "wsbridge://clients",
        name="clients",
        title="Connected clients",
        description="The clients connected across the cluster, as list_clients returns them (first 1000).",
        mime_type="application/json",
    )
    async def clients_resource() -> str:
        page = await _reach(lambda: backend.clients(role="client", limit=LIMIT_RANGE[1]))
        clients = [{k: c[k] for k in _CLIENT_FIELDS if k in c} for c in page.get("clients", [])]
        return json.dumps({"clients": clients, "next_cursor": page.get("next_cursor")})

    @server.prompt(name="drive_a_device", title="Drive a device", description="How to drive devices with these tools.")
    def drive_a_device(goal: Annotated[str, Field(description="What the devices should do.")] = "") -> str:
        return DRIVE_A_DEVICE.format(goal=f"\nGoal: {goal}" if goal else "")

    register_manifest_tools(server, backend)
    add_followup_tool(server, backend)
    _forbid_unknown_arguments(server)
    return server


def _forbid_unknown_arguments(server: MCPServer) -> None:
    """A misspelt argument (``timeout`` for ``timeout_seconds``) is refused, not silently ignored.

    The SDK's argument models ignore extra keys; there is no public switch, so each tool's model
    is rebuilt with ``extra="forbid"`` (tests/integration/test_mcp.py fails if the SDK changes).
    """
    for tool in server._tool_manager.list_tools():
        model = tool.fn_metadata.arg_model
        model.model_config["extra"] = "forbid"
        model.model_rebuild(force=True)
        tool.parameters["additionalProperties"] = False


async def serve_stdio(url: str, token: str) -> None:
    """``wsbridge mcp``: the tools over stdio, reaching the appliance through its HTTP API."""
    from .controller import HttpController

    async with HttpController(url, token) as api:
        await build_mcp_server(api).run_stdio_async()


# --- following a command up (GET /api/v1/commands/{id}; appliance/commands/followup.py) -----------

#: How often a long send_command tells a caller that asked for progress that it still waits.
PROGRESS_SECONDS = 1.0


def explain_timeout(exc: CommandError, target: str) -> str:
    """No reply in time: follow the command up by its id; never send it again blindly."""
    command_id = exc.extra.get("id")
    follow = f"call get_command with command_id={json.dumps(command_id)}" if command_id is not None else "follow it up"
    if exc.extra.get("delivered") is False:
        return (
            f"The command never reached '{target}': it waited behind an earlier command that '{target}' has not "
            f"answered yet (or in its queue) and was not sent. To check, {follow}. Sending it again is safe once "
            "the earlier command is answered or timed out."
        )
    return (
        f"The command reached '{target}' but no reply came in time. Do not send it again: the client may still "
        f"be working on it, and a second send would run it twice. To get its reply when it comes, {follow} "
        "(with wait_seconds to wait for it)."
    )


def _wants_progress(ctx: Context | None) -> bool:
    if ctx is None:
        return False
    try:
        meta = ctx.request_context.meta
    except ValueError:  # Not inside a request.
        return False
    if meta is None:
        return False
    if not isinstance(meta, dict):
        return getattr(meta, "progress_token", None) is not None
    return meta.get("progress_token", meta.get("progressToken")) is not None


async def with_progress(ctx: Context | None, waiting_for: str, total_seconds: float, work: Awaitable[_T]) -> _T:
    """``await work``, with a progress notification every :data:`PROGRESS_SECONDS` when the caller asked for them.

    An MCP client that gets progress can keep waiting past its own request timeout (a 90 s
    command under a client's 60 s default otherwise timed out with no sign of life).
    """
    if not _wants_progress(ctx):
        return await work
    assert ctx is not None
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait((task,), timeout=PROGRESS_SECONDS)
            if done:
                return task.result()
            elapsed = time.monotonic() - started
            await ctx.report_progress(round(elapsed, 1), total_seconds, f"{waiting_for}: {elapsed:.0f} s")
    finally:
        if not task.done():  # The call was cancelled: stop waiting (the command's record says so).
            task.cancel()


class CommandStatus(TypedDict):
    id: str | int
    target: str
    status: Literal["sending", "delivered", "queued", "replied", "timeout", "failed"]
    caller: Literal["waiting", "answered", "cancelled", "disconnected"]
    delivered: bool
    open: bool
    reply: NotRequired[str]
    rtt_ms: NotRequired[float]
    late: NotRequired[bool]
    error: NotRequired[str]
    detail: NotRequired[str]
    message_truncated: NotRequired[bool]
    reply_truncated: NotRequired[bool]
    lost: NotRequired[bool]


_STATUS_FIELDS = tuple(CommandStatus.__annotations__)


def add_followup_tool(server: MCPServer, backend: Backend) -> None:
    """``get_command``: a command's status and reply, on any instance, after its caller stopped waiting."""

    @server.tool(
        title="Follow a command up",
        annotations=READ_ONLY,
    )
    async def get_command(
        command_id: Annotated[
            str,
            Field(
                description="The id send_command returned (or named in its timeout error), or your idempotency_key.",
                json_schema_extra=_KEY_SCHEMA,
            ),
        ],
        wait_seconds: Annotated[
            float,
            Field(
                description="Wait up to this long for the reply (0: answer at once).",
                json_schema_extra={"minimum": 0, "maximum": TIMEOUT_RANGE[1]},
            ),
        ] = 0.0,
        ctx: Context | None = None,
    ) -> CommandStatus:
        """What became of a command sent with send_command: its status and, once it came, the client's reply.

        Use it after send_command timed out, or with wait=false: a reply that came late is here
        (late=true). "open": true means a reply may still come; call again with wait_seconds to wait for it.
        "lost": true means the bridge instance that sent it restarted: nothing more will come. The record keeps
        the first 4 KiB of the message and reply (message_truncated, reply_truncated).
        """
        _check_range("wait_seconds", wait_seconds, (0.0, TIMEOUT_RANGE[1]))
        follow = backend.command_status(command_id, wait_ms=round(wait_seconds * 1000))
        try:
            record = await _reach(lambda: with_progress(ctx, f"waiting for {command_id}", wait_seconds, follow))
        except CommandError as exc:
            if exc.code == "unknown_command":
                raise _refuse(
                    exc.code,
                    f"No command with id '{command_id}' is known (records are kept for a while after the "
                    "command). Use the id send_command returned, exactly.",
                ) from None
            raise _refuse(exc.code, f"Could not read the command: {exc.detail}. Retry in a few seconds.") from None
        return {k: record[k] for k in _STATUS_FIELDS if record.get(k) is not None}  # type: ignore[return-value]
