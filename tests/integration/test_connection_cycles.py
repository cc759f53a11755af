"""A closed connection is freed by refcounting alone, not left for a full garbage collection.

The appliance collects the old generation rarely (``_tune_gc`` in appliance/server.py), so
every closed connection held in a reference cycle stayed in memory: the soak saw the
clients' instance grow ~16 KiB per reconnect (bench/README.md). Here the production uvicorn
stack (``build_server``) serves in a thread of this process with the collector disabled,
connections open, exchange frames and close in the ways they do in production, and then
none of their objects may be left.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections import Counter

from support import CLIENT_TOKEN, CONTROLLER_TOKEN, command, free_port, timeout
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.asyncio.client import connect
from websockets.server import ServerProtocol

from appliance.app import create_app
from appliance.connections import Connection
from appliance.core.session import Session
from appliance.handshake_guard import guarded_http_protocol
from appliance.server import build_server
from appliance.settings import Settings
from appliance.web import RelaySocket

ROUNDS = 60

# guarded_http_protocol makes a new class per call: match the server's by name.
WATCHED = (Connection, Session, RelaySocket, WebSocketsSansIOProtocol, ServerProtocol)
HTTP_PROTOCOL = guarded_http_protocol(1).__qualname__


def _alive() -> Counter[str]:
    alive: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        if issubclass(kind, WATCHED) or kind.__qualname__ == HTTP_PROTOCOL:
            alive[kind.__name__] += 1
    return alive


async def _churn(ws_url: str) -> None:
    def open_(client_id: str, token: str):
        return connect(f"{ws_url}/ws/{client_id}", additional_headers={"X-Auth-Token": token}, compression=None)

    async with open_("LLM", CONTROLLER_TOKEN) as controller:
        for i in range(ROUNDS):
            async with open_(f"dev{i % 5}", CLIENT_TOKEN) as client:  # closed by the peer
                await controller.send(command(f"dev{i % 5}", f"m{i}"))
                await asyncio.wait_for(client.recv(), timeout(5))
                await client.send(f"reply {i}")
                await asyncio.wait_for(controller.recv(), timeout(5))
        async with open_("dev0", CLIENT_TOKEN) as first:  # closed by the relay: replaced
            async with open_("dev0", CLIENT_TOKEN):
                await asyncio.wait_for(first.wait_closed(), timeout(5))
        async with open_("dev1", "wrong-token") as refused:  # refused after accept
            await asyncio.wait_for(refused.wait_closed(), timeout(5))
        drop = await open_("dev2", CLIENT_TOKEN)  # lost without a close frame
        drop.transport.abort()


def test_closed_connections_are_freed_without_a_full_collection() -> None:
    port = free_port()
    settings = Settings(
        _env_file=None,
        llm_secret_token=CONTROLLER_TOKEN,
        unity_client_token=CLIENT_TOKEN,
        bind_host="127.0.0.1",
        web_socket_port=port,
        log_level="WARNING",
    )
    server = build_server(create_app(settings), settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout(10)
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        asyncio.run(_churn(f"ws://127.0.0.1:{port}"))  # warm-up: first-use caches are not connections
        gc.collect()
        # Connections other tests of this process left registered (relays whose metrics callbacks keep
        # them) are not this server's: only what the measured churn leaves behind counts.
        before = _alive()
        gc.disable()
        try:
            asyncio.run(_churn(f"ws://127.0.0.1:{port}"))
            # The server thread may still be finishing the last handlers (3 s was too short once at
            # load 5). Waiting longer weakens nothing: with the collector off, a cycle never goes.
            deadline = time.monotonic() + timeout(15)
            while (alive := _alive() - before) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            gc.enable()
        assert not alive, f"closed connections left to the cyclic collector: {dict(alive)}"
    finally:
        server.should_exit = True
        thread.join(timeout(10))
