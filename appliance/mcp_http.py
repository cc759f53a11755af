"""The MCP endpoint ``/mcp`` (streamable HTTP): the tools of appliance/mcp_tools.py on the command service."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import AsyncIterator
from typing import Any

from litestar.handlers import asgi
from litestar.types import Receive, Scope, Send

from .audit import AuditLog, audit_admin_command
from .brokers.base import BrokerUnavailable
from .client_pages import filter_clients
from .commands import CommandService
from .controller import CommandError, ReplyTimeout, error_for
from .core.protocol import ErrorCode
from .http_auth import bearer_allowed
from .relay import Relay
from .tokens import Grant

__all__ = ["LocalBackend", "mcp_endpoint", "mcp_lifespan", "stop_mcp_calls"]

#: Who called /mcp in this request (the token's grant and the source address), for names, rate limits
#: and the audit trail. The MCP session manager runs the tools in tasks started from the request, which
#: copy its context.
_caller: contextvars.ContextVar[tuple[Grant, str] | None] = contextvars.ContextVar("mcp_caller", default=None)


class LocalBackend:
    """The MCP tools' backend inside the appliance: the command service, no HTTP hop."""

    def __init__(self, commands: CommandService, relay: Relay, audit: AuditLog | None = None) -> None:
        self.commands = commands
        self.relay = relay
        self.audit = audit

    async def clients(self, **filters: Any) -> dict[str, Any]:
        records = await self.relay.clients()
        return filter_clients(records, **{k: v for k, v in filters.items() if v is not None})

    async def client(self, client_id: str) -> dict[str, Any] | None:
        try:
            return await self.relay.client(client_id)
        except BrokerUnavailable as exc:
            raise CommandError(ErrorCode.BROKER_UNAVAILABLE.value, str(exc)) from None

    async def command(self, target: str, message: str, **fields: Any) -> dict[str, Any]:
        grant, source = _caller.get() or (None, "")
        outcome = await self.commands.send_command(
            target,
            message,
            wait_ms=fields.get("wait_ms"),
            timeout_ms=fields.get("timeout_ms"),
            queue=bool(fields.get("queue")),
            controller=grant.actor("mcp") if grant is not None else "mcp",  # a named token's caller: its <name>
            budget=grant.budget if grant is not None else "",
            owner=grant.caller if grant is not None else None,
            command_id=fields.get("id"),
            idempotency_key=None if fields.get("id") is None else f"id:{fields['id']!r}",
        )
        if grant is not None:
            status = outcome.body.get("status") or outcome.body.get("error")
            actor = grant.actor(grant.name)
            await audit_admin_command(self.audit, actor, grant.role, source, target, message, status, "mcp")
        if outcome.http_status == 504:  # With its id, and whether it was delivered: the model follows it up.
            extra = {k: v for k, v in outcome.body.items() if k != "detail"}
            raise ReplyTimeout("timeout", outcome.body.get("detail", "no reply in time"), **extra)
        if outcome.http_status >= 300:
            raise error_for(outcome.body)
        return outcome.body

    async def command_status(self, command_id: str, wait_ms: int | None = None) -> dict[str, Any]:
        """``GET /api/v1/commands/{id}`` without the HTTP hop (commands/followup.py)."""
        grant = (_caller.get() or (None, ""))[0]
        owner = grant.caller if grant is not None else None  # Only the sender's own records.
        record = await self.commands.followups.wait(command_id, (wait_ms or 0) / 1000, owner)
        if record is None:
            raise CommandError("unknown_command", f"no command with id {command_id!r}")
        return record.public(time.time())


def _bearer(scope: Scope) -> str:
    """The token of ``Authorization: Bearer <token>``, or ""."""
    value = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, presented = value.partition(" ")
    return presented if scheme.lower() == "bearer" else ""


