"""Idempotency records in Redis, a budget of them per caller (core/keybudget.py), in one slot per caller.

- ``wsb:idem:{caller}:<key>``: the record, a string expiring with the window after its last write;
- ``wsb:idem-at:{caller}``: sorted set of the caller's live keys, scored by when they expire (ms);
- ``wsb:idem-size:{caller}``: hash of the bytes each key counts, and their total under ``""``.

A claim is one script: the record when there is one; else it forgets the caller's expired keys,
refuses a new one beyond the budget (with the seconds until its oldest expires), or stores it
(``SET NX``-like: of two instances claiming at once exactly one wins). The record, index and
sizes carry ``{caller}`` on a Cluster, so each script touches one shard. A live key is never
forgotten before its window ends: a caller over its budget waits for its keys to expire.
"""

from __future__ import annotations

from redis.exceptions import RedisError

from ...core.keybudget import KeyBudget, TooManyKeys
from .link import Link, unavailable

__all__ = ["IdempotencyRecords"]

# Forget the caller's keys expired by ``now`` (their strings expired by themselves). KEYS[2], KEYS[3].
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
if #old > 0 then
  local freed = 0
  for i = 1, #old, 1000 do
    local part = {unpack(old, i, math.min(i + 999, #old))}
    for _, cost in ipairs(redis.call('HMGET', KEYS[3], unpack(part))) do freed = freed + (tonumber(cost) or 0) end
    redis.call('HDEL', KEYS[3], unpack(part))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('HINCRBY', KEYS[3], '', -freed)
end
local function put(cost)
  local old_cost = tonumber(redis.call('HGET', KEYS[3], ARGV[1])) or 0
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], cost)
  redis.call('HINCRBY', KEYS[3], '', cost - old_cost)
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
"""

# KEYS: record, index, sizes. ARGV: key, record, window (ms), overhead, max keys, max bytes, reserve.
# Returns {1, record} (held), {0, keys, bytes, ms until the oldest expires} (refused), or nil (ours).
CLAIM = (
    _PRELUDE
    + """
local held = redis.call('GET', KEYS[1])
if held then return {1, held} end
local cost = math.max(tonumber(ARGV[7]), #ARGV[1] + #ARGV[2] + tonumber(ARGV[4]))
local keys = redis.call('ZCARD', KEYS[2])
if keys > 0 then
  local used = tonumber(redis.call('HGET', KEYS[3], '')) or 0
  if keys >= tonumber(ARGV[5]) or used + cost > tonumber(ARGV[6]) then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, keys, used, tonumber(oldest[2]) - now}
  end
end
put(cost)
return false
"""
)

# KEYS: record, index, sizes. ARGV: key, record, window (ms), overhead. The outcome: it counts its real size.
SET = _PRELUDE + "put(#ARGV[1] + #ARGV[2] + tonumber(ARGV[4]))\n"

# KEYS: record, index, sizes. ARGV: key.
DROP = (
    _PRELUDE
    + """
redis.call('DEL', KEYS[1])
local cost = tonumber(redis.call('HGET', KEYS[3], ARGV[1]))
if cost then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[3], '', -cost)
  redis.call('ZREM', KEYS[2], ARGV[1])
end
"""
)


class IdempotencyRecords:
    """Each record lives ``window`` seconds after its last write; each caller within ``budget``."""

    def __init__(self, link: Link, *, window: float, budget: KeyBudget) -> None:
        self._link = link
        self._window_ms = max(1, round(window * 1000))
        self._budget = budget

    def _keys(self, caller: str, key: str) -> tuple[str, str, str]:
        keys = self._link.keys
        return keys.idempotency(caller, key), keys.idempotency_index(caller), keys.idempotency_costs(caller)

    async def claim(self, caller: str, key: str, record: str) -> str | None:
        budget = self._budget
        try:
            answer = await self._link.client().eval(
                CLAIM, 3, *self._keys(caller, key), key, record, self._window_ms, budget.overhead, budget.keys,
                budget.bytes, budget.reserve,
            )  # fmt: skip
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None
        if answer is None:
            return None
        if int(answer[0]) == 1:
            return _text(answer[1])
        raise TooManyKeys(int(answer[1]), int(answer[2]), int(answer[3]) / 1000)

    async def get(self, caller: str, key: str) -> str | None:
        try:
            return _text(await self._link.client().get(self._keys(caller, key)[0]))
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    async def set(self, caller: str, key: str, record: str) -> None:
        try:
            await self._link.client().eval(
                SET, 3, *self._keys(caller, key), key, record, self._window_ms, self._budget.overhead
            )
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    async def drop(self, caller: str, key: str) -> None:
        try:
            await self._link.client().eval(DROP, 3, *self._keys(caller, key), key)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
