"""HTTP command API (``/api/v1/commands``, ``/api/v1/clients/...``); the MCP endpoint is appliance/mcp_http.py.

Handlers are thin: they authenticate, let Litestar validate the body (one error
shape, 422), and call the command service on ``app.state.commands``. The request
and response types are msgspec Structs with descriptions, so the OpenAPI schema
Litestar serves at ``/schema/openapi.json`` is accurate enough to generate an LLM
tool definition from.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Annotated, Any, Literal, cast

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, Parameter
from msgspec import UNSET, Meta, Struct, UnsetType

from .audit import audit_admin_command
from .brokers.base import BrokerUnavailable
from .client_pages import MAX_PAGE, filter_clients
from .commands import HTTP_CONTROLLER, CommandService
from .core.protocol import CloseCode, ErrorCode
from .core.protocol_v2 import MAX_COMMAND_ID_LENGTH
from .http_auth import require_token
from .recent import RecentCommands
from .relay import Relay

__all__ = ["API_HANDLERS", "ApiError", "CommandBody", "api_error", "validation_as_422"]


# --- bodies --------------------------------------------------------------------------------------

CommandId = str | int


class CommandBody(Struct, forbid_unknown_fields=True):
    """A command for one client, every client (``*``) or a group (``group:<name>``)."""

    target: Annotated[
        str,
        Meta(
            description='A client id (^[a-zA-Z0-9_-]{1,50}$), "*" for every client, or "group:<name>".',
            examples=["unity_client_1"],
        ),
    ]
    message: Annotated[str, Meta(description="The text the client receives.", examples=["MoveForward 10"])]
    id: Annotated[
        CommandId | None,
        Meta(
            description=f"Your id for this command (string of 1-{MAX_COMMAND_ID_LENGTH} characters, or integer); "
            "generated if absent. It also makes the command safe to retry: the same id within "
            "IDEMPOTENCY_WINDOW_SECONDS (default 600) returns the first command's outcome (marked replayed), "
            "or waits for it, and never reaches the client twice; the same id for another command is 409."
        ),
    ] = None
    wait_ms: (
        Annotated[
            int,
            Meta(
                ge=1,
                description="Wait this long for the client's reply: 200 with the reply, or 504. "
                "Without it the answer is 202 as soon as the command is delivered or queued. "
                'For "*" or a group: 200 with the count, the replies of version-2 clients and those that did '
                "not reply in time (no_reply), as soon as all replied or when wait_ms is over.",
            ),
        ]
        | None
    ) = None
    timeout_ms: (
        Annotated[int, Meta(ge=1, description="How long a queued command may wait for its client (without wait_ms).")]
        | None
    ) = None
    queue: Annotated[
        bool, Meta(description="Keep the command for a client that is not connected and deliver it when it connects.")
    ] = False


class BroadcastReply(Struct):
    """A version-2 client's reply to a broadcast or group command whose caller waited (wait_ms)."""

    client: str
    message: str
    rtt_ms: Annotated[float, Meta(description="From the broadcast's send to this reply, in milliseconds.")]


class CommandResult(Struct):
    id: CommandId
    status: Literal["delivered", "queued", "replied", "timeout"]
    target: str
    sender: str | None = None
    message: Annotated[str | None, Meta(description="The client's reply (status replied).")] = None
    rtt_ms: Annotated[float | None, Meta(description="Round trip to the reply, in milliseconds.")] = None
    count: Annotated[int | None, Meta(description='Clients reached by "*" or a group, cluster-wide.')] = None
    replies: Annotated[
        list[BroadcastReply] | None,
        Meta(description='"*" or a group with wait_ms: the replies of version-2 clients, in arrival order.'),
    ] = None
    no_reply: Annotated[
        list[str] | None,
        Meta(description='"*" or a group with wait_ms: version-2 clients that did not reply within wait_ms.'),
    ] = None
    expires_in_ms: Annotated[int | None, Meta(description="How long a queued command waits.")] = None
    duplicate: bool | None = None
    replayed: Annotated[
        bool | None, Meta(description="true: the outcome of an earlier request with the same id or Idempotency-Key.")
    ] = None
    detail: str | None = None


class ErrorBody(Struct, omit_defaults=True):
    error: Annotated[
        str,
        Meta(
            description="target_offline, message_too_large, rate_limited, queue_full, duplicate_id, "
            "delivery_failed, invalid_target, target_not_client, ..."
        ),
    ]
    detail: str
    target: str | None = None
    id: CommandId | None = None
    limit: int | None = None
    retry_after_ms: int | None = None
    history: Annotated[
        list[dict[str, Any]] | None, Meta(description="GET /api/v1/clients/{id}: the id's connect history.")
    ] = None
    recent_commands: Annotated[
        list[dict[str, Any]] | None,
        Meta(description="GET /api/v1/clients/{id}: the commands last sent to the id, while still kept."),
    ] = None


