"""Connect history in Redis: ``wsb:hist:{id}``, newest first, capped per id and in ids, expiring.

Entries are JSON of :func:`~appliance.core.history.close_entry`; ``LPUSH`` + ``LTRIM`` to
``HISTORY_PER_CLIENT`` + ``EXPIRE`` ``HISTORY_TTL_SECONDS``, written in the same pipeline as
the presence change of the close that produced it (never on the handshake's path).
``wsb:hist-ids`` scores every id by its latest entry; beyond ``HISTORY_MAX_CLIENTS`` ids
cluster-wide the oldest ids' histories are deleted, so cycling fresh ids cannot fill Redis.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from redis.exceptions import RedisError

from .codec import decode_json, encode_json
from .keys import HISTORY_INDEX_KEY
from .link import Link, unavailable

__all__ = ["HISTORY_BACKLOG", "HistoryLog"]

#: History entries waiting for Redis (an outage): beyond this many, the oldest are dropped.
HISTORY_BACKLOG = 10_000


class HistoryLog:
    """Entries recorded here and not written yet, the writes, and the reads."""

    def __init__(self, link: Link, *, per_client: int, ttl: int, max_ids: int) -> None:
        self._link = link
        self._per_client = per_client
        self._ttl = ttl
        self._max_ids = max_ids
        #: (id, JSON entry) not written yet, oldest first; written with the next presence write.
        self._out: deque[tuple[str, bytes]] = deque(maxlen=HISTORY_BACKLOG)
        self._writing: list[tuple[str, bytes]] = []  # In the pipeline now: not readable from Redis yet.

    def record(self, client_id: str, entry: dict[str, Any]) -> None:
        self._out.append((client_id, encode_json(entry)))

    def take(self) -> list[tuple[str, bytes]]:
        """The entries to write now; they stay readable here until :meth:`written` or :meth:`put_back`."""
        self._writing = list(self._out)
        self._out.clear()
        return self._writing

    def put_back(self, entries: list[tuple[str, bytes]]) -> None:
        """A write failed: the entries go first again, ahead of newer ones."""
        self._out.extendleft(reversed(entries))

    def written(self) -> None:
        self._writing = []

    def unwritten(self) -> list[tuple[str, bytes]]:
        return list(self._out)

    def queue(self, pipe: Any, entries: list[tuple[str, bytes]]) -> None:
        now = time.time()
        for client_id, entry in entries:
            key = self._link.keys.history(client_id)
            pipe.lpush(key, entry)
            pipe.ltrim(key, 0, self._per_client - 1)
            pipe.expire(key, self._ttl)
        if entries:
            # Scored in the order written (a later entry of an id moves it up), so ties never decide.
            pipe.zadd(HISTORY_INDEX_KEY, {client_id: now + i / 1e6 for i, (client_id, _) in enumerate(entries)})

    async def evict(self) -> None:
        """Beyond ``max_ids`` ids cluster-wide, delete the histories of those closed longest ago."""
        redis = self._link.redis
        assert redis is not None
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(HISTORY_INDEX_KEY, "-inf", time.time() - self._ttl)  # Expired by now.
            pipe.zcard(HISTORY_INDEX_KEY)
            _, count = await pipe.execute()
        if count <= self._max_ids:
            return
        oldest: list[Any] = await redis.zpopmin(HISTORY_INDEX_KEY, count - self._max_ids)
        if oldest:  # One key per command: on a Cluster they live in many slots.
            async with redis.pipeline(transaction=False) as pipe:
                for client_id, _ in oldest:
                    name = client_id.decode() if isinstance(client_id, bytes) else str(client_id)
                    pipe.delete(self._link.keys.history(name))
                await pipe.execute()

    async def read(self, client_id: str, limit: int) -> list[dict[str, Any]]:
        limit = min(limit, self._per_client)
        if limit < 1:
            return []
        # Entries of this instance not written yet come first: they are the newest.
        unwritten = [decode_json(e) for i, e in reversed([*self._writing, *self._out]) if i == client_id]
        redis = self._link.client()
        try:
            stored = await redis.lrange(self._link.keys.history(client_id), 0, limit - 1)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        return [*unwritten, *(decode_json(e) for e in stored)][:limit]
