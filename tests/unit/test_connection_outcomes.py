"""A connection says whether a frame will be written, and bounds its queue in bytes too."""

import asyncio

from appliance.connections import Connection, Flusher
from appliance.core.protocol import CloseCode, Role
from appliance.core.session import Limits, Session


def make(send, role=Role.CLIENT, **bounds):
    session = Session("c1", role, Limits(1024, 0, 1), now=0)
    return Connection(session, send, "127.0.0.1:1", Flusher(), **bounds)


async def test_a_frame_for_a_closing_connection_is_reported_not_delivered():
    sent = []

    async def send(event):
        sent.append(event)

    conn = make(send)
    conn.opened()
    assert conn.deliver("before") is True
    conn.close(CloseCode.REPLACED)
    assert conn.deliver("after the close") is False
    await conn.flush(1)
    assert [e.get("text") for e in sent] == ["before", None]


async def test_the_queue_is_bounded_in_bytes_not_only_in_messages():
    gate = asyncio.Event()
    sent = []

    async def send(event):
        await gate.wait()  # The peer stopped reading.
        sent.append(event)

    conn = make(send, max_messages=10_000, max_chars=100_000)
    conn.opened()
    frame = "x" * 30_000  # Four of these are over the bound, far below the message count.
    results = [conn.deliver(frame) for _ in range(4)]
    assert results == [True, True, True, False]
    assert conn.close_code == CloseCode.SLOW_CONSUMER
    gate.set()
    await conn.flush(5)
    # The backlog was dropped to free its memory: only the close is left to write.
    assert sent == [{"type": "websocket.close", "code": 4008, "reason": "too many undelivered messages"}]


async def test_written_frames_no_longer_count_against_the_bound():
    sent = []

    async def send(event):
        sent.append(event)

    conn = make(send, max_messages=10_000, max_chars=1000)
    conn.opened()
    for _ in range(50):  # 50 x 600 characters in all, but never more than 600 waiting.
        assert conn.deliver("y" * 600)
        await conn.flush(1)
    assert len(sent) == 50 and conn.close_code is None
