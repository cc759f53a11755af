"""The broker contract, at the broker API, run against both brokers (one contract, two backends).

``cluster`` gives "instances": with the memory broker every instance is the same
process (one broker, one inbox); with Redis each is its own ``RedisBroker`` with its
own inbox on a real Redis, so every promise is also checked across instances.
The inbox of broker_support.py stands in for the relay's side of :class:`~appliance.brokers.base.Inbox`
(the relay's own side is tested in test_relay_races.py and end to end).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from broker_support import BACKENDS, CLIENT, CONTROLLER, Cluster, Outcome, cluster_group, new_id, sentinel_group, until
from support import eventually

from appliance.brokers.base import BrokerNotStarted, KeyBudget, TooManyKeys
from appliance.brokers.memory import MemoryBroker
from appliance.brokers.redis import RedisBroker
from appliance.core.protocol import ErrorCode

__all__ = ["cluster_group", "sentinel_group"]  # Fixtures of broker_support, used through the backend.


@pytest.fixture(params=BACKENDS)
async def cluster(request: pytest.FixtureRequest):
    made = Cluster.of(request, request.param)
    yield made
    await made.stop()


# --- ownership ------------------------------------------------------------------------------


async def test_a_free_id_is_claimed_and_its_owner_records_the_role(cluster):
    a = await cluster.node("a")
    claim = await a.claim(new_id(), CONTROLLER)
    assert claim.accepted and claim.previous is None and not claim.role_conflict
    assert claim.owner.role is CONTROLLER and claim.owner.instance == a.name


async def test_a_newer_claim_replaces_the_owner_and_tells_it(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    first = await a.claim(client_id)
    second = await b.claim(client_id)
    assert second.accepted and second.previous == first.owner
    assert second.owner.generation > first.owner.generation
    if cluster.kind != "memory":  # Across instances the old holder learns it on its channel.
        await until(lambda: (client_id, first.owner) in a.inbox.replaced_owners, message="the kick")
    else:
        assert (client_id, first.owner) in a.inbox.replaced_owners


async def test_reject_policy_keeps_the_owner(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    first = await a.claim(client_id)
    second = await b.claim(client_id, reject=True)
    assert not second.accepted and not second.role_conflict and second.previous == first.owner


@pytest.mark.parametrize("reject", [False, True], ids=["replace", "reject"])
@pytest.mark.parametrize("holder", [CONTROLLER, CLIENT], ids=["controller-holds", "client-holds"])
async def test_the_other_role_never_displaces_the_owner(cluster, reject, holder):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    first = await a.claim(client_id, holder)
    other = CLIENT if holder is CONTROLLER else CONTROLLER
    refused = await b.broker.claim(client_id, b.name, "intruder", other, reject)
    assert not refused.accepted and refused.role_conflict and refused.previous == first.owner
    await asyncio.sleep(0.2)
    assert a.inbox.replaced_owners == []
    # The holder still gets its traffic (a client holder; a controller holder keeps refusing commands).
    outcome = Outcome()
    b.broker.send(client_id, "still yours?", outcome)
    expected = None if holder is CLIENT else ErrorCode.TARGET_NOT_CLIENT
    assert await outcome.result() is expected


async def test_once_released_an_id_may_change_role(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    first = await a.claim(client_id, CONTROLLER)
    await a.release(client_id, first.owner)
    again = await b.claim(client_id, CLIENT, reject=True)
    assert again.accepted and again.owner.role is CLIENT


async def test_an_old_owners_release_never_removes_a_newer_owner(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    first = await a.claim(client_id)
    second = await b.claim(client_id)
    await a.broker.release(client_id, first.owner)
    third = await a.broker.claim(client_id, a.name, "late", CLIENT, True)
    assert not third.accepted and third.previous == second.owner


# --- routing --------------------------------------------------------------------------------


async def test_send_reaches_the_client_wherever_it_is_with_one_success(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    await b.claim(client_id)
    outcomes = [Outcome() for _ in range(20)]
    for i, outcome in enumerate(outcomes):
        a.broker.send(client_id, f"m{i}", outcome)
    for outcome in outcomes:
        assert await outcome.result() is None
    assert [text for cid, text in b.inbox.received if cid == client_id] == [f"m{i}" for i in range(20)]


async def test_send_to_nobody_is_target_offline(cluster):
    a = await cluster.node("a")
    outcome = Outcome()
    a.broker.send(new_id(), "hello?", outcome)
    assert await outcome.result() is ErrorCode.TARGET_OFFLINE


async def test_send_to_a_controller_is_refused_on_every_instance(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id("planner")
    await b.claim(client_id, CONTROLLER)
    outcome = Outcome()
    a.broker.send(client_id, '{"sender": "forged", "message": "x"}', outcome)
    assert await outcome.result() is ErrorCode.TARGET_NOT_CLIENT
    assert "controllers send to clients only" in outcome.calls[0][1]
    assert b.inbox.received == []


async def test_a_subscribed_id_without_a_live_connection_is_reported_not_counted_as_delivered(cluster):
    """The id's channel is still subscribed (its release is under way) but the connection is gone."""
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    await b.claim(client_id)
    b.inbox.roles.pop(client_id)  # The connection went away; the broker has not been told yet.
    outcome = Outcome()
    a.broker.send(client_id, "into the void", outcome)
    assert await outcome.result() is ErrorCode.TARGET_OFFLINE


