"""Commands safe to retry, end to end: two instances on one real Redis, real HTTP, the MCP client over /mcp.

A retry of a command (same HTTP ``id``, same ``Idempotency-Key``, same MCP ``idempotency_key``)
on either instance, one after the other or at the same time, gets the first command's outcome
and the device receives the command once.
"""

import asyncio
import contextlib
import json
import uuid

import httpx
import httpx2
import pytest
from support import CONTROLLER_TOKEN, timeout

V2 = ["wsbridge.v2"]
AUTH = {"X-Auth-Token": CONTROLLER_TOKEN}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pair(redis_server):
    from support import Appliance

    apps = [Appliance(redis_url=redis_server.url, name=f"idem-{n}") for n in "ab"]
    for app in apps:
        app.start()
    yield apps
    for app in apps:
        app.stop()


@contextlib.asynccontextmanager
async def counting_device(app, client_id, *, delay=0.0):
    """A v2 client that answers every command after ``delay`` and counts what it received."""
    received: list[str] = []
    async with app.connect(client_id, subprotocols=V2) as ws:

        async def answer():
            async for raw in ws:
                frame = json.loads(raw)
                received.append(frame["message"])
                await asyncio.sleep(delay)
                await ws.send(json.dumps({"reply_to": frame["id"], "message": f"done {len(received)}"}))

        task = asyncio.create_task(answer())
        try:
            yield received
        finally:
            task.cancel()


async def post(app, body, **headers):
    async with httpx.AsyncClient(timeout=timeout(30)) as http:
        return await http.post(f"{app.http}/api/v1/commands", json=body, headers={**AUTH, **headers})


async def test_the_same_id_posted_again_on_the_other_instance_returns_the_first_reply(pair):
    a, b = pair
    target = uid("dev")
    async with counting_device(a, target) as received:
        body = {"target": target, "message": "MoveForward 10", "id": uid("cmd"), "wait_ms": 5000}
        first = await post(a, body)
        again = await post(b, body)
    assert first.status_code == again.status_code == 200
    assert again.json() == {**first.json(), "replayed": True}
    assert received == ["MoveForward 10"]


async def test_concurrent_retries_with_an_idempotency_key_run_the_command_once(pair):
    a, b = pair
    target = uid("dev")
    async with counting_device(a, target, delay=0.3) as received:
        body = {"target": target, "message": "MoveForward 10", "wait_ms": 5000}
        key = {"Idempotency-Key": str(uuid.uuid4())}
        answers = await asyncio.gather(*(post(app, body, **key) for app in (a, b, a, b)))
    assert [r.status_code for r in answers] == [200] * 4
    assert {r.json()["message"] for r in answers} == {"done 1"}
    assert sorted(bool(r.json().get("replayed")) for r in answers) == [False, True, True, True]
    assert received == ["MoveForward 10"]


async def test_a_key_reused_for_another_command_gets_409_duplicate_id(pair):
    a, b = pair
    target = uid("dev")
    async with counting_device(a, target) as received:
        command_id = uid("cmd")
        await post(a, {"target": target, "message": "MoveForward 10", "id": command_id, "wait_ms": 5000})
        other = await post(b, {"target": target, "message": "MoveBack 10", "id": command_id, "wait_ms": 5000})
    assert other.status_code == 409
    assert other.json()["error"] == "duplicate_id" and "different command" in other.json()["detail"]
    assert received == ["MoveForward 10"]


async def test_a_command_to_an_offline_client_can_be_retried_once_it_connects(pair):
    a, b = pair
    target = uid("late")
    body = {"target": target, "message": "Wake", "id": uid("cmd"), "wait_ms": 5000}
    assert (await post(b, body)).status_code == 404
    async with counting_device(a, target) as received:
        retried = await post(b, body)
    assert retried.status_code == 200 and "replayed" not in retried.json()
    assert received == ["Wake"]


async def test_a_timed_out_command_is_not_sent_again_by_a_retry(pair):
    a, b = pair
    target = uid("slow")
    async with counting_device(a, target, delay=1.5) as received:
        body = {"target": target, "message": "Dig", "id": uid("cmd"), "wait_ms": 300}
        first = await post(a, body)
        again = await post(b, body)
        await asyncio.sleep(1.5)  # let the device answer the only command it got
    assert first.status_code == again.status_code == 504
    assert again.json()["replayed"] is True
    assert received == ["Dig"]


async def test_mcp_send_command_with_an_idempotency_key_runs_once(pair):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    a, b = pair
    target = uid("dev")
    key = str(uuid.uuid4())
    async with counting_device(a, target) as received:
        results = []
        for app in (a, b):
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {CONTROLLER_TOKEN}"}, timeout=timeout(30))
            async with Client(streamable_http_client(f"{app.http}/mcp", http_client=http)) as client:
                arguments = {"target": target, "message": "Open", "idempotency_key": key}
                results.append(await client.call_tool("send_command", arguments))
    assert [r.is_error for r in results] == [False, False]
    assert results[0].structured_content["reply"] == results[1].structured_content["reply"] == "done 1"
    assert results[1].structured_content["replayed"] is True
    assert received == ["Open"]


async def test_an_id_while_redis_is_down_gets_a_clear_503_and_the_command_is_not_sent(own_redis):
    """The idempotency record cannot be claimed: nothing is sent, the caller gets an answer it can retry."""
    from broker_support import Cluster

    from appliance.commands.idempotency import IdempotentSends, fingerprint
    from appliance.commands.outcome import Outcome

    cluster = Cluster("redis", own_redis.url)
    node = await cluster.node("a")
    sent: list[str] = []

    async def first() -> Outcome:
        sent.append("MoveForward 10")
        return Outcome(200, {"status": "replied"})

    try:
        await asyncio.to_thread(own_redis.kill)
        outcome = await IdempotentSends(node.broker, 600).send(
            "~", "http:id:'x'", fingerprint("dev", "MoveForward 10", False), 1.0, first
        )
    finally:
        await cluster.stop()
    assert outcome.http_status == 503 and outcome.body["error"] == "broker_unavailable"
    assert sent == []


async def test_a_websocket_controllers_repeated_id_after_a_reconnect_to_the_other_instance_is_not_sent_again(pair):
    """A WebSocket controller's id is its idempotency key, cluster-wide: the device runs the command once."""
    a, b = pair
    target = uid("ws-key")
    command = json.dumps({"target": target, "message": "MoveForward 10", "id": uid("k")})
    async with counting_device(a, target) as received:
        async with a.connect("llm-keys", token=CONTROLLER_TOKEN) as llm:
            await llm.send(command)
            frames = [json.loads(await asyncio.wait_for(llm.recv(), timeout(10))) for _ in range(2)]
            assert [f.get("status") for f in frames] == ["delivered", None] and frames[1]["message"] == "done 1"
        async with b.connect("llm-keys", token=CONTROLLER_TOKEN) as llm:
            await llm.send(command)
            repeat = json.loads(await asyncio.wait_for(llm.recv(), timeout(10)))
        assert (repeat["message"], repeat["replayed"]) == ("done 1", True)
    assert received == ["MoveForward 10"]
