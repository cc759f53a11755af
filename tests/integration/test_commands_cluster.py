"""Request/reply, broadcast, queue and disconnect across instances sharing one real Redis."""

import asyncio
import contextlib
import json
import uuid

import httpx
import httpx2
import pytest
import redis.asyncio as aioredis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from support import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    CONTROLLER_TOKEN,
    closed_with,
    command,
    eventually,
    recv,
    recv_json,
    timeout,
)

from appliance.client import BridgeClient

V2 = ["wsbridge.v2"]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def trio(redis_server):
    """Three instances on one Redis: a (controllers), b (HTTP), c (clients)."""
    from support import Appliance

    apps = [Appliance(redis_url=redis_server.url, name=f"cmd-{n}") for n in "abc"]
    for app in apps:
        app.start()
    yield apps
    for app in apps:
        app.stop()


async def nothing_arrives(ws, within: float = 0.3) -> bool:
    try:
        frame = await asyncio.wait_for(ws.recv(), within)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected frame {frame!r}")


async def test_ws_request_reply_with_controller_and_client_on_different_instances(trio):
    a, b, c = trio
    v2, v1, ctl = uid("v2"), uid("v1"), uid("ctl")
    async with (
        a.controller(ctl) as llm,
        b.controller(uid("other")) as other,
        c.connect(v2, subprotocols=V2) as client2,
        c.connect(v1) as client1,
    ):
        await llm.send(command(v2, "jump", id="x1"))
        assert await recv_json(client2) == {"id": "x1", "from": ctl, "message": "jump"}
        assert await recv_json(llm) == {"id": "x1", "status": "delivered", "target": v2}
        await client2.send(json.dumps({"reply_to": "x1", "message": "jumped"}))
        reply = await recv_json(llm)
        assert (reply["reply_to"], reply["sender"], reply["message"]) == ("x1", v2, "jumped")
        assert await nothing_arrives(other)  # the v2 reply went to its sender only

        await llm.send(command(v1, "sit", id=7))
        assert await recv(client1) == "sit"
        assert (await recv_json(llm))["status"] == "delivered"
        await client1.send("sat")
        assert await recv_json(other) == {"sender": v1, "message": "sat"}  # v1 frame to every controller
        frames = [await recv_json(llm) for _ in range(2)]
        reply = next(f for f in frames if "reply_to" in f)
        assert (reply["reply_to"], reply["sender"], reply["message"]) == (7, v1, "sat")

        await llm.send(command(v2, "slow", id="t1", timeout_ms=300))
        await recv(client2)
        assert (await recv_json(llm))["status"] == "delivered"
        assert (await recv_json(llm))["status"] == "timeout"


async def test_http_request_on_one_instance_reply_from_a_client_on_another(trio):
    _, b, c = trio
    v2, v1 = uid("v2"), uid("v1")
    async with (
        c.connect(v2, subprotocols=V2) as client2,
        c.connect(v1) as client1,
        httpx.AsyncClient(base_url=b.http, headers={"X-Auth-Token": CONTROLLER_TOKEN}, timeout=timeout(15)) as http,
    ):

        async def answer():
            frame = await recv_json(client2)
            await client2.send(json.dumps({"reply_to": frame["id"], "message": "v2 says hi"}))
            assert await recv(client1) == "hello v1"
            await client1.send("v1 says hi")

        answering = asyncio.create_task(answer())
        r2 = await http.post("/api/v1/commands", json={"target": v2, "message": "hello v2", "wait_ms": 5000})
        r1 = await http.post("/api/v1/commands", json={"target": v1, "message": "hello v1", "wait_ms": 5000})
        await answering
        assert (r2.status_code, r2.json()["message"]) == (200, "v2 says hi")
        assert (r1.status_code, r1.json()["message"]) == (200, "v1 says hi")
        offline = await http.post("/api/v1/commands", json={"target": uid("gone"), "message": "x", "wait_ms": 500})
        assert offline.status_code == 404