class HistoryEntry(Struct):
    """One closed connection of an id (appliance/core/history.py)."""

    connected_at: str
    closed_at: str
    duration_seconds: float
    role: str
    instance: Annotated[str, Meta(description="The instance that held the connection.")]
    remote: Annotated[str, Meta(description="Address the connection came from (as the relay saw it).")]
    code: Annotated[int, Meta(description="Close code: the relay's (closed_by relay) or the one the peer sent.")]
    reason: Annotated[str, Meta(description="Close reason sent with the code (the peer's text when closed_by peer).")]
    closed_by: Annotated[Literal["relay", "peer"], Meta(description="Who sent the first close frame.")]
    protocol: int = 1
    token: str | None = None
    token_version: int | None = None
    messages_in: int = 0
    messages_out: int = 0


class RecentCommand(Struct, omit_defaults=True):
    """One command handed to a client's socket (appliance/core/recent.py), newest first.

    Kept in the memory of the instance that held the client: the last
    RECENT_COMMANDS_PER_CLIENT per client, texts cut to RECENT_COMMANDS_MAX_CHARS.
    """

    at: Annotated[str, Meta(description="When the relay handed it to the client's socket (UTC).")]
    controller: Annotated[
        str, Meta(description="Who sent it: a controller's id; http, dashboard or mcp for those paths.")
    ]
    message: Annotated[str, Meta(description="The command's text, cut to the length cap (… marks a cut).")]
    outcome: Annotated[
        Literal["replied", "pending", "timeout", "error", "uncorrelated"],
        Meta(
            description="uncorrelated: no reply can be matched (no id, or a broadcast); pending: waiting for the "
            "reply; replied, timeout, error (see detail)."
        ),
    ]
    instance: Annotated[str, Meta(description="The instance that held the client and recorded it.")]
    id: Annotated[CommandId | None | UnsetType, Meta(description="The command's id, if it had one.")] = UNSET
    reply: Annotated[str | None, Meta(description="The client's reply (outcome replied), cut to the cap.")] = None
    rtt_ms: Annotated[
        float | None, Meta(description="From handing the command to the socket to the reply, as that instance saw it.")
    ] = None
    detail: Annotated[str | None, Meta(description="Why it failed (outcome error).")] = None


#: Absent unless set (the single-record GET always sets them, empty or not): ``UNSET`` typed as the list, so
#: the schema says "a list" exactly as before while an unset field is left out of the JSON.
_ABSENT_HISTORYENTRY = cast(list[HistoryEntry], UNSET)
_ABSENT_RECENTCOMMAND = cast(list[RecentCommand], UNSET)


class ManifestArgument(Struct, omit_defaults=True):
    type: Annotated[Literal["string", "number", "integer", "boolean"], Meta(description="JSON Schema type.")]
    description: str = ""
    enum: list[str | int | float | bool] | None = None
    minimum: float | None = None
    maximum: float | None = None


class ManifestArguments(Struct):
    type: Literal["object"]
    properties: Annotated[
        dict[str, ManifestArgument], Meta(description="The arguments, in order: the words after the command's name.")
    ]
    required: Annotated[list[str], Meta(description="The arguments that must be given (the first ones).")]


class ManifestCommand(Struct):
    name: Annotated[str, Meta(description="The command's first word (matched ignoring case).")]
    description: str
    arguments: ManifestArguments


class ClientManifest(Struct):
    """What a version-2 client declared it accepts (docs/protocol.md, "Command manifest")."""

    commands: list[ManifestCommand]
    updated_at: Annotated[str, Meta(description="When the client sent it (UTC).")]


class ClientRecord(Struct, omit_defaults=True):
    id: str
    role: str
    instance: str
    connected_since: str
    remote: str
    messages_in: int
    messages_out: int
    last_activity: str
    token: Annotated[
        str | None | UnsetType, Meta(description="Name of the token that opened it (never its value).")
    ] = UNSET
    token_version: int | None | UnsetType = UNSET
    protocol: Annotated[int, Meta(description="2 for clients speaking wsbridge.v2 (absent: 1).")] = 1
    groups: Annotated[list[str], Meta(description="Groups the client joined (absent: none).")] = []
    manifest: Annotated[
        ClientManifest | None,
        Meta(description="The commands the client declared (GET /api/v1/clients/{id} only; absent: none declared)."),
    ] = None
    history: Annotated[
        list[HistoryEntry],
        Meta(description="Connect history of the id, cluster-wide, newest first (GET /api/v1/clients/{id} only)."),
    ] = _ABSENT_HISTORYENTRY
    recent_commands: Annotated[
        list[RecentCommand],
        Meta(
            description="Commands last sent to the id and their replies, newest first (GET /api/v1/clients/{id} only)."
        ),
    ] = _ABSENT_RECENTCOMMAND


