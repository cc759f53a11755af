"""Connect history end to end, on both brokers: real appliances, real sockets, real Redis.

A client closes with its own code, is replaced (4010) and disconnected by an administrator
(4012); the history is read over the HTTP API, from another instance when Redis is used.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, closed_with, eventually, timeout


@pytest.fixture(scope="module", params=["memory", "redis"])
def pair(request: pytest.FixtureRequest):
    """(where clients connect, where the history is read): two instances on one Redis, or one memory instance."""
    from support import Appliance

    if request.param == "memory":
        app = Appliance(name="hist-mem").start()
        yield app, app
        app.stop()
        return
    url = request.getfixturevalue("redis_server").url
    apps = [Appliance(redis_url=url, name=f"hist-{n}", env={"HISTORY_PER_CLIENT": "4"}) for n in "ab"]
    for app in apps:
        app.start()
    yield apps[0], apps[1]
    for app in apps:
        app.stop()


async def _client(http: httpx.AsyncClient, base: str, client_id: str, token: str = CONTROLLER_TOKEN):
    return await http.get(f"{base}/api/v1/clients/{client_id}", headers={"X-Auth-Token": token})


async def test_history_records_close_codes_reasons_and_who_closed(pair):
    a, reader = pair
    client_id = f"hist-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=timeout(10)) as http:
        # 1. The client closes itself with an application code (4000-4999) and a reason.
        async with a.connect(client_id, subprotocols=["wsbridge.v2"]) as ws:
            await ws.close(code=4000, reason="bye <b>now</b>")
        # 2. A newer connection replaces it (4010, by the relay) ...
        older = await a.connect(client_id)
        newer = await a.connect(client_id)
        assert (await closed_with(older))[0] == 4010
        # ... 3. which is then disconnected by an administrator (4012, by the relay).

        async def listed() -> bool:
            return (await _client(http, reader.http, client_id)).status_code == 200

        await eventually(listed, 10, "the newer connection listed cluster-wide")
        live = (await _client(http, reader.http, client_id)).json()
        assert live["id"] == client_id and isinstance(live["history"], list)  # connected: 200 with its history
        deleted = await http.delete(f"{reader.http}/api/v1/clients/{client_id}", headers={"X-Auth-Token": ADMIN_TOKEN})
        assert deleted.status_code == 204
        assert (await closed_with(newer))[0] == 4012

        async def three() -> list | None:
            response = await _client(http, reader.http, client_id)
            history = response.json().get("history") or []
            return history if response.status_code == 404 and len(history) == 3 else None

        history = await eventually(three, 10, "three closed connections in the history")
        assert [(h["code"], h["closed_by"]) for h in history] == [(4012, "relay"), (4010, "relay"), (4000, "peer")]
        assert history[0]["reason"] == "disconnected by an administrator"
        assert history[1]["reason"] == "replaced by a newer connection"
        assert history[2]["reason"] == "bye <b>now</b>"  # The peer's own words, as data (escaped where rendered).
        assert [h["protocol"] for h in history] == [1, 1, 2]
        for h in history:
            assert h["instance"] == a.name and h["role"] == "client"
            assert h["remote"].startswith("127.0.0.1:")
            assert h["token"] == "UNITY_CLIENT_TOKEN" and isinstance(h["token_version"], int)
            assert h["connected_at"] <= h["closed_at"] and h["duration_seconds"] >= 0
        assert CLIENT_TOKEN not in str(history)

        # The admin token reads it too; a client token and no token do not.
        assert (await _client(http, reader.http, client_id, ADMIN_TOKEN)).json()["history"] == history
        assert (await _client(http, reader.http, client_id, CLIENT_TOKEN)).status_code == 403
        assert (await http.get(f"{reader.http}/api/v1/clients/{client_id}")).status_code == 401
        limited = await http.get(
            f"{reader.http}/api/v1/clients/{client_id}?history_limit=1", headers={"X-Auth-Token": CONTROLLER_TOKEN}
        )
        assert [h["code"] for h in limited.json()["history"]] == [4012]


async def test_a_peer_that_vanishes_is_recorded_as_1006_and_the_history_is_capped(pair):
    a, reader = pair
    client_id = f"hist-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=timeout(10)) as http:
        for n in range(5):
            async with a.connect(client_id) as ws:
                await ws.close(code=1000 if n < 4 else 4001, reason=f"round {n}")
        ws = await a.connect(client_id)
        ws.transport.abort()  # No close frame: the relay reports 1006 for the peer.

        async def latest() -> list | None:
            history = (await _client(http, reader.http, client_id)).json().get("history") or []
            return history if history and history[0]["code"] == 1006 else None

        history = await eventually(latest, 10, "the vanished connection in the history")
        assert history[0]["closed_by"] == "peer"
        assert history[1]["code"] == 4001 and history[1]["reason"] == "round 4"
        cap = 4 if reader is not a else 50  # HISTORY_PER_CLIENT=4 on the Redis pair, the default on memory.
        assert len(history) == min(cap, 6)