async def test_a_closing_connection_is_reported_as_delivery_failed(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    await b.claim(client_id)
    b.inbox.closing.add(client_id)
    outcome = Outcome()
    a.broker.send(client_id, "too late", outcome)
    assert await outcome.result() is ErrorCode.DELIVERY_FAILED


async def test_send_to_controllers_reaches_every_instance(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    frame = f'{{"sender":"{new_id()}","message":"hi"}}'
    a.broker.send_to_controllers(frame)
    await until(lambda: frame in a.inbox.controller_frames and frame in b.inbox.controller_frames)


# --- presence and health --------------------------------------------------------------------


async def test_presence_lists_every_instance_and_forgets_released_ids(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    one, two = new_id(), new_id()
    await a.claim(one)
    second = await b.claim(two, CONTROLLER)

    async def ids():
        return {r["id"] for r in await a.broker.presence()}

    await eventually(lambda: _has(ids, {one, two}), 10, "both ids in presence")
    await b.release(two, second.owner)
    await eventually(lambda: _lacks(ids, two), 10, "the released id gone")


async def test_presence_summary_counts_every_instance_and_moves_with_membership(cluster):
    """What an idle dashboard polls instead of presence(): per-instance counters and a membership version."""
    a, b = await cluster.node("a"), await cluster.node("b")
    one, two = new_id(), new_id()
    await a.claim(one)
    second = await b.claim(two, CONTROLLER)

    async def totals():
        summaries = await a.broker.presence_summary()
        return {k: sum(s[k] for s in summaries) for k in ("connections", "clients", "controllers")}, {
            s["instance"]: s["membership"] for s in summaries
        }

    async def counted(wanted):
        return (await totals())[0] == wanted

    await eventually(lambda: counted({"connections": 2, "clients": 1, "controllers": 1}), 10, "both counted")
    versions = (await totals())[1]
    assert set(versions) == {a.name, b.name}
    await b.release(two, second.owner)
    await eventually(lambda: counted({"connections": 1, "clients": 1, "controllers": 0}), 10, "the release counted")
    assert (await totals())[1][b.name] != versions[b.name]
    if cluster.kind != "memory":
        await b.broker.stop()
        cluster.nodes.remove(b)

        async def forgotten():
            return b.name not in (await totals())[1]

        await eventually(forgotten, 10, "a stopped instance's summary gone")
        # A crashed instance: its summary expired, its presence hash is kept a while longer. Its
        # connections are no longer listed; the first reader forgets it, and each of its connections
        # gets a history entry saying the instance was lost.
        raw = cluster.raw()
        lost = cluster.keys.presence("crashed")
        lost_id = new_id("lost")
        record = {
            "id": lost_id,
            "role": "client",
            "instance": "crashed",
            "connected_since": "2026-01-01T00:00:00+00:00",
        }
        try:
            await raw.sadd("wsb:instances", "crashed")
            await raw.hset(lost, lost_id, json.dumps(record))
            assert lost_id not in {r["id"] for r in await a.broker.presence()}
            await a.broker.presence_summary()
            assert await raw.smembers("wsb:instances") == {a.name.encode()}
            assert not await raw.exists(lost)

            async def recorded():
                return await a.broker.history(lost_id, 5)

            entries = await eventually(recorded, 10, "the lost connection in its history")
            assert len(entries) == 1  # Recorded once, by the one reader that forgot the instance.
            assert entries[0]["closed_by"] == "instance lost" and entries[0]["code"] == 1006
            assert "crashed lost" in entries[0]["reason"]
        finally:
            await raw.delete(lost)
            await raw.aclose()


async def test_a_heartbeat_rides_on_the_summary_and_its_trend_reaches_the_other_instances(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    beat = {"at": round(time.time(), 3), "period": 1.0, "version": "t", "memory_bytes": 1, "rates": {"errors": 0}}
    trend = {"t": beat["at"], "connections": 0, "commands_in": 1.5}
    b.broker.heartbeat(beat, trend)

    async def seen():
        summaries = {s["instance"]: s for s in await a.broker.presence_summary()}
        return summaries.get(b.name) if summaries.get(b.name, {}).get("at") == beat["at"] else None

    summary = await eventually(seen, 10, "the beat in the summary")
    assert summary["version"] == "t" and summary["rates"] == {"errors": 0}
    trends = await a.broker.trends([a.name, b.name])
    if cluster.kind == "memory":
        assert trends == {}  # One process: the heartbeat keeps its own series.
    else:
        assert summary["redis_latency_ms"] >= 0  # A PING timed with each beat.
        assert trends == {b.name: [trend]}
        b.broker.heartbeat({**beat, "at": beat["at"] + 1}, {**trend, "t": trend["t"] + 1})
        await eventually(lambda: _points(a, b.name, 2), 10, "the second point")


async def _points(node, instance, wanted):
    return len((await node.broker.trends([instance])).get(instance, [])) == wanted


async def _has(ids, wanted):
    return wanted <= await ids()


async def _lacks(ids, unwanted):
    return unwanted not in await ids()


async def test_health_is_ready_once_started_and_use_before_start_fails_loudly(cluster):
    a = await cluster.node("a")
    assert a.broker.health() == (True, "ok")
    unstarted = MemoryBroker() if cluster.kind == "memory" else RedisBroker(cluster.target, instance="x")
    assert unstarted.health()[0] is False
    with pytest.raises(BrokerNotStarted):
        unstarted.send_to_controllers("x")


async def test_a_cancelled_claim_leaves_the_id_free(cluster):
    """Cancel a claim at every point of its way; the id must never stay held by nobody."""
    a, b = await cluster.node("a"), await cluster.node("b")
    for passes in range(12):
        client_id = new_id()
        task = asyncio.ensure_future(a.broker.claim(client_id, a.name, f"k{passes}", CLIENT, False))
        for _ in range(passes):
            await asyncio.sleep(0)
        task.cancel()
        try:
            claim = await task
        except asyncio.CancelledError:
            claim = None
        if claim is not None and claim.accepted:  # Finished before the cancel: a normal release.
            await a.broker.release(client_id, claim.owner)

        async def free(client_id=client_id, passes=passes):
            probe = await b.broker.claim(client_id, b.name, f"probe{passes}", CLIENT, True)
            if probe.accepted:
                await b.broker.release(client_id, probe.owner)
            return probe.accepted

        await eventually(free, 5, f"{client_id} free after a claim cancelled after {passes} passes")


# --- connect history ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
async def test_connect_history_is_shared_capped_and_newest_first(kind, request):
    cluster = Cluster.of(request, kind, history_per_client=3)
    try:
        a, b = await cluster.node("a"), await cluster.node("b")
        client_id, other = new_id(), new_id()
        for n in range(5):
            a.broker.record_history(client_id, {"code": 4000 + n, "closed_by": "peer"})
        a.broker.record_history(other, {"code": 1000})
        # Readable at once where it was written (even before Redis has it), then from any instance.
        assert [e["code"] for e in await a.broker.history(client_id, 10)] == [4004, 4003, 4002]

        async def on_b() -> bool:
            return [e["code"] for e in await b.broker.history(client_id, 10)] == [4004, 4003, 4002]

        await eventually(on_b, 10, "history on the other instance")
        assert [e["code"] for e in await b.broker.history(client_id, 2)] == [4004, 4003]
        assert await b.broker.history(client_id, 0) == []
        assert await b.broker.history(new_id(), 10) == []
        assert [e["code"] for e in await b.broker.history(other, 10)] == [1000]
        if kind != "memory":
            raw = cluster.raw()
            try:
                assert 0 < await raw.ttl(cluster.keys.history(client_id)) <= 7 * 86400
            finally:
                await raw.aclose()
    finally:
        await cluster.stop()


# --- idempotency records ----------------------------------------------------------------------


async def test_an_idempotency_key_is_claimed_by_exactly_one_of_many_at_once(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    key = new_id()
    answers = await asyncio.gather(
        *(node.broker.idempotency_claim("~", key, f"claim-{n}") for n, node in enumerate([a, b, a, b, a, b]))
    )
    winners = [n for n, held in enumerate(answers) if held is None]
    assert len(winners) == 1
    assert {held for held in answers if held is not None} == {f"claim-{winners[0]}"}


async def test_an_idempotency_record_is_read_replaced_and_dropped_anywhere(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    key = new_id()
    assert await b.broker.idempotency_get("~", key) is None
    assert await a.broker.idempotency_claim("~", key, "pending") is None
    await a.broker.idempotency_set("~", key, "done")
    assert await b.broker.idempotency_get("~", key) == "done"
    assert await b.broker.idempotency_claim("~", key, "other") == "done"
    await b.broker.idempotency_drop("~", key)
    assert await a.broker.idempotency_get("~", key) is None
    assert await a.broker.idempotency_claim("~", key, "again") is None


@pytest.mark.parametrize("kind", BACKENDS)
async def test_idempotency_keys_are_budgeted_per_caller_atomically_and_freed_by_expiry(kind, request):
    """Keyed commands cannot fill Redis (issue 21): a caller's new keys beyond its budget are refused, never evicted."""
    budget = KeyBudget(keys=3, bytes=2000, reserve=100, overhead=50)
    cluster = Cluster.of(request, kind, idempotency_window=1.5, key_budget=budget)
    try:
        a, b = await cluster.node("a"), await cluster.node("b")
        alice, bob, carol = new_id("alice"), new_id("bob"), new_id("carol")
        # A flood of new keys from two instances at once: exactly the budget is claimed, the rest refused.
        claims = [node.broker.idempotency_claim(alice, f"k{n}", f"r{n}") for n, node in enumerate([a, b] * 5)]
        answers = await asyncio.gather(*claims, return_exceptions=True)
        claimed = [n for n, held in enumerate(answers) if held is None]
        refused = [held for held in answers if isinstance(held, TooManyKeys)]
        assert len(claimed) == 3 and len(refused) == 7, answers
        assert all(r.keys == 3 and 0 < r.retry_after <= 1.5 for r in refused)
        for n in claimed:  # A live key is kept and answered over the budget (a retry gets its first outcome).
            assert await b.broker.idempotency_claim(alice, f"k{n}", "again") == f"r{n}"
        assert await a.broker.idempotency_claim(bob, "k0", "bob's") is None  # another caller's flood takes none of his
        # Bytes: an outcome counts its size; a key waiting for its outcome counts the reserve.
        assert await a.broker.idempotency_claim(carol, "big", "pending") is None
        await b.broker.idempotency_set(carol, "big", "x" * 1950)
        with pytest.raises(TooManyKeys):
            await a.broker.idempotency_claim(carol, "next", "pending")
        await b.broker.idempotency_drop(carol, "big")  # a command that reached no client frees its key
        assert await a.broker.idempotency_claim(carol, "next", "pending") is None
        # Expired keys free the budget.
        await eventually(
            lambda: _claims(b, alice, "later"), 10, "a new key once the window of the old ones ended"
        )  # fmt: skip
        if kind != "memory":
            raw = cluster.raw()
            costs = {k.decode(): int(v) for k, v in (await raw.hgetall(cluster.keys.idempotency_costs(alice))).items()}
            total = costs.pop("")
            assert costs["later"] == 100 and total == sum(costs.values())  # the total follows every change
            assert await raw.zcard(cluster.keys.idempotency_index(alice)) == len(costs)
            assert 0 < await raw.pttl(cluster.keys.idempotency(alice, "later")) <= 1500
            await raw.aclose()
    finally:
        await cluster.stop()


async def _claims(node, caller: str, key: str) -> bool:
    try:
        return await node.broker.idempotency_claim(caller, key, "r") is None
    except TooManyKeys:
        return False


@pytest.mark.parametrize("kind", BACKENDS)
async def test_command_records_are_capped_per_owner_atomically_and_shared(kind, request):
    cluster = Cluster.of(request, kind, records_per_owner=3)
    try:
        a, b = await cluster.node("a"), await cluster.node("b")
        alice, bob = new_id("alice"), new_id("bob")
        await b.broker.record_put(bob, "k0", "bob's")
        # A flood from two instances at once: each write trims in the same step, so 3 stay, never more.
        await asyncio.gather(*(node.broker.record_put(alice, f"k{n}", f"r{n}") for n, node in enumerate([a, b] * 10)))
        kept = [await b.broker.record_get(alice, f"k{n}") for n in range(20)]
        assert sum(v is not None for v in kept) == 3
        await a.broker.record_put(alice, "k2", "one")  # ordered writes: the oldest go first
        for n in (3, 4):
            await a.broker.record_put(alice, f"k{n}", f"r{n}")
        await b.broker.record_put(alice, "k2", "newest again")
        await b.broker.record_put(alice, "k5", "r5")
        assert [await a.broker.record_get(alice, f"k{n}") for n in (2, 3, 4, 5)] == ["newest again", None, "r4", "r5"]
        assert await a.broker.record_get(bob, "k0") == "bob's"  # another owner's flood takes none of his
        assert await a.broker.record_get(bob, "k1") is None
        if kind != "memory":
            raw = cluster.raw()
            assert await raw.hlen(cluster.keys.command_records(alice)) == 3
            assert await raw.zcard(cluster.keys.command_record_times(alice)) == 3
            assert 0 < await raw.pttl(cluster.keys.command_records(alice)) <= 600_000
            await raw.aclose()
    finally:
        await cluster.stop()


@pytest.mark.parametrize("kind", BACKENDS)
async def test_connect_history_keeps_the_ids_closed_last_cluster_wide(kind, request):
    """Cycling fresh ids cannot fill Redis (issue 20): beyond the cap the ids closed longest ago go."""
    cluster = Cluster.of(request, kind, history_max_clients=3)
    try:
        a, b = await cluster.node("a"), await cluster.node("b")
        ids = [new_id("hist") for _ in range(5)]
        for n, client_id in enumerate(ids):
            (a if n % 2 else b).broker.record_history(client_id, {"code": 1000 + n})
            await asyncio.sleep(0.3 if kind != "memory" else 0)  # One write each: their order is their age.

        async def capped() -> bool:
            kept = [bool(await a.broker.history(client_id, 5)) for client_id in ids]
            return kept == [False, False, True, True, True]

        await eventually(capped, 10, "only the three ids closed last keep a history")
    finally:
        await cluster.stop()


# --- admission records: known ids, new-id counters, the ban list (appliance/gate.py) ----------


async def test_an_id_is_known_once_held_or_with_a_history_on_every_instance(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    held, closed, fresh = new_id("known"), new_id("known"), new_id("known")
    claim = await a.claim(held)
    a.broker.record_history(closed, {"code": 1000})
    assert await b.broker.id_known(held)
    await eventually(lambda: b.broker.id_known(closed), 10, "the closed id's history on the other instance")
    assert not await b.broker.id_known(fresh)
    assert claim.owner is not None
    await a.broker.release(held, claim.owner)
    assert not await b.broker.id_known(held)  # Released, and never closed with a history.


async def test_a_window_counter_is_shared_and_restarts_when_its_window_ends(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    key = new_id("tok")
    first, second = await a.broker.count_in_window(key, 1.0), await b.broker.count_in_window(key, 1.0)
    assert (first.count, second.count) == (1, 2)
    assert 0 < second.left <= 1.0

    async def restarted() -> bool:
        return (await a.broker.count_in_window(key, 30.0)).count == 1

    await eventually(restarted, 10, "a new window after the first one ended")
    assert (await b.broker.count_in_window(key, 30.0)).left > 1.0  # The new window is the new length.


async def test_a_ban_is_seen_by_every_instance_after_one_version_read_and_lifted_anywhere(cluster):
    import time

    a, b = await cluster.node("a"), await cluster.node("b")
    key, expired = f"id:{new_id('ban')}", f"id:{new_id('ban')}"
    await a.broker.put_ban(expired, '{"old":1}', time.time() - 1)
    await a.broker.put_ban(key, '{"r":1}', time.time() + 60)
    version, records = await b.broker.bans(None)
    assert records is not None and records.get(key) == '{"r":1}' and expired not in records
    assert await b.broker.bans(version) == (version, None)  # Unchanged: the list is not read again.
    assert await b.broker.drop_ban(key)
    assert not await b.broker.drop_ban(key)
    moved, after = await a.broker.bans(version)
    assert moved != version and after is not None and key not in after