class ClientPage(Struct):
    clients: list[ClientRecord]
    count: Annotated[int, Meta(description="Connections matching the filters, cluster-wide.")]
    next_cursor: Annotated[str | None, Meta(description="Pass as cursor for the next page; null on the last.")] = None


class ApiError(Exception):
    """An error answered with its :class:`ErrorBody` and HTTP status (``api_error`` is the app's handler)."""

    def __init__(self, status_code: int, body: ErrorBody) -> None:
        super().__init__(body.detail)
        self.status_code = status_code
        self.body = body


def api_error(request: Request[Any, Any, Any], exc: ApiError) -> Response[ErrorBody]:
    return Response(exc.body, status_code=exc.status_code)


def _broker_unavailable(exc: BrokerUnavailable) -> ApiError:
    return ApiError(503, ErrorBody(ErrorCode.BROKER_UNAVAILABLE.value, str(exc)))


def _not_connected(client_id: str, **extra: Any) -> ApiError:
    return ApiError(404, ErrorBody(ErrorCode.TARGET_OFFLINE.value, f"{client_id} is not connected", client_id, **extra))


def _commands(request: Request[Any, Any, Any]) -> CommandService:
    return request.app.state.commands


def _relay(request: Request[Any, Any, Any]) -> Relay:
    return request.app.state.relay


def _recent(request: Request[Any, Any, Any]) -> RecentCommands:
    return request.app.state.recent


_COMMAND_RESPONSES = {
    200: ResponseSpec(
        CommandResult, description='The client replied (with wait_ms); for "*" or a group, the replies collected.'
    ),
    202: ResponseSpec(CommandResult, description="Delivered or queued (without wait_ms), or queued (with)."),
    404: ResponseSpec(ErrorBody, description="target_offline: the target is not connected anywhere."),
    409: ResponseSpec(ErrorBody, description="queue_full or duplicate_id."),
    413: ResponseSpec(ErrorBody, description="message_too_large."),
    429: ResponseSpec(ErrorBody, description="rate_limited; retry after retry_after_ms."),
    503: ResponseSpec(ErrorBody, description="delivery_failed: the target's instance cannot be reached."),
    504: ResponseSpec(CommandResult, description="timeout: no reply within wait_ms."),
}


#: Long enough for a UUID or a hash with a prefix; short enough to keep Redis keys small.
MAX_IDEMPOTENCY_KEY_LENGTH = 200


