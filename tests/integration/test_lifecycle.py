"""Limits, graceful shutdown, the CLI and the client library, against real server processes."""

import asyncio
import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading

import pytest
from support import (
    CLIENT_TOKEN,
    CONTROLLER_TOKEN,
    closed_with,
    command,
    eventually,
    free_port,
    recv,
    recv_json,
    timeout,
)

from appliance.client import BridgeClient, BridgeClosed


async def test_sigterm_closes_every_socket_with_1001_after_in_flight_messages(start_appliance):
    app = start_appliance({"SHUTDOWN_GRACE": "5"})
    async with app.controller() as llm, app.connect("c1") as client, app.connect("c2") as other:
        for i in range(50):
            await llm.send(command("c1", f"in flight {i}"))
        assert await recv(client) == "in flight 0"  # Routing is under way when SIGTERM arrives.
        code = await asyncio.to_thread(app.terminate)
        received = [await recv(client) for _ in range(49)]
        assert received == [f"in flight {i}" for i in range(1, 50)]
        for ws in (llm, client, other):
            assert await closed_with(ws) == (1001, "server shutting down")
    # uvicorn re-raises the captured SIGTERM once shut down: exit status 143, as Docker expects.
    assert code in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in app.log()


async def test_client_over_its_rate_is_slowed_and_loses_nothing(start_appliance):
    app = start_appliance({"CLIENT_RATE_LIMIT": "50", "CLIENT_RATE_BURST": "5"})
    async with app.controller() as llm, app.connect("chatty") as client:
        for i in range(30):
            await client.send(f"r{i}")
        replies = [(await recv_json(llm))["message"] for _ in range(30)]
        assert replies == [f"r{i}" for i in range(30)]
        _status, body = await app.aget("/metrics")
        throttled = [line for line in body.splitlines() if line.startswith("wsbridge_client_throttled_total")]
        assert throttled and float(throttled[0].split()[-1]) >= 20


async def test_controller_over_its_rate_gets_rate_limited_errors(start_appliance):
    app = start_appliance({"CONTROLLER_RATE_LIMIT": "1", "CONTROLLER_RATE_BURST": "3"})
    async with app.controller() as llm, app.connect("c1") as client:
        for i in range(5):
            # No ids: commands with an id to a version-1 client wait for each other's replies (protocol v2).
            await llm.send(command("c1", f"m{i}"))
        assert [await recv(client) for _ in range(3)] == ["m0", "m1", "m2"]
        errors = [await recv_json(llm) for _ in range(2)]
        assert [e["error"] for e in errors] == ["rate_limited", "rate_limited"]
        assert all(e["retry_after_ms"] > 0 for e in errors)


async def test_max_message_size_is_configurable(start_appliance):
    app = start_appliance({"MAX_MESSAGE_BYTES": "1024"})
    async with app.controller() as llm, app.connect("c1") as client:
        await llm.send(command("c1", "x" * 1000))
        assert (await recv_json(llm))["limit"] == 1024
        await client.send("y" * 1025)
        assert (await closed_with(client))[0] == 1009


def run_cli(app, *args, token=CONTROLLER_TOKEN):
    env = {**os.environ, "LLM_SECRET_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "send", "--url", app.ws, "--timeout", "5", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout(30),
    )


async def test_cli_send_prints_the_reply(start_appliance):
    app = start_appliance()
    async with app.connect("echo-bot") as bot:

        async def echo():
            text = await recv(bot, 15)
            await bot.send(f"done: {text}")

        task = asyncio.create_task(echo())
        result = await asyncio.to_thread(run_cli, app, "--target", "echo-bot", "MoveForward 10")
        await task
    assert (result.returncode, result.stdout.strip()) == (0, "done: MoveForward 10")


async def test_cli_send_reports_errors_with_exit_codes(start_appliance):
    app = start_appliance()
    offline = await asyncio.to_thread(run_cli, app, "--target", "nobody", "hi")
    assert offline.returncode == 1 and "target_offline" in offline.stderr
    denied = await asyncio.to_thread(run_cli, app, "--target", "nobody", "hi", token="wrong")
    assert denied.returncode == 2 and "4001" in denied.stderr


