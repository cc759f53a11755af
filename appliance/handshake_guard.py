"""Drops peers that do not finish sending their HTTP request in time (slowloris), which uvicorn does not.

uvicorn's ``timeout_keep_alive`` only runs *between* requests, and every byte received
cancels it: a peer that opens TCP and sends nothing, sends its headers one byte at a
time, or announces a body (``Content-Length: 100``) and never sends it, holds a socket
(and a file descriptor, and a request task waiting for the body) forever. This protocol
arms a timer when the connection opens and when a request starts, and disarms it when
the request is complete: headers *and* body for HTTP, the headers for a WebSocket
upgrade (that is the whole HTTP part of the handshake). Time the app then takes to
answer is not counted. When it fires, the connection is aborted without an answer:
nothing is owed to such a peer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .metrics import REGISTRY

__all__ = ["HANDSHAKE_TIMEOUTS", "guarded_http_protocol"]

HANDSHAKE_TIMEOUTS = Counter(
    "wsbridge_handshake_timeouts_total",
    "Connections dropped because their HTTP request (headers, and body) was not complete within HANDSHAKE_TIMEOUT.",
    registry=REGISTRY,
)


def guarded_http_protocol(timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline on each request, headers and body (``Config(http=...)``)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_deadline is None:  # A later request on a kept-alive connection: a new deadline.
                self._arm()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if self.parser.should_upgrade() and self._should_upgrade():
                self._disarm()  # A WebSocket handshake is complete with its headers.
            # Otherwise the body has to arrive within the same deadline (on_message_complete).

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_websocket_upgrade(self) -> None:
            super().handle_websocket_upgrade()
            # The WebSocket protocol owns the transport now, and connection_lost (which drops the
            # parser) never comes here: the parser's callbacks would keep this protocol in a cycle.
            self.parser = None  # type: ignore[assignment]

        def _arm(self) -> None:
            self._disarm()
            self._header_deadline = self.loop.call_later(timeout, self._expired)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _expired(self) -> None:
            self._header_deadline = None
            HANDSHAKE_TIMEOUTS.inc()
            if not self.transport.is_closing():
                self.transport.abort()

    return GuardedHttpToolsProtocol
