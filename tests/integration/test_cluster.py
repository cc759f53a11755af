"""Several instances over one real Redis: routing, presence, duplicates, the reconnect storm, outages."""

import asyncio
import contextlib
import random

import pytest
from support import CONTROLLER_TOKEN, closed_with, command, eventually, recv, recv_json
from websockets.exceptions import ConnectionClosed


@pytest.fixture
def pair(start_appliance, redis_server):
    """Two instances sharing the session's Redis."""
    redis_server.command("FLUSHALL")
    a = start_appliance(redis_url=redis_server.url, name="inst-a")
    b = start_appliance(redis_url=redis_server.url, name="inst-b")
    return a, b


async def test_controller_on_one_instance_reaches_client_on_another(pair):
    a, b = pair
    async with a.controller() as llm, b.connect("unity_client_1") as unity:
        await llm.send(command("unity_client_1", "MoveForward 10"))
        assert await recv(unity) == "MoveForward 10"
        await unity.send("Movement completed")
        assert await recv(llm) == '{"sender":"unity_client_1","message":"Movement completed"}'


async def test_replies_reach_controllers_on_every_instance(pair):
    a, b = pair
    async with a.controller() as on_a, b.controller("planner-b") as on_b, a.connect("c1") as client:
        await client.send("hello")
        assert await recv_json(on_a) == {"sender": "c1", "message": "hello"}
        assert await recv_json(on_b) == {"sender": "c1", "message": "hello"}


async def test_presence_is_cluster_wide_and_shows_the_instance(pair):
    a, b = pair
    async with a.connect("c-on-a"), b.connect("c-on-b"):

        async def both_listed():
            status, body = await a.aget("/api/v1/clients", CONTROLLER_TOKEN)
            return status == 200 and {(r["id"], r["instance"]) for r in body["clients"]} == {
                ("c-on-a", "inst-a"),
                ("c-on-b", "inst-b"),
            }

        await eventually(both_listed, 5, "both clients in presence from instance A")

    async def emptied():
        return (await b.aget("/api/v1/clients", CONTROLLER_TOKEN))[1]["count"] == 0

    await eventually(emptied, 5, "presence emptied")


async def test_redis_connections_do_not_grow_with_clients(pair, redis_server):
    a, _ = pair
    before = await redis_server.aconnected_clients()
    sockets = [await a.connect(f"many-{i}") for i in range(200)]
    try:
        async with a.controller() as llm:
            for i in range(0, 200, 20):
                await llm.send(command(f"many-{i}", "ping"))
                assert await recv(sockets[i]) == "ping"
        assert await redis_server.aconnected_clients() <= before + 2  # At most the bounded pool filling up.
    finally:
        await asyncio.gather(*(s.close() for s in sockets))


async def _status_is(app, path, status):
    return (await app.aget(path))[0] == status


# --- duplicate ids -------------------------------------------------------------------------------


async def test_new_connection_replaces_old_one_across_instances(pair):
    a, b = pair
    async with a.controller() as llm, a.connect("dup") as old:
        async with b.connect("dup") as new:
            assert await closed_with(old) == (4010, "replaced by a newer connection")
            await llm.send(command("dup", "to the new one"))
            assert await recv(new) == "to the new one"


async def test_reject_policy_keeps_the_old_connection(start_appliance, redis_server):
    await redis_server.acommand("FLUSHALL")
    env = {"DUPLICATE_POLICY": "reject"}
    a = start_appliance(env, redis_url=redis_server.url, name="rej-a")
    b = start_appliance(env, redis_url=redis_server.url, name="rej-b")
    async with a.controller() as llm, a.connect("dup") as old:
        async with b.connect("dup") as newcomer:
            assert await closed_with(newcomer) == (4009, "id already connected")
        await llm.send(command("dup", "still here"))
        assert await recv(old) == "still here"


async def test_reject_policy_on_the_embedded_broker(start_appliance):
    app = start_appliance({"DUPLICATE_POLICY": "reject"})
    async with app.connect("dup") as old, app.connect("dup") as newcomer:
        assert (await closed_with(newcomer))[0] == 4009
        async with app.controller() as llm:
            await llm.send(command("dup", "kept"))
            assert await recv(old) == "kept"


