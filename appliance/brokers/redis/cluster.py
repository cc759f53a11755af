"""On a Redis Cluster: sharded pub/sub, one subscriber connection per primary.

``REDIS_CLUSTER=true`` with ``REDIS_URL`` naming any node. Commands go through redis-py's
cluster client (which follows the slot map); every channel is a shard channel
(``SPUBLISH``/``SSUBSCRIBE``, Redis 7+) that lives in one slot: an id's channel with the
id's keys (``{id}`` hash tags, :class:`~.keys.Keys`), an instance's channel with its
presence, ``wsb:controllers`` and ``wsb:fan`` in their own. A shard channel's message
travels to the nodes of its shard only, not over the whole cluster bus, so the traffic
grows with the shards.

Any loss (a node down, a failover, a slot moved away: Redis then unsubscribes us) is a loss
of the whole instance as with one Redis: ``/readyz`` 503, commands in flight reported,
then every connection rebuilt from a fresh slot map, every id and presence record
re-asserted, and ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url

from ..base import BrokerUnavailable
from .subscriber import Subscriber, SubscriberConnection, next_message

__all__ = ["ClusterSubscriber"]

log = logging.getLogger(__name__)

#: Seconds to wait for the initial subscriptions of every shard before giving up on a rebuild.
CONFIRM_SECONDS = 10.0


class _Shard:
    """One primary's subscriber connection."""

    def __init__(self, address: tuple[str, int], options: dict[str, Any]) -> None:
        self.address = address
        self.pool = BlockingConnectionPool(
            max_connections=1, timeout=5, **{**options, "host": address[0], "port": address[1]}
        )
        self.pubsub: PubSub = SubscriberConnection(self.pool, ignore_subscribe_messages=False)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.pool.disconnect()


class ClusterSubscriber(Subscriber):
    """:class:`~.subscriber.Subscriber` over shard channels, on one connection per primary."""

    WHAT = "Redis cluster subscriber"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shards: dict[tuple[str, int], _Shard] = {}
        self._rebuild = asyncio.Event()
        self._leaving: dict[str, int] = {}  # SUNSUBSCRIBEs sent and not confirmed yet, per channel.
        options: dict[str, Any] = dict(parse_url(self._link.target.url))
        for name in ("host", "port", "db", "path"):
            options.pop(name, None)
        self._options = {**options, "socket_connect_timeout": 3, "socket_timeout": 10}

    @property
    def _cluster(self) -> RedisCluster:
        return cast(RedisCluster, self._link.redis)

    def request_reconnect(self) -> None:
        super().request_reconnect()
        self._rebuild.set()

    async def close(self) -> None:
        shards, self._shards = list(self._shards.values()), {}
        for shard in shards:
            await shard.close()

    def _shard_for(self, channel: str) -> _Shard:
        node = self._cluster.get_node_from_key(channel)
        shard = self._shards.get((node.host, int(node.port))) if node is not None else None
        if shard is None:  # The slot map changed since the last rebuild.
            self.request_reconnect()
            raise BrokerUnavailable("redis cluster: slot map changed; reconnecting")
        return shard

    async def _connect(self) -> None:
        await self.close()
        cluster = self._cluster
        await cluster.initialize()  # Once: the slot map and the command table.
        await cluster.nodes_manager.initialize()  # A fresh slot map: after a failover, the new primaries.
        addresses = [(n.host, int(n.port)) for n in cluster.get_primaries()]
        self._shards = {address: _Shard(address, self._options) for address in addresses}
        self._subs.reset_counts()
        self._leaving.clear()
        for shard in self._shards.values():
            await shard.pubsub.connect()

    def _connected(self) -> bool:
        return bool(self._shards)

    async def _send_subscribe(self, channel: str) -> None:
        await self._shard_for(channel).pubsub.ssubscribe(channel)

    async def _send_unsubscribe(self, channel: str) -> None:
        shard = self._shard_for(channel)
        self._leaving[channel] = self._leaving.get(channel, 0) + 1
        await shard.pubsub.sunsubscribe(channel)

    async def _subscribe_all(self) -> None:
        channels = self._channels()
        # One SSUBSCRIBE names channels of one slot only.
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(self._cluster.keyslot(channel), []).append(channel)
        for mine in by_slot.values():
            shard = self._shard_for(mine[0])
            for chunk in self._chunks(mine):
                await shard.pubsub.ssubscribe(*chunk)
        await asyncio.wait_for(asyncio.gather(*(self._subs.wait_for(ch) for ch in channels)), CONFIRM_SECONDS)

    async def _read(self, shard: _Shard) -> None:
        """Hand over every message of one shard; raises when its connection is lost."""
        while True:
            message = await next_message(shard.pubsub)
            kind = message["type"]
            if kind == "smessage":
                self._on_message(message["channel"], message["data"])
            elif kind == "ssubscribe":
                self._subs.confirmed(message["channel"].decode())
            elif kind == "sunsubscribe":
                channel = message["channel"].decode()
                if self._leaving.get(channel, 0) > 0:
                    self._leaving[channel] -= 1
                    if not self._leaving[channel]:
                        del self._leaving[channel]
                else:  # Not asked for: the slot moved to another shard. Rebuild from a fresh slot map.
                    raise ConnectionError("redis cluster moved a subscribed slot")

    async def run(self) -> None:
        backoff = 0.1
        while not self.stopping:
            readers: list[asyncio.Task[None]] = []
            reasserting: asyncio.Task[None] | None = None
            try:
                self._rebuild.clear()
                await self._connect()
                readers = [asyncio.ensure_future(self._read(shard)) for shard in self._shards.values()]
                subscribing: asyncio.Future[Any] = asyncio.ensure_future(self._subscribe_all())
                try:  # A reader that fails meanwhile (a refused SSUBSCRIBE, a lost node) ends the wait.
                    done, _ = await asyncio.wait([subscribing, *readers], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    subscribing.cancel()
                for task in done:
                    task.result()
                if subscribing not in done:
                    raise ConnectionError("a subscriber connection ended")
                self._reconnect_requested = False
                if not self._link.up:
                    reasserting = asyncio.get_running_loop().create_task(self._came_back())
                    backoff = 0.1
                rebuild: asyncio.Future[Any] = asyncio.ensure_future(self._rebuild.wait())
                try:
                    done, _ = await asyncio.wait([*readers, rebuild], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    rebuild.cancel()
                for task in done:
                    if task is not rebuild:
                        task.result()  # Raises the reader's error.
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
            if reasserting is not None and not reasserting.done():
                reasserting.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
