"""BridgeClient: a receive cut short by a timeout never loses the connection being opened.

A real websockets server on a free port stands in for a relay that answers the handshake
slowly and writes a command the moment a connection is accepted (as the relay does with a
command that arrives meanwhile). The client's caller waits with ``asyncio.wait_for``, which
cancels the receive while the handshake is under way.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.server import serve

from appliance.client import BridgeClient

HANDSHAKE_DELAY = 0.5


async def test_a_receive_cancelled_during_the_handshake_keeps_the_connection_and_its_first_command() -> None:
    accepted: list[int] = []

    async def slow_handshake(connection, request):
        await asyncio.sleep(HANDSHAKE_DELAY)  # The client's wait_for times out meanwhile.
        return None

    async def relay(ws) -> None:
        accepted.append(len(accepted) + 1)
        await ws.send(f"command for connection {len(accepted)}")
        await ws.wait_closed()

    async with serve(relay, "127.0.0.1", 0, process_request=slow_handshake) as server:
        port = server.sockets[0].getsockname()[1]
        client = BridgeClient(f"ws://127.0.0.1:{port}", "dev", "token", backoff_initial=0.01)
        try:
            timeouts = 0
            while True:
                try:
                    text = await asyncio.wait_for(client.receive(), HANDSHAKE_DELAY / 5)
                    break
                except TimeoutError:
                    timeouts += 1
                    assert timeouts < 200, "never received anything"
            # Cancelled at least once mid-handshake; the first connection survived it and its command arrived.
            assert timeouts >= 2
            assert text == "command for connection 1"
            assert accepted == [1] and client.connections == 1
        finally:
            await client.close()
