"""The command service, recent commands and the token service in-process: real parts, a fake socket.

Every piece here is the appliance's own (the composition root's ``wire_relay`` on the memory
broker, the relay, the sessions, the command service); only the WebSocket transport is a
stand-in, :class:`Peer`, which records the ASGI events the relay sends. Frames go in through
the same path the WebSocket adapter uses (``session.receive_text`` then ``relay.perform``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from appliance.app import Relaying, wire_relay
from appliance.brokers.memory import MemoryBroker
from appliance.commands import broadcast
from appliance.core.protocol import CloseCode, Role
from appliance.settings import Settings
from appliance.tokens.base import Grant
from appliance.tokens.env import EnvTokenStore
from appliance.tokens.service import TokenService

CONTROLLER_TOKEN, CLIENT_TOKEN = "c" * 32, "u" * 32


class Peer:
    """One connection's far end: what the relay writes to it, and a way to send it text."""

    def __init__(self, parts: Relaying, client_id: str, role: Role, *, v2: bool = False, groups=()) -> None:
        self.parts = parts
        self.texts: list[str] = []
        self.close_code: int | None = None
        self.conn = parts.relay.new_connection(client_id, role, self._send, "127.0.0.1:1", v2=v2, groups=groups)

    async def _send(self, event: dict[str, Any]) -> None:
        if event["type"] == "websocket.send":
            self.texts.append(event["text"])
        else:
            self.close_code = event["code"]

    async def open(self) -> Peer:
        assert await self.parts.relay.open(self.conn) is None
        self.conn.opened()
        return self

    def say(self, text: str | dict[str, Any]) -> None:
        frame = text if isinstance(text, str) else json.dumps(text)
        self.parts.relay.perform(self.conn, self.conn.session.receive_text(frame, time.time()))

    async def next(self, within: float = 5.0) -> str:
        async with asyncio.timeout(within):
            while not self.texts:
                await asyncio.sleep(0.002)
        return self.texts.pop(0)

    async def next_json(self, within: float = 5.0) -> dict[str, Any]:
        return json.loads(await self.next(within))

    async def nothing(self, within: float = 0.2) -> bool:
        await asyncio.sleep(within)
        return not self.texts

    async def close(self) -> None:
        await self.parts.relay.close(self.conn)


def settings(**overrides: Any) -> Settings:
    return Settings(
        _env_file=None,
        llm_secret_token=CONTROLLER_TOKEN,
        unity_client_token=CLIENT_TOKEN,
        instance_id="unit-a",
        **overrides,
    )


@pytest.fixture
async def parts() -> AsyncIterator[Relaying]:
    wired = wire_relay(settings(controller_rate_limit=0), MemoryBroker())
    await wired.relay.start()
    yield wired
    await wired.relay.stop()


async def peer(parts: Relaying, client_id: str, role: Role = Role.CLIENT, **kwargs: Any) -> Peer:
    return await Peer(parts, client_id, role, **kwargs).open()


# --- WebSocket controllers ------------------------------------------------------------------------


async def test_a_v2_reply_goes_to_its_sender_only_with_a_round_trip(parts):
    llm, other = await peer(parts, "llm", Role.CONTROLLER), await peer(parts, "other", Role.CONTROLLER)
    client = await peer(parts, "unity", v2=True)
    llm.say({"target": "unity", "message": "MoveForward 10", "id": "c-1"})
    assert await client.next_json() == {"id": "c-1", "from": "llm", "message": "MoveForward 10"}
    assert await llm.next_json() == {"id": "c-1", "status": "delivered", "target": "unity"}
    client.say({"reply_to": "c-1", "message": "done"})
    reply = await llm.next_json()
    assert (reply["reply_to"], reply["sender"], reply["message"]) == ("c-1", "unity", "done")
    assert reply["rtt_ms"] >= 0
    assert await other.nothing()


async def test_a_v1_client_answers_in_order_and_later_commands_wait_their_turn(parts):
    llm, client = await peer(parts, "llm", Role.CONTROLLER), await peer(parts, "v1")
    llm.say({"target": "v1", "message": "first", "id": 1})
    llm.say({"target": "v1", "message": "second", "id": 2})
    assert await client.next() == "first"
    assert await client.nothing()  # The second waits for the first one's reply.
    assert (await llm.next_json())["id"] == 1  # delivered
    client.say("answer one")
    reply = await llm.next_json()
    assert (reply["reply_to"], reply["message"]) == (1, "answer one")
    assert await client.next() == "second"


