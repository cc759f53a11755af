"""Idempotency records in Redis: ``wsb:idem:{key}``, one string each, expiring with the window.

A claim is ``SET NX`` (of two instances claiming at once exactly one wins) followed, when it
lost, by a ``GET`` of the winner's record; both in one round trip (a small script).
"""

from __future__ import annotations

from redis.exceptions import RedisError

from .keys import IDEMPOTENCY_KEY
from .link import Link, unavailable

__all__ = ["IdempotencyRecords"]

CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
return redis.call('GET', KEYS[1])
"""


class IdempotencyRecords:
    """Each record lives ``window`` seconds after its last write."""

    def __init__(self, link: Link, *, window: float) -> None:
        self._link = link
        self._window_ms = max(1, round(window * 1000))

    async def claim(self, key: str, record: str) -> str | None:
        try:
            held = await self._link.client().eval(CLAIM, 1, IDEMPOTENCY_KEY + key, record, self._window_ms)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None
        return _text(held)

    async def get(self, key: str) -> str | None:
        try:
            return _text(await self._link.client().get(IDEMPOTENCY_KEY + key))
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    async def set(self, key: str, record: str) -> None:
        try:
            await self._link.client().set(IDEMPOTENCY_KEY + key, record, px=self._window_ms)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    async def drop(self, key: str) -> None:
        try:
            await self._link.client().delete(IDEMPOTENCY_KEY + key)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value
