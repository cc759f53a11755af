"""Batched frame writes through the real uvicorn websockets-sansio protocol behind Litestar.

Also the joined HTTP response writes of appliance/server.py, on the same server.

The batcher reaches into uvicorn's protocol object; these tests run the pinned uvicorn and
Litestar in-process over a real socket, so an upgrade that moves what the batcher relies
on fails here rather than silently falling back to one write per frame.
"""

import asyncio
import socket

import pytest
import uvicorn
import websockets
from litestar import Litestar, get, websocket
from websockets.protocol import State
from websockets.server import ServerProtocol

from appliance.admission import AdmissionMiddleware
from appliance.connections import Connection, Flusher
from appliance.core.protocol import CloseCode, Role
from appliance.core.session import Limits, Session
from appliance.handshake_guard import guarded_http_protocol
from appliance.server import joined_writes
from appliance.settings import Settings
from appliance.web import RelaySocket
from appliance.ws_protocol import OrderedWebSocketsProtocol
from appliance.wsbatch import MAX_BATCH_CHARS, _frame, _frames, batcher_for

found: list[bool] = []


@websocket("/ws", websocket_class=RelaySocket)
async def handler(socket: RelaySocket) -> None:
    await socket.accept()
    conn = Connection(Session("c1", Role.CLIENT, Limits(1 << 20, 0, 1), now=0), socket.raw_send, "x", Flusher())
    found.append(conn._batcher is not None)
    conn.opened()
    conn.deliver("first")
    conn.deliver("second é" * 40)  # A 16-bit length.
    conn.deliver("x" * (MAX_BATCH_CHARS + 10))  # A 64-bit length.  # Two writes: the batch stops at the limit.
    conn.deliver("last")
    conn.close(CloseCode.REPLACED)
    await conn.flush(5)
    assert conn.session.messages_out == 4
    while (await socket.raw_receive())["type"] != "websocket.disconnect":
        pass


async def _serve() -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The server's own chain: admission middleware, its protocols (see appliance/server.py).
    settings = Settings(_env_file=None, llm_secret_token="c" * 32, unity_client_token="u" * 32)
    config = uvicorn.Config(
        AdmissionMiddleware(Litestar([handler, hello]), settings),
        ws=OrderedWebSocketsProtocol,
        http=joined_writes(guarded_http_protocol(5)),
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    return server, task, port


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70001])
def test_frames_are_the_bytes_websockets_writes(length):
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    data = ("é" * length).encode()[:length]
    data = data.decode(errors="ignore").encode()
    protocol.send_text(data)
    assert _frame(data) == b"".join(protocol.data_to_send())


def test_several_frames_are_the_bytes_websockets_writes_for_each_in_turn():
    texts = ["", "ping", "é" * 62, "x" * 125, "y" * 126, '{"id":1,"status":"delivered","target":"u"}', "z" * 65536, "w"]
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    for text in texts:
        protocol.send_text(text.encode())
    assert _frames(texts) == b"".join(protocol.data_to_send())


def test_batcher_only_for_the_protocol_behind_known_wrappers():
    async def send(event):
        pass

    assert batcher_for(send) is None  # Not uvicorn's: the plain ASGI path.


async def test_frames_go_out_batched_intact_and_in_order_then_the_close():
    found.clear()
    server, task, port = await _serve()
    try:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            received = [await asyncio.wait_for(ws.recv(), 10) for _ in range(4)]
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
        assert received == ["first", "second é" * 40, "x" * (MAX_BATCH_CHARS + 10), "last"]
        assert code == CloseCode.REPLACED
        assert found == [True]
    finally:
        server.should_exit = True
        await task


@get("/hello", sync_to_thread=False)
def hello() -> dict[str, str]:
    return {"hello": "world"}


async def test_http_answers_are_whole_through_the_joined_writes():
    server, task, port = await _serve()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):  # Kept alive: each answer complete, none mixed with the next.
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
            assert await asyncio.wait_for(reader.readexactly(length), 10) == b'{"hello":"world"}'
        writer.close()
    finally:
        server.should_exit = True
        await task
