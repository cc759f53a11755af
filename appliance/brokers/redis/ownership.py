"""Id ownership: who holds each id (``wsb:owner:{id}``), claimed atomically, kept alive by its holder.

The key has a TTL refreshed by the holder, so a crashed instance's ids free themselves;
the holder re-asserts it on every heartbeat, so a key lost to eviction or ``FLUSHALL``
comes back (or, if someone else took the id meanwhile, the holder closes with 4010).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from ...core.protocol import Role
from ..base import BrokerUnavailable, Claim, Inbox, Owner
from .codec import decode_owner
from .keys import GENERATION_KEY
from .link import Link, unavailable
from .subscriber import Subscriber

__all__ = ["RELEASE", "Ownership"]

log = logging.getLogger(__name__)

REASSERT_CHUNK = 1000

# Atomic claim: a live owner of the other role always wins (2); a reject-policy claim loses
# to a live owner (0); otherwise it wins and the previous owner is told, on the id's
# channel, to close the connection it replaced.
CLAIM = """
local previous = redis.call('GET', KEYS[1])
if previous then
  if string.match(previous, '^%d+|([^|]*)|') ~= ARGV[5] then return {2, previous} end
  if ARGV[3] == '1' then return {0, previous} end
end
local owner = redis.call('INCR', KEYS[2]) .. '|' .. ARGV[1]
redis.call('SET', KEYS[1], owner, 'EX', ARGV[2])
if previous then redis.call('PUBLISH', ARGV[4], 'k' .. previous) end
return {1, owner, previous or ''}
"""

# The same on a Cluster, where a claim touches the id's slot only: no shared generation counter
# (the generation is the shard's clock in microseconds, above the previous owner's), and the kick
# goes out with SPUBLISH on the id's channel, which lives in that slot too.
CLAIM_SHARDED = """
local previous = redis.call('GET', KEYS[1])
local generation = 0
if previous then
  if string.match(previous, '^%d+|([^|]*)|') ~= ARGV[5] then return {2, previous} end
  if ARGV[3] == '1' then return {0, previous} end
  generation = tonumber(string.match(previous, '^(%d+)|')) + 1
end
local now = redis.call('TIME')
generation = math.max(generation, now[1] * 1000000 + now[2])
local owner = string.format('%.0f', generation) .. '|' .. ARGV[1]
redis.call('SET', KEYS[1], owner, 'EX', ARGV[2])
if previous then redis.call('SPUBLISH', ARGV[4], 'k' .. previous) end
return {1, owner, previous or ''}
"""

# Compare-and-delete: an old connection's cleanup never removes a newer owner.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Heartbeat and after an outage: keep each claim if it is still ours or free again (evicted,
# flushed, expired); report, as (index, current owner) pairs, those someone else holds now.
# One SET ... GET per key in the usual case (the script is atomic, so putting a newer
# owner back is never seen by anyone); Redis >= 6.2.
REASSERT = """
local lost = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1], 'GET')
  if current and current ~= ARGV[i + 1] then
    redis.call('SET', key, current, 'EX', ARGV[1])
    table.insert(lost, i)
    table.insert(lost, current)
  end
