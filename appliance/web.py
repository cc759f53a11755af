"""Litestar adapter: the WebSocket endpoint and the HTTP API around the relay service."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar, Request, Response, WebSocket, get, websocket
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from msgspec import Struct

from ui import DashboardPlugin  # ui uses appliance's settings, audit and brokers, never this module

from . import __version__, metrics
from .audit import MemoryAuditLog
from .brokers.base import Broker, BrokerUnavailable
from .brokers.memory import MemoryBroker
from .core.protocol import CLOSE_REASONS, CloseCode
from .core.session import Throttle, authorize
from .relay import Connection, Relay
from .settings import Settings

__all__ = ["create_app", "make_broker"]

log = logging.getLogger(__name__)

_REFUSAL_REASONS = {
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.INVALID_CLIENT_ID: "invalid_id",
    CloseCode.RESERVED_ID: "reserved_id",
    CloseCode.DUPLICATE_REJECTED: "duplicate",
    CloseCode.TRY_AGAIN_LATER: "broker_unavailable",
    CloseCode.GOING_AWAY: "shutting_down",
    CloseCode.REPLACED: "replaced",
    CloseCode.INTERNAL_ERROR: "internal_error",
}


def make_broker(settings: Settings) -> Broker:
    if not settings.redis_enabled:
        return MemoryBroker()
    from .brokers.redis import RedisBroker

    return RedisBroker(
        settings.redis_connection_url(),
        instance=settings.instance_id,
        presence_ttl=settings.presence_ttl,
        pool_size=settings.redis_publish_pool_size,
        display=settings.redis_display(),
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
    """

    __slots__ = ("raw_receive", "raw_send")

    def __init__(self, scope: Any, receive: Any, send: Any) -> None:
        super().__init__(scope, receive, send)
        self.raw_receive = receive
        self.raw_send = send


async def _refuse(socket: WebSocket, code: CloseCode) -> None:
    """Accept, then close with a code the client can read (an HTTP 403 would not say why)."""
    metrics.REFUSED.labels(reason=_REFUSAL_REASONS.get(code, str(int(code)))).inc()
    await socket.accept()
    await socket.close(code=int(code), reason=CLOSE_REASONS[code])


@websocket("/ws/{client_id:str}", websocket_class=RelaySocket)
async def relay_socket(socket: RelaySocket, client_id: str) -> None:
    relay = _relay(socket)
    tokens = socket.app.state.tokens
    decision = authorize(client_id, socket.headers.get("x-auth-token"), tokens.controller, tokens.client)
    if isinstance(decision, CloseCode):
        log.info("Refused connection for id %r: %s", client_id[:64], CLOSE_REASONS[decision])
        await _refuse(socket, decision)
        return
    conn = relay.new_connection(client_id, decision, socket.raw_send, _remote(socket))
    try:
        refusal = await relay.open(conn)
    except Exception:  # A bug must not turn into an HTTP 403 that clients take as final.
        log.exception("Could not register %s", client_id)
        refusal = CloseCode.INTERNAL_ERROR
    if refusal is not None:
        await _refuse(socket, refusal)
        return
    try:
        await socket.accept()
        conn.opened()
        await _read_frames(socket, relay, conn)
    except Exception as exc:  # The socket is gone; the finally block cleans up.
        log.debug("Connection %s ended: %r", client_id, exc)
    finally:
        await relay.close(conn)


async def _read_frames(socket: RelaySocket, relay: Relay, conn: Connection) -> None:
    receive, session, perform = socket.raw_receive, conn.session, relay.perform
    clock = time.time
    while True:
        event = await receive()
        if event["type"] != "websocket.receive":
            return
        if conn.close_code is not None:
            continue  # Closing: drain what the peer still sends until it acknowledges.
        text = event.get("text")
        if text is None:
            try:
                text = (event.get("bytes") or b"").decode()
            except UnicodeDecodeError:
                perform(conn, session.receive_undecodable())
                continue
        action = session.receive_text(text, clock())
        if type(action) is Throttle:
            # Over its rate: stop reading, so TCP slows the peer down and nothing is lost.
            metrics.THROTTLED.inc()
            await asyncio.sleep(action.seconds)
            action = action.then
        perform(conn, action)


# --- HTTP API -------------------------------------------------------------------------------


class Tokens(Struct, frozen=True):
    controller: str
    client: str
    admin: str | None


def _require_token(request: Request, *, allow_controller: bool) -> None:
    presented = (request.headers.get("x-auth-token") or "").encode()
    tokens: Tokens = request.app.state.tokens
    allowed = [tokens.admin] + ([tokens.controller] if allow_controller else [])
    if not presented:
        raise NotAuthorizedException("X-Auth-Token header required")
    # Evaluate every comparison so timing does not tell which token was close.
    matches = [hmac.compare_digest(presented, t.encode()) for t in allowed if t]
    if not any(matches):
        raise PermissionDeniedException("token not allowed here")


@get("/", sync_to_thread=False)
def root() -> dict[str, str]:
    return {"message": "WebSocket Bridge is running", "version": __version__}


@get("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", sync_to_thread=False)
def readyz(request: Request) -> Response[dict[str, str]]:
    ready, reason = _relay(request).status()
    if ready:
        return Response({"status": "ready", "broker": _relay(request).broker.describe()})
    return Response({"status": "not ready", "reason": reason}, status_code=HTTP_503_SERVICE_UNAVAILABLE)


@get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics_endpoint(request: Request) -> bytes:
    ready, _ = _relay(request).status()
    metrics.BROKER_UP.set(1 if ready else 0)
    return metrics.render()


@get("/api/v1/clients")
async def list_clients(request: Request) -> Response[dict[str, Any]]:
    _require_token(request, allow_controller=True)
    try:
        records = await _relay(request).clients()
    except BrokerUnavailable as exc:
        return Response({"error": "broker_unavailable", "detail": str(exc)}, status_code=HTTP_503_SERVICE_UNAVAILABLE)
    return Response({"clients": records, "count": len(records)})


# --- application -----------------------------------------------------------------------------


def create_app(settings: Settings, broker: Broker | None = None) -> Litestar:
    if settings.llm_secret_token is None or settings.unity_client_token is None:
        raise ValueError("LLM_SECRET_TOKEN and UNITY_CLIENT_TOKEN must both be set")
    relay = Relay(settings, broker or make_broker(settings))
    tokens = Tokens(
        controller=settings.llm_secret_token.get_secret_value(),
        client=settings.unity_client_token.get_secret_value(),
        admin=settings.admin_token.get_secret_value() if settings.admin_token else None,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await relay.start()
        metrics.BUILD.info({"version": __version__, "broker": relay.broker.name})
        log.info("Relay ready on broker %s as instance %s", relay.broker.describe(), relay.instance)
        try:
            yield
        finally:
            await relay.stop()

    return Litestar(
        route_handlers=[relay_socket, root, healthz, readyz, metrics_endpoint, list_clients],
        plugins=[DashboardPlugin(settings)],  # The admin dashboard under /admin (ui/).
        state=State({"relay": relay, "tokens": tokens, "settings": settings, "audit": MemoryAuditLog()}),
        lifespan=[lifespan],
        openapi_config=None,
        logging_config=None,
    )
