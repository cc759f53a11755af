"""REDIS_SENTINEL_PASSWORD and the data password: Sentinels and data nodes that both require AUTH."""

from __future__ import annotations

import pytest
from broker_support import CLIENT, Cluster, Outcome, new_id
from redis_topologies import MASTER_NAME, SentinelGroup

from appliance.brokers.redis import RedisTarget


@pytest.fixture
def guarded():
    group = SentinelGroup(password="data-pass-7f3a9c", sentinel_password="sentinel-pass-2b8e41")
    group.start()
    yield group
    group.stop()


@pytest.mark.slow
async def test_a_broker_reaches_a_master_behind_password_protected_sentinels(guarded):
    sentinels = tuple(("127.0.0.1", s.port) for s in guarded.sentinels)
    target = RedisTarget(
        sentinels=sentinels,
        sentinel_master=MASTER_NAME,
        sentinel_password=guarded.sentinel_password,
        password=guarded.password,
    )
    cluster = Cluster("sentinel", target)
    try:
        a, b = await cluster.node("a"), await cluster.node("b")
        assert a.broker.health() == (True, "ok")
        client_id = new_id()
        await b.claim(client_id, CLIENT)
        outcome = Outcome()
        a.broker.send(client_id, "through both passwords", outcome)
        assert await outcome.result() is None
        assert b.inbox.received[-1] == (client_id, "through both passwords")
    finally:
        await cluster.stop()
    # Without the Sentinels' password the broker cannot find the master: not ready, no crash.
    blind = Cluster(
        "sentinel", RedisTarget(sentinels=sentinels, sentinel_master=MASTER_NAME, password=guarded.password)
    )
    try:
        node = await blind.node("c")
        assert node.broker.health()[0] is False
    finally:
        await blind.stop()