end
return lost
"""


class Ownership:
    """The ids this instance holds, and the releases still owed to Redis after an outage.

    ``changed(id)`` tells presence that the id's record changed; ``spawn`` runs a
    clean-up in the background (one that must survive the caller's cancellation).
    """

    def __init__(
        self,
        link: Link,
        subscriber: Subscriber,
        inbox: Callable[[], Inbox],
        changed: Callable[[str], None],
        spawn: Callable[[Awaitable[None]], None],
        *,
        ttl: int,
    ) -> None:
        self._link = link
        self._subscriber = subscriber
        self._inbox = inbox
        self._changed = changed
        self._spawn = spawn
        self._ttl = ttl
        self._keys = link.keys
        self.owners: dict[str, Owner] = {}  # Local ids this instance holds, for refresh and reassert.
        self.unreleased: dict[str, Owner] = {}  # Releases that failed (outage): retried when Redis is back.

    def open(self) -> None:
        redis = self._link.redis
        assert redis is not None
        self._claim = redis.register_script(CLAIM_SHARDED if self._link.sharded else CLAIM)
        self._release = redis.register_script(RELEASE)

    async def claim(self, client_id: str, instance: str, conn_key: str, role: Role, reject_if_taken: bool) -> Claim:
        channel = self._keys.client_channel(client_id)
        # Subscribe first, so a newer claim's kick can never be missed. A command published
        # meanwhile is answered (target_offline until the connection is registered), not lost.
        await self._subscriber.subscribe(channel)
        call = asyncio.ensure_future(
            self._claim(
                keys=[self._keys.owner(client_id)]
                if self._link.sharded
                else [self._keys.owner(client_id), GENERATION_KEY],
                args=[
                    f"{role.value}|{instance}|{conn_key}",
                    self._ttl,
                    "1" if reject_if_taken else "0",
                    channel,
                    role.value,
                ],
            )
        )
        try:
            code, owner_value, *rest = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The script may have run: undo the claim once it answers, and the subscription.
            self._spawn(self._undo_claim(client_id, channel, call))
            raise
        except (RedisError, OSError) as exc:
            await self._subscriber.unsubscribe(channel)
            raise unavailable(exc) from exc
        except BaseException:
            await self._subscriber.unsubscribe(channel)
            raise
        if code != 1:
            await self._subscriber.unsubscribe(channel)
            return Claim(False, None, decode_owner(owner_value), role_conflict=code == 2)
        try:
            owner = Owner.decode(owner_value.decode())
            previous = decode_owner(rest[0]) if rest and rest[0] else None
        except BaseException:  # Never keep an id nobody will release.
            self._spawn(self._undo_claim(client_id, channel, call))
            raise
        self.owners[client_id] = owner
        self.unreleased.pop(client_id, None)
        self._changed(client_id)
        return Claim(True, owner, previous)

    async def _undo_claim(self, client_id: str, channel: str, call: asyncio.Future[Any]) -> None:
        try:
            code, owner_value, *_ = await call
            if code == 1 and self._link.redis is not None:
                await self._release(keys=[self._keys.owner(client_id)], args=[owner_value])
        except (RedisError, OSError):
            pass  # Not claimed, or the owner key expires within PRESENCE_TTL.
        finally:
            await self._subscriber.unsubscribe(channel)

    async def release(self, client_id: str, owner: Owner) -> None:
        if self.owners.get(client_id) == owner:
            del self.owners[client_id]
        self._changed(client_id)
        try:
            if not self._link.up or self._link.redis is None:
                raise ConnectionError("redis is down")
            await self._release(keys=[self._keys.owner(client_id)], args=[owner.encode()])
        except (RedisError, OSError):
            # Retried when Redis is back; a newer local claim of the id supersedes it.
            if client_id not in self.owners:
                self.unreleased[client_id] = owner
        finally:
            await self._subscriber.unsubscribe(self._keys.client_channel(client_id))

    async def owner_of(self, client_id: str) -> Owner | None:
        if self._link.redis is None:
            raise BrokerUnavailable(self._link.health()[1])
        try:
            value = await self._link.redis.get(self._link.keys.owner(client_id))
        except (RedisError, OSError) as exc:
            raise unavailable(exc, "Redis unreachable: {}") from exc
        if not value:
            return None
        return Owner.decode(value.decode() if isinstance(value, bytes) else str(value))

    async def reassert(self) -> None:
        """Keep every local id owned in Redis: rewrite a vanished key, give up an id taken elsewhere."""
        redis = self._link.redis
        assert redis is not None
        items = list(self.owners.items())
        owner_key = self._keys.owner
        for start in range(0, len(items), REASSERT_CHUNK):
            chunk = items[start : start + REASSERT_CHUNK]
            if self._link.sharded:  # One key per script on a Cluster (keys of many slots), in one pipeline.
                async with redis.pipeline(transaction=False) as pipe:
                    for client_id, owner in chunk:
                        pipe.eval(REASSERT, 1, owner_key(client_id), self._ttl, owner.encode())
                    answers = await pipe.execute()
                lost: list[Any] = [x for i, answer in enumerate(answers) if answer for x in (i + 1, answer[1])]
            else:
                lost = await redis.eval(
                    REASSERT,
                    len(chunk),
                    *(owner_key(client_id) for client_id, _ in chunk),
                    self._ttl,
                    *(owner.encode() for _, owner in chunk),
                )
            for index, current in zip(lost[::2], lost[1::2], strict=True):
                client_id, owner = chunk[int(index) - 1]
                if self.owners.get(client_id) != owner:
                    continue  # Released meanwhile.
                log.info("%s is now held by %s; closing the local connection", client_id, current.decode())
                self._inbox().replaced(client_id, owner)

    async def release_leftovers(self) -> None:
        """Releases that failed during an outage: do them now, so a stale owner blocks nobody."""
        redis = self._link.redis
        assert redis is not None
        if not self.unreleased:
            return
        items = list(self.unreleased.items())
        async with redis.pipeline(transaction=False) as pipe:
            for client_id, owner in items:
                pipe.eval(RELEASE, 1, self._keys.owner(client_id), owner.encode())
            await pipe.execute()
        for client_id, owner in items:
            if self.unreleased.get(client_id) == owner:
                del self.unreleased[client_id]

    def release_all(self, pipe: Any) -> None:
        """At stop: give up every id held or still owed, in ``pipe``."""
        for client_id, owner in [*self.owners.items(), *self.unreleased.items()]:
            pipe.eval(RELEASE, 1, self._keys.owner(client_id), owner.encode())