async def test_reconnect_storm_leaves_exactly_one_live_connection_per_id(pair):
    """1000 simultaneous connects for 100 ids, spread over two instances (the seed's race)."""
    a, b = pair
    ids = [f"storm-{i}" for i in range(100)]
    attempts = [(random.choice((a, b)), client_id) for client_id in ids for _ in range(10)]
    random.shuffle(attempts)

    async def attempt(app, client_id):
        with contextlib.suppress(OSError, ConnectionClosed, TimeoutError):
            return client_id, await app.connect(client_id)
        return client_id, None

    opened = await asyncio.gather(*(attempt(app, cid) for app, cid in attempts))
    sockets = [(cid, ws) for cid, ws in opened if ws is not None]
    try:
        # Every id ends with exactly one survivor; all others were told they were replaced.
        def survivors():
            alive = {}
            for cid, ws in sockets:
                if ws.protocol.close_rcvd is None and ws.protocol.state.name == "OPEN":
                    alive.setdefault(cid, []).append(ws)
            return alive

        async def one_survivor_each():
            alive = survivors()
            return len(alive) == 100 and all(len(v) == 1 for v in alive.values())

        await eventually(one_survivor_each, 20, "one survivor per id")
        for cid, ws in sockets:
            if ws not in survivors()[cid]:
                assert ws.protocol.close_rcvd.code == 4010

        async def presence_is_exact():
            status, body = await a.aget("/api/v1/clients", CONTROLLER_TOKEN)
            listed = sorted(r["id"] for r in body["clients"] if r["id"].startswith("storm-"))
            return status == 200 and listed == sorted(ids)

        await eventually(presence_is_exact, 10, "each id listed exactly once")
        async with b.controller() as llm:
            alive = survivors()
            for cid in ids:
                await llm.send(command(cid, f"hello {cid}"))
            for cid in ids:
                assert await recv(alive[cid][0], 10) == f"hello {cid}"
    finally:
        await asyncio.gather(*(ws.close() for _, ws in sockets), return_exceptions=True)

    async def all_released():
        status, body = await a.aget("/api/v1/clients", CONTROLLER_TOKEN)
        return status == 200 and not [r for r in body["clients"] if r["id"].startswith("storm-")]

    await eventually(all_released, 10, "no stuck ids after the storm")
    async with a.connect("storm-1") as again:  # Ids are free again.
        async with b.controller() as llm:
            await llm.send(command("storm-1", "reusable"))
            assert await recv(again) == "reusable"


# --- Redis outage ---------------------------------------------------------------------------------


async def test_redis_outage_keeps_local_clients_and_recovers(start_appliance, own_redis):
    a = start_appliance(redis_url=own_redis.url, name="out-a")
    b = start_appliance(redis_url=own_redis.url, name="out-b")
    async with a.controller() as llm, a.connect("local") as local, b.connect("remote") as remote:
        await llm.send(command("remote", "before"))
        assert await recv(remote) == "before"

        await asyncio.to_thread(own_redis.kill)
        await eventually(lambda: _status_is(a, "/readyz", 503), 15, "instance A not ready")
        _status, body = await a.aget("/readyz")
        assert body["status"] == "not ready" and "redis" in body["reason"]

        # Local delivery goes on; cross-instance delivery fails loudly.
        await llm.send(command("local", "during outage"))
        assert await recv(local) == "during outage"
        await llm.send(command("remote", "lost?", id=5))
        error = await recv_json(llm)
        if "id" not in error:  # "before" may be reported first: its outcome died with Redis (outcome unknown).
            assert (error["error"], error["target"]) == ("delivery_failed", "remote")
            error = await recv_json(llm)
        assert (error["error"], error["target"], error["id"]) == ("delivery_failed", "remote", 5)
        await local.send("reply during outage")
        assert await recv_json(llm) == {"sender": "local", "message": "reply during outage"}

        # Newcomers are told to come back later rather than silently half-connected.
        async with a.connect("newcomer") as newcomer:
            assert (await closed_with(newcomer))[0] == 1013

        await asyncio.to_thread(own_redis.start)
        await eventually(lambda: _status_is(a, "/readyz", 200), 20, "instance A ready again")
        await eventually(lambda: _status_is(b, "/readyz", 200), 20, "instance B ready again")

        await llm.send(command("remote", "after"))
        assert await recv(remote, 10) == "after"
        await remote.send("reply after")
        assert await recv_json(llm) == {"sender": "remote", "message": "reply after"}

        async def presence_restored():
            status, body = await a.aget("/api/v1/clients", CONTROLLER_TOKEN)
            return status == 200 and {"LLM", "local", "remote"} <= {r["id"] for r in body["clients"]}

        await eventually(presence_restored, 10, "presence rebuilt after the outage")


async def test_instance_starts_while_redis_is_down_and_becomes_ready(start_appliance, own_redis):
    own_redis.kill()
    app = start_appliance(redis_url=own_redis.url, name="late", wait_ready=False)
    status, body = await app.aget("/readyz")
    assert status == 503 and "redis" in body["reason"]
    await asyncio.to_thread(own_redis.start)
    await eventually(lambda: _status_is(app, "/readyz", 200), 20, "ready once Redis is up")
    async with app.controller() as llm, app.connect("c1") as client:
        await llm.send(command("c1", "works"))
        assert await recv(client) == "works"


async def test_a_crashed_instance_leaves_presence_and_frees_its_ids(start_appliance, own_redis):
    env = {"PRESENCE_TTL": "3", "DUPLICATE_POLICY": "reject"}
    a = start_appliance(env, redis_url=own_redis.url, name="survivor")
    b = start_appliance(env, redis_url=own_redis.url, name="crasher")
    client = await b.connect("orphan")

    async def listed():
        status, body = await a.aget("/api/v1/clients", CONTROLLER_TOKEN)
        return status == 200 and any(r["id"] == "orphan" for r in body["clients"])

    await eventually(listed, 5, "the client listed from the other instance")
    await asyncio.to_thread(b.kill)  # SIGKILL: no cleanup runs; only the TTL can free the id.
    await client.close()

    async def gone():
        return not await listed()

    await eventually(gone, 10, "the crashed instance's presence to expire")
    async with a.connect("orphan") as again:  # The reject policy no longer sees a live owner.
        async with a.controller() as llm:
            await llm.send(command("orphan", "welcome back"))
            assert await recv(again) == "welcome back"