async def test_broadcast_and_group_counts_are_cluster_wide(trio):
    a, b, c = trio
    group = uid("grp")
    async with (
        a.controller(uid("ctl")) as llm,
        b.connect(f"{uid('m')}?groups={group}") as m1,
        c.connect(f"{uid('m')}?groups={group}", subprotocols=V2) as m2,
        c.connect(f"{uid('m')}?groups={group}") as m3,
        b.connect(uid("outsider")) as outsider,
    ):
        await llm.send(command(f"group:{group}", "rally", id="g"))
        assert await recv(m1) == "rally"
        assert (await recv_json(m2))["message"] == "rally"
        assert await recv(m3) == "rally"
        assert await recv_json(llm) == {"id": "g", "status": "delivered", "target": f"group:{group}", "count": 3}
        assert await nothing_arrives(outsider)
        async with httpx.AsyncClient(base_url=b.http, headers={"X-Auth-Token": CONTROLLER_TOKEN}) as http:
            response = await http.post("/api/v1/commands", json={"target": "*", "message": "all"})
            assert response.status_code == 202
            assert response.json()["count"] >= 4
        assert await recv(outsider) == "all"


async def test_a_waiting_http_group_send_collects_the_v2_replies_from_every_instance(trio):
    a, b, c = trio
    group = uid("grp")
    speaker, silent, old = uid("speaker"), uid("silent"), uid("old")
    async with (
        a.controller(uid("ctl")) as llm,
        c.connect(f"{speaker}?groups={group}", subprotocols=V2) as answering,
        b.connect(f"{silent}?groups={group}", subprotocols=V2) as quiet,
        c.connect(f"{old}?groups={group}") as v1,
        httpx.AsyncClient(base_url=b.http, headers={"X-Auth-Token": CONTROLLER_TOKEN}, timeout=timeout(15)) as http,
    ):
        body = {"target": f"group:{group}", "message": "report", "id": uid("g"), "wait_ms": 1500}
        sending = asyncio.create_task(http.post("/api/v1/commands", json=body))
        frame = await recv_json(answering)
        assert (frame["id"], (await recv_json(quiet))["id"], await recv(v1)) == (body["id"], body["id"], "report")
        await answering.send(json.dumps({"reply_to": frame["id"], "message": "all good"}))
        response = await sending
        assert response.status_code == 200, response.text
        result = response.json()
        assert (result["status"], result["count"], result["no_reply"]) == ("delivered", 3, [silent])
        assert [(r["client"], r["message"]) for r in result["replies"]] == [(speaker, "all good")]
        # The reply also reached the controllers (on another instance) as the client's plain message.
        assert await recv_json(llm) == {"sender": speaker, "message": "all good"}


async def test_command_queued_on_one_instance_is_delivered_on_another(trio):
    a, _, c = trio
    target = uid("later")
    async with a.controller(uid("ctl")) as llm:
        await llm.send(command(target, "first", id="q1", queue=True, timeout_ms=20_000))
        await llm.send(command(target, "second", id="q2", queue=True, timeout_ms=20_000))
        assert [(await recv_json(llm))["status"] for _ in range(2)] == ["queued", "queued"]
        async with c.connect(target, subprotocols=V2) as client:
            assert [(await recv_json(client))["message"] for _ in range(2)] == ["first", "second"]
            delivered = {(await recv_json(llm))["id"] for _ in range(2)}
            assert delivered == {"q1", "q2"}


async def test_admin_disconnect_reaches_another_instance(trio):
    a, _, c = trio
    target = uid("kick")
    async with c.connect(target) as client:
        async with httpx.AsyncClient(base_url=a.http, headers={"X-Auth-Token": ADMIN_TOKEN}) as http:
            assert (await http.delete(f"/api/v1/clients/{target}")).status_code == 204
        assert (await closed_with(client))[0] == 4012


