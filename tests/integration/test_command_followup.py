"""Following a command up: GET /api/v1/commands/{id} and the MCP tool get_command, cluster-wide.

Two appliances on one real Redis: commands are sent through one and followed up on the other.
"""

import asyncio
import contextlib
import json
import uuid

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from support import CONTROLLER_TOKEN, timeout

V2 = ["wsbridge.v2"]
HEADERS = {"X-Auth-Token": CONTROLLER_TOKEN}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pair(redis_server):
    from support import Appliance

    a = Appliance(redis_url=redis_server.url, name="follow-a")
    b = Appliance(redis_url=redis_server.url, name="follow-b")
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


@contextlib.asynccontextmanager
async def slow_client(app, client_id, delay):
    """A v2 client that answers every command after ``delay`` seconds."""
    async with app.connect(client_id, subprotocols=V2) as ws:

        async def answer(frame):
            await asyncio.sleep(delay)
            await ws.send(json.dumps({"reply_to": frame["id"], "message": "done: " + frame["message"]}))

        answers: set[asyncio.Task] = set()

        async def read():
            async for raw in ws:
                answering = asyncio.create_task(answer(json.loads(raw)))
                answers.add(answering)
                answering.add_done_callback(answers.discard)

        task = asyncio.create_task(read())
        try:
            yield ws
        finally:
            task.cancel()


def mcp_client(app, read_timeout=30.0):
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {CONTROLLER_TOKEN}"}, timeout=timeout(30))
    return Client(
        streamable_http_client(f"{app.http}/mcp", http_client=http), read_timeout_seconds=timeout(read_timeout)
    )


async def follow(http, app, command_id, until, wait_ms=1000, deadline=None):
    """GET the record on ``app`` until ``until(record)``."""
    deadline = deadline or timeout(30)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        response = await http.get(f"{app.http}/api/v1/commands/{command_id}", params={"wait_ms": wait_ms})
        assert response.status_code in (200, 404), response.text
        if response.status_code == 200 and until(response.json()):
            return response.json()
        assert loop.time() < end, response.text
        await asyncio.sleep(0.05)


async def test_a_reply_after_the_timeout_is_kept_and_any_instance_shows_it(pair):
    a, b = pair
    target = uid("late")
    async with slow_client(a, target, delay=1.0), httpx.AsyncClient(headers=HEADERS, timeout=timeout(30)) as http:
        sent = await http.post(f"{a.http}/api/v1/commands", json={"target": target, "message": "dig", "wait_ms": 200})
        assert sent.status_code == 504, sent.text
        body = sent.json()
        assert body["delivered"] is True and "follow the command up by its id" in body["detail"]
        record = (await http.get(f"{b.http}/api/v1/commands/{body['id']}")).json()
        assert (record["status"], record["caller"], record["open"]) == ("timeout", "answered", True)
        # wait_ms on the other instance: answered as soon as the late reply is in.
        record = await follow(http, b, body["id"], lambda r: r["status"] == "replied", wait_ms=10_000)
        assert (record["reply"], record["late"], record["target"]) == ("done: dig", True, target)

        # wait=false (no wait_ms) and an id of the caller's choosing: the reply is there too.
        command_id = uid("mine")
        sent = await http.post(f"{a.http}/api/v1/commands", json={"target": target, "message": "go", "id": command_id})
        assert sent.status_code == 202 and sent.json()["status"] == "delivered"
        record = await follow(http, b, command_id, lambda r: r["status"] == "replied", wait_ms=10_000)
        assert record["reply"] == "done: go" and record["caller"] == "answered"

        unknown = await http.get(f"{b.http}/api/v1/commands/{uid('never')}")
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_command"


async def test_an_http_caller_that_goes_away_stops_waiting_and_the_record_says_so(pair):
    a, b = pair
    target = uid("gone")
    command_id = uid("cmd")
    async with a.connect(target, subprotocols=V2), httpx.AsyncClient(headers=HEADERS, timeout=timeout(30)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                f"{a.http}/api/v1/commands",
                json={"target": target, "message": "wait", "id": command_id, "wait_ms": 60_000},
                timeout=0.5,
            )
        record = await follow(http, b, command_id, lambda r: r["caller"] != "waiting")
        assert (record["caller"], record["status"], record["delivered"]) == ("disconnected", "delivered", True)