@post(
    "/api/v1/commands",
    status_code=202,
    responses=_COMMAND_RESPONSES,
    summary="Send a command to a client and optionally wait for its reply",
    tags=["commands"],
)
async def post_command(
    request: Request[Any, Any, Any],
    data: JSONBody[CommandBody],
    idempotency_key: Annotated[
        str | None,
        Parameter(
            header="Idempotency-Key",
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
            description="Makes a retry safe without choosing an id: the same key within the window returns the "
            "first command's outcome and never sends it twice (takes precedence over id for that).",
        ),
    ] = None,
) -> Response[dict[str, Any]]:
    """Send ``message`` to ``target``; with ``wait_ms``, answer with the client's reply (200) or 504."""
    grant = require_token(request, allow_controller=True)
    commands = _commands(request)
    limit = commands.settings.command_timeout_max_ms
    for name, value in (("wait_ms", data.wait_ms), ("timeout_ms", data.timeout_ms)):
        if value is not None and value > limit:
            raise ValidationException(f"{name} must be at most {limit}", extra=[{"key": name, "message": "too large"}])
    if idempotency_key is None and data.id is not None:
        idempotency_key = f"id:{data.id!r}"  # repr: the string "7" and the integer 7 are different ids
    # A caller that waits for the reply stops waiting if it goes away; other answers come at once.
    send = (
        commands.send_command if data.wait_ms is None else partial(_unless_disconnected, request, commands.send_command)
    )
    outcome = await send(
        data.target,
        data.message,
        command_id=data.id,
        wait_ms=data.wait_ms,
        timeout_ms=data.timeout_ms,
        queue=data.queue,
        idempotency_key=idempotency_key,
        controller=grant.actor(HTTP_CONTROLLER),  # A named token's caller has its own name and bucket.
        owner=grant.caller,  # and its own command records (SECURITY.md)
        budget=grant.budget,
    )
    if outcome is None:  # The client went away; the command's record says so (GET /api/v1/commands/{id}).
        return Response({"error": "disconnected", "detail": "the client closed the connection"}, status_code=499)
    await audit_admin_command(
        getattr(request.app.state, "audit", None),
        grant.actor(grant.name),
        grant.role,
        _source(request),
        data.target,
        data.message,
        outcome.body.get("status") or outcome.body.get("error"),
        "api",
    )
    headers = {}
    if outcome.http_status == 429 and "retry_after_ms" in outcome.body:
        headers["Retry-After"] = str(max(1, -(-int(outcome.body["retry_after_ms"]) // 1000)))
    return Response(outcome.body, status_code=outcome.http_status, headers=headers)


# --- clients ---------------------------------------------------------------------------------


@get("/api/v1/clients", summary="List live connections across the cluster", tags=["clients"])
async def list_clients(
    request: Request[Any, Any, Any],
    role: Annotated[Literal["client", "controller"] | None, Parameter(description="Only this role.")] = None,
    group: Annotated[str | None, Parameter(description="Only clients in this group.")] = None,
    prefix: Annotated[str | None, Parameter(description="Only ids starting with this.")] = None,
    limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE, description="Page size.")] = MAX_PAGE,
    cursor: Annotated[str | None, Parameter(description="next_cursor of the previous page.")] = None,
) -> Response[ClientPage]:
    """Every live connection in the cluster, filtered and paginated."""
    require_token(request, allow_controller=True)
    try:
        records = await _relay(request).clients()
    except BrokerUnavailable as exc:
        raise _broker_unavailable(exc) from None
    page = filter_clients(records, role=role, group=group, prefix=prefix, limit=limit, cursor=cursor)
    # Manifests only with one client: a page of them could be megabytes.
    listed = [r if "manifest" not in r else {k: v for k, v in r.items() if k != "manifest"} for r in page["clients"]]
    clients = msgspec.convert(listed, list[ClientRecord])
    return Response(ClientPage(clients, page["count"], page["next_cursor"]))


@get(
    "/api/v1/clients/{client_id:str}",
    summary="One live connection",
    tags=["clients"],
    responses={
        404: ResponseSpec(
            ErrorBody, description="not connected (target_offline); the body still carries its history, if any"
        )
    },
)
async def get_client(
    request: Request[Any, Any, Any],
    client_id: FromPath[str],
    history_limit: Annotated[
        int, Parameter(ge=0, le=10_000, description="Connect history entries to include (capped by the setting).")
    ] = 20,
) -> Response[ClientRecord]:
    """One live connection with its id's connect history (closed connections, close codes, who closed them)
    and the commands last sent to it, with their replies and round-trip times."""
    require_token(request, allow_controller=True)
    relay = _relay(request)
    try:
        record = await relay.client(client_id)  # Its holder's record, with its manifest: not every record.
        history = await relay.history(client_id, history_limit)
    except BrokerUnavailable as exc:
        raise _broker_unavailable(exc) from None
    # Kept by the instances that hold or held the id: the recent-commands service asks them.
    recent, _ = await _recent(request).read(client_id, history)
    if record is None:
        raise _not_connected(client_id, history=history, recent_commands=recent)
    return Response(msgspec.convert({**record, "history": history, "recent_commands": recent}, ClientRecord))


@delete(
    "/api/v1/clients/{client_id:str}",
    status_code=204,
    summary="Disconnect a connection (admin token only; close code 4012)",
    tags=["clients"],
    responses={404: ResponseSpec(ErrorBody, description="not connected")},
)
async def delete_client(request: Request[Any, Any, Any], client_id: FromPath[str]) -> Response[None]:
    grant = require_token(request, allow_controller=False)
    try:
        found = await _commands(request).disconnect(client_id, CloseCode.DISCONNECTED)
    except BrokerUnavailable as exc:
        raise _broker_unavailable(exc) from None
    if not found:
        raise _not_connected(client_id)
    audit = getattr(request.app.state, "audit", None)
    if audit is not None:
        from .audit import AuditEvent

        await audit.record(
            AuditEvent(
                "client.disconnect", grant.actor(grant.name), _source(request), client_id, {"code": 4012, "via": "api"}
            )
        )
    return Response(None, status_code=204)


def _source(request: Request[Any, Any, Any]) -> str:
    client = request.client
    return client.host if client else "unknown"


def validation_as_422(request: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    """Litestar's validation error shape, with 422 (Unprocessable Content) as the status."""
    body: dict[str, Any] = {"status_code": 422, "detail": exc.detail}
    if exc.extra:
        body["extra"] = exc.extra
    return Response(body, status_code=422)


# --- following a command up (appliance/commands/followup.py) ----------------------------------------


async def _unless_disconnected(request: Request[Any, Any, Any], call: Any, *args: Any, **kwargs: Any) -> Any:
    """``await call(*args, **kwargs)``, cancelled with reason "disconnected" if the client leaves first (None then).

    Litestar keeps a handler running after its client went away; a caller that waits long
    for a reply must stop waiting then, and the command's record must say so. One watching
    task per request, which cancels this one.
    """
    handler = asyncio.current_task()
    assert handler is not None
    watch = asyncio.ensure_future(_disconnect(request))
    over = [False]  # Once the call is over, a late disconnect must not cancel the response being sent.
    watch.add_done_callback(lambda done: over[0] or done.cancelled() or handler.cancel("disconnected"))
    try:
        return await call(*args, **kwargs)
    except asyncio.CancelledError as exc:
        if not (watch.done() and not watch.cancelled() and exc.args == ("disconnected",)):
            raise
        handler.uncancel()
        return None
    finally:
        over[0] = True
        watch.cancel()


async def _disconnect(request: Request[Any, Any, Any]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class CommandRecordBody(Struct):
    """What became of a command sent through the HTTP API, MCP or the dashboard."""

    id: CommandId
    target: str
    message: str
    status: Annotated[
        Literal["sending", "delivered", "queued", "replied", "timeout", "failed"],
        Meta(description="sending: not at the client yet; timeout: no reply yet when its caller stopped waiting."),
    ]
    caller: Annotated[
        Literal["waiting", "answered", "cancelled", "disconnected"],
        Meta(description="What its caller did: still waiting, got an answer, cancelled (MCP), or went away (HTTP)."),
    ]
    delivered: Annotated[bool, Meta(description="Whether it reached the client's socket.")]
    open: Annotated[bool, Meta(description="true: a reply may still come (wait_ms waits for it).")]
    sent_at: float
    updated_at: float
    open_until: float
    sender: str | None = None
    reply: Annotated[str | None, Meta(description="The client's reply (status replied).")] = None
    rtt_ms: float | None = None
    late: Annotated[bool | None, Meta(description="true: the reply came after its caller stopped waiting.")] = None
    error: str | None = None
    detail: str | None = None


@get(
    "/api/v1/commands/{command_id:str}",
    responses={
        200: ResponseSpec(CommandRecordBody, description="The command's record."),
        404: ResponseSpec(ErrorBody, description="unknown_command: no such command within the window."),
        503: ResponseSpec(ErrorBody, description="broker_unavailable: the records cannot be read right now."),
    },
    summary="Follow a command up: its status and reply, waiting for them up to wait_ms",
    tags=["commands"],
)
async def get_command(
    request: Request[Any, Any, Any],
    command_id: FromPath[str],
    wait_ms: Annotated[
        int | None,
        Parameter(
            ge=0,
            le=300_000,
            description="Wait up to this long for the reply (or failure); the record as it is then.",
        ),
    ] = None,
) -> Response[CommandRecordBody]:
    """A command sent with ``POST /api/v1/commands`` (or MCP): status, reply, and whether its caller waited.

    A reply that came after its caller stopped waiting (a timeout, ``wait=false``, a queued command,
    a cancelled call) is here, marked late. Any instance answers.
    """
    grant = require_token(request, allow_controller=True)
    commands = _commands(request)
    follow = partial(commands.followups.wait, owner=grant.caller)  # Only the sender's own records.
    try:
        record = await _unless_disconnected(request, follow, command_id, (wait_ms or 0) / 1000)
    except BrokerUnavailable as exc:
        raise _broker_unavailable(exc) from None
    if record is None:
        window = commands.settings.idempotency_window_seconds
        detail = (
            f"no command with id {command_id!r} was sent through the HTTP API or MCP in the last {window} s "
            "on this cluster: use the id that send_command or POST /api/v1/commands returned"
        )
        raise ApiError(404, ErrorBody("unknown_command", detail, id=command_id))
    return Response(msgspec.convert(record.public(time.time()), CommandRecordBody))


API_HANDLERS = [post_command, list_clients, get_client, delete_client, get_command]