async def test_a_client_leaving_mid_command_on_another_instance_leaves_every_command_one_outcome(trio):
    """The controller on a, the client on c: in flight → timeout; waiting (queue) → queued, then delivered."""
    a, _, c = trio
    target = uid("leaver")
    final = lambda f: "reply_to" in f or "error" in f or f.get("status") == "timeout"  # noqa: E731
    async with a.controller(uid("ctl")) as llm:
        async with c.connect(target) as client:
            await llm.send(command(target, "first", id=1, timeout_ms=1500))
            await llm.send(command(target, "second", id=2, queue=True, timeout_ms=20_000))
            await llm.send(command(target, "ping"))  # Without id: never held back, and behind 2 in order.
            assert await recv(client) == "first"
            assert await recv(client) == "ping"  # So 2 waits in its line.
        frames: dict = {1: [], 2: []}
        while not (any(map(final, frames[1])) and frames[2]):
            frame = await recv_json(llm, 10)
            key = frame.get("reply_to", frame.get("id"))
            if key in frames:
                frames[key].append(frame)
        assert [f["status"] for f in frames[1]] == ["delivered", "timeout"]
        assert [f.get("status") for f in frames[2]] == ["queued"]
        async with c.connect(target) as again:
            assert await recv(again) == "second"
            await again.send("second done")
            while not any(map(final, frames[2])):
                frame = await recv_json(llm, 10)
                if frame.get("reply_to", frame.get("id")) == 2:
                    frames[2].append(frame)
            assert [f.get("status") for f in frames[2]] == ["queued", "delivered", None]
            assert (frames[2][-1]["reply_to"], frames[2][-1]["message"]) == (2, "second done")
        # Only the plain copy of the reply (every controller gets it) may follow: no second outcome for either.
        later = []
        with contextlib.suppress(TimeoutError):
            while True:
                later.append(json.loads(await asyncio.wait_for(llm.recv(), 0.5)))
        assert all(set(f) == {"sender", "message"} for f in later), later


# --- GET /api/v1/events: what controllers hear, as server-sent events ---------------------------------