async def test_a_command_without_a_reply_times_out_and_a_late_reply_reaches_every_controller(parts):
    llm, client = await peer(parts, "llm", Role.CONTROLLER), await peer(parts, "slow", v2=True)
    llm.say({"target": "slow", "message": "work", "id": "t", "timeout_ms": 100})
    await client.next()
    assert (await llm.next_json())["status"] == "delivered"
    assert await llm.next_json() == {"id": "t", "status": "timeout", "target": "slow", "timeout_ms": 100}
    client.say({"reply_to": "t", "message": "too late"})
    late = await llm.next_json()
    assert "reply_to" not in late and late["sender"] == "slow"


async def test_an_offline_target_gets_one_error_and_a_repeated_id_in_flight_is_refused(parts):
    llm, client = await peer(parts, "llm", Role.CONTROLLER), await peer(parts, "busy", v2=True)
    llm.say({"target": "nobody", "message": "x", "id": "o1"})
    error = await llm.next_json()
    assert (error["error"], error["target"], error["id"]) == ("target_offline", "nobody", "o1")
    llm.say({"target": "busy", "message": "a", "id": "dup"})
    await client.next()
    assert (await llm.next_json())["status"] == "delivered"
    llm.say({"target": "busy", "message": "b", "id": "dup"})
    error = await llm.next_json()
    assert (error["error"], error["id"]) == ("duplicate_id", "dup")
    assert await client.nothing()


async def test_broadcast_and_group_commands_report_how_many_clients_they_reached(parts):
    llm = await peer(parts, "llm", Role.CONTROLLER)
    red = await peer(parts, "red", groups=("team",))
    blue = await peer(parts, "blue", v2=True, groups=("team",))
    grey = await peer(parts, "grey")
    llm.say({"target": "*", "message": "all", "id": "b1"})
    assert await llm.next_json() == {"id": "b1", "status": "delivered", "target": "*", "count": 3}
    assert (await red.next(), await grey.next()) == ("all", "all")
    assert (await blue.next_json())["message"] == "all"
    llm.say({"target": "group:team", "message": "team only", "id": "g1"})
    assert (await llm.next_json())["count"] == 2
    assert await red.next() == "team only"
    assert await grey.nothing()


async def test_queued_commands_reach_their_client_in_order_once_and_a_repeat_is_not_delivered_again(parts):
    llm = await peer(parts, "llm", Role.CONTROLLER)
    for i in range(3):
        llm.say({"target": "late", "message": f"q{i}", "id": f"q{i}", "queue": True, "timeout_ms": 20_000})
    statuses = [await llm.next_json() for _ in range(3)]
    assert [s["status"] for s in statuses] == ["queued"] * 3
    await llm.close()
    llm = await peer(parts, "llm", Role.CONTROLLER)  # Reconnected: the same (controller, id) again.
    llm.say({"target": "late", "message": "q0", "id": "q0", "queue": True, "timeout_ms": 20_000})
    repeat = await llm.next_json()
    # The first command's last status, replayed: the (controller, id) is an idempotency key, and the
    # offline queue's own de-duplication would also have refused to queue it twice.
    assert (repeat["status"], repeat["replayed"]) == ("queued", True)
    client = await peer(parts, "late", v2=True)
    assert [(await client.next_json())["message"] for _ in range(3)] == ["q0", "q1", "q2"]
    assert await client.nothing()


async def test_a_closing_target_fails_a_command_or_queues_it_for_its_return(parts):
    llm, client = await peer(parts, "llm", Role.CONTROLLER), await peer(parts, "leaving", v2=True)
    client.conn.close(CloseCode.GOING_AWAY)
    llm.say({"target": "leaving", "message": "x", "id": "f1"})
    error = await llm.next_json()
    assert (error["error"], error["id"]) == ("delivery_failed", "f1")
    llm.say({"target": "leaving", "message": "y", "id": "f2", "queue": True, "timeout_ms": 20_000})
    assert (await llm.next_json())["status"] == "queued"
    await client.close()
    back = await peer(parts, "leaving", v2=True)
    assert (await back.next_json())["message"] == "y"


# --- in-process callers (the HTTP API, MCP, the dashboard) ------------------------------------------


