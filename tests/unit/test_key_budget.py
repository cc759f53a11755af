"""Idempotency keys cannot fill the broker (issue 21): a budget of live keys per caller, in-process.

Before the budget, every keyed command (HTTP id / Idempotency-Key, MCP idempotency_key, WebSocket id)
left a record for the window with no bound per caller: ~890 keyed commands/s from one token (or ~4.9/s
with 64 KB replies) filled the shipped 192 MB noeviction Redis.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient

from appliance.app import create_app, wire_relay
from appliance.brokers.memory import MemoryBroker
from appliance.commands.idempotency import ControllerKeys, IdempotentSends, fingerprint, key_budget, too_many_keys
from appliance.commands.outcome import Outcome
from appliance.controller import RateLimited, error_for
from appliance.core.keybudget import KeyBook, KeyBudget, TooManyKeys
from appliance.core.protocol_v2 import Request, TimeoutPolicy, request_from_fields
from appliance.mcp_tools import explain
from appliance.settings import Settings
from appliance.tokens.base import Grant

BUDGET = KeyBudget(keys=3, bytes=1000, reserve=100, overhead=0)
CONTROLLER = "c" * 32


def test_a_caller_holds_at_most_its_budget_of_live_keys_and_a_live_key_is_never_forgotten():
    book = KeyBook(BUDGET, window=600)
    for n in range(3):
        assert book.claim("alice", f"k{n}", "pending", now=n) is None
    with pytest.raises(TooManyKeys) as refused:
        book.claim("alice", "k3", "pending", now=10)
    assert (refused.value.keys, refused.value.used, refused.value.retry_after) == (3, 300, 590)  # k0 expires at 600
    assert book.claim("alice", "k0", "again", now=10) == "pending"  # a repeat is answered over the budget
    assert book.claim("bob", "k3", "his", now=10) is None  # another caller's budget is his own
    assert book.claim("alice", "k3", "pending", now=600) is None  # k0 expired: room for one
    with pytest.raises(TooManyKeys):
        book.claim("alice", "k4", "pending", now=600)
    book.drop("alice", "k1", now=601)  # a command that reached no client frees its key
    assert book.claim("alice", "k4", "pending", now=601) is None
    assert book.usage("alice", now=1300) == (0, 0)  # all expired


def test_outcomes_count_their_size_and_a_caller_without_keys_may_always_claim_one():
    book = KeyBook(BUDGET, window=600)
    assert book.claim("alice", "big", "pending", now=0) is None
    book.set("alice", "big", "x" * 950, now=1)
    assert book.usage("alice", now=1) == (1, 953)
    with pytest.raises(TooManyKeys):  # 953 + the reserve of a new key (100) > 1000
        book.claim("alice", "next", "pending", now=2)
    book.set("alice", "big", "small", now=3)  # an outcome written again counts its new size
    assert book.claim("alice", "next", "pending", now=4) is None
    huge = KeyBudget(keys=3, bytes=1000, reserve=5000, overhead=0)
    assert KeyBook(huge, window=600).claim("carol", "k", "pending", now=0) is None  # the first key always fits
    redis_like = KeyBook(KeyBudget(), window=600)  # a written record counts what Redis spends on it besides
    redis_like.set("dave", "k", "done", now=0)
    assert redis_like.usage("dave", now=0) == (1, 1 + 4 + 384)


def test_the_refusal_says_what_happened_when_to_retry_and_how_to_do_without_a_key():
    outcome = too_many_keys(TooManyKeys(1000, 123456, 41.2), KeyBudget(keys=1000), 600)
    assert outcome.http_status == 429
    body = outcome.body
    assert body["error"] == "too_many_keys" and body["retry_after_ms"] == 42_000 and body["limit"] == 1000
    for words in ("1000 live idempotency keys", "last 600 s", "COMMAND_KEYS_PER_CALLER=1000", "nothing was sent"):
        assert words in body["detail"]
    assert "Retry with the same key in 42 s" in body["detail"] and "send without a key" in body["detail"]
    # The Python client raises RateLimited (with retry_after_ms); the MCP tools explain it to a model.
    error = error_for(body)
    assert isinstance(error, RateLimited) and error.retry_after_ms == 42_000
    text = explain(error, "dev")
    assert text.startswith("Nothing was sent") and "limit of 1000 live idempotency keys" in text
    assert "same idempotency_key in 42 s" in text and "without idempotency_key" in text


async def test_keyed_sends_beyond_the_budget_are_refused_before_anything_is_sent():
    sends, sent = IdempotentSends(MemoryBroker(key_budget=BUDGET), 600, BUDGET), []

    async def first() -> Outcome:
        sent.append(1)
        return Outcome(202, {"status": "queued"})

    outcomes = [await sends.send("~", f"http:id:{n}", fingerprint("dev", "x", True), 1, first) for n in range(4)]
    assert [o.http_status for o in outcomes] == [202, 202, 202, 429] and len(sent) == 3
    again = await sends.send("~", "http:id:0", fingerprint("dev", "x", True), 1, first)
    assert again.http_status == 202 and again.body["replayed"] is True and len(sent) == 3


def _request(command_id: str) -> Request:
    parsed = request_from_fields({"target": "dev", "message": "Jump", "id": command_id}, TimeoutPolicy(30_000, 300_000))
    assert isinstance(parsed, Request)
    return parsed


async def test_a_websocket_controllers_budget_is_its_tokens_whatever_connection_or_controller_id_it_uses():
    sent: list[str] = []
    frames: list[tuple[str, str]] = []
    callers = {"conn-1": "agent-a", "conn-2": "agent-a", "conn-3": "agent-b"}
    keys = ControllerKeys(
        IdempotentSends(MemoryBroker(key_budget=BUDGET), 600, BUDGET),
        lambda waiter, controller, req: sent.append(f"{waiter}/{req.id}"),
        lambda waiter, frame: frames.append((waiter, frame)),
        asyncio.ensure_future,
        callers.__getitem__,
    )
    for n in range(3):
        keys.submit("conn-1", "llm", _request(f"k{n}"))
    keys.submit("conn-2", "llm-again", _request("k9"))  # a reconnect under another id: the same token's budget
    keys.submit("conn-3", "other", _request("k9"))
    async with asyncio.timeout(5):
        while len(sent) + len(frames) < 5:
            await asyncio.sleep(0.01)
    assert sorted(sent) == ["conn-1/k0", "conn-1/k1", "conn-1/k2", "conn-3/k9"]
    ((waiter, frame),) = frames
    error: dict[str, Any] = msgspec.json.decode(frame)
    assert waiter == "conn-2" and error["error"] == "too_many_keys" and error["id"] == "k9"
    assert error["target"] == "dev" and error["retry_after_ms"] > 0


async def test_the_command_service_counts_a_connection_under_its_tokens_caller():
    settings = Settings(_env_file=None, llm_secret_token=CONTROLLER, unity_client_token="u" * 32)
    wired = wire_relay(settings, MemoryBroker())
    named = Grant("controller", "controller_tokens/agent-a", 1, caller="agent-a")
    wired.local._by_key["k-named"] = SimpleNamespace(grant=named)  # type: ignore[assignment]
    wired.local._by_key["k-fixed"] = SimpleNamespace(grant=Grant("controller", "LLM_SECRET_TOKEN", 1))  # type: ignore[assignment]
    assert wired.commands._caller_of("k-named") == "agent-a"
    assert wired.commands._caller_of("k-fixed") == "~" and wired.commands._caller_of("gone") == "~"
    assert key_budget(settings) == KeyBudget(10_000, 16 * 1024 * 1024, 65536 + 1024, 384)


def test_http_a_new_key_beyond_the_budget_is_429_with_retry_after_and_unkeyed_commands_are_unaffected():
    settings = Settings(
        _env_file=None,
        llm_secret_token=CONTROLLER,
        unity_client_token="u" * 32,
        instance_id="unit",
        command_keys_per_caller=2,
        shutdown_grace=0,
    )
    headers = {"X-Auth-Token": CONTROLLER}
    queued = {"target": "dev_absent", "message": "Jump", "queue": True}  # queued: its key stays
    with TestClient(create_app(settings)) as client:
        first = client.post("/api/v1/commands", json={**queued, "id": "a"}, headers=headers)
        second = client.post("/api/v1/commands", json=queued, headers={**headers, "Idempotency-Key": "b"})
        refused = client.post("/api/v1/commands", json={**queued, "id": "c"}, headers=headers)
        repeat = client.post("/api/v1/commands", json={**queued, "id": "a"}, headers=headers)
        unkeyed = client.post("/api/v1/commands", json=queued, headers=headers)
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["error"] == "too_many_keys" and body["limit"] == 2 and "send without a key" in body["detail"]
    assert int(refused.headers["Retry-After"]) == body["retry_after_ms"] // 1000 > 590
    assert repeat.status_code == 202 and repeat.json()["replayed"] is True
    assert unkeyed.status_code == 202 and unkeyed.json()["status"] == "queued"
