"""Command manifests through the real transports: a v2 client declares its commands on instance a, and
instance b (over Redis) shows them in the HTTP API and over /mcp, where send_command checks against them."""

import asyncio
import contextlib
import json
import uuid

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from support import CLIENT_TOKEN, CONTROLLER_TOKEN, eventually, recv_json, timeout

from appliance.client import BridgeClient

V2 = ["wsbridge.v2"]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pair(redis_server):
    """Two instances on one Redis: a holds the devices, b answers HTTP and MCP."""
    from support import Appliance

    apps = [Appliance(redis_url=redis_server.url, name=f"manifest-{n}") for n in "ab"]
    for app in apps:
        app.start()
    yield apps
    for app in apps:
        app.stop()


@contextlib.asynccontextmanager
async def device(app, client_id):
    """The Python BridgeClient as a v2 device with two handlers, serving them."""
    robot = BridgeClient(app.ws, client_id, CLIENT_TOKEN, v2=True)

    @robot.on_command(
        "MoveForward",
        "Moves forward",
        arguments={"distance": {"type": "number", "description": "metres"}, "speed": {"type": "integer"}},
        required=["distance"],
    )
    async def move(distance: float, speed: int = 1) -> str:
        return f"moved {distance} at {speed}"

    robot.register("Status", lambda: "idle", "Reports the state")
    async with robot:
        task = asyncio.create_task(robot.serve())
        try:
            yield robot
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def declared(app, client_id, commands=None):
    """The manifest of ``client_id`` as ``app``'s HTTP API shows it, once it has ``commands`` (names)."""

    async def read():
        status, body = await app.aget(f"/api/v1/clients/{client_id}", CONTROLLER_TOKEN)
        manifest = body.get("manifest") if status == 200 else None
        if manifest is None or (commands is not None and [c["name"] for c in manifest["commands"]] != commands):
            return None
        return manifest

    return await eventually(read, 10, f"the manifest of {client_id} on {app.name}")


def mcp(app):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {CONTROLLER_TOKEN}"}, timeout=timeout(30))
    return Client(streamable_http_client(f"{app.http}/mcp", http_client=http), read_timeout_seconds=timeout(30))


async def test_a_declared_manifest_is_shown_cluster_wide_and_checked_by_send_command(pair):
    a, b = pair
    robot_id = uid("robot")
    async with device(a, robot_id):
        manifest = await declared(b, robot_id, ["MoveForward", "Status"])
        move = manifest["commands"][0]
        assert move["description"] == "Moves forward"
        assert move["arguments"]["properties"]["distance"] == {"type": "number", "description": "metres"}
        assert move["arguments"]["required"] == ["distance"]
        status, page = await b.aget(f"/api/v1/clients?prefix={robot_id}", CONTROLLER_TOKEN)
        assert status == 200 and [c["id"] for c in page["clients"]] == [robot_id]
        assert "manifest" not in page["clients"][0]  # only with one client

        async with mcp(b) as client:
            resource = await client.read_resource(f"wsbridge://clients/{robot_id}/manifest")
            assert json.loads(resource.contents[0].text)["manifest"]["commands"][1]["name"] == "Status"
            described = await client.call_tool("describe_client", {"target": robot_id})
            assert not described.is_error, described.content
            assert described.structured_content["usage"] == [
                "MoveForward <distance:number> [speed:integer] — Moves forward",
                "Status — Reports the state",
            ]
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert tools["describe_client"].annotations.read_only_hint is True

            refused = await client.call_tool("send_command", {"target": robot_id, "message": "Jump 3"})
            assert refused.is_error
            text = refused.content[0].text
            assert "[unknown_command]" in text and "MoveForward, Status" in text and "describe_client" in text
            bad = await client.call_tool("send_command", {"target": robot_id, "message": "MoveForward far"})
            assert bad.is_error and "[invalid_arguments]" in bad.content[0].text

            ok = await client.call_tool("send_command", {"target": robot_id, "message": "moveforward 2 3"})
            assert not ok.is_error, ok.content
            assert ok.structured_content["reply"] == "moved 2.0 at 3"


async def test_a_manifest_is_replaced_and_a_bad_one_is_answered_with_an_error_frame(pair):
    a, b = pair
    client_id = uid("dev")
    async with a.connect(client_id, subprotocols=V2) as ws:
        await ws.send(json.dumps({"type": "manifest", "commands": [{"name": "Blink"}]}))
        assert await recv_json(ws) == {"type": "manifest_accepted", "commands": 1}
        await declared(b, client_id, ["Blink"])

        await ws.send(json.dumps({"type": "manifest", "commands": [{"name": "Blink"}, {"name": "two words"}]}))
        error = await recv_json(ws)
        assert error["type"] == "manifest_error" and error["error"] == "invalid_manifest"
        assert error["path"] == "commands[1].name"

        await ws.send(json.dumps({"type": "manifest", "commands": [{"name": "Dim"}]}))
        assert await recv_json(ws) == {"type": "manifest_accepted", "commands": 1}
        await declared(b, client_id, ["Dim"])  # replaced; the refused one changed nothing

    # A client without a manifest is unchanged: its commands go through unchecked.
    plain = uid("plain")
    async with a.connect(plain, subprotocols=V2) as ws, mcp(b) as client:

        async def listed():
            return (await b.aget(f"/api/v1/clients/{plain}", CONTROLLER_TOKEN))[0] == 200

        await eventually(listed, 10, "presence on b")

        async def answer():
            frame = await recv_json(ws, 30)
            await ws.send(json.dumps({"reply_to": frame["id"], "message": "did " + frame["message"]}))

        task = asyncio.create_task(answer())
        result = await client.call_tool("send_command", {"target": plain, "message": "Anything 1 2 3"})
        await task
        assert not result.is_error and result.structured_content["reply"] == "did Anything 1 2 3"
        described = await client.call_tool("describe_client", {"target": plain})
        assert described.structured_content["manifest"] is None
