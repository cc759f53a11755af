"""The relay's open/close paths under races, driven directly on real brokers (Redis included)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from support import eventually

from appliance.app import wire_relay
from appliance.brokers.memory import MemoryBroker
from appliance.brokers.redis import RedisBroker
from appliance.core.protocol import CloseCode, Role
from appliance.relay import Relay
from appliance.settings import Settings


class Socket:
    """The ASGI ``send`` side of one accepted WebSocket: records what the relay writes."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    async def __call__(self, event: dict) -> None:
        self.events.append(event)

    def frames(self) -> list[str]:
        return [e["text"] for e in self.events if e["type"] == "websocket.send"]


def settings(**overrides) -> Settings:
    return Settings(
        _env_file=None,
        llm_secret_token="controller-token-0123456789",
        unity_client_token="client-token-0123456789",
        instance_id=f"races-{uuid.uuid4().hex[:6]}",
        **overrides,
    )


@pytest.fixture(params=["memory", "redis"])
async def make_relay(request):
    """Relays on one broker kind; with Redis each relay is its own instance on a shared Redis."""
    started: list[Relay] = []
    memory = MemoryBroker()

    async def make(**overrides) -> Relay:
        config = settings(**overrides)
        if request.param == "memory":
            if started:  # One process: every "instance" is the same relay.
                return started[0]
            broker = memory
        else:
            url = request.getfixturevalue("redis_server").url
            broker = RedisBroker(url, instance=config.instance_id, presence_ttl=30)
        relay = wire_relay(config, broker).relay
        await relay.start()
        started.append(relay)
        return relay

    yield make
    for relay in started:
        await relay.stop()


async def open_id(relay: Relay, client_id: str, role: Role = Role.CLIENT):
    socket = Socket()
    conn = relay.new_connection(client_id, role, socket, "127.0.0.1:1")
    refusal = await relay.open(conn)
    if refusal is None:
        conn.opened()
    return conn, socket, refusal


async def test_a_cancelled_open_never_leaves_its_id_held(make_relay):
    """Cancel open() after every number of loop passes: the id is free again each time."""
    relay = await make_relay()
    other = await make_relay(duplicate_policy="reject")
    for passes in range(12):
        client_id = f"cancel-{uuid.uuid4().hex[:8]}"
        conn = relay.new_connection(client_id, Role.CLIENT, Socket(), "127.0.0.1:1")
        task = asyncio.ensure_future(relay.open(conn))
        for _ in range(passes):
            await asyncio.sleep(0)
        task.cancel()
        try:
            refusal = await task
        except asyncio.CancelledError:
            refusal = CloseCode.GOING_AWAY  # Never registered.
        if refusal is None:  # It won the race: the socket's cleanup releases it as usual.
            await relay.close(conn)
        assert client_id not in relay.local

        async def free(client_id=client_id):
            conn, _, refusal = await open_id(other, client_id)
            if refusal is None:
                await other.close(conn)
            return refusal is None

        await eventually(free, 5, f"{client_id} free after open() was cancelled after {passes} passes")


async def test_a_claim_that_finishes_after_sigterm_is_refused_and_released(make_relay):
    relay = await make_relay()
    conn = relay.new_connection("late", Role.CLIENT, Socket(), "127.0.0.1:1")
    opening = asyncio.ensure_future(relay.open(conn))
    await relay.drain(1)
    assert await opening in (CloseCode.GOING_AWAY, None)
    if relay.local.get("late") is conn:  # Registered before the drain: drain closed it with 1001.
        assert conn.close_code == CloseCode.GOING_AWAY
        await relay.close(conn)
    other = await make_relay(duplicate_policy="reject")
    if other is not relay:
        _, _, refusal = await open_id(other, "late")
        assert refusal is None


async def test_concurrent_opens_of_one_id_leave_exactly_one_registered(make_relay):
    relay = await make_relay()
    opened = await asyncio.gather(*(open_id(relay, "storm") for _ in range(8)))
    live = [conn for conn, _, refusal in opened if refusal is None and conn.close_code is None]
    assert len(live) == 1 and relay.local["storm"] is live[0]


async def test_a_command_to_a_closing_client_gets_delivery_failed_with_its_id(make_relay):
    relay = await make_relay()
    client, client_socket, _ = await open_id(relay, "closing-client")
    llm, llm_socket, _ = await open_id(relay, "LLM", Role.CONTROLLER)
    client.close(CloseCode.REPLACED)  # Closing: its reader has not cleaned up yet.
    frame = json.dumps({"target": "closing-client", "message": "too late", "id": "c-1"})
    relay.perform(llm, llm.session.receive_text(frame, time.time()))

    async def answered():
        return llm_socket.frames()

    [error] = await eventually(answered, 10, "the error frame")
    assert json.loads(error) | {"detail": ""} == {
        "error": "delivery_failed",
        "detail": "",
        "target": "closing-client",
        "id": "c-1",
    }
    assert "too late" not in client_socket.frames()


async def test_a_queued_command_to_a_closing_client_is_queued_for_its_return(make_relay):
    """With "queue": true a client that is leaving is as good as offline: queued, not delivery_failed."""
    relay = await make_relay()
    target = f"leaving-{uuid.uuid4().hex[:8]}"  # Redis queues outlive a test.
    client, client_socket, _ = await open_id(relay, target)
    llm, llm_socket, _ = await open_id(relay, "LLM", Role.CONTROLLER)
    client.close(CloseCode.REPLACED)  # Closing: its reader has not cleaned up yet.
    frame = {"target": target, "message": "when back", "id": "q-1", "queue": True, "timeout_ms": 20_000}
    relay.perform(llm, llm.session.receive_text(json.dumps(frame), time.time()))

    async def statuses():
        return [json.loads(f) for f in llm_socket.frames()]

    [queued] = await eventually(statuses, 10, "the queued status")
    assert queued | {"expires_in_ms": 0} == {"id": "q-1", "status": "queued", "target": target, "expires_in_ms": 0}
    await relay.close(client)
    _, again_socket, refusal = await open_id(relay, target)
    assert refusal is None

    async def handed_over():
        return again_socket.frames() == ["when back"] and len(llm_socket.frames()) == 2

    await eventually(handed_over, 10, "the queued command on the new connection")
    assert json.loads(llm_socket.frames()[1]) == {"id": "q-1", "status": "delivered", "target": target}
    assert "when back" not in client_socket.frames()
