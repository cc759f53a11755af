"""Presence: every instance's connections and counters, written cheaply, read in a few round trips.

- ``wsb:instance:{name}``: hash of that instance's presence records, with the presence TTL;
  one field is written or deleted per connect or disconnect, the whole hash only on the
  periodic refresh and after an outage.
- ``wsb:summary:{name}``: that instance's counters and membership version (JSON of
  :meth:`~appliance.brokers.base.Inbox.presence_summary`), same TTL, written in the same
  transaction as its presence hash; ``wsb:instances`` is the set of names (added with every
  presence write), so an idle dashboard reads two small keys instead of every presence
  record, and a full presence read needs no SCAN of the keyspace. The summary carries the
  instance's heartbeat (appliance/heartbeat.py) and ``redis_latency_ms``, a PING timed per beat.
- ``wsb:manifest:{name}``: the command manifests of that instance's clients, by id, written with their
  records but read only for one client (``GET /api/v1/clients/{id}``, MCP), never by a listing.
- ``wsb:series:{name}``: that instance's trend points (JSON), a list capped at an hour's worth.

The summary is the liveness mark: an instance whose summary expired is lost, even while its
presence hash (kept ``LOST_GRACE`` times as long) is still there. The first instance to see
that (every instance looks on its refresh) takes the hash away atomically and records in each
of its connections' history that the instance was lost; presence reads skip such hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from ...core.history import lost_entry
from ..base import Inbox
from .codec import decode_json, encode_json
from .history import HistoryLog
from .keys import INSTANCES_KEY
from .link import Link, unavailable

__all__ = ["Presence"]

log = logging.getLogger(__name__)

# Forget instances that stopped without saying so: those whose summary (KEYS[2i], written with
# the name) expired. The one caller that removes a name gets that instance's presence records
# (KEYS[2i + 1]) and deletes them, so each lost connection is recorded once, cluster-wide.
FORGET_INSTANCES = """
local lost = {}
for i, name in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[2 * i]) == 0 and redis.call('SREM', KEYS[1], name) == 1 then
    for _, record in ipairs(redis.call('HVALS', KEYS[2 * i + 1])) do
      table.insert(lost, record)
    end
    redis.call('DEL', KEYS[2 * i + 1])
  end
