"""Who may connect, cluster-wide: whether an id is known, new-id counters and the ban list.

- ``wsb:win:<key>``: a counter created with its window's expiry (``SET NX PX``), then
  ``INCR``; one script on one key, so it holds on a Cluster too.
- ``wsb:{bans}``: a hash of ban key -> ``"<until> <record>"``; ``wsb:{bans}:version`` moves
  on every change, so a handshake reads one small value and the list only after a change.
  Both carry the hash tag ``{bans}`` (one slot on a Cluster, harmless elsewhere). Expired
  bans are skipped on read and deleted at the next change; the list is small (operators write it).
"""

from __future__ import annotations

import time

from redis.exceptions import RedisError

from ...core.newids import WindowCount
from .history import HistoryLog
from .keys import PREFIX
from .link import Link, unavailable

__all__ = ["AdmissionRecords", "BANS_KEY", "BANS_VERSION_KEY", "WINDOW_KEY"]

WINDOW_KEY = f"{PREFIX}win:"
BANS_KEY = f"{PREFIX}{{bans}}"
BANS_VERSION_KEY = f"{PREFIX}{{bans}}:version"


#: One counter: created with the window's expiry if absent (the window starts at the first count), then one more.
COUNT = """
redis.call('SET', KEYS[1], 0, 'PX', ARGV[1], 'NX')
local count = redis.call('INCR', KEYS[1])
return {count, redis.call('PTTL', KEYS[1])}
"""
#: Put (ARGV[1] the field, ARGV[2] the value) or drop (no ARGV[2]) one ban, and move the version; returns 1 if it was there.
CHANGE = """
local there = redis.call('HEXISTS', KEYS[1], ARGV[1])
if ARGV[2] then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) else redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('INCR', KEYS[2])
return there
"""
#: The version, and the list unless the version is ARGV[1].
READ = """
local version = redis.call('GET', KEYS[2]) or '0'
if version == ARGV[1] then return {version} end
return {version, redis.call('HGETALL', KEYS[1])}
"""


class AdmissionRecords:
    def __init__(self, link: Link, history: HistoryLog) -> None:
        self._link = link
        self._history = history

    async def id_known(self, client_id: str) -> bool:
        keys = self._link.keys
        try:
            # The owner and history of one id share a slot on a Cluster: one EXISTS of both.
            found = await self._link.client().exists(keys.owner(client_id), keys.history(client_id))
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None
        # An entry of this instance not written yet (a close moments ago) makes the id known too.
        return bool(found) or any(i == client_id for i, _ in self._history.unwritten())

    async def count_in_window(self, key: str, window: float) -> WindowCount:
        try:
            count, ttl = await self._link.client().eval(COUNT, 1, WINDOW_KEY + key, max(1, round(window * 1000)))
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None
        return WindowCount(int(count), int(ttl) / 1000 if int(ttl) > 0 else window)

    async def put_ban(self, key: str, record: str, until: float) -> None:
        redis = self._link.client()
        try:
            expired = _expired(await redis.hgetall(BANS_KEY), time.time())
            if expired:
                await redis.hdel(BANS_KEY, *expired)
            await redis.eval(CHANGE, 2, BANS_KEY, BANS_VERSION_KEY, key, f"{until!r} {record}")
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None

    async def drop_ban(self, key: str) -> bool:
        try:
            there = await self._link.client().eval(CHANGE, 2, BANS_KEY, BANS_VERSION_KEY, key)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None
        return bool(there)

    async def bans(self, seen: int | None) -> tuple[int, dict[str, str] | None]:
        redis = self._link.client()
        try:
            if seen is not None and int(await redis.get(BANS_VERSION_KEY) or 0) == seen:
                return seen, None  # One plain GET per handshake while the list is unchanged.
            answer = await redis.eval(READ, 2, BANS_KEY, BANS_VERSION_KEY, "" if seen is None else seen)
        except (RedisError, OSError) as exc:
            raise unavailable(exc) from None
        version = int(_text(answer[0]))
        if len(answer) == 1:
            return version, None
        flat = answer[1]
        now = time.time()
        found: dict[str, str] = {}
        for field, value in zip(flat[::2], flat[1::2], strict=True):
            until, _, record = _text(value).partition(" ")
            if float(until) > now:
                found[_text(field)] = record
        return version, found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _expired(raw: dict[bytes | str, bytes | str], now: float) -> list[bytes | str]:
    return [field for field, value in raw.items() if float(_text(value).partition(" ")[0]) <= now]
