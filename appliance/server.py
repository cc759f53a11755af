"""Run the app on uvicorn, with a shutdown that closes every socket with 1001 first."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from typing import Any

import uvicorn
from litestar import Litestar
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import logflood
from .admission import AdmissionMiddleware
from .app import create_app
from .forwarded import ForwardedForMiddleware
from .handshake_guard import guarded_http_protocol
from .mcp_http import stop_mcp_calls
from .relay import Relay
from .settings import Settings
from .tokens import TokenStore
from .ws_protocol import OrderedWebSocketsProtocol

__all__ = ["build_server", "joined_writes", "run", "transport_max_size"]


def transport_max_size(settings: Settings) -> int:
    """Frames above this are cut off by uvicorn with 1009; below it the relay answers with a clear error."""
    return max(4 * settings.max_message_bytes, 1 << 20)


class _GracefulServer(uvicorn.Server):
    """uvicorn closes WebSockets with 1012 on shutdown; clients should see 1001 (going away)."""

    def __init__(self, config: uvicorn.Config, relay: Relay, state: Any = None) -> None:
        super().__init__(config)
        self.relay = relay
        self.state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.relay.drain(self.relay.settings.shutdown_grace)
        if self.state is not None:  # MCP tool calls in flight end now, not after the grace (mcp_http.py).
            stop_mcp_calls(self.state)
        await super().shutdown(sockets)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _leave_rotation, self.relay)
        except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (in-process tests)
            pass
        await super().serve(sockets)


def _leave_rotation(relay: Relay) -> None:
    """SIGUSR1, a rolling upgrade's first step (docs/deploy.md): out of the load balancer's rotation.

    /readyz answers 503 and newcomers are refused, so the balancer's health check stops
    sending connections here; open sockets keep working until SIGTERM closes them with 1001.
    """
    if not relay.draining:
        relay.draining = True
        logging.getLogger(__name__).warning("SIGUSR1: leaving the rotation (/readyz 503); SIGTERM closes the sockets")


class _JoinedWrites:
    """A response's writes within one loop pass, joined into one ``transport.write``.

    uvicorn writes the status line and headers at ``http.response.start`` and the body
    at ``http.response.body``: two syscalls and two TCP segments for every small JSON
    answer. Writes are held until the end of the pass (or a close), so a body sent right
    after its start goes out with it; a streamed body still goes out as it comes.
    """

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop  # The protocol's: get_running_loop() would cost a getpid syscall per request.
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is None:
            self._held = [data]
            self._loop.call_soon(self.flush)
        else:
            self._held.append(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(b"".join(held))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, ...: the transport's own.
        return getattr(self._transport, name)


def joined_writes(base: type[HttpToolsProtocol]) -> type[HttpToolsProtocol]:
    """``base`` (uvicorn's httptools protocol) whose request cycles write through :class:`_JoinedWrites`.

    Only the cycle's transport is wrapped: a WebSocket upgrade keeps the real one.
    """

    class JoinedWritesProtocol(base):  # type: ignore[valid-type,misc]
        def on_headers_complete(self) -> None:
            before = self.cycle
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and cycle is not before:
                cycle.transport = _JoinedWrites(cycle.transport, self.loop)

        def shutdown(self) -> None:
            # uvicorn closes the real transport of an idle connection: write what this pass still holds first.
            if self.cycle is not None and isinstance(self.cycle.transport, _JoinedWrites):
                self.cycle.transport.flush()
            super().shutdown()

    return JoinedWritesProtocol


def _tune_gc() -> None:
    """Fewer, cheaper collections: a relay holds many long-lived objects per connection.

    The bench saw full collections of 10,000 idle connections take up to 66 ms, the
    whole latency tail; freezing start-up objects and collecting the old generation
    less often keeps refcounting (which frees almost everything here) doing the work.
    That needs every closed connection freed by refcounting alone: a cycle would wait for a
    full collection, which this makes rare (tests/integration/test_connection_cycles.py).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def build_server(app: Litestar, settings: Settings) -> uvicorn.Server:
    """The uvicorn server ``run`` serves ``app`` on (the tests run this exact stack in-process)."""
    config = uvicorn.Config(
        # X-Forwarded-For checked (forwarded.py), then floods, scanners and foreign origins stop (SECURITY.md).
        ForwardedForMiddleware(AdmissionMiddleware(app, settings), settings),
        host=settings.bind_host,
        port=settings.web_socket_port,
        loop="uvloop",
        # Slowloris: uvicorn has no header deadline; one write per response.
        http=joined_writes(guarded_http_protocol(settings.handshake_timeout)),
        ws=OrderedWebSocketsProtocol,  # websockets-sansio, keeping frames that precede a protocol error.
        ws_max_size=transport_max_size(settings),
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
        log_config=None,
        log_level=settings.log_level.lower(),
        lifespan="on",
        server_header=False,
        proxy_headers=False,  # ForwardedForMiddleware reads X-Forwarded-For, accepting only IP addresses.
    )
    return _GracefulServer(config, app.state.relay, app.state)


def run(settings: Settings, token_store: TokenStore | None = None) -> None:
    app = create_app(settings, token_store=token_store)
    _tune_gc()
    logflood.install(settings.log_flood_burst, settings.log_flood_rate)
    build_server(app, settings).run()