async def test_cli_send_prints_the_targets_reply_not_another_clients_chatter(start_appliance):
    app = start_appliance()
    async with app.connect("echo-bot") as bot, app.connect("chatter") as chatter:
        chatting = True

        async def chat():
            while chatting:
                await chatter.send("unrelated chatter")
                await asyncio.sleep(0.01)

        async def echo():
            text = await recv(bot, 15)
            await asyncio.sleep(0.3)  # The chatter reaches the CLI first.
            await bot.send(f"done: {text}")

        tasks = [asyncio.create_task(chat()), asyncio.create_task(echo())]
        result = await asyncio.to_thread(run_cli, app, "--target", "echo-bot", "MoveForward 10")
        chatting = False
        await asyncio.gather(*tasks)
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "done: MoveForward 10", "")


class _NotARelay(http.server.BaseHTTPRequestHandler):
    """A real web server that is not the relay: every path is 404."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://127.0.0.1:{free}", "cannot connect"),  # Nothing listens there: connection refused.
        ("ws://127.0.0.1:{port}/no/such/path", "HTTP 403"),  # The relay refuses an unknown WebSocket path.
        ("ws://127.0.0.1:{web}", "HTTP 404"),  # A web server that is not the relay.
        ("http://127.0.0.1:{port}", "ws:// or wss://"),
        ("not a url", "ws:// or wss://"),
    ],
)
@pytest.mark.parametrize("wait", [[], ["--wait"]], ids=["plain", "wait"])
async def test_cli_send_reports_a_bad_url_in_one_line_with_exit_code_2(start_appliance, url, expected, wait):
    app = start_appliance()
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotARelay) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        url = url.format(free=free_port(), port=app.port, web=web.server_address[1])
        result = await asyncio.to_thread(run_cli, app, *wait, "--url", url, "--target", "echo-bot", "hi")
        web.shutdown()
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("wsbridge send: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr and result.stdout == ""


def test_cli_send_help_documents_the_exit_codes():
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "send", "--help"], capture_output=True, text=True, timeout=timeout(30)
    )
    assert result.returncode == 0
    for line in ("0 ", "1 ", "2 ", "3 "):
        assert any(text.strip().startswith(line) for text in result.stdout.splitlines()), result.stdout


async def test_client_library_reconnects_after_a_restart(start_appliance):
    app = start_appliance()
    client = BridgeClient(app.ws, "unity_client_1", CLIENT_TOKEN, backoff_max=0.5)
    await client.connect()
    receiving = asyncio.create_task(client.receive())
    await asyncio.to_thread(app.terminate)
    await asyncio.to_thread(app.start)  # Same port: the client comes back by itself.
    async with BridgeClient(app.ws, "LLM", CONTROLLER_TOKEN) as llm:

        async def delivered():
            await llm.send_command("unity_client_1", "after restart")
            await asyncio.sleep(0.2)
            return receiving.done()

        await eventually(delivered, 15, "the reconnected client to receive")
        assert receiving.result() == "after restart"
        await client.send_text("reply")
        reply = await llm.receive_json()
        while reply.get("error") == "target_offline":  # Sent before the client was back.
            reply = await llm.receive_json()
        assert reply == {"sender": "unity_client_1", "message": "reply"}
    assert client.connections >= 2  # A try may land on the old process while it drains (1001).
    await client.close()


async def test_client_library_shared_by_a_reader_and_a_writer_survives_a_restart(start_appliance):
    """Both tasks see the connection drop; only one may reconnect, or the second socket replaces the first."""
    app = start_appliance()
    client = BridgeClient(app.ws, "unity_client_1", CLIENT_TOKEN, backoff_max=0.5)
    await client.connect()
    received: asyncio.Queue[str] = asyncio.Queue()

    async def reader():
        while True:
            received.put_nowait(await client.receive())

    async def writer():
        for i in range(1_000_000):
            await client.send_text(f"tick {i}")
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    try:
        await asyncio.sleep(0.1)  # Both tasks are using the first connection.
        await asyncio.to_thread(app.terminate)
        await asyncio.to_thread(app.start)  # Same port.
        async with BridgeClient(app.ws, "LLM", CONTROLLER_TOKEN) as llm:
            frames = []

            async def collect():  # Keeps reading, so the ticks never back up into the close handshake.
                while True:
                    frames.append(await llm.receive_json())

            tasks.append(asyncio.create_task(collect()))

            async def ticks_arrive():
                return any(frame.get("sender") == "unity_client_1" for frame in frames)

            await eventually(ticks_arrive, 15, "the writer's messages after the restart")

            async def command_arrives():
                await llm.send_command("unity_client_1", "after restart")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout(0.5)):
                        while await received.get() != "after restart":
                            pass
                        return True
                return False

            await eventually(command_arrives, 15, "the reader to receive after the restart")
            await asyncio.sleep(timeout(0.5))  # A second socket would have replaced the first (4010) by now.
            for task in tasks:  # Neither task gave up.
                assert not task.done(), task.exception()
        _status, body = await app.aget("/metrics")
        replaced = [
            line
            for line in body.splitlines()
            if line.startswith('wsbridge_connections_closed_total{reason="replaced"}')
        ]
        assert all(float(line.split()[-1]) == 0 for line in replaced), replaced  # It never replaced itself.
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


async def test_client_library_stops_on_final_close_codes(start_appliance):
    app = start_appliance()
    client = BridgeClient(app.ws, "unity_client_1", "wrong-token")
    await client.connect()
    with pytest.raises(BridgeClosed) as closed:
        await asyncio.wait_for(client.receive(), timeout(5))
    assert closed.value.code == 4001


async def test_a_final_close_stops_the_reader_and_the_writer_alike(start_appliance):
    """After 4010 no task reconnects: that would take the id back from the newer connection."""
    app = start_appliance()
    client = BridgeClient(app.ws, "shared", CLIENT_TOKEN)
    await client.connect()
    reader = asyncio.create_task(client.receive())
    async with app.connect("shared") as newer:
        with pytest.raises(BridgeClosed) as closed:
            await asyncio.wait_for(reader, timeout(5))
        assert closed.value.code == 4010
        with pytest.raises(BridgeClosed) as again:
            await client.send_text("from the writer")
        assert again.value.code == 4010
        async with app.controller() as llm:  # The newer connection still holds the id.
            await llm.send(command("shared", "to the newer one"))
            assert await recv(newer) == "to the newer one"
    assert client.connections == 1
    await client.close()


async def test_a_client_that_reads_slowly_gets_everything_in_order(start_appliance):
    """Enough data to fill the socket buffers, so uvicorn's send waits (back-pressure)."""
    app = start_appliance()
    payload = "x" * 8000
    async with app.controller() as llm, app.connect("slow-reader", max_queue=1) as client:
        for i in range(2000):
            await llm.send(command("slow-reader", f"{i:05d}{payload}"))
        received = [await recv(client, 20) for _ in range(2000)]
        assert [frame[:5] for frame in received] == [f"{i:05d}" for i in range(2000)]
        with pytest.raises(TimeoutError):  # And no error frame came back to the controller.
            await asyncio.wait_for(llm.recv(), timeout(0.2))