end
return lost
"""

#: A presence hash outlives its summary this many times over, so the connections of a lost
#: instance can still be read (and recorded as lost) after its summary expired.
LOST_GRACE = 2
#: Trend points kept per instance: an hour's worth at its heartbeat period.
HOUR = 3600.0

#: A burst of connects settles this long into one write.
SETTLE_SECONDS = 0.2


def _without_manifest(record: dict[str, Any]) -> dict[str, Any]:
    """The record every listing reads: a client's manifest (up to 32 KiB) is kept apart, read for one client only
    (300 clients with big manifests in their records made each GET /api/v1/clients read 10 MB: ~6 ms -> ~400 ms)."""
    return record if "manifest" not in record else {k: v for k, v in record.items() if k != "manifest"}


class Presence:
    """This instance's presence in Redis (with the connect history written alongside), and everyone's."""

    def __init__(self, link: Link, instance: str, inbox: Callable[[], Inbox], history: HistoryLog, *, ttl: int):
        self._link = link
        self._instance = instance
        self._inbox = inbox
        self._history = history
        self.ttl = ttl
        self._keys = link.keys
        self._dirty = asyncio.Event()
        self._changed: set[str] = set()  # ids whose presence record changed since the last write
        self._beat: dict[str, Any] = {}  # The latest heartbeat, carried by every summary write.
        self._trends: list[bytes] = []  # Trend points not written yet.
        self._ping_due = False
        self.latency_ms: float | None = None

    def open(self) -> None:
        assert self._link.redis is not None
        self._forget_instances = self._link.redis.register_script(FORGET_INSTANCES)

    def changed(self, client_id: str) -> None:
        """``client_id``'s record changed (connect, disconnect): written within ~0.2 s."""
        self._changed.add(client_id)
        self._dirty.set()

    def history_recorded(self) -> None:
        self._dirty.set()  # The heartbeat writes it with the presence change, within ~0.2 s.

    def beat(self, beat: dict[str, Any], trend: dict[str, Any] | None) -> None:
        """A heartbeat: written with the summary within ~0.2 s (Redis latency timed just before)."""
        self._beat = dict(beat)
        if trend is not None:
            self._trends = [*self._trends, encode_json(trend)][-self._series_len() :]
        self._ping_due = True
        self._dirty.set()

    def _series_len(self) -> int:
        period = self._beat.get("period") or self.ttl / 3
        return max(2, min(3600, math.ceil(HOUR / period)))

    def _summary(self, inbox: Inbox) -> dict[str, Any]:
        summary = inbox.presence_summary()
        if self._beat:
            summary.update(self._beat, redis_latency_ms=self.latency_ms)
        return summary

    async def write(self, *, full: bool) -> None:
        """Write presence: the changed records only (O(1) per connect), or all of them."""
        assert self._link.redis is not None
        key = self._keys.presence(self._instance)
        inbox = self._inbox()
        if self._ping_due:
            self._ping_due = False
            started = time.perf_counter()
            await self._link.redis.ping()
            self.latency_ms = round((time.perf_counter() - started) * 1000, 3)
        changed, self._changed = self._changed, set()
        trends, self._trends = self._trends, []
        history = self._history.take()
        try:
            # On a Cluster no transaction (the history and the set of names are in other slots): the
            # records and the summary, in one slot, are still written in this order on one connection.
            async with self._link.redis.pipeline(transaction=not self._link.sharded) as pipe:
                manifests = self._keys.manifests(self._instance)
                if full:
                    records = inbox.presence_records()
                    pipe.delete(key, manifests)
                    if records:
                        pipe.hset(key, mapping={r["id"]: encode_json(_without_manifest(r)) for r in records})
                    declared = {r["id"]: encode_json(r["manifest"]) for r in records if "manifest" in r}
                    if declared:
                        pipe.hset(manifests, mapping=declared)
                else:
                    gone = []
                    for client_id in changed:
                        record = inbox.presence_record(client_id)
                        if record is None:
                            gone.append(client_id)
                        else:
                            pipe.hset(key, client_id, encode_json(_without_manifest(record)))
                            if "manifest" in record:
                                pipe.hset(manifests, client_id, encode_json(record["manifest"]))
                            else:
                                pipe.hdel(manifests, client_id)
                    if gone:
                        pipe.hdel(key, *gone)
                        pipe.hdel(manifests, *gone)
                pipe.expire(key, self.ttl * LOST_GRACE)
                pipe.expire(manifests, self.ttl)
                # Taken with the records above (no await between): the version matches what is written.
                pipe.set(self._keys.summary(self._instance), encode_json(self._summary(inbox)), ex=self.ttl)
                if trends:
                    series = self._keys.series(self._instance)
                    pipe.rpush(series, *trends)
                    pipe.ltrim(series, -self._series_len(), -1)
                    pipe.expire(series, self.ttl)
                pipe.sadd(INSTANCES_KEY, self._instance)
                self._history.queue(pipe, history)
                await pipe.execute()
        except BaseException:
            self._changed |= changed  # Written by the next attempt.
            self._trends = [*trends, *self._trends]
            self._history.put_back(history)
            raise
        finally:
            self._history.written()
        if history:
            await self._history.evict()

    def withdraw(self, pipe: Any) -> None:
        """At stop: remove this instance's presence, in ``pipe``; history not written yet goes too."""
        pipe.delete(
            self._keys.presence(self._instance), self._keys.summary(self._instance), self._keys.series(self._instance)
        )
        pipe.delete(self._keys.manifests(self._instance))
        pipe.srem(INSTANCES_KEY, self._instance)
        self._history.queue(pipe, self._history.unwritten())

    async def heartbeat(self, refresh_owners: Callable[[], Awaitable[None]]) -> None:
        """Write changed records soon after a connect or disconnect; every third of the TTL
        refresh everything and re-assert every local id's owner key (``refresh_owners``)."""
        period = self.ttl / 3
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + period
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_refresh):
                    await self._dirty.wait()
                await asyncio.sleep(SETTLE_SECONDS)
            self._dirty.clear()
            refresh = loop.time() >= next_refresh
            if refresh:
                next_refresh = loop.time() + period
            if not self._link.up:
                continue
            try:
                if refresh:
                    await refresh_owners()
                    await self.write(full=True)
                    await self.reap()
                else:
                    await self.write(full=False)
            except (RedisError, OSError) as exc:
                log.warning("Could not refresh presence in Redis: %s", exc)

    # --- reads --------------------------------------------------------------------------------

    async def records(self) -> list[dict[str, Any]]:
        redis = self._link.client()
        records = self._inbox().presence_records()
        try:
            others = await self._other_instances()
            async with redis.pipeline(transaction=False) as pipe:  # One round trip for every instance.
                for name in others:
                    pipe.exists(self._keys.summary(name))
                    pipe.hgetall(self._keys.presence(name))
                replies = await pipe.execute() if others else []
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        for alive, values in zip(replies[::2], replies[1::2], strict=True):
            if alive:  # A lost instance's hash (its summary expired) is kept only to record it as lost.
                records.extend(decode_json(value) for value in values.values())
        return records

    async def record(self, instance: str, client_id: str) -> dict[str, Any] | None:
        """``client_id``'s record in ``instance``'s presence (written within ~0.2 s of a change), or None."""
        try:
            async with self._link.client().pipeline(transaction=False) as pipe:
                pipe.hget(self._keys.presence(instance), client_id)
                pipe.hget(self._keys.manifests(instance), client_id)
                value, manifest = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        if value is None:
            return None
        record = decode_json(value)
        if manifest is not None:
            record["manifest"] = decode_json(manifest)
        return record

    async def _other_instances(self) -> list[str]:
        """The names in ``wsb:instances`` but this one (every instance adds itself with each presence write)."""
        assert self._link.redis is not None
        members = await self._link.redis.smembers(INSTANCES_KEY)
        names = sorted(n.decode() if isinstance(n, bytes) else n for n in members)
        return [name for name in names if name != self._instance]

    async def _forget(self, gone: list[str]) -> None:
        """Forget the instances in ``gone`` whose summary expired; record their connections as lost."""
        redis = self._link.redis
        assert redis is not None
        lost: list[Any] = []
        if not self._link.sharded:
            keys = [INSTANCES_KEY, *(k for n in gone for k in (self._keys.summary(n), self._keys.presence(n)))]
            lost = await self._forget_instances(keys=keys, args=gone)
        else:
            # On a Cluster the set of names is in another slot than each instance's keys: not atomic. A
            # name removed just as its instance wrote its keys again comes back with its next write.
            for name in gone:
                if not await redis.exists(self._keys.summary(name)) and await redis.srem(INSTANCES_KEY, name):
                    lost.extend((await redis.hgetall(self._keys.presence(name))).values())
                    await redis.delete(self._keys.presence(name))
        now = time.time()
        for value in lost:
            record = decode_json(value)
            self._history.record(str(record.get("id")), lost_entry(record, now))
        if lost:
            log.warning("Recorded %d connection(s) of lost instance(s) %s", len(lost), ", ".join(gone))
            self._dirty.set()

    async def reap(self) -> None:
        """Forget the instances whose summary expired (run on every refresh, by every instance)."""
        others = await self._other_instances()
        if not others:
            return
        redis = self._link.client()
        summary_keys = [self._keys.summary(name) for name in others]
        if self._link.sharded:
            values = await redis.mget_nonatomic(summary_keys)  # type: ignore[attr-defined]
        else:
            values = await redis.mget(summary_keys)
        gone = [name for name, value in zip(others, values, strict=True) if value is None]
        if gone:
            await self._forget(gone)

    async def trends(self, instances: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The trend points the other ``instances`` wrote, oldest first."""
        others = [name for name in instances if name != self._instance]
        if not others:
            return {}
        redis = self._link.client()
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for name in others:
                    pipe.lrange(self._keys.series(name), 0, -1)
                lists = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return {name: [decode_json(v) for v in values] for name, values in zip(others, lists, strict=True)}

    async def summaries(self) -> list[dict[str, Any]]:
        redis = self._link.client()
        summaries = [self._summary(self._inbox())]
        try:
            others = await self._other_instances()
            summary_keys = [self._keys.summary(name) for name in others]
            if not others:
                values = []
            elif self._link.sharded:  # Keys of many slots: one MGET per shard.
                values = await redis.mget_nonatomic(summary_keys)  # type: ignore[attr-defined]
            else:
                values = await redis.mget(summary_keys)
            gone = [name for name, value in zip(others, values, strict=True) if value is None]
            if gone:  # Stopped without saying so (its keys expired): forget the name.
                await self._forget(gone)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        summaries.extend(decode_json(value) for value in values if value is not None)
        return summaries
