"""Run the app on uvicorn, with a shutdown that closes every socket with 1001 first."""

from __future__ import annotations

import gc
import socket

import uvicorn
from litestar import Litestar

from . import logflood
from .admission import AdmissionMiddleware
from .handshake_guard import guarded_http_protocol
from .relay import Relay
from .settings import Settings
from .tokens import TokenStore
from .web import create_app
from .ws_protocol import OrderedWebSocketsProtocol

__all__ = ["build_server", "run", "transport_max_size"]


def transport_max_size(settings: Settings) -> int:
    """Frames above this are cut off by uvicorn with 1009; below it the relay answers with a clear error."""
    return max(4 * settings.max_message_bytes, 1 << 20)


class _GracefulServer(uvicorn.Server):
    """uvicorn closes WebSockets with 1012 on shutdown; clients should see 1001 (going away)."""

    def __init__(self, config: uvicorn.Config, relay: Relay) -> None:
        super().__init__(config)
        self.relay = relay

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.relay.drain(self.relay.settings.shutdown_grace)
        await super().shutdown(sockets)


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
        AdmissionMiddleware(app, settings),  # Floods, scanners and foreign origins stop here (SECURITY.md).
        host=settings.bind_host,
        port=settings.web_socket_port,
        loop="uvloop",
        http=guarded_http_protocol(settings.handshake_timeout),  # Slowloris: uvicorn has no header deadline.
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
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    return _GracefulServer(config, app.state.relay)


def run(settings: Settings, token_store: TokenStore | None = None) -> None:
    app = create_app(settings, token_store=token_store)
    _tune_gc()
    logflood.install(settings.log_flood_burst, settings.log_flood_rate)
    build_server(app, settings).run()
