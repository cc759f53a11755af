"""SIGTERM with an MCP tool call in flight over /mcp: the call ends and the process exits promptly."""

import asyncio
import signal
import time

import httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from support import CONTROLLER_TOKEN, timeout


async def test_sigterm_with_an_mcp_call_in_flight_exits_promptly(start_appliance):
    app = start_appliance(name="mcp-stop")  # The default 10 s grace: the call must not hold it.
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {CONTROLLER_TOKEN}"}, timeout=timeout(30))
    async with app.connect("mute") as device:  # Takes the command and never answers.
        async with Client(streamable_http_client(f"{app.http}/mcp", http_client=http)) as client:
            call = asyncio.create_task(
                client.call_tool("send_command", {"target": "mute", "message": "never answered", "timeout_seconds": 60})
            )
            assert await asyncio.wait_for(device.recv(), timeout(10)) == "never answered"  # The call waits.
            started = time.monotonic()
            code = await asyncio.to_thread(app.terminate, 15)
            took = time.monotonic() - started
            # The in-flight call gets an error at once (the stream ends without a response), not a hang.
            outcome = await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), timeout(10))
            assert isinstance(outcome[0], Exception), outcome
    assert code in (0, -signal.SIGTERM)
    # It held SIGTERM for the whole SHUTDOWN_GRACE (10 s), then uvicorn cancelled it with a traceback.
    assert took < 5, f"SIGTERM took {took:.1f} s"
    assert "Application shutdown complete" in app.log() and "graceful shutdown exceeded" not in app.log()
