"""HTTP command API (``/api/v1/commands``, ``/api/v1/clients/...``); the MCP endpoint is appliance/mcp_http.py.

Handlers are thin: they authenticate, let Litestar validate the body (one error
shape, 422), and call the command service on ``app.state.commands``. They take and
return the msgspec Structs of appliance/api_types.py, which the OpenAPI schema at
``/schema/openapi.json`` is made of.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import FromPath, HeaderParameter, JSONBody, Parameter
from msgspec import Struct

from .api_schema import AUTH_ERRORS, ApiOperation, JsonBodyOperation, options_handlers, refuse_repeated_query
from .api_types import (
    BroadcastReply,
    ClientPage,
    ClientRecord,
    CommandBody,
    CommandRecordBody,
    CommandResult,
    ErrorBody,
    HistoryEntry,
    RecentCommand,
)
from .audit import audit_admin_command
from .brokers.base import BrokerUnavailable
from .client_pages import MAX_PAGE, filter_clients
from .commands import HTTP_CONTROLLER, CommandService
from .core.protocol import CloseCode, ErrorCode
from .http_auth import require_token
from .recent import RecentCommands
from .relay import Relay

__all__ = ["API_HANDLERS", "ApiError", "CommandBody", "api_error", "validation_as_422"]


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


def _spec(kind: Any, description: str, *examples: Struct) -> ResponseSpec:
    """A documented answer with the examples given (Litestar's generated ones are random values)."""
    listed = [Example(value=msgspec.to_builtins(example)) for example in examples] or None
    return ResponseSpec(kind, description=description, generate_examples=False, examples=listed)


_UNAVAILABLE = _spec(
    ErrorBody,
    "broker_unavailable: the broker (Redis) cannot be reached; retry later.",
    ErrorBody(ErrorCode.BROKER_UNAVAILABLE.value, "Redis is unreachable"),
)
_OFFLINE = ErrorBody(ErrorCode.TARGET_OFFLINE.value, "unity_client_1 is not connected", "unity_client_1")

_COMMAND_RESPONSES = {
    200: _spec(
        CommandResult,
        'The client replied (with wait_ms); for "*" or a group, the replies collected.',
        CommandResult("c-1", "replied", "unity_client_1", "unity_client_1", "Moved 10", 12.5),
        CommandResult(
            "c-4",
            "replied",
            "group:red",
            count=1,
            replies=[BroadcastReply("unity_client_1", "Moved 10", 12.5)],
            no_reply=[],
        ),
    ),
    202: _spec(
        CommandResult,
        "Delivered or queued (without wait_ms), or queued (with).",
        CommandResult("c-1", "delivered", "unity_client_1"),
        CommandResult("c-2", "delivered", "*", count=4),
        CommandResult("c-3", "queued", "unity_client_1", expires_in_ms=30_000),
    ),
    404: _spec(ErrorBody, "target_offline: the target is not connected anywhere.", _OFFLINE),
    409: _spec(ErrorBody, "queue_full or duplicate_id."),
    413: _spec(ErrorBody, "message_too_large.", ErrorBody(ErrorCode.MESSAGE_TOO_LARGE.value, "too large", limit=65536)),
    422: _spec(
        ErrorBody,
        "invalid_target, invalid_message or target_not_client; or a body or wait_ms the API refuses "
        "(Litestar's validation shape: status_code, detail, extra).",
    ),
    429: _spec(
        ErrorBody,
        "rate_limited; or too_many_keys: a new id / Idempotency-Key beyond the caller's COMMAND_KEYS_PER_CALLER "
        "live keys, nothing sent (retry the same key after retry_after_ms, or send without a key). "
        "retry_after_ms also in Retry-After.",
        ErrorBody(ErrorCode.RATE_LIMITED.value, "too many commands; retry later", retry_after_ms=250),
        ErrorBody(
            ErrorCode.TOO_MANY_KEYS.value,
            "this caller (its token) already holds 10000 live idempotency keys ...; nothing was sent. Retry with "
            "the same key in 42 s, when its oldest key expires, or send without a key",
            retry_after_ms=42_000,
            limit=10_000,
        ),
    ),
    503: _spec(ErrorBody, "delivery_failed: the target's instance cannot be reached; broker_unavailable: Redis."),
    504: _spec(
        CommandResult,
        "timeout: no reply within wait_ms.",
        CommandResult("c-1", "timeout", "unity_client_1", detail="unity_client_1 did not reply in time"),
    ),
}


#: Long enough for a UUID or a hash with a prefix; short enough to keep Redis keys small.
MAX_IDEMPOTENCY_KEY_LENGTH = 200


@post(
    "/api/v1/commands",
    status_code=202,
    responses=_COMMAND_RESPONSES,
    raises=AUTH_ERRORS,
    operation_id="sendCommand",
    operation_class=JsonBodyOperation,
    before_request=refuse_repeated_query,
    summary="Send a command to a client and optionally wait for its reply",
    tags=["commands"],
)
async def post_command(
    request: Request[Any, Any, Any],
    data: JSONBody[CommandBody],
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(
            name="Idempotency-Key",
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
            description="Makes a retry safe without choosing an id: the same key within the window returns the "
            "first command's outcome and never sends it twice (takes precedence over id for that).",
        ),
    ] = None,
) -> Response[CommandResult | ErrorBody]:
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
        return Response(ErrorBody("disconnected", "the client closed the connection"), status_code=499)
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
    body = as_result(outcome.body)
    headers = {}
    if isinstance(body, ErrorBody) and body.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, -(-body.retry_after_ms // 1000)))
    return Response(body, status_code=outcome.http_status, headers=headers)


def as_result(body: dict[str, Any]) -> CommandResult | ErrorBody:
    """The command service's outcome as the Struct the schema documents: a status, or an error."""
    if "status" in body:
        return msgspec.convert(body, CommandResult)
    return msgspec.convert(body, ErrorBody)


# --- clients ---------------------------------------------------------------------------------


@get(
    "/api/v1/clients",
    summary="List live connections across the cluster",
    tags=["clients"],
    responses={503: _UNAVAILABLE},
    raises=AUTH_ERRORS,
    operation_id="listClients",
    operation_class=ApiOperation,
    before_request=refuse_repeated_query,
)
async def list_clients(
    request: Request[Any, Any, Any],
    role: Annotated[Literal["client", "controller"] | None, Parameter(description="Only this role.")] = None,
    group: Annotated[str | None, Parameter(description="Only clients in this group.")] = None,
    prefix: Annotated[str | None, Parameter(description="Only ids starting with this.")] = None,
    limit: Annotated[int, Parameter(ge=1, le=MAX_PAGE, description="Page size.")] = MAX_PAGE,
    cursor: Annotated[
        str | None, Parameter(description="next_cursor of the previous page; another value is answered 422.")
    ] = None,
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
        404: _spec(
            ErrorBody,
            "not connected (target_offline); the body still carries its history, if any",
            msgspec.structs.replace(_OFFLINE, history=[], recent_commands=[]),
        ),
        503: _UNAVAILABLE,
    },
    raises=AUTH_ERRORS,
    operation_id="getClient",
    operation_class=ApiOperation,
    before_request=refuse_repeated_query,
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
    entries = msgspec.convert(history, list[HistoryEntry])
    commands = msgspec.convert(recent, list[RecentCommand])
    if record is None:
        raise _not_connected(client_id, history=entries, recent_commands=commands)
    found = msgspec.convert(record, ClientRecord)
    return Response(msgspec.structs.replace(found, history=entries, recent_commands=commands))


@delete(
    "/api/v1/clients/{client_id:str}",
    status_code=204,
    summary="Disconnect a connection (admin token only; close code 4012)",
    tags=["clients"],
    responses={404: _spec(ErrorBody, "target_offline: not connected", _OFFLINE), 503: _UNAVAILABLE},
    raises=AUTH_ERRORS,
    operation_id="disconnectClient",
    operation_class=ApiOperation,
    before_request=refuse_repeated_query,
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


@get(
    "/api/v1/commands/{command_id:str}",
    responses={
        200: ResponseSpec(CommandRecordBody, description="The command's record."),
        404: ResponseSpec(ErrorBody, description="unknown_command: no such command within the window."),
        503: ResponseSpec(ErrorBody, description="broker_unavailable: the records cannot be read right now."),
    },
    summary="Follow a command up: its status and reply, waiting for them up to wait_ms",
    tags=["commands"],
    raises=AUTH_ERRORS,
    operation_class=ApiOperation,
    before_request=refuse_repeated_query,
)
async def get_command(
    request: Request[Any, Any, Any],
    command_id: FromPath[str],
    wait_ms: Annotated[
        int,  # Not optional: Litestar leaves ge=0 out of the schema of an ``int | None``.
        Parameter(
            ge=0,
            le=300_000,
            description="Wait up to this long for the reply (or failure); the record as it is then.",
        ),
    ] = 0,
) -> Response[CommandRecordBody]:
    """A command sent with ``POST /api/v1/commands`` (or MCP): status, reply, and whether its caller waited.

    A reply that came after its caller stopped waiting (a timeout, ``wait=false``, a queued command,
    a cancelled call) is here, marked late. Any instance answers.
    """
    grant = require_token(request, allow_controller=True)
    commands = _commands(request)
    follow = partial(commands.followups.wait, owner=grant.caller)  # Only the sender's own records.
    try:
        record = await _unless_disconnected(request, follow, command_id, wait_ms / 1000)
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
API_HANDLERS[:0] = options_handlers(API_HANDLERS)  # First: registered after GET, Litestar's own would clash.
