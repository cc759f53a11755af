"""The WebSocket adapter: ``/ws/{client_id}`` feeds the relay (appliance/relay.py) one frame at a time.

It authenticates the handshake, opens the connection through the relay, reads frames into
the connection's session and performs the actions it returns; everything else (the HTTP
API, the probes, the dashboard) is another adapter, wired by appliance/app.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from litestar import WebSocket, websocket
from litestar.connection.base import empty_receive, empty_send
from litestar.params import FromPath

from . import metrics
from .connections import Connection
from .core.protocol import CLOSE_REASONS, CloseCode, Role, negotiate_subprotocol
from .core.protocol_v2 import SUBPROTOCOL_V2, parse_groups
from .core.session import Throttle, authorize
from .http_auth import token_store
from .logs import connection_fields
from .relay import Relay

__all__ = ["RelaySocket", "relay_socket"]

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
    CloseCode.TOO_MANY_NEW_IDS: "too_many_new_ids",
    CloseCode.BANNED: "banned",
}


def _relay(socket: WebSocket) -> Relay:
    return socket.app.state.relay


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
    metrics.CLOSED_BY_RELAY.labels(reason=_REFUSAL_REASONS.get(code, str(int(code)))).inc()
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
    grant = token_store(socket).lookup(socket.headers.get("x-auth-token") or offered_token)
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
    client = socket.scope.get("client")
    # Bans and the rate of new ids, cluster-wide (appliance/gate.py).
    barred = await socket.app.state.gate.admit(client_id, decision, grant.name if grant else None, client and client[0])
    if barred is not None:
        await _refuse(socket, barred, subprotocol)
        return
    v2 = subprotocol == SUBPROTOCOL_V2
    conn = relay.new_connection(client_id, decision, socket.raw_send, _remote(socket), grant, v2=v2, groups=groups)
    try:
        refusal = await relay.open(conn)
    except Exception:  # A bug must not turn into an HTTP 403 that clients take as final.
        log.exception("Could not register %s", client_id, extra=connection_fields(client_id, conn.conn_key))
        refusal = CloseCode.INTERNAL_ERROR
    if refusal is None and grant is not None and not token_store(socket).connection_allowed(grant.name, grant.version):
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