class EventStream:
    """One real SSE response read with httpx: its events as (event, id, data) as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, within: float = 10.0) -> tuple[str, str | None, str]:
        event, event_id, data = "message", None, []
        async with asyncio.timeout(timeout(within)):
            async for line in self._lines:
                if line.startswith(":") or line.startswith("retry:"):
                    continue
                if not line:
                    if data:
                        return event, event_id, "\n".join(data)
                    continue
                field, _, value = line.partition(": ")
                if field == "event":
                    event = value
                elif field == "id":
                    event_id = value
                elif field == "data":
                    data.append(value)
        raise AssertionError("the stream ended")


@contextlib.asynccontextmanager
async def events(app, last_event_id: str | None = None, **params: str):
    headers = {"X-Auth-Token": CONTROLLER_TOKEN}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with (
        httpx.AsyncClient(base_url=app.http, timeout=timeout(15)) as http,
        http.stream("GET", "/api/v1/events", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = EventStream(response)
        assert (await stream._lines.__anext__()).startswith(":")  # The opening comment: it follows from here.
        yield stream


async def _presence_on(app, client_id: str) -> bool:
    status, _ = await app.aget(f"/api/v1/clients/{client_id}", CONTROLLER_TOKEN)
    return status == 200


async def test_events_reach_an_sse_caller_on_another_instance_filtered_and_resumable(trio):
    a, b, c = trio
    speaker, other, group = uid("speaker"), uid("other"), uid("grp")
    async with httpx.AsyncClient(base_url=b.http) as http:
        assert (await http.get("/api/v1/events")).status_code == 401
    async with (
        c.connect(f"{speaker}?groups={group}") as talker,
        c.connect(other) as noisy,
    ):
        async with events(b, client=speaker) as stream:
            await noisy.send("not for this stream")
            await talker.send("hello from c")
            kind, first_id, data = await stream.next()
            assert (kind, json.loads(data)) == ("message", {"sender": speaker, "message": "hello from c"})
            assert first_id
        await talker.send("said while nobody listened")  # b keeps recording for a while: resumable
        await talker.send("and again")
        async with events(b, last_event_id=first_id, client=speaker) as stream:
            replayed = [json.loads((await stream.next())[2])["message"] for _ in range(2)]
            assert replayed == ["said while nobody listened", "and again"]
        # Another instance cannot know what b numbered: it says so (a gap), then follows. Group membership
        # of c's clients comes from c's presence records, which follow a connect within a presence write.
        await eventually(lambda: _presence_on(a, speaker), 15, f"{speaker} in presence")
        async with events(a, last_event_id=first_id, group=group) as stream:
            assert (await stream.next())[0] == "gap"
            await noisy.send("outside the group")
            await talker.send("in the group")
            # a may replay what it recorded after the id's time (while another test followed it): only
            # the group's member speaks in this stream, and the new message comes last.
            heard = []
            while not heard or heard[-1] != {"sender": speaker, "message": "in the group"}:
                kind, _, data = await stream.next()
                assert kind == "message"
                heard.append(json.loads(data))
            assert all(frame["sender"] == speaker for frame in heard), heard
            # A member that joins now is recognised at its first message (its own presence record is read,
            # not a member list a few seconds old).
            newcomer = uid("newcomer")
            async with c.connect(f"{newcomer}?groups={group}") as late:
                await eventually(lambda: _presence_on(a, newcomer), 10, f"{newcomer} in presence")
                await late.send("just joined")
                kind, _, data = await stream.next()
                assert (kind, json.loads(data)) == ("message", {"sender": newcomer, "message": "just joined"})


# --- command manifests (issue 21 item 4): a v2 client declares its commands on c; b shows them in the HTTP API
# and over /mcp, where send_command checks commands against them.


@contextlib.asynccontextmanager
async def manifest_device(app, client_id):
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


def mcp_over_http(app):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {CONTROLLER_TOKEN}"}, timeout=timeout(30))
    return Client(streamable_http_client(f"{app.http}/mcp", http_client=http), read_timeout_seconds=timeout(30))


async def test_a_declared_manifest_is_shown_cluster_wide_and_checked_by_send_command(trio, redis_server):
    _, b, a = trio  # the device on c, HTTP and MCP on b
    robot_id = uid("robot")
    async with manifest_device(a, robot_id):
        manifest = await declared(b, robot_id, ["MoveForward", "Status"])
        # Kept apart from the presence record that every listing reads (32 KiB each made listings ~60x slower).
        redis = aioredis.from_url(redis_server.url)
        try:
            records = [await redis.hget(key, robot_id) async for key in redis.scan_iter(match="wsb:instance:*")]
            (record,) = [json.loads(r) for r in records if r is not None]
            assert record["id"] == robot_id and "manifest" not in record
            stored = [await redis.hget(key, robot_id) async for key in redis.scan_iter(match="wsb:manifest:*")]
            (kept,) = [json.loads(m) for m in stored if m is not None]
            assert [c["name"] for c in kept["commands"]] == ["MoveForward", "Status"]
        finally:
            await redis.aclose()
        move = manifest["commands"][0]
        assert move["description"] == "Moves forward"
        assert move["arguments"]["properties"]["distance"] == {"type": "number", "description": "metres"}
        assert move["arguments"]["required"] == ["distance"]
        status, page = await b.aget(f"/api/v1/clients?prefix={robot_id}", CONTROLLER_TOKEN)
        assert status == 200 and [c["id"] for c in page["clients"]] == [robot_id]
        assert "manifest" not in page["clients"][0]  # only with one client

        async with mcp_over_http(b) as client:
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


async def test_a_manifest_is_replaced_and_a_bad_one_is_answered_with_an_error_frame(trio):
    _, b, a = trio
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
    async with a.connect(plain, subprotocols=V2) as ws, mcp_over_http(b) as client:

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