async def test_send_command_waits_for_the_reply_and_says_why_it_could_not(parts):
    client = await peer(parts, "unity", v2=True)
    commands = parts.commands
    sending = asyncio.ensure_future(commands.send_command("unity", "ping", wait_ms=5_000))
    command = await client.next_json()
    client.say({"reply_to": command["id"], "message": "pong"})
    outcome = await sending
    assert outcome.http_status == 200
    assert (outcome.body["status"], outcome.body["message"], outcome.body["sender"]) == ("replied", "pong", "unity")
    offline = await commands.send_command("nobody", "x")
    assert (offline.http_status, offline.body["error"]) == (404, "target_offline")
    too_large = await commands.send_command("unity", "x" * (parts.relay.settings.max_message_bytes + 1))
    assert (too_large.http_status, too_large.body["error"]) == (413, "message_too_large")
    delivered = await commands.send_command("unity", "no wait")
    assert (delivered.http_status, delivered.body["status"]) == (202, "delivered")


async def test_a_waiting_broadcast_collects_each_v2_clients_reply_and_names_the_silent_ones(parts):
    llm = await peer(parts, "llm", Role.CONTROLLER)
    fast, slow = await peer(parts, "fast", v2=True, groups=("team",)), await peer(parts, "slow", v2=True)
    old = await peer(parts, "old", groups=("team",))  # Version 1: reached and counted, its text unmatched.
    sending = asyncio.ensure_future(parts.commands.send_command("*", "status?", wait_ms=600))
    command = await fast.next_json()
    assert (await slow.next_json())["id"] == command["id"] and await old.next() == "status?"
    fast.say({"reply_to": command["id"], "message": "ok"})
    outcome = await sending
    assert outcome.http_status == 200
    body = outcome.body
    assert (body["status"], body["count"], body["no_reply"]) == ("delivered", 3, ["slow"])
    assert [(r["client"], r["message"]) for r in body["replies"]] == [("fast", "ok")]
    assert body["replies"][0]["rtt_ms"] >= 0
    # The reply also reached every controller as the client's plain message, as before.
    assert await llm.next_json() == {"sender": "fast", "message": "ok"}
    slow.say({"reply_to": command["id"], "message": "late"})  # After the wait: to controllers only.
    assert (await llm.next_json())["message"] == "late"
    assert not parts.commands.broadcasts.awaiting
    # Everybody answers: replied, as soon as the last one does (well before the 60 s wait).
    sending = asyncio.ensure_future(parts.commands.send_command("group:team", "again", wait_ms=60_000))
    command = await fast.next_json()
    await old.next()
    fast.say({"reply_to": command["id"], "message": "done"})
    async with asyncio.timeout(5):
        outcome = await sending
    assert (outcome.body["status"], outcome.body["count"], outcome.body["no_reply"]) == ("replied", 2, [])
    # Without wait_ms nothing is collected and nothing is remembered.
    delivered = await parts.commands.send_command("*", "fire and forget")
    assert (delivered.http_status, delivered.body["status"], delivered.body["count"]) == (202, "delivered", 3)
    assert "replies" not in delivered.body and not parts.commands.broadcasts.awaiting


async def test_in_process_commands_share_the_controller_rate_limit():
    wired = wire_relay(settings(controller_rate_limit=1, controller_rate_burst=2), MemoryBroker())
    await wired.relay.start()
    try:
        statuses = [(await wired.commands.send_command("nobody", "m")).http_status for _ in range(4)]
    finally:
        await wired.relay.stop()
    assert statuses[:2] == [404, 404] and 429 in statuses[2:]


async def test_disconnect_closes_the_holder_with_4012_and_says_when_nobody_holds_the_id(parts):
    client = await peer(parts, "unity")
    assert await parts.commands.disconnect("unity") is True
    await asyncio.sleep(0.01)
    assert client.close_code == CloseCode.DISCONNECTED
    assert await parts.commands.disconnect("nobody") is False


# --- recent commands and tokens ---------------------------------------------------------------------


async def test_recent_commands_show_every_path_with_its_outcome(parts):
    llm, client = await peer(parts, "llm", Role.CONTROLLER), await peer(parts, "unity", v2=True)
    llm.say({"target": "unity", "message": "plain"})
    llm.say({"target": "unity", "message": "asked", "id": "r1"})
    await client.next()
    await client.next()
    client.say({"reply_to": "r1", "message": "answered"})
    await llm.next_json()  # delivered
    await llm.next_json()  # the reply
    entries, silent = await parts.recent.read("unity")
    assert silent == []
    assert [(e["message"], e["outcome"], e["instance"]) for e in entries] == [
        ("asked", "replied", "unit-a"),
        ("plain", "uncorrelated", "unit-a"),
    ]
    assert entries[0]["reply"] == "answered"


