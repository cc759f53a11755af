"""The outbound side of a connection, fed through a plain ASGI ``send`` callable."""

import asyncio

from appliance.connections import MAX_PENDING_MESSAGES, Connection, Flusher
from appliance.core.protocol import CloseCode, Role
from appliance.core.session import Limits, Session


def make(send):
    session = Session("c1", Role.CLIENT, Limits(1024, 0, 1), now=0)
    return Connection(session, send, "127.0.0.1:1", Flusher())


async def test_frames_wait_for_the_handshake_then_go_out_in_order_before_the_close():
    sent = []

    async def send(event):
        sent.append(event)

    conn = make(send)
    conn.deliver("first")
    conn.deliver("second")
    await asyncio.sleep(0)
    assert sent == []  # Not accepted yet.
    conn.opened()
    conn.close(CloseCode.REPLACED)
    conn.deliver("after close is dropped")
    await conn.flush(1)
    assert sent == [
        {"type": "websocket.send", "text": "first"},
        {"type": "websocket.send", "text": "second"},
        {"type": "websocket.close", "code": 4010, "reason": "replaced by a newer connection"},
    ]
    assert conn.session.messages_out == 2


async def test_a_peer_that_stops_reading_is_closed_as_slow_consumer():
    """uvicorn's send waits while the transport is paused; the queue must not grow for ever."""
    gate = asyncio.Event()
    sent = []

    async def send(event):
        await gate.wait()  # The transport is full: uvicorn's send waits until it drains.
        sent.append(event)

    conn = make(send)
    conn.opened()
    for i in range(MAX_PENDING_MESSAGES + 5):
        conn.deliver(f"m{i}")
    assert conn.close_code == CloseCode.SLOW_CONSUMER
    gate.set()
    await conn.flush(5)
    # The backlog was dropped to free its memory: only the close is left to write.
    assert sent == [{"type": "websocket.close", "code": 4008, "reason": "too many undelivered messages"}]


async def test_a_vanished_peer_does_not_raise_into_the_router():
    async def send(event):
        raise OSError("connection reset")

    conn = make(send)
    conn.opened()
    conn.deliver("lost")
    await conn.flush(1)
    conn.deliver("also fine")  # No exception escapes to the broker or the caller.
    await conn.flush(1)
    assert conn.session.messages_out == 0
    assert conn.close_code is None  # The reader sees the disconnect and cleans up.


async def test_frames_queued_behind_a_paused_transport_go_out_in_order():
    gate = asyncio.Event()
    sent = []

    async def send(event):
        await gate.wait()  # Paused transport: the first send suspends.
        sent.append(event["text"])

    conn = make(send)
    conn.opened()
    conn.deliver("a")
    await asyncio.sleep(0)  # The flusher runs and the send suspends; a writer task takes over.
    conn.deliver("b")
    conn.deliver("c")
    await asyncio.sleep(0)
    assert sent == []
    gate.set()
    await conn.flush(1)
    assert sent == ["a", "b", "c"]
    assert conn.session.messages_out == 3
