"""appliance.controller against a real relay: request/reply over WebSocket and HTTP, typed errors, send --wait."""

import asyncio
import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, recv, timeout

import appliance.controller as controller_module
from appliance.client import BridgeClient, BridgeClosed
from appliance.controller import (
    ClientOffline,
    Controller,
    HttpController,
    InvalidCommand,
    MessageTooLarge,
    RateLimited,
    ReplyTimeout,
)

V2 = ["wsbridge.v2"]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_public_api_is_pinned():
    assert controller_module.__all__ == [
        "BridgeClosed",
        "ClientOffline",
        "CommandError",
        "Controller",
        "DeliveryFailed",
        "DuplicateId",
        "HttpController",
        "IdTaken",
        "InvalidCommand",
        "MessageTooLarge",
        "QueueFull",
        "RateLimited",
        "Reply",
        "ReplyTimeout",
        "error_for",
    ]


async def echo_v1(ws, noisy=None):
    """A version-1 client: answers each command with 'done: <command>', after another client chatted."""
    async for text in ws:
        if noisy is not None:
            await noisy.send("unrelated chatter")
            await asyncio.sleep(0.05)  # let the chatter reach the controller first
        await ws.send("done: " + text)


async def test_request_gets_its_own_reply_among_other_traffic(relay):
    v1, v2 = uid("v1"), uid("v2")
    async with relay.connect(v1) as c1, relay.connect(v2, subprotocols=V2) as c2, relay.connect(uid("noisy")) as noisy:
        task = asyncio.create_task(echo_v1(c1, noisy))

        async def echo_v2():
            async for raw in c2:
                frame = json.loads(raw)
                await noisy.send("noise")  # another client's message reaches every controller
                await c2.send(json.dumps({"reply_to": frame["id"], "message": "v2: " + frame["message"]}))

        task2 = asyncio.create_task(echo_v2())
        try:
            async with Controller(relay.ws, uid("ctl"), CONTROLLER_TOKEN) as ctl:
                reply = await ctl.request(v1, "walk", timeout=5)
                assert (reply.sender, reply.message) == (v1, "done: walk")
                reply = await ctl.request(v2, "run", timeout=5)
                assert (reply.sender, reply.message) == (v2, "v2: run")
                assert reply.rtt_ms >= 0
                others = [await asyncio.wait_for(ctl.receive(), timeout(5)) for _ in range(3)]
                # Other clients' messages, and the v1 frame every controller gets, are kept for receive().
                assert sorted(o["message"] for o in others) == ["done: walk", "noise", "unrelated chatter"]
                with pytest.raises(ClientOffline):
                    await ctl.request(uid("nobody"), "x", timeout=2)
                with pytest.raises(ReplyTimeout):
                    await ctl.request(uid("nobody"), "x", timeout=0.2, queue=True)
                with pytest.raises(InvalidCommand):
                    await ctl.request("bad id!", "x", timeout=1)
                with pytest.raises(MessageTooLarge) as too_large:
                    await ctl.request(v1, "x" * 70_000, timeout=1)
                assert too_large.value.limit == 65536
        finally:
            task.cancel()
            task2.cancel()


async def test_http_controller_request_and_errors(relay):
    target = uid("h")
    async with relay.connect(target) as client, HttpController(relay.http, CONTROLLER_TOKEN) as http:
        task = asyncio.create_task(echo_v1(client))
        try:
            reply = await http.request(target, "wave", timeout=5)
            assert (reply.sender, reply.message) == (target, "done: wave")
            with pytest.raises(ClientOffline):
                await http.request(uid("nobody"), "x", timeout=1)
            with pytest.raises(InvalidCommand):
                await http.request(target, "x", timeout=1000)  # over COMMAND_TIMEOUT_MAX_MS
            page = await http.clients(prefix=target)
            assert [c["id"] for c in page["clients"]] == [target]
        finally:
            task.cancel()
    async with HttpController(relay.http, CONTROLLER_TOKEN) as http:
        assert CONTROLLER_TOKEN not in repr(http)