async def test_client_library_backs_off_while_its_id_is_refused(start_appliance):
    app = start_appliance({"DUPLICATE_POLICY": "reject"})
    async with app.connect("held"):  # Keeps the id, so every attempt is closed with 4009.
        client = BridgeClient(app.ws, "held", CLIENT_TOKEN, backoff_initial=0.05, backoff_max=0.4)
        window = timeout(2)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.receive(), window)
    # Full jitter, doubling to 0.4 s: about five tries a second, never a tight loop.
    assert 2 <= client.connections <= 15 * window


def _read_frames_raw(sock, buffer: bytes, until_opcode: int, within: float) -> list[tuple[int, bytes]]:
    """Read server frames (unmasked) from a raw socket until one with ``until_opcode``."""
    sock.settimeout(timeout(within))
    frames = []
    while True:
        while len(buffer) < 2 or len(buffer) < 2 + (buffer[1] & 0x7F):
            chunk = sock.recv(4096)
            if not chunk:
                return frames
            buffer += chunk
        opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F  # Control frames: length < 126.
        frames.append((opcode, buffer[2 : 2 + length]))
        buffer = buffer[2 + length :]
        if opcode == until_opcode:
            return frames


async def test_a_peer_that_never_answers_pings_is_closed_with_1011(start_appliance):
    """A raw socket completes the handshake, then ignores the server's pings."""
    import base64
    import socket as sockets

    app = start_appliance({"PING_INTERVAL": "0.3", "PING_TIMEOUT": "0.5"})
    key = base64.b64encode(os.urandom(16)).decode()
    with sockets.create_connection(("127.0.0.1", app.port), timeout=timeout(5)) as sock:
        sock.sendall(
            (
                f"GET /ws/silent HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"X-Auth-Token: {CLIENT_TOKEN}\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += sock.recv(1024)
        assert response.startswith(b"HTTP/1.1 101")
        already_read = response.split(b"\r\n\r\n", 1)[1]  # A ping may come with the response.
        frames = await asyncio.to_thread(_read_frames_raw, sock, already_read, 0x8, 10)
    assert frames[0][0] == 0x9  # A ping came first, unanswered...
    opcode, payload = frames[-1]
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1011  # ...then 1011.
