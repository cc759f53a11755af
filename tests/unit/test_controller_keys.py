"""A WebSocket controller's command ids as idempotency keys (ControllerKeys), in-process on the embedded broker."""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.brokers.memory import MemoryBroker
from appliance.commands.idempotency import ControllerKeys, IdempotentSends
from appliance.core.protocol_v2 import Request, TimeoutPolicy, request_from_fields

POLICY = TimeoutPolicy(30_000, 300_000)


def request(target: str, message: str, command_id: str) -> Request:
    parsed = request_from_fields({"target": target, "message": message, "id": command_id}, POLICY)
    assert isinstance(parsed, Request)
    return parsed


async def test_a_retry_of_a_command_in_flight_does_not_hold_the_connections_later_commands():
    """Measured on a real appliance before the fix: a retry of a 5 s command held the next command to
    another device for 5 s (up to the command's timeout), every later frame of that connection too."""
    sent: list[str] = []
    frames: list[str] = []
    tasks: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    keys = ControllerKeys(
        IdempotentSends(MemoryBroker(), 600),
        lambda waiter, controller, req: sent.append(req.message),
        lambda waiter, frame: frames.append(frame),
        spawn,
    )
    keys.submit("c1", "llm", request("slow-dev", "MoveForward 10", "k1"))
    keys.submit("c1", "llm", request("slow-dev", "MoveForward 10", "k1"))  # its retry, while k1 is in flight
    keys.submit("c1", "llm", request("fast-dev", "Jump", "k2"))
    async with asyncio.timeout(5):
        while sent != ["MoveForward 10", "Jump"]:
            await asyncio.sleep(0.01)
    assert frames == []  # The retry still waits for k1's outcome, and gets it: sent once.
    keys.finished("c1", "k1", '{"reply_to": "k1", "sender": "slow-dev", "message": "done"}')
    async with asyncio.timeout(5):
        while not frames:
            await asyncio.sleep(0.01)
    assert '"replayed":true' in frames[0] and '"done"' in frames[0]
    assert sent == ["MoveForward 10", "Jump"]
    for task in tasks:
        task.cancel()


async def test_a_keyed_command_counts_against_its_token_even_if_the_connection_closes_before_its_claim():
    """The caller is its connection's token's when the frame came: a connection closed meanwhile (the
    reason to retry) claimed in the unnamed tokens' pool, so the retry on a new connection, claiming
    under the token's name, found no key and ran the command a second time."""
    broker = MemoryBroker()
    connected = {"c1": "alice", "c2": "alice"}
    sent: list[str] = []
    keys = ControllerKeys(
        IdempotentSends(broker, 600),
        lambda waiter, controller, req: sent.append(waiter),
        lambda waiter, frame: None,
        lambda coro: asyncio.ensure_future(coro),
        lambda waiter: connected.get(waiter, "~"),
    )
    keys.submit("c1", "llm", request("dev", "MoveForward 10", "k1"))
    del connected["c1"]  # Closed before the claim ran.
    async with asyncio.timeout(5):
        while not sent:
            await asyncio.sleep(0.01)
    assert await broker.idempotency_get("alice", "ws:llm:id:'k1'") is not None
    keys.submit("c2", "llm", request("dev", "MoveForward 10", "k1"))  # The retry, reconnected.
    await keys._last["c2"]  # Its claim: the key is held, so it waits for the first's outcome.
    assert sent == ["c1"]
