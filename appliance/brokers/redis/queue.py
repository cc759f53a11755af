"""The offline queue in Redis: commands kept for an absent client, never delivered twice.

``wsb:q:{id}``: list of commands queued for an absent client (JSON, oldest first), with a TTL
of its longest-lived entry; ``wsb:qd:{controller}:{id}`` remembers a queued or delivered
command so that a repeat is never delivered twice.
"""

from __future__ import annotations

from redis.exceptions import RedisError

from ...core.requests import Enqueued, Routed
from .codec import ENQUEUED, QueuedEntry, decode_queued, encode_json
from .keys import Keys
from .link import Link, unavailable

__all__ = ["RedisQueue"]

# Refuse a repeat (answer its state) or a full queue; else append, keep the list as long as
# its longest-lived entry, and remember (controller, id).
ENQUEUE = """
local seen = redis.call('GET', KEYS[2])
if seen and not (ARGV[5] == '1' and seen == 'd') then return seen end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 'full' end
redis.call('RPUSH', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('SET', KEYS[2], 'q', 'PX', ARGV[4])
return 'ok'
"""


def _seen_key(keys: Keys, target: str, routed: Routed) -> str:
    kind = "i" if isinstance(routed.id, int) else "s"
    return keys.queue_seen(target, routed.controller, f"{kind}{routed.id}")


class RedisQueue:
    """At most ``max_per_client`` commands per absent client; a (controller, id) is remembered
    ``remember_seconds`` (or as long as its command lives)."""

    def __init__(self, link: Link, *, max_per_client: int, remember_seconds: float) -> None:
        self._link = link
        self._max = max_per_client
        self._remember = remember_seconds

    async def enqueue(self, target: str, routed: Routed, now: float, *, requeue: bool = False) -> Enqueued:
        redis = self._link.client()
        keys = self._link.keys
        ttl_ms = max(1, routed.timeout_ms)
        entry = encode_json(QueuedEntry(routed, now + routed.timeout_ms / 1000))
        try:
            answer = await redis.eval(
                ENQUEUE,
                2,
                keys.queue(target),
                _seen_key(keys, target, routed),
                entry,
                self._max,
                ttl_ms,
                max(ttl_ms, round(self._remember * 1000)),
                "1" if requeue else "0",
            )
        except (RedisError, OSError) as exc:
            raise unavailable(exc, "Redis unreachable: {}") from exc
        return ENQUEUED[answer.decode() if isinstance(answer, bytes) else str(answer)]

    async def take(self, target: str, now: float) -> list[Routed]:
        redis = self._link.client()
        try:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.lrange(self._link.keys.queue(target), 0, -1)
                pipe.delete(self._link.keys.queue(target))
                raw, _ = await pipe.execute()
            taken = [e.routed for e in map(decode_queued, raw) if e.expires > now]
            if taken:
                async with redis.pipeline(transaction=False) as pipe:
                    for routed in taken:
                        pipe.set(_seen_key(self._link.keys, target, routed), "d", px=round(self._remember * 1000))
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            raise unavailable(exc, "Redis unreachable: {}") from exc
        return taken
