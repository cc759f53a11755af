"""Command records (appliance/commands/followup.py) in Redis: bounded per owner, in one slot per owner.

- ``wsb:cmd:{owner}``: hash of the owner's records by key (JSON);
- ``wsb:cmd-at:{owner}``: sorted set of the same keys, scored by their last write (ms, Redis's clock,
  moved a microsecond past the newest so that two writes in one millisecond keep their order).

A write is one script: it writes the record, forgets the owner's records last written more than
the window ago, then the ones written longest ago beyond ``per_owner``, and keeps both keys
the window after this write. Both keys carry ``{owner}`` on a Cluster (one slot, so the script
touches one shard). A flood from one caller therefore replaces its own oldest records and never
holds more than ``per_owner`` records (each at most a few KiB: the texts are cut, followup.py).
"""

from __future__ import annotations

from redis.exceptions import RedisError

from .link import Link, unavailable

__all__ = ["CommandRecords"]

# KEYS: the hash, the sorted set. ARGV: key, record, window (ms), per_owner.
PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Strictly after the newest write (two in one millisecond keep their order; ties would sort by name).
local at = now
local newest = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) >= at then at = tonumber(newest[2]) + 0.001 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], at, ARGV[1])
local function forget(keys)
  for i = 1, #keys, 1000 do
    redis.call('HDEL', KEYS[1], unpack(keys, i, math.min(i + 999, #keys)))
  end
end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
if #old > 0 then
  forget(old)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  forget(redis.call('ZRANGE', KEYS[2], 0, over - 1))
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
"""

# KEYS: the hash, the sorted set. ARGV: key, window (ms). A record older than the window is gone.
GET = """
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not at then return false end
local t = redis.call('TIME')
if tonumber(at) <= tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2]) then
  return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
"""


class CommandRecords:
    """At most ``per_owner`` records per owner, each kept ``window`` seconds after its last write."""

    def __init__(self, link: Link, *, window: float, per_owner: int) -> None:
        self._link = link
        self._window_ms = max(1, round(window * 1000))
        self._per_owner = per_owner

    def _keys(self, owner: str) -> tuple[str, str]:
        keys = self._link.keys
        return keys.command_records(owner), keys.command_record_times(owner)

    async def put(self, owner: str, key: str, record: str) -> None:
        try:
            await self._link.client().eval(PUT, 2, *self._keys(owner), key, record, self._window_ms, self._per_owner)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    async def get(self, owner: str, key: str) -> str | None:
        try:
            held = await self._link.client().eval(GET, 2, *self._keys(owner), key, self._window_ms)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None
        if held is None:
            return None
        return held.decode() if isinstance(held, bytes) else str(held)
