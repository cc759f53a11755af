"""The broker contract for commands with an id, at the broker API, against both brokers.

Routed commands, the per-instance channel, fan-out with instance counts, the offline
queue and owner lookup; the same tests for the memory broker and Redis (one server, Sentinels, a Cluster).
"""

from __future__ import annotations

import pytest
from broker_support import BACKENDS, CONTROLLER, Cluster, Outcome, cluster_group, new_id, sentinel_group, until

from appliance.core.protocol import ErrorCode
from appliance.core.requests import Enqueued, Routed

__all__ = ["cluster_group", "sentinel_group"]  # Fixtures of broker_support, used through the backend.


@pytest.fixture(params=BACKENDS)
async def cluster(request: pytest.FixtureRequest):
    made = Cluster.of(request, request.param, queue_max=3, queue_remember_seconds=60)
    yield made
    await made.stop()


def routed(command_id, message="m", controller="LLM", timeout_ms=10_000, reply_to="a"):
    return Routed(controller, command_id, message, reply_to, "owner-1", timeout_ms)


async def test_routed_command_reaches_the_target_instance_in_order_with_plain_sends(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    target = new_id()
    await b.claim(target)
    outcomes = [Outcome(), Outcome(), Outcome()]
    a.broker.send(target, "before", outcomes[0], "planner")
    a.broker.send_routed(target, routed(1, "routed"), outcomes[1])
    a.broker.send(target, "after", outcomes[2], "planner")
    for outcome in outcomes:
        assert await outcome.result() is None
    assert b.inbox.arrivals[-3:] == ["before", "routed", "after"]
    assert b.inbox.routed[-1] == (target, routed(1, "routed"))
    assert b.inbox.senders[-2:] == ["planner", "planner"]  # a version-2 client is told who sent it


async def test_routed_command_outcomes_for_offline_and_controller_targets(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    offline = Outcome()
    a.broker.send_routed(new_id(), routed(1), offline)
    assert await offline.result() is ErrorCode.TARGET_OFFLINE
    controller = new_id()
    await b.claim(controller, CONTROLLER)
    refused = Outcome()
    a.broker.send_routed(controller, routed(2), refused)
    assert await refused.result() is ErrorCode.TARGET_NOT_CLIENT


async def test_instance_channel_reaches_exactly_that_instance(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    a.broker.send_to_instance(b.name, b"for b")
    await until(lambda: b"for b" in b.inbox.events, message="the event on b")
    a.broker.send_to_instance(a.name, b"for a")
    assert b"for a" in a.inbox.events  # its own instance: at once, no round trip
    if cluster.kind != "memory":
        assert b"for b" not in a.inbox.events and b"for a" not in b.inbox.events


async def test_fan_out_reaches_every_instance_and_counts_them(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    payload = new_id("fan").encode()
    instances = await a.broker.fan_out(payload)
    nodes = [a] if cluster.kind == "memory" else [a, b]
    assert instances >= len(nodes)  # other test appliances may share this Redis
    for node in nodes:
        await until(lambda node=node: payload in node.inbox.fanned, message=f"the fan-out on {node.name}")


async def test_offline_queue_keeps_order_bounds_and_forgets_nothing_twice(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    target = new_id()
    now = 1_000_000.0
    assert await a.broker.enqueue(target, routed("1"), now) is Enqueued.QUEUED
    assert await a.broker.enqueue(target, routed(1), now) is Enqueued.QUEUED  # 1 and "1" are different ids
    assert await a.broker.enqueue(target, routed("1"), now) is Enqueued.ALREADY_QUEUED
    assert await a.broker.enqueue(target, routed("3", timeout_ms=100), now) is Enqueued.QUEUED
    assert await a.broker.enqueue(target, routed("4"), now) is Enqueued.FULL  # queue_max=3
    taken = await b.broker.take_queued(target, now + 1.0)  # "3" expired meanwhile
    assert [r.id for r in taken] == ["1", 1]
    assert await b.broker.take_queued(target, now + 1.0) == []
    assert await a.broker.enqueue(target, routed("1"), now + 2) is Enqueued.ALREADY_DELIVERED
    assert await a.broker.enqueue(target, routed("1", controller="other"), now + 2) is Enqueued.QUEUED
    # Taken but never handed over (its client left first): queued again, once.
    assert await a.broker.enqueue(target, routed("1"), now + 2, requeue=True) is Enqueued.QUEUED
    assert await a.broker.enqueue(target, routed("1"), now + 2, requeue=True) is Enqueued.ALREADY_QUEUED
    assert [r.id for r in await b.broker.take_queued(target, now + 3)] == ["1", "1"]  # other's, then the requeued


async def test_owner_of_names_the_holder_anywhere(cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    client_id = new_id()
    assert await a.broker.owner_of(client_id) is None
    claim = await b.claim(client_id)
    assert await a.broker.owner_of(client_id) == claim.owner
