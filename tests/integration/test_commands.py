"""Protocol version 2 and the HTTP command API on one instance, against both brokers, over real sockets."""

import asyncio
import json
import uuid

import httpx
import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, closed_with, command, recv, recv_json, timeout

V2 = ["wsbridge.v2"]


def uid(prefix: str) -> str:
    """Ids unique per test: the Redis broker's queues outlive one test."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def nothing_arrives(ws, within: float = 0.3) -> bool:
    """True if no frame arrives within ``within`` seconds (absence can only be shown by waiting)."""
    try:
        frame = await asyncio.wait_for(ws.recv(), within)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected frame {frame!r}")


async def next_status(ws) -> dict:
    """The next status frame, skipping client messages (every controller in the cluster gets those)."""
    while "status" not in (frame := await recv_json(ws)):
        pass
    return frame


def api(relay, token=CONTROLLER_TOKEN) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=relay.http, headers={"X-Auth-Token": token}, timeout=timeout(15))


# --- WebSocket: status frames and replies ------------------------------------------------------


async def test_v2_client_gets_id_and_sender_and_its_reply_goes_to_the_sender_only(relay):
    target = uid("v2")
    async with (
        relay.controller(uid("ctl")) as llm,
        relay.controller(uid("other")) as other,
        relay.connect(target, subprotocols=V2) as client,
    ):
        assert client.subprotocol == "wsbridge.v2"
        await llm.send(command(target, "MoveForward 10", id="c-1"))
        frame = await recv_json(client)
        assert frame == {"id": "c-1", "from": llm.request.path.rsplit("/", 1)[1], "message": "MoveForward 10"}
        assert await recv_json(llm) == {"id": "c-1", "status": "delivered", "target": target}
        await client.send(json.dumps({"reply_to": "c-1", "message": "done"}))
        reply = await recv_json(llm)
        assert (reply["reply_to"], reply["sender"], reply["message"]) == ("c-1", target, "done")
        assert list(reply) == ["reply_to", "sender", "message", "rtt_ms"]
        assert 0 <= reply["rtt_ms"] < 5000
        assert await nothing_arrives(other)


async def test_two_controllers_using_one_id_for_one_v2_client_get_its_replies_oldest_first(relay):
    target = uid("v2")
    async with (
        relay.controller(uid("first")) as first,
        relay.controller(uid("second")) as second,
        relay.connect(target, subprotocols=V2) as client,
    ):
        await first.send(command(target, "a", id=7))
        assert (await recv_json(client))["message"] == "a"
        await second.send(command(target, "b", id=7))
        assert (await recv_json(client))["message"] == "b"
        assert (await next_status(first))["status"] == "delivered"
        assert (await next_status(second))["status"] == "delivered"
        await client.send(json.dumps({"reply_to": 7, "message": "for a"}))
        await client.send(json.dumps({"reply_to": 7, "message": "for b"}))
        assert (await recv_json(first))["message"] == "for a"
        assert (await recv_json(second))["message"] == "for b"
        # A third answer has nobody waiting: every controller gets it as plain client text.
        await client.send(json.dumps({"reply_to": 7, "message": "extra"}))
        assert (await recv_json(first))["sender"] == target
        assert (await recv_json(second))["sender"] == target


async def test_v2_client_plain_text_reaches_every_controller_as_version_1(relay):
    target = uid("v2")
    async with relay.controller(uid("ctl")) as llm, relay.connect(target, subprotocols=V2) as client:
        await client.send("status ok")
        assert await recv(llm) == json.dumps({"sender": target, "message": "status ok"}, separators=(",", ":"))


async def test_command_without_id_reaches_v2_client_with_null_id(relay):
    target = uid("v2")
    async with relay.controller(uid("ctl")) as llm, relay.connect(target, subprotocols=V2) as client:
        await llm.send(command(target, "hello"))
        frame = await recv_json(client)
        assert frame["id"] is None and frame["message"] == "hello"
        assert await nothing_arrives(llm)  # no status frame without an id


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"timeout_ms": 0}, "invalid_message"),
        ({"queue": "yes"}, "invalid_message"),
        ({"id": "x" * 65}, "invalid_message"),
    ],
)
async def test_bad_v2_fields_get_error_frames(relay, fields, code):
    async with relay.controller(uid("ctl")) as llm:
        await llm.send(json.dumps({"target": "someone", "message": "m", "id": "e1", **fields}))
        assert (await recv_json(llm))["error"] == code


# --- broadcast and groups ------------------------------------------------------------------------


async def test_broadcast_and_group_counts(relay):
    group = uid("g")
    a, b, c = uid("a"), uid("b"), uid("c")
    async with (
        relay.controller(uid("ctl")) as llm,
        relay.connect(f"{a}?groups={group}") as ca,
        relay.connect(f"{b}?groups={group},other", subprotocols=V2) as cb,
        relay.connect(c) as cc,
    ):
        await llm.send(command(f"group:{group}", "team go", id="g1"))
        assert await recv(ca) == "team go"
        assert (await recv_json(cb))["message"] == "team go"
        assert await recv_json(llm) == {"id": "g1", "status": "delivered", "target": f"group:{group}", "count": 2}
        assert await nothing_arrives(cc)
        await llm.send(command("*", "everybody", id="b1"))
        assert await recv(ca) == "everybody"
        assert await recv(cc) == "everybody"
        status = await recv_json(llm)
        # Other tests' clients may be connected to this module-scoped relay too.
        assert status["status"] == "delivered" and status["count"] >= 3


async def test_broadcasts_keep_their_order_and_each_gets_its_own_count(relay):
    group = uid("g")
    async with relay.controller(uid("ctl")) as llm, relay.connect(f"{uid('a')}?groups={group}") as member:
        await llm.send(command(f"group:{group}", "x1"))
        await llm.send(command(f"group:{group}", "x2"))
        await llm.send(command(f"group:{group}", "x3", id="third"))
        await llm.send(command(f"group:{group}", "x4", id="fourth"))
        assert [await recv(member) for _ in range(4)] == ["x1", "x2", "x3", "x4"]
        # Each broadcast's count is gathered on its own: their status frames may come in either order.
        statuses = sorted([await next_status(llm) for _ in range(2)], key=lambda status: status["id"] != "third")
        assert statuses == [
            {"id": "third", "status": "delivered", "target": f"group:{group}", "count": 1},
            {"id": "fourth", "status": "delivered", "target": f"group:{group}", "count": 1},
        ]
        with pytest.raises(TimeoutError):  # no status frames for the broadcasts without id
            await asyncio.wait_for(next_status(llm), 0.3)


async def test_v2_client_refused_still_gets_its_subprotocol_and_the_close_code(relay):
    # Browsers fail a handshake that does not select the subprotocol they offered.
    async with relay.connect(uid("x"), token="wrong", subprotocols=V2) as client:
        assert client.subprotocol == "wsbridge.v2"
        assert (await closed_with(client))[0] == 4001


async def test_invalid_group_name_is_refused_at_connect(relay):
    async with relay.connect(f"{uid('x')}?groups=bad%20name") as client:
        assert (await closed_with(client))[0] == 4002


# --- offline queue ---------------------------------------------------------------------------------


async def test_queued_commands_are_delivered_in_order_on_connect_once(relay):
    target, controller = uid("late"), uid("ctl")
    async with relay.controller(controller) as llm:
        for i in range(3):
            await llm.send(command(target, f"q{i}", id=f"q{i}", queue=True, timeout_ms=20_000))
        statuses = [await recv_json(llm) for _ in range(3)]
        assert [s["status"] for s in statuses] == ["queued"] * 3
        assert 0 < statuses[0]["expires_in_ms"] <= 20_000
        await llm.send(command(target, "other", id="q0", queue=True, timeout_ms=20_000))  # the id of another
        assert (await recv_json(llm))["error"] == "duplicate_id"
    async with relay.controller(controller) as llm:  # the controller reconnected and repeats itself
        await llm.send(command(target, "q0", id="q0", queue=True, timeout_ms=20_000))
        repeat = await recv_json(llm)  # the id is an idempotency key: the first command's last status
        assert (repeat["status"], repeat["replayed"]) == ("queued", True)
        async with relay.connect(target, subprotocols=V2) as client:
            got = [(await recv_json(client))["message"] for _ in range(3)]
            assert got == ["q0", "q1", "q2"]
            assert await nothing_arrives(client)  # the repeat was not delivered twice
            await llm.send(command(target, "q1", id="q1", queue=True))  # a repeat after delivery, client online
            assert (await recv_json(llm))["replayed"] is True  # within the idempotency window: never again
            assert await nothing_arrives(client)


async def test_repeat_of_a_delivered_queued_command_is_not_delivered_again(relay):
    target, controller = uid("once"), uid("ctl")
    async with relay.controller(controller) as llm:
        await llm.send(command(target, "x", id="once", queue=True, timeout_ms=20_000))
        assert (await recv_json(llm))["status"] == "queued"
        async with relay.connect(target) as client:
            assert await recv(client) == "x"
        assert (await recv_json(llm))["status"] == "delivered"
        await client.wait_closed()
    async with relay.controller(controller) as llm:
        await llm.send(command(target, "x", id="once", queue=True, timeout_ms=20_000))
        repeat = await recv_json(llm)
        assert (repeat["status"], repeat["replayed"]) == ("delivered", True)
        async with relay.connect(target) as client:
            assert await nothing_arrives(client, 0.5)


async def test_queued_command_expires_with_timeout(relay):
    target = uid("never")
    async with relay.controller(uid("ctl")) as llm:
        await llm.send(command(target, "x", id="exp", queue=True, timeout_ms=300))
        assert (await recv_json(llm))["status"] == "queued"
        assert (await recv_json(llm, within=5))["status"] == "timeout"
        async with relay.connect(target) as client:
            assert await nothing_arrives(client, 0.5)


async def test_nothing_is_queued_for_the_controller_id_which_no_client_can_hold(relay):
    async with relay.controller(uid("ctl")) as llm, api(relay) as http:
        await llm.send(command("LLM", "x", id="for-llm", queue=True))
        refused = await recv_json(llm)
        assert (refused["error"], refused["id"]) == ("target_not_client", "for-llm")
        response = await http.post("/api/v1/commands", json={"target": "LLM", "message": "x", "queue": True})
        assert response.status_code != 202 and response.json()["error"] == "target_not_client"


async def test_queue_without_id_is_a_version_1_command(relay):
    # Without an id a command behaves exactly as in version 1, where unknown fields are ignored.
    async with relay.controller(uid("ctl")) as llm:
        await llm.send(command("somebody", "x", queue=True))
        error = await recv_json(llm)
        assert error["error"] == "target_offline" and "id" not in error


# --- HTTP API --------------------------------------------------------------------------------------


async def answer_v2(relay, client_id, *, groups=None):
    """A v2 client that answers every command with 'ok: <message>'; returns (task, ready event)."""
    ready = asyncio.Event()
    path = client_id + (f"?groups={groups}" if groups else "")

    async def run():
        async with relay.connect(path, subprotocols=V2) as ws:
            ready.set()
            async for raw in ws:
                frame = json.loads(raw)
                await ws.send(json.dumps({"reply_to": frame["id"], "message": "ok: " + frame["message"]}))

    task = asyncio.create_task(run())
    await asyncio.wait_for(ready.wait(), timeout(10))
    return task


async def test_http_command_with_wait_returns_the_reply(relay):
    target = uid("h")
    task = await answer_v2(relay, target)
    try:
        async with api(relay) as http:
            response = await http.post("/api/v1/commands", json={"target": target, "message": "ping", "wait_ms": 5000})
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["status"], body["sender"], body["message"], body["target"]) == (
                "replied",
                target,
                "ok: ping",
                target,
            )
            assert body["rtt_ms"] >= 0
            response = await http.post("/api/v1/commands", json={"target": target, "message": "fire"})
            assert response.status_code == 202
            assert response.json()["status"] == "delivered"
    finally:
        task.cancel()


async def test_http_command_to_a_v1_client_gets_its_reply(relay):
    target = uid("h1")
    async with relay.connect(target) as client, api(relay) as http:
        pending = asyncio.create_task(
            http.post("/api/v1/commands", json={"target": target, "message": "hello", "wait_ms": 5000})
        )
        assert await recv(client) == "hello"
        await client.send("hi back")
        response = await pending
        assert response.status_code == 200
        assert response.json()["message"] == "hi back"


async def test_http_errors(relay):
    target = uid("silent")
    async with relay.connect(target, subprotocols=V2), api(relay) as http:
        response = await http.post("/api/v1/commands", json={"target": target, "message": "x", "wait_ms": 200})
        assert response.status_code == 504
        assert response.json()["status"] == "timeout"
        response = await http.post("/api/v1/commands", json={"target": "nobody-h", "message": "x", "wait_ms": 200})
        assert response.status_code == 404
        assert response.json()["error"] == "target_offline"
        response = await http.post("/api/v1/commands", json={"target": uid("q"), "message": "x", "queue": True})
        assert response.status_code == 202
        assert response.json()["status"] == "queued"
        queued = {"target": uid("q"), "message": "x", "queue": True, "wait_ms": 10_000, "id": "hq"}
        response = await http.post("/api/v1/commands", json=queued)
        assert (response.status_code, response.json()["status"]) == (202, "queued")  # queued: not awaited
        response = await http.post("/api/v1/commands", json=queued)  # a retry: the first outcome, not queued twice
        assert (response.status_code, response.json()["status"], response.json()["replayed"]) == (202, "queued", True)
        response = await http.post("/api/v1/commands", json={"target": target, "message": "x" * 70_000})
        assert response.status_code == 413
        assert response.json()["error"] == "message_too_large"
        for bad in ({"target": target}, {"target": target, "message": 5}, {"target": target, "message": "m", "x": 1}):
            response = await http.post("/api/v1/commands", json=bad)
            assert response.status_code == 422, bad
            assert response.json()["status_code"] == 422
        response = await http.post("/api/v1/commands", json={"target": "bad id!", "message": "m"})
        assert response.status_code == 422
        assert response.json()["error"] == "invalid_target"
    async with api(relay, CLIENT_TOKEN) as http:
        assert (await http.post("/api/v1/commands", json={"target": "a", "message": "m"})).status_code == 403


# --- clients API -------------------------------------------------------------------------------------


async def test_clients_filters_pagination_and_lookup(relay):
    prefix = uid("page")
    group = uid("grp")
    async with contextlib_stack() as stack:
        for i in range(5):
            path = f"{prefix}-{i}" + (f"?groups={group}" if i % 2 == 0 else "")
            await stack.enter_async_context(relay.connect(path))
        async with api(relay) as http:
            ids, cursor = [], None
            while True:
                params = {"prefix": prefix, "limit": 2, **({"cursor": cursor} if cursor else {})}
                page = (await http.get("/api/v1/clients", params=params)).json()
                assert page["count"] == 5
                ids += [r["id"] for r in page["clients"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert ids == [f"{prefix}-{i}" for i in range(5)]
            grouped = (await http.get("/api/v1/clients", params={"group": group})).json()
            assert [r["id"] for r in grouped["clients"]] == [f"{prefix}-{i}" for i in (0, 2, 4)]
            assert grouped["clients"][0]["groups"] == [group]
            controllers = (await http.get("/api/v1/clients", params={"role": "controller", "prefix": prefix})).json()
            assert controllers["count"] == 0
            one = await http.get(f"/api/v1/clients/{prefix}-1")
            assert one.status_code == 200 and one.json()["id"] == f"{prefix}-1"
            assert (await http.get("/api/v1/clients/nobody-xyz")).status_code == 404
            assert (await http.get("/api/v1/clients", params={"cursor": "!!"})).status_code == 422


async def test_admin_disconnects_a_client_with_4012(relay):
    target = uid("kick")
    async with relay.connect(target) as client:
        async with api(relay) as http:
            assert (await http.delete(f"/api/v1/clients/{target}")).status_code == 403  # controller token
        async with api(relay, ADMIN_TOKEN) as http:
            assert (await http.delete(f"/api/v1/clients/{target}")).status_code == 204
            assert await closed_with(client) == (4012, "disconnected by an administrator")
            assert (await http.delete(f"/api/v1/clients/{target}")).status_code == 404


def test_openapi_schema_describes_the_command_api(relay):
    status, schema = relay.get("/schema/openapi.json")
    assert status == 200
    operation = schema["paths"]["/api/v1/commands"]["post"]
    assert {"200", "202", "404", "413", "429", "504"} <= set(operation["responses"])
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    ref = body["$ref"].rsplit("/", 1)[1]
    props = schema["components"]["schemas"][ref]["properties"]
    assert {"target", "message", "id", "wait_ms", "queue"} <= set(props)
    assert schema["components"]["schemas"][ref]["required"] == ["message", "target"]
    # A client generated from the schema must know to send the token header.
    scheme = schema["components"]["securitySchemes"]["XAuthToken"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-Auth-Token")
    assert schema["security"] == [{"XAuthToken": []}]
    assert relay.get("/schema")[0] == 200


def contextlib_stack():
    import contextlib

    return contextlib.AsyncExitStack()


def _gauge(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


async def test_metrics_show_pending_and_queued_commands(start_appliance):
    from support import eventually

    app = start_appliance(name="cmd-metrics")
    target = uid("m")
    async with app.controller(uid("ctl")) as llm:
        await llm.send(command(target, "later", id="m1", queue=True, timeout_ms=20_000))
        assert (await recv_json(llm))["status"] == "queued"

        async def gauges():
            _, body = await app.aget("/metrics")
            pending = _gauge(body, "wsbridge_pending_requests")
            queued = _gauge(body, "wsbridge_offline_queue_messages")
            return (pending, queued) if (pending, queued) == (1, 1) else None

        await eventually(gauges, 5, "the gauges to count the queued command")
        async with app.connect(target) as client:
            assert await recv(client) == "later"
            await client.send("done")

            async def drained():
                _, body = await app.aget("/metrics")
                idle = _gauge(body, "wsbridge_pending_requests") == 0
                return idle and _gauge(body, "wsbridge_offline_queue_messages") == 0

            await eventually(drained, 5, "the gauges to return to 0")
        _, body = await app.aget("/metrics")
        assert 'wsbridge_command_outcomes_total{outcome="replied"} 1.0' in body


async def test_full_queues_are_refused_with_queue_full(start_appliance):
    app = start_appliance({"OFFLINE_QUEUE_MAX": "2", "V1_REPLY_QUEUE": "1"}, name="cmd-full")
    absent, busy = uid("absent"), uid("busy")
    async with app.controller(uid("ctl")) as llm:
        for i in range(3):
            await llm.send(command(absent, f"q{i}", id=f"q{i}", queue=True, timeout_ms=20_000))
        frames = [await recv_json(llm) for _ in range(3)]
        assert [f.get("status", f.get("error")) for f in frames] == ["queued", "queued", "queue_full"]
        assert frames[2]["id"] == "q2" and frames[2]["target"] == absent
        async with api(app) as http:
            response = await http.post("/api/v1/commands", json={"target": absent, "message": "x", "queue": True})
            assert (response.status_code, response.json()["error"]) == (409, "queue_full")
        async with app.connect(busy) as client:  # version 1: one in flight, one waiting, then full
            for i in range(3):
                await llm.send(command(busy, f"b{i}", id=f"b{i}"))
            assert await recv(client) == "b0"
            frames = [await recv_json(llm) for _ in range(2)]
            assert {f.get("status", f.get("error")) for f in frames} == {"delivered", "queue_full"}
            assert next(f for f in frames if "error" in f)["id"] == "b2"


# --- a client that leaves mid-command ----------------------------------------------------------


async def outcomes_by_id(ws, ids: set, until=None, within: float = 10.0) -> dict:
    """The frames about ``ids``, by id, until each has a final outcome (reply, timeout or error).

    ``until(key, frame)`` may end an id's wait at another frame (``queued``). Plain client
    messages (every controller gets them) are skipped; a second final outcome fails the test.
    """
    frames: dict = {i: [] for i in ids}
    final: set = set()
    done: set = set()
    async with asyncio.timeout(timeout(within)):
        while done != ids:
            frame = await recv_json(ws, within)
            key = frame.get("reply_to", frame.get("id"))
            if key not in ids:
                continue
            frames[key].append(frame)
            if "reply_to" in frame or "error" in frame or frame.get("status") == "timeout":
                assert key not in final, f"a second final outcome for {key}: {frames[key]}"
                final.add(key)
                done.add(key)
            elif until is not None and until(key, frame):
                done.add(key)
    return frames


async def test_a_v1_client_leaving_mid_command_leaves_every_command_exactly_one_outcome(relay):
    """In flight: timeout. Waiting in its line: target_offline, or with "queue": true queued for its return."""
    target = uid("leaver")
    async with relay.controller(uid("ctl")) as llm:
        async with relay.connect(target) as client:
            await llm.send(command(target, "first", id=1, timeout_ms=1500))
            await llm.send(command(target, "second", id=2, queue=True, timeout_ms=20_000))
            await llm.send(command(target, "third", id=3))
            await llm.send(command(target, "ping"))  # Without id: never held back, and behind 2 and 3 in order.
            assert await recv(client) == "first"
            assert await recv(client) == "ping"  # So 2 and 3 now wait in its line.
        # The client left without answering "first"; "second" and "third" were never handed over.
        frames = await outcomes_by_id(llm, {1, 2, 3}, until=lambda key, frame: frame.get("status") == "queued")
        assert frames[1] == [
            {"id": 1, "status": "delivered", "target": target},
            {"id": 1, "status": "timeout", "target": target, "timeout_ms": 1500},
        ]
        assert [f.get("status") for f in frames[2]] == ["queued"]
        assert [(f["error"], f["id"]) for f in frames[3]] == [("target_offline", 3)]
        async with relay.connect(target) as again:
            assert await recv(again) == "second"
            await again.send("second done")
            frames = await outcomes_by_id(llm, {2})
            assert frames[2][0] == {"id": 2, "status": "delivered", "target": target}
            assert (frames[2][-1]["reply_to"], frames[2][-1]["message"]) == (2, "second done")
            assert await nothing_arrives(again)


async def test_queued_commands_handed_to_a_v1_client_that_leaves_again_wait_for_its_next_return(relay):
    """Taken from the queue, one waited behind the first when the client left again: queued once more."""
    target = uid("flaky")
    async with relay.controller(uid("ctl")) as llm:
        await llm.send(command(target, "first", id=1, queue=True, timeout_ms=1500))
        await llm.send(command(target, "second", id=2, queue=True, timeout_ms=20_000))
        frames = await outcomes_by_id(llm, {1, 2}, until=lambda key, frame: frame.get("status") == "queued")
        assert [f["status"] for f in frames[1] + frames[2]] == ["queued", "queued"]
        async with relay.connect(target) as client:
            assert await recv(client) == "first"  # "second" waits for its reply, which never comes.
            assert (await next_status(llm)) == {"id": 1, "status": "delivered", "target": target}
        frames = await outcomes_by_id(llm, {1, 2}, until=lambda key, frame: frame.get("status") == "queued")
        assert frames[1] == [{"id": 1, "status": "timeout", "target": target, "timeout_ms": 1500}]
        assert [f.get("status") for f in frames[2]] == ["queued"]
        async with relay.connect(target) as again:
            assert await recv(again) == "second"
            await again.send("second done")
            frames = await outcomes_by_id(llm, {2})
            assert frames[2][0] == {"id": 2, "status": "delivered", "target": target}
            assert (frames[2][-1]["reply_to"], frames[2][-1]["message"]) == (2, "second done")
