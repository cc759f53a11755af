"""Litestar adapter: the WebSocket endpoint and the HTTP API around the relay service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, Response, WebSocket, get, websocket
from litestar.connection.base import empty_receive, empty_send
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import FromPath
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE

from ui import DashboardPlugin  # ui uses appliance's settings, audit and brokers, never this module

from . import __version__, metrics
from .admission import max_request_bytes
from .api import API_HANDLERS, mcp_lifespan, validation_as_422
from .audit import AuditLog, MemoryAuditLog
from .brokers.base import Broker
from .brokers.memory import MemoryBroker
from .core.protocol import CLOSE_REASONS, CloseCode, Role, negotiate_subprotocol
from .core.protocol_v2 import SUBPROTOCOL_V2, parse_groups
from .core.session import Throttle, authorize
from .logs import connection_fields
from .relay import Connection, Relay
from .settings import Settings
from .tokens import Grant, TokenStore, make_token_store
from .tokens.service import TokenService

__all__ = ["create_app", "make_broker"]

log = logging.getLogger(__name__)

_REFUSAL_REASONS = {
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.INVALID_CLIENT_ID: "invalid_id",
    CloseCode.RESERVED_ID: "reserved_id",
    CloseCode.ROLE_CONFLICT: "role_conflict",
    CloseCode.DUPLICATE_REJECTED: "duplicate",
    CloseCode.TRY_AGAIN_LATER: "broker_unavailable",
    CloseCode.GOING_AWAY: "shutting_down",
    CloseCode.REPLACED: "replaced",
    CloseCode.INTERNAL_ERROR: "internal_error",
    CloseCode.TOKEN_EXPIRED: "token_expired",
    CloseCode.GROUP_NOT_ALLOWED: "group_not_allowed",
}


def make_broker(settings: Settings) -> Broker:
    queue: dict[str, Any] = {
        "queue_max": settings.offline_queue_max,
        # A delivered (controller, id) is remembered as long as any command may live.
        "queue_remember_seconds": settings.command_timeout_max_ms / 1000,
        "history_per_client": settings.history_per_client,
        "history_ttl": settings.history_ttl_seconds,
    }
    if not settings.redis_enabled:
        return MemoryBroker(**queue, history_max_clients=settings.history_max_clients)
    from .brokers.redis import RedisBroker

    return RedisBroker(
        settings.redis_connection_url(),
        instance=settings.instance_id,
        presence_ttl=settings.presence_ttl,
        pool_size=settings.redis_publish_pool_size,
        display=settings.redis_display(),
        outbox_limit=settings.redis_outbox_limit,
        **queue,
    )


def _relay(connection: Request | WebSocket) -> Relay:
    return connection.app.state.relay


def _remote(socket: WebSocket) -> str:
    client = socket.scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unknown"


class RelaySocket(WebSocket):
    """Litestar's WebSocket, keeping the raw ASGI callables for the per-frame hot path.

    Litestar wraps ``receive`` and ``send`` to track the connection state; once the
    handshake is done the relay tracks state itself, and the two extra coroutine
    layers per frame were a measurable share of the fan-out time.

    Litestar's wrappers are closures over the socket, a reference cycle that would keep the
    socket, and through the raw callables uvicorn's whole connection, until a full garbage
    collection (rare here: ``appliance/server.py`` tunes the collector for latency).
    ``release`` breaks it when the connection ends, so refcounting frees it at once.
    """

    __slots__ = ("raw_receive", "raw_send")

    def __init__(self, scope: Any, receive: Any, send: Any) -> None:
        super().__init__(scope, receive, send)
        self.raw_receive = receive
        self.raw_send = send

    def release(self) -> None:
        """Drop the ASGI callables (and the cycle through Litestar's wrappers): the connection is over."""
        self.receive = self.raw_receive = empty_receive
        self.send = self.raw_send = empty_send


def _fields(conn: Connection) -> dict[str, str]:
    return {**connection_fields(conn.client_id, conn.conn_key, conn.role.value), "remote": conn.remote}


async def _refuse(
    socket: WebSocket, code: CloseCode, subprotocol: str | None = None, reason: str | None = None
) -> None:
    """Accept, then close with a code the client can read (an HTTP 403 would not say why).

    A browser that offered subprotocols fails a handshake that selects none (1006, no code),
    so a refusal selects the offered version too.
    """
    metrics.REFUSED.labels(reason=_REFUSAL_REASONS.get(code, str(int(code)))).inc()
    metrics.record_close(int(code), by_relay=True)
    await socket.accept(subprotocols=subprotocol)
    await socket.close(code=int(code), reason=reason or CLOSE_REASONS[code])


@websocket("/ws/{client_id:str}", websocket_class=RelaySocket)
async def relay_socket(socket: RelaySocket, client_id: FromPath[str]) -> None:
    try:
        await _serve(socket, client_id)
    finally:
        socket.release()


async def _serve(socket: RelaySocket, client_id: str) -> None:
    relay = _relay(socket)
    # Browsers and WebGL cannot set X-Auth-Token: they offer `wsbridge.token.<token>` as a subprotocol.
    offered_token, subprotocol = negotiate_subprotocol(socket.scope.get("subprotocols") or [])
    grant = _token_store(socket).lookup(socket.headers.get("x-auth-token") or offered_token)
    decision = authorize(client_id, grant.role if grant else None, grant.id_pattern if grant else None)
    if isinstance(decision, CloseCode):
        log.info(
            "Refused connection for id %r: %s",
            client_id[:64],
            CLOSE_REASONS[decision],
            extra=connection_fields(client_id[:64]),
        )
        await _refuse(socket, decision, subprotocol)
        return
    groups = parse_groups(socket.query_params.get("groups")) if decision is Role.CLIENT else ()
    if isinstance(groups, str):
        log.info("Refused connection for id %r: %s", client_id, groups)
        await _refuse(socket, CloseCode.INVALID_CLIENT_ID, subprotocol, groups)
        return
    if grant is not None and not grant.allows_groups(groups):  # A scoped token joins only the groups it names.
        log.info("Refused connection for id %r: groups not allowed for %s", client_id, grant.name)
        await _refuse(socket, CloseCode.GROUP_NOT_ALLOWED, subprotocol)
        return
    v2 = subprotocol == SUBPROTOCOL_V2
    conn = relay.new_connection(client_id, decision, socket.raw_send, _remote(socket), grant, v2=v2, groups=groups)
    try:
        refusal = await relay.open(conn)
    except Exception:  # A bug must not turn into an HTTP 403 that clients take as final.
        log.exception("Could not register %s", client_id, extra=connection_fields(client_id, conn.conn_key))
        refusal = CloseCode.INTERNAL_ERROR
    if refusal is None and grant is not None and not _token_store(socket).connection_allowed(grant.name, grant.version):
        await relay.close(conn)  # The grace window ended while the id was being claimed: eviction missed it.
        refusal = CloseCode.TOKEN_EXPIRED
    if refusal is not None:
        await _refuse(socket, refusal, subprotocol)
        return
    peer_code: int | None = 1006  # What uvicorn reports for a connection lost without a close frame.
    peer_reason = ""
    try:
        await socket.accept(subprotocols=subprotocol)  # Never the token entry: it would be echoed.
        conn.opened()
        metrics.OPENED[conn.role.value].inc()
        log.info("Connected as %s from %s", conn.role.value, conn.remote, extra=_fields(conn))
        peer_code, peer_reason = await _read_frames(socket, relay, conn)
    except Exception as exc:  # The socket is gone; the finally block cleans up.
        log.debug("Connection %s ended: %r", client_id, exc, extra=connection_fields(client_id, conn.conn_key))
    finally:
        # Whoever sent the first close frame closed it: the relay if it had started closing.
        by_relay = conn.close_code is not None
        code = conn.close_code if by_relay else peer_code
        metrics.record_close(code, by_relay)
        log.info("Disconnected: close code %s from the %s", code, "relay" if by_relay else "peer", extra=_fields(conn))
        relay.record_close(conn, code, conn.close_reason if by_relay else peer_reason, by_relay)
        await relay.close(conn)


async def _read_frames(socket: RelaySocket, relay: Relay, conn: Connection) -> tuple[int | None, str]:
    """Feed received frames to the session until the peer is gone; returns the peer's close code and reason."""
    receive, session, perform = socket.raw_receive, conn.session, relay.perform
    clock, flusher, rtt = time.time, relay.flusher, metrics.COMMAND_RTT
    while True:
        event = await receive()
        if event["type"] != "websocket.receive":
            if "reason" not in event and event.get("code") == 1005:
                # uvicorn's sans-I/O protocol reports a lost TCP connection as 1005 without a reason key,
                # and a received close frame always with one: RFC 6455 §7.1.5 calls the former 1006.
                return 1006, ""
            return event.get("code"), event.get("reason") or ""
        if conn.close_code is not None:
            continue  # Closing: drain what the peer still sends until it acknowledges.
        text = event.get("text")
        if text is None:
            try:
                text = (event.get("bytes") or b"").decode()
            except UnicodeDecodeError:
                perform(conn, session.receive_undecodable())
                continue
        now = clock()
        if not flusher.received_at:
            flusher.received_at = now
        if conn.rtt_from:  # Only clients have one: the command they were sent before this message.
            rtt.observe(now - conn.rtt_from)
            conn.rtt_from = 0.0
        action = session.receive_text(text, now)
        if type(action) is Throttle:
            # Over its rate: stop reading, so TCP slows the peer down and nothing is lost.
            metrics.THROTTLED.inc()
            await asyncio.sleep(action.seconds)
            action = action.then
        perform(conn, action)


# --- HTTP API -------------------------------------------------------------------------------


def _token_store(connection: Request | WebSocket) -> TokenStore:
    return connection.app.state.token_store


def _require_token(request: Request, *, allow_controller: bool) -> Grant:
    """The admin (or controller) grant of the request's X-Auth-Token, through the store's one comparator."""
    presented = request.headers.get("x-auth-token")
    if not presented:
        raise NotAuthorizedException("X-Auth-Token header required")
    grant = _token_store(request).lookup(presented)
    allowed = ("admin", "controller") if allow_controller else ("admin",)
    if grant is None or grant.role not in allowed:
        raise PermissionDeniedException("token not allowed here")
    return grant


@get("/", sync_to_thread=False)
def root() -> dict[str, str]:
    return {"message": "WebSocket Bridge is running", "version": __version__}


@get("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", sync_to_thread=False)
def readyz(request: Request) -> Response[dict[str, Any]]:
    ready, reason = _relay(request).status()
    # A failed token refresh keeps the last good tokens: still ready, and said so here.
    tokens = _token_store(request).health()
    if ready:
        return Response({"status": "ready", "broker": _relay(request).broker.describe(), "tokens": tokens})
    return Response(
        {"status": "not ready", "reason": reason, "tokens": tokens}, status_code=HTTP_503_SERVICE_UNAVAILABLE
    )


@get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics_endpoint(request: Request) -> bytes:
    return metrics.render()


# --- application -----------------------------------------------------------------------------


def _grace_windows(store: TokenStore) -> dict[str, float]:
    """Open grace windows by token name, for wsbridge_token_grace_end_timestamp_seconds."""
    now = time.time()
    return {
        s.name: s.grace_ends for s in store.states.values() if s.grace_ends is not None and s.previous_accepted(now)
    }


def make_audit_log(redis: Any | None) -> AuditLog:
    if redis is None:
        return MemoryAuditLog()
    from .audit import RedisAuditLog

    return RedisAuditLog(redis)


def create_app(settings: Settings, broker: Broker | None = None, token_store: TokenStore | None = None) -> Litestar:
    """The app. ``token_store`` may come loaded (``wsbridge serve`` loads it to fail fast); else it is loaded here."""
    problems = settings.token_problems()
    if problems:
        raise ValueError("; ".join(problems))
    if token_store is None:
        token_store = make_token_store(settings)
        token_store.load()
    relay = Relay(settings, broker or make_broker(settings))
    metrics.watch(metrics.READY, lambda: 1.0 if relay.status()[0] else 0.0)
    redis = None
    if settings.redis_enabled:
        from redis.asyncio import Redis

        # Audit trail and token notifications; the broker keeps its own connections.
        redis = Redis.from_url(settings.redis_connection_url(), socket_connect_timeout=2, socket_timeout=5)
    audit = make_audit_log(redis)
    notifier = None
    if redis is not None:
        from .tokens.notify import TokenNotifier

        notifier = TokenNotifier(redis)
    token_service = TokenService(settings, token_store, audit, relay=relay, notifier=notifier)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await relay.start()
        await token_service.start()
        metrics.set_build_info(__version__, relay.broker.name, relay.instance)
        metrics.TOKEN_GRACE_ENDS.source = lambda: _grace_windows(token_store)
        if settings.token_store == "env":  # Read once at start and never failing; the SSM store keeps its own.
            metrics.TOKEN_STORE_UP.set(1)
            metrics.TOKEN_LAST_REFRESH.set_to_current_time()
        log.info("Relay ready on broker %s as instance %s", relay.broker.describe(), relay.instance)
        try:
            async with mcp_lifespan(app):
                yield
        finally:
            await token_service.stop()
            await relay.stop()
            if redis is not None:
                await redis.aclose()

    return Litestar(
        route_handlers=[relay_socket, root, healthz, readyz, metrics_endpoint, *API_HANDLERS],
        plugins=[DashboardPlugin(settings)],  # The admin dashboard under /admin (ui/).
        state=State(
            {
                "relay": relay,
                "commands": relay.commands,
                "settings": settings,
                "audit": audit,
                "token_store": token_store,
                "token_service": token_service,
            }
        ),
        lifespan=[lifespan],
        # The admission middleware refuses a larger Content-Length unread; this bounds chunked bodies too.
        request_max_body_size=max_request_bytes(settings),
        middleware=[metrics.http_metrics()],
        exception_handlers={ValidationException: validation_as_422},
        openapi_config=OpenAPIConfig(
            title="WebSocket Bridge",
            version=__version__,
            description="HTTP API of the WebSocket Bridge relay. Authenticate with the X-Auth-Token header.",
            path="/schema",
            # The schema only (at /schema and /schema/openapi.json), no documentation UI: Litestar's UIs load
            # third-party scripts without SRI (Redoc from a mutable URL) on the dashboard's origin, outside the
            # dashboard's CSP, so such a script could read a CSRF token and act as a signed-in admin (#20).
            render_plugins=[JsonRenderPlugin()],
            # Declared so a generated client (an LLM tool definition) sends the header; /healthz,
            # /readyz and / ignore it.
            components=Components(
                security_schemes={
                    "XAuthToken": SecurityScheme(type="apiKey", name="X-Auth-Token", security_scheme_in="header")
                }
            ),
            security=[{"XAuthToken": []}],
        ),
        logging_config=None,
    )