async def test_the_token_service_evicts_connections_of_a_token_version_no_longer_allowed(parts):
    store = EnvTokenStore(parts.relay.settings)
    store.load()
    service = TokenService(parts.relay.settings, store, audit=None, local=parts.local)  # type: ignore[arg-type]
    current = await peer(parts, "now")
    current.conn.grant = Grant("client", "UNITY_CLIENT_TOKEN", store.states["UNITY_CLIENT_TOKEN"].current.version)
    stale = await peer(parts, "old")
    stale.conn.grant = Grant("client", "UNITY_CLIENT_TOKEN", 999)
    assert service.enforce() == 1
    await asyncio.sleep(0.01)
    assert (stale.close_code, current.close_code) == (CloseCode.TOKEN_EXPIRED, None)
    await stale.close()  # What the WebSocket adapter does once the peer has gone.
    assert {e["name"]: e["connections"] for e in service.status()}["UNITY_CLIENT_TOKEN"] == {"1": 1}


async def test_a_waiting_broadcast_keeps_replies_whole_up_to_a_budget_then_cut(parts, monkeypatch):
    # 10,000 clients answering 64 KiB would hold 640 MB per waiting caller: beyond the budget, replies are cut.
    monkeypatch.setattr(broadcast, "REPLY_CHARS", 500)
    llm = await peer(parts, "llm", Role.CONTROLLER)
    first, second = await peer(parts, "first", v2=True), await peer(parts, "second", v2=True)
    sending = asyncio.ensure_future(parts.commands.send_command("*", "dump", wait_ms=60_000))
    command_id = (await first.next_json())["id"]
    await second.next_json()
    first.say({"reply_to": command_id, "message": "a" * 400})
    assert (await llm.next_json())["sender"] == "first"
    second.say({"reply_to": command_id, "message": "b" * 400})
    async with asyncio.timeout(5):
        outcome = await sending
    replies = {r["client"]: r["message"] for r in outcome.body["replies"]}
    assert replies["first"] == "a" * 400
    assert replies["second"] == "b" * broadcast.REPLY_CUT_CHARS + "…"
    assert outcome.body["status"] == "replied"
    assert await llm.next_json() == {"sender": "second", "message": "b" * 400}, "controllers get it whole"


async def test_an_instance_keeps_a_bounded_total_of_manifests(parts):
    # Each manifest (up to 32 KiB) is also in Redis presence: 10,000 connections would fill the shipped 192 MB Redis.
    parts.relay.manifests.limit = 400
    frame = {"type": "manifest", "commands": [{"name": "Ping", "description": "p" * 100}]}
    first, second = await peer(parts, "first", v2=True), await peer(parts, "second", v2=True)
    first.say(frame)
    assert (await first.next_json())["type"] == "manifest_accepted"
    first.say(frame)  # Replacing its own counts once.
    assert (await first.next_json())["type"] == "manifest_accepted"
    second.say({**frame, "commands": [{"name": "Ping", "description": "p" * 300}]})
    refused = await second.next_json()
    assert (refused["type"], refused["error"]) == ("manifest_error", "manifests_full"), refused
    assert second.conn.manifest is None
    await parts.relay.close(first.conn)  # Its bytes are free again.
    second.say(frame)
    assert (await second.next_json())["type"] == "manifest_accepted"
    assert parts.relay.manifests.used < 400


async def test_a_websocket_controllers_id_is_an_idempotency_key_on_its_connection_and_after_a_reconnect(parts):
    """Issue 21: the same id repeated waits for the first command's outcome; the client gets it once."""
    llm, client = await peer(parts, "llm", Role.CONTROLLER), await peer(parts, "keyed", v2=True)
    command = {"target": "keyed", "message": "MoveForward 10", "id": "k1"}
    llm.say(command)
    llm.say(command)  # In flight: waits for the first one's outcome.
    sent = await client.next_json()
    assert (await llm.next_json())["status"] == "delivered"
    client.say({"reply_to": sent["id"], "message": "moved"})
    first, repeat = await llm.next_json(), await llm.next_json()
    assert (first["message"], first.get("replayed")) == ("moved", None)
    assert (repeat["reply_to"], repeat["message"], repeat["replayed"]) == ("k1", "moved", True)
    await llm.close()
    llm = await peer(parts, "llm", Role.CONTROLLER)  # Reconnected: the same id again.
    llm.say(command)
    assert (await llm.next_json())["replayed"] is True
    llm.say({**command, "message": "MoveBack 10"})  # The same id for another command.
    error = await llm.next_json()
    assert (error["error"], error["id"]) == ("duplicate_id", "k1") and "different command" in error["detail"]
    assert await client.nothing()