async def test_http_controller_rate_limited(start_appliance):
    app = start_appliance({"CONTROLLER_RATE_LIMIT": "1", "CONTROLLER_RATE_BURST": "1"})
    async with HttpController(app.http, CONTROLLER_TOKEN) as http:
        with pytest.raises(ClientOffline):
            await http.request("nobody", "x", timeout=1)
        with pytest.raises(RateLimited) as limited:
            await http.request("nobody", "x", timeout=1)
        assert limited.value.retry_after_ms > 0


async def test_bridge_client_speaks_v2_and_joins_groups(relay):
    target, group = uid("dev"), uid("grp")
    async with (
        BridgeClient(relay.ws, target, CLIENT_TOKEN, v2=True, groups=[group]) as device,
        Controller(relay.ws, uid("ctl"), CONTROLLER_TOKEN) as ctl,
    ):

        async def answer():
            frame = json.loads(await device.receive())
            await device.send_text(json.dumps({"reply_to": frame["id"], "message": "ack " + frame["message"]}))

        answering = asyncio.create_task(answer())
        reply = await ctl.request(target, "blink", timeout=5)
        await answering
        assert reply.message == "ack blink"
        await ctl.send(f"group:{group}", "all blink")
        assert json.loads(await asyncio.wait_for(device.receive(), timeout(5)))["message"] == "all blink"


async def test_bridge_client_stops_for_good_after_an_admin_disconnect(relay):
    target = uid("kicked")
    async with BridgeClient(relay.ws, target, CLIENT_TOKEN) as device:
        async with httpx.AsyncClient(base_url=relay.http, headers={"X-Auth-Token": ADMIN_TOKEN}) as admin:
            assert (await admin.delete(f"/api/v1/clients/{target}")).status_code == 204
        with pytest.raises(BridgeClosed) as closed:
            await asyncio.wait_for(device.receive(), timeout(5))
        assert closed.value.code == 4012


def run_cli(app, *args):
    env = {**os.environ, "LLM_SECRET_TOKEN": CONTROLLER_TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "appliance", "send", "--url", app.ws, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout(30),
    )


async def test_cli_send_wait_prints_only_the_reply_to_its_command(relay):
    target = uid("cli")
    async with relay.connect(target) as client, relay.connect(uid("chatty")) as chatty:
        running = asyncio.create_task(
            asyncio.to_thread(run_cli, relay, "--wait", "--timeout", "5", "--target", target, "status?")
        )
        assert await recv(client, 15) == "status?"
        await chatty.send("I am not the answer")
        await client.send("all good")
        result = await running
    assert result.returncode == 0, result.stderr
    assert result.stdout == "all good\n"


async def test_cli_send_wait_exit_codes(relay):
    offline = await asyncio.to_thread(run_cli, relay, "--wait", "--timeout", "2", "--target", uid("gone"), "x")
    assert offline.returncode == 1 and "target_offline" in offline.stderr
    target = uid("mute")
    async with relay.connect(target, subprotocols=V2):
        silent = await asyncio.to_thread(run_cli, relay, "--wait", "--timeout", "0.5", "--target", target, "x")
    assert silent.returncode == 3 and "no reply" in silent.stderr


async def test_two_controllers_with_one_id_end_with_a_typed_error_naming_the_id(relay):
    """The README once had every controller connect as "LLM": the second evicted the first (4010)."""
    from appliance.controller import IdTaken  # in the controller's error tree (also appliance.client's)

    target, shared = uid("dev"), uid("llm")
    async with relay.connect(target, subprotocols=V2), Controller(relay.ws, shared, CONTROLLER_TOKEN) as first:
        async with Controller(relay.ws, shared, CONTROLLER_TOKEN) as second:
            with pytest.raises(IdTaken) as taken:
                await asyncio.wait_for(first.receive(), timeout(10))
            assert taken.value.code == 4010 and isinstance(taken.value, BridgeClosed)
            assert shared in str(taken.value) and "an id of its own" in str(taken.value)
            with pytest.raises(IdTaken):  # and every request after, rather than waiting for replies gone elsewhere
                await first.request(target, "ping", timeout=timeout(5))
            with pytest.raises(ClientOffline):  # the newer one works
                await second.request(uid("nobody"), "ping", timeout=timeout(5))
