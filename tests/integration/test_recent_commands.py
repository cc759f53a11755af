"""A client's recent commands end to end, on both brokers: real appliances, real sockets, real Redis.

A controller sends commands with and without an id to a version-1 and a version-2 client,
the API sends one too, the clients reply; the detail (API and dashboard page) shows each
command, its sender, the matched reply and a round-trip time. On Redis the clients are
held by one instance and the detail is read on the other (it asks over the broker).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import httpx
import pytest
from support import ADMIN_TOKEN, CONTROLLER_TOKEN, command, eventually, recv, recv_json, timeout

PER_CLIENT = 5


@pytest.fixture(scope="module", params=["memory", "redis"])
def pair(request: pytest.FixtureRequest):
    """(where clients connect, where the detail is read): two instances on one Redis, or one memory instance."""
    from support import Appliance

    env = {"RECENT_COMMANDS_PER_CLIENT": str(PER_CLIENT)}
    if request.param == "memory":
        app = Appliance(env, name="recent-mem").start()
        yield app, app
        app.stop()
        return
    url = request.getfixturevalue("redis_server").url
    apps = [Appliance(env, redis_url=url, name=f"recent-{n}") for n in "ab"]
    for app in apps:
        app.start()
    yield apps[1], apps[0]  # Clients on b, read on a.
    for app in apps:
        app.stop()


async def _detail(http: httpx.AsyncClient, base: str, client_id: str) -> dict:
    response = await http.get(f"{base}/api/v1/clients/{client_id}", headers={"X-Auth-Token": CONTROLLER_TOKEN})
    assert response.status_code in (200, 404), response.text
    return response.json()


async def _dashboard_page(base: str, client_id: str) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=timeout(10)) as browser:
        page = await browser.get("/admin/login")
        csrf = re.search(r'name="_csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        login = await browser.post("/admin/login", data={"token": ADMIN_TOKEN, "_csrf_token": csrf.group(1)})
        assert login.status_code == 303
        response = await browser.get("/admin/client", params={"id": client_id})
        assert response.status_code == 200
        return response.text


async def test_commands_from_every_path_with_their_replies_and_round_trips(pair):
    holder, reader = pair
    tag = uuid.uuid4().hex[:8]
    v1_id, v2_id, ctl_id = f"rc1-{tag}", f"rc2-{tag}", f"ctl-{tag}"
    async with (
        httpx.AsyncClient(timeout=timeout(15)) as http,
        holder.connect(v1_id) as v1,
        holder.connect(v2_id, subprotocols=["wsbridge.v2"]) as v2,
        reader.controller(ctl_id) as ctl,
    ):

        async def listed() -> bool:
            return all([(await _detail(http, reader.http, c)).get("id") == c for c in (v1_id, v2_id)])

        await eventually(listed, 10, "both clients listed cluster-wide")
        # Version 1, no id: delivered as is; no reply can be matched to it.
        await ctl.send(command(v1_id, "<script>alert(1)</script>"))
        assert await recv(v1) == "<script>alert(1)</script>"
        # Version 1 with an id: the client's next message is its reply (FIFO).
        await ctl.send(command(v1_id, "ping", id="c1"))
        assert await recv(v1) == "ping"
        await v1.send("pong <b>1</b>")
        frames = [await recv_json(ctl), await recv_json(ctl)]
        assert {"reply_to": "c1", "sender": v1_id, "message": "pong <b>1</b>"}.items() <= frames[-1].items()
        # Version 2 with an id: matched by reply_to; without one: no correlation.
        await ctl.send(command(v2_id, "status?", id=7))
        assert await recv_json(v2) == {"id": 7, "from": ctl_id, "message": "status?"}
        await v2.send(json.dumps({"reply_to": 7, "message": "all good"}))
        await ctl.send(command(v2_id, "hello"))
        assert (await recv_json(v2))["message"] == "hello"
        # The HTTP API (the dashboard's send uses the same service), waiting for the reply.
        posted = asyncio.ensure_future(
            http.post(
                f"{reader.http}/api/v1/commands",
                json={"target": v1_id, "message": "via http", "wait_ms": 10_000},
                headers={"X-Auth-Token": CONTROLLER_TOKEN},
            )
        )
        assert await recv(v1, 10) == "via http"
        await v1.send("http pong")
        assert (await posted).json()["message"] == "http pong"

        async def recorded() -> tuple[list, list] | None:
            one = (await _detail(http, reader.http, v1_id)).get("recent_commands") or []
            two = (await _detail(http, reader.http, v2_id)).get("recent_commands") or []
            return (one, two) if len(one) == 3 and len(two) == 2 and one[0]["outcome"] == "replied" else None

        one, two = await eventually(recorded, 10, "the commands in both clients' details")
        assert [(c["controller"], c["message"], c["outcome"]) for c in one] == [
            ("http", "via http", "replied"),
            (ctl_id, "ping", "replied"),
            (ctl_id, "<script>alert(1)</script>", "uncorrelated"),
        ]
        assert one[0]["reply"] == "http pong" and one[1]["reply"] == "pong <b>1</b>" and one[1]["id"] == "c1"
        assert one[0]["id"].startswith("http-")
        assert "reply" not in one[2] and one[2]["id"] is None
        assert [(c["id"], c["message"], c["outcome"], c.get("reply")) for c in two] == [
            (None, "hello", "uncorrelated", None),
            (7, "status?", "replied", "all good"),
        ]
        for c in (one[0], one[1], two[1]):
            assert 0 <= c["rtt_ms"] < 10_000
        assert {c["instance"] for c in one + two} == {holder.name}

        # The dashboard's page shows them, escaped, with the round trips.
        html = await _dashboard_page(reader.http, v1_id)
        section = html[html.index('id="recent-commands"') :]
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section and "<script>alert(1)" not in html
        assert "pong &lt;b&gt;1&lt;/b&gt;" in section and "http pong" in section
        assert "no reply correlation" in section
        assert f"{one[1]['rtt_ms']} ms" in section

        # A broadcast reaches both; its replies go to every controller, so none is matched to it.
        await ctl.send(command("*", "all hands", id="b1"))
        assert await recv(v1) == "all hands"
        assert (await recv_json(v2))["message"] == "all hands"

        async def broadcast_recorded() -> bool:
            for client_id in (v1_id, v2_id):
                newest = (await _detail(http, reader.http, client_id))["recent_commands"][0]
                if (newest["message"], newest["id"], newest["outcome"]) != ("all hands", "b1", "uncorrelated"):
                    return False
            return True

        await eventually(broadcast_recorded, 10, "the broadcast in both clients' details")


async def test_only_the_last_n_are_kept_and_they_outlive_the_connection(pair):
    holder, reader = pair
    client_id = f"rcn-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=timeout(15)) as http, reader.controller(f"ctl-{client_id}") as ctl:
        async with holder.connect(client_id) as client:

            async def listed() -> bool:
                return (await _detail(http, reader.http, client_id)).get("id") == client_id

            await eventually(listed, 10, "the client listed cluster-wide")
            for n in range(PER_CLIENT + 3):
                await ctl.send(command(client_id, f"m{n}"))
                assert await recv(client) == f"m{n}"
        expected = [f"m{n}" for n in reversed(range(3, PER_CLIENT + 3))]

        async def gone_but_kept() -> list | None:
            response = await http.get(
                f"{reader.http}/api/v1/clients/{client_id}", headers={"X-Auth-Token": CONTROLLER_TOKEN}
            )
            recent = response.json().get("recent_commands") or []
            return recent if response.status_code == 404 and [c["message"] for c in recent] == expected else None

        # Disconnected: the detail is a 404 that still carries the last N commands.
        await eventually(gone_but_kept, 10, f"the last {PER_CLIENT} commands after the client left")


async def test_the_openapi_schema_describes_recent_commands(pair):
    _, reader = pair
    status, schema = await reader.aget("/schema/openapi.json")
    assert status == 200
    schemas = schema["components"]["schemas"]
    record = schemas["ClientRecord"]["properties"]["recent_commands"]
    assert record["items"]["$ref"].endswith("/RecentCommand")
    props = schemas["RecentCommand"]["properties"]
    assert {"at", "controller", "id", "message", "outcome", "reply", "rtt_ms", "instance"} <= set(props)
    assert set(props["outcome"]["enum"]) == {"replied", "pending", "timeout", "error", "uncorrelated"}


async def test_an_instance_that_held_the_id_and_does_not_answer_is_named(pair, request):
    holder, reader = pair
    if holder is reader:
        pytest.skip("one instance: nobody else to ask")
    from appliance.core.history import close_entry

    redis_server = request.getfixturevalue("redis_server")
    client_id = f"rcg-{uuid.uuid4().hex[:8]}"
    now = time.time()
    # A connection that closed a minute ago on an instance that is gone now.
    entry = close_entry(
        {"role": "client", "instance": "ghost-instance", "remote": "203.0.113.9:1"},
        connected_at=now - 120,
        closed_at=now - 60,
        code=1006,
        reason="",
        by_relay=False,
    )
    await redis_server.acommand("LPUSH", f"wsb:hist:{client_id}", json.dumps(entry))
    async with holder.connect(client_id):
        started = time.monotonic()
        html = await _dashboard_page(reader.http, client_id)
        assert time.monotonic() - started < timeout(10)
        section = html[html.index('id="recent-commands"') :]
        assert "No answer from ghost-instance" in section


@pytest.fixture
def disabled(start_appliance):
    return start_appliance(env={"RECENT_COMMANDS_PER_CLIENT": "0"}, name="recent-off")


async def test_zero_disables_recording(disabled):
    app = disabled
    client_id = f"rco-{uuid.uuid4().hex[:8]}"
    async with (
        httpx.AsyncClient(timeout=timeout(15)) as http,
        app.controller() as ctl,
        app.connect(client_id) as client,
    ):
        await ctl.send(command(client_id, "not kept"))
        assert await recv(client) == "not kept"
        assert (await _detail(http, app.http, client_id))["recent_commands"] == []
        assert "Not recorded (RECENT_COMMANDS_PER_CLIENT is 0)" in await _dashboard_page(app.http, client_id)
