"""Presence: every instance's connections and counters, written cheaply, read in a few round trips.

- ``wsb:instance:{name}``: hash of that instance's presence records, with the presence TTL;
  one field is written or deleted per connect or disconnect, the whole hash only on the
  periodic refresh and after an outage.
- ``wsb:summary:{name}``: that instance's counters and membership version (JSON of
  :meth:`~appliance.brokers.base.Inbox.presence_summary`), same TTL, written in the same
  transaction as its presence hash; ``wsb:instances`` is the set of names (added with every
  presence write), so an idle dashboard reads two small keys instead of every presence
  record, and a full presence read needs no SCAN of the keyspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from ..base import Inbox
from .codec import decode_json, encode_json
from .history import HistoryLog
from .keys import INSTANCES_KEY
from .link import Link, unavailable

__all__ = ["Presence"]

log = logging.getLogger(__name__)

# Forget instances that stopped without saying so: only those whose summary and presence keys
# (KEYS[2i], KEYS[2i + 1], written with the name in one transaction) are both gone, checked
# atomically so a name re-added meanwhile stays.
FORGET_INSTANCES = """
local gone = 0
for i, name in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[2 * i], KEYS[2 * i + 1]) == 0 then
    gone = gone + redis.call('SREM', KEYS[1], name)
  end
end
return gone
"""

#: A burst of connects settles this long into one write.
SETTLE_SECONDS = 0.2


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

    def open(self) -> None:
        assert self._link.redis is not None
        self._forget_instances = self._link.redis.register_script(FORGET_INSTANCES)

    def changed(self, client_id: str) -> None:
        """``client_id``'s record changed (connect, disconnect): written within ~0.2 s."""
        self._changed.add(client_id)
        self._dirty.set()

    def history_recorded(self) -> None:
        self._dirty.set()  # The heartbeat writes it with the presence change, within ~0.2 s.

    async def write(self, *, full: bool) -> None:
        """Write presence: the changed records only (O(1) per connect), or all of them."""
        assert self._link.redis is not None
        key = self._keys.presence(self._instance)
        inbox = self._inbox()
        changed, self._changed = self._changed, set()
        history = self._history.take()
        try:
            # On a Cluster no transaction (the history and the set of names are in other slots): the
            # records and the summary, in one slot, are still written in this order on one connection.
            async with self._link.redis.pipeline(transaction=not self._link.sharded) as pipe:
                if full:
                    records = inbox.presence_records()
                    pipe.delete(key)
                    if records:
                        pipe.hset(key, mapping={r["id"]: encode_json(r) for r in records})
                else:
                    gone = []
                    for client_id in changed:
                        record = inbox.presence_record(client_id)
                        if record is None:
                            gone.append(client_id)
                        else:
                            pipe.hset(key, client_id, encode_json(record))
                    if gone:
                        pipe.hdel(key, *gone)
                pipe.expire(key, self.ttl)
                # Taken with the records above (no await between): the version matches what is written.
                pipe.set(self._keys.summary(self._instance), encode_json(inbox.presence_summary()), ex=self.ttl)
                pipe.sadd(INSTANCES_KEY, self._instance)
                self._history.queue(pipe, history)
                await pipe.execute()
        except BaseException:
            self._changed |= changed  # Written by the next attempt.
            self._history.put_back(history)
            raise
        finally:
            self._history.written()
        if history:
            await self._history.evict()

    def withdraw(self, pipe: Any) -> None:
        """At stop: remove this instance's presence, in ``pipe``; history not written yet goes too."""
        pipe.delete(self._keys.presence(self._instance), self._keys.summary(self._instance))
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
                    pipe.hgetall(self._keys.presence(name))
                hashes = await pipe.execute() if others else []
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        for values in hashes:
            records.extend(decode_json(value) for value in values.values())
        return records

    async def record(self, instance: str, client_id: str) -> dict[str, Any] | None:
        """``client_id``'s record in ``instance``'s presence (written within ~0.2 s of a change), or None."""
        try:
            value = await self._link.client().hget(self._keys.presence(instance), client_id)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return None if value is None else decode_json(value)

    async def _other_instances(self) -> list[str]:
        """The names in ``wsb:instances`` but this one (every instance adds itself with each presence write)."""
        assert self._link.redis is not None
        members = await self._link.redis.smembers(INSTANCES_KEY)
        names = sorted(n.decode() if isinstance(n, bytes) else n for n in members)
        return [name for name in names if name != self._instance]

    async def _forget(self, gone: list[str]) -> None:
        redis = self._link.redis
        assert redis is not None
        if not self._link.sharded:
            keys = [INSTANCES_KEY, *(k for n in gone for k in (self._keys.summary(n), self._keys.presence(n)))]
            await self._forget_instances(keys=keys, args=gone)
            return
        # On a Cluster the set of names is in another slot than each instance's keys: not atomic. A
        # name removed just as its instance wrote its keys again comes back with its next write.
        for name in gone:
            if not await redis.exists(self._keys.summary(name), self._keys.presence(name)):
                await redis.srem(INSTANCES_KEY, name)

    async def summaries(self) -> list[dict[str, Any]]:
        redis = self._link.client()
        summaries = [self._inbox().presence_summary()]
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