async def test_mcp_get_command_follows_a_timed_out_call_up_on_the_other_instance(pair):
    a, b = pair
    target = uid("mcp-late")
    async with slow_client(a, target, delay=1.0), mcp_client(a) as on_a, mcp_client(b) as on_b:
        tools = {tool.name: tool for tool in (await on_b.list_tools()).tools}
        assert tools["get_command"].annotations.read_only_hint is True
        result = await on_a.call_tool("send_command", {"target": target, "message": "scan", "timeout_seconds": 0.2})
        assert result.is_error
        text = result.content[0].text
        assert "[timeout]" in text and "Do not send it again" in text and "get_command" in text
        command_id = text.split('command_id="', 1)[1].split('"', 1)[0]
        followed = await on_b.call_tool("get_command", {"command_id": command_id, "wait_seconds": 10})
        assert not followed.is_error, followed.content
        assert followed.structured_content["status"] == "replied"
        assert (followed.structured_content["reply"], followed.structured_content["late"]) == ("done: scan", True)
        missing = await on_b.call_tool("get_command", {"command_id": "no-such-command"})
        assert missing.is_error and "[unknown_command] No command with id" in missing.content[0].text


async def test_a_long_send_command_reports_progress_when_asked(pair):
    a, _ = pair
    target = uid("progress")
    seen: list[tuple[float, float | None, str | None]] = []

    async def progress(value, total, message):
        seen.append((value, total, message))

    async with slow_client(a, target, delay=2.5), mcp_client(a) as client:
        result = await client.call_tool(
            "send_command", {"target": target, "message": "long", "timeout_seconds": 20}, progress_callback=progress
        )
    assert not result.is_error and result.structured_content["reply"] == "done: long"
    assert len(seen) >= 1, seen
    assert all(total == 20 for _, total, _ in seen) and target in (seen[0][2] or "")


async def test_a_cancelled_mcp_call_does_not_leave_the_next_command_to_a_v1_client_unsent(pair):
    """The bug of issue 21: a call whose MCP client timed out blocked a version-1 client's line, and the
    next command timed out unsent while its caller was told it had reached the client."""
    a, b = pair
    target, first = uid("v1"), uid("first")
    async with a.connect(target) as device, mcp_client(a, read_timeout=1.0) as client:  # version 1: one at a time
        call = {"target": target, "message": "first", "timeout_seconds": 4, "idempotency_key": first}
        with pytest.raises(Exception):  # noqa: B017 - the client's own timeout, whatever its type
            await client.call_tool("send_command", call)
        assert await asyncio.wait_for(device.recv(), timeout(10)) == "first"  # in flight, never answered
        async with httpx.AsyncClient(headers=HEADERS, timeout=timeout(30)) as http:
            record = await follow(http, b, first, lambda r: r["caller"] != "waiting")
            assert record["caller"] == "cancelled" and record["delivered"] is True

            second = await mcp_client(a).__aenter__()
            try:
                result = await second.call_tool(
                    "send_command", {"target": target, "message": "second", "timeout_seconds": 0.5}
                )
                assert result.is_error
                text = result.content[0].text
                assert "never reached" in text and "reached '" not in text.split("never reached")[0], text
                command_id = text.split('command_id="', 1)[1].split('"', 1)[0]
                record = await follow(http, b, command_id, lambda r: r["status"] == "timeout")
                assert record["delivered"] is False
                # Once the first command's deadline passed, the line is free: the next one reaches the device.
                third = asyncio.create_task(
                    second.call_tool("send_command", {"target": target, "message": "third", "timeout_seconds": 20})
                )
                assert await asyncio.wait_for(device.recv(), timeout(15)) == "third"  # never "second"
                await device.send("ok third")
                result = await third
                assert not result.is_error and result.structured_content["reply"] == "ok third"
            finally:
                await second.__aexit__(None, None, None)