def bearer_refusal(scope: Scope, token_store: Any) -> tuple[int, bytes] | None:
    """Why ``Authorization: Bearer <token>`` does not open /mcp, or None when it does.

    Only a missing token answers 401 (which MCP clients take as "sign in with OAuth"); a token
    that is wrong or of the wrong role answers 403 with words a person can act on, since this
    bridge has no OAuth to offer and the MCP Inspector otherwise reports only that it needs a TTY.
    """
    presented = _bearer(scope)
    if not presented:
        return 401, b'{"error":"unauthorized","detail":"Authorization: Bearer <controller token> required"}'
    if bearer_allowed(scope, token_store):
        return None
    if token_store.lookup(presented) is None:
        return 403, (
            b'{"error":"forbidden","detail":"the bearer token is not a token of this bridge: '
            b'use a controller token (LLM_SECRET_TOKEN or controller_tokens/<name>)"}'
        )
    return 403, (
        b'{"error":"forbidden","detail":"a client token cannot use /mcp: '
        b'use a controller token (LLM_SECRET_TOKEN or controller_tokens/<name>)"}'
    )


@asgi("/mcp", is_mount=True, copy_scope=True)
async def mcp_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """MCP streamable HTTP; ``Authorization: Bearer <controller token>``."""
    app = scope["app"]
    refusal = bearer_refusal(scope, app.state.token_store)
    if refusal is not None:
        status, body = refusal
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        start: Any = {"type": "http.response.start", "status": status, "headers": headers}
        await send(start)
        end: Any = {"type": "http.response.body", "body": body}
        await send(end)
        return
    grant = app.state.token_store.lookup(_bearer(scope))
    client = scope.get("client")
    _caller.set((grant, client[0] if client else "unknown") if grant is not None else None)
    scope["path"] = "/mcp" + (scope["path"] if scope["path"] != "/" else "")
    await _stoppable(app.state, scope, receive, send)


async def _stoppable(state: Any, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one /mcp request, which :func:`stop_mcp_calls` ends at shutdown.

    Without it a tool call in flight (send_command waiting for a reply, get_command waiting)
    held SIGTERM for the whole shutdown grace, and uvicorn then cancelled it with a traceback.
    """
    import anyio

    sent = {"started": False, "complete": False}

    async def tracked(message: Any) -> None:
        if message["type"] == "http.response.start":
            sent["started"] = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            sent["complete"] = True
        await send(message)

    calls: set[anyio.CancelScope] = state.setdefault("mcp_calls", set())
    with anyio.CancelScope() as call:
        calls.add(call)
        try:
            await state.mcp_app(scope, receive, tracked)
        finally:
            calls.discard(call)
    if not call.cancelled_caught or sent["complete"]:
        return
    with anyio.CancelScope(shield=True):  # End the response: the caller gets an error, not a cut connection.
        if not sent["started"]:
            headers = [(b"content-type", b"application/json")]
            start: Any = {"type": "http.response.start", "status": 503, "headers": headers}
            await send(start)
            body = b'{"error":"shutting_down","detail":"the instance is shutting down: call again"}'
            end: Any = {"type": "http.response.body", "body": body}
        else:
            end = {"type": "http.response.body", "body": b"", "more_body": False}
        with contextlib.suppress(OSError):
            await send(end)


def stop_mcp_calls(state: Any) -> int:
    """At SIGTERM: end every /mcp request in flight (its tool call is cancelled). Returns how many."""
    calls = state.get("mcp_calls") or set()
    for call in list(calls):
        call.cancel()
    return len(calls)


@contextlib.asynccontextmanager
async def mcp_lifespan(app: Any) -> AsyncIterator[None]:
    """Build the MCP tool server on the command service and run its session manager."""
    from mcp.server.transport_security import TransportSecuritySettings

    from .mcp_events import FeedBus, add_messages_resource
    from .mcp_tools import build_mcp_server

    backend = LocalBackend(app.state.commands, app.state.relay, getattr(app.state, "audit", None))
    # Clients' messages as a resource per client, with listen notifications when one speaks (mcp_events.py).
    feed = app.state.events
    server = build_mcp_server(backend, subscriptions=FeedBus(feed))
    add_messages_resource(server, feed)
    # The bearer token guards the endpoint; DNS-rebinding checks on Host would only refuse
    # legitimate names behind the load balancer. Stateless: the tools keep no session state,
    # and a session held in one instance's memory answered 404 on every other replica
    # behind a load balancer without sticky sessions (docker-compose.prod.yml runs two).
    app.state.mcp_app = server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    async with server.session_manager.run():
        yield
