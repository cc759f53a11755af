"""A budget of live idempotency keys per caller, so that keyed commands cannot fill the broker. No I/O.

Each caller (a named token; the unnamed tokens together) holds at most ``keys`` live keys and
``bytes`` of records. A key whose outcome is not written yet counts :attr:`KeyBudget.reserve`
bytes (the largest outcome a command usually leaves), a written one its key and record's length
plus :attr:`KeyBudget.overhead` (what Redis spends on it besides): the bytes bound the memory.
Beyond the budget a NEW key is refused (:class:`TooManyKeys`); a live key is never forgotten
before its window ends (a retry within the window must get its first outcome), and a caller
without live keys may always claim one. Expired keys free the budget.

:class:`KeyBook` is the embedded broker's book; the Redis broker runs the same rule in one
script (appliance/brokers/redis/idempotency.py). Time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["DEFAULT_KEY_BUDGET", "KeyBook", "KeyBudget", "TooManyKeys"]


@dataclass(frozen=True, slots=True)
class KeyBudget:
    keys: int = 10_000
    bytes: int = 16 * 1024 * 1024
    #: Bytes a key counts until its outcome is written (then its real size).
    reserve: int = 65536 + 1024
    #: Bytes Redis spends on a key besides its name and record: the string's header, its index and
    #: size entries (measured ~340 for 1,000 small records: 486 KB in all for 150 B of names and records each).
    overhead: int = 384


DEFAULT_KEY_BUDGET = KeyBudget()


class TooManyKeys(Exception):
    """A new key refused: the caller holds its budget of live keys (``keys`` of them, ``used`` bytes).

    ``retry_after``: seconds until its oldest key expires and frees room.
    """

    def __init__(self, keys: int, used: int, retry_after: float) -> None:
        super().__init__(f"{keys} live keys, {used} bytes; the oldest expires in {retry_after:.1f} s")
        self.keys = keys
        self.used = used
        self.retry_after = max(0.0, retry_after)


class _Caller:
    __slots__ = ("entries", "used")

    def __init__(self) -> None:
        #: key -> (record, when it expires, bytes it counts); the soonest to expire first.
        self.entries: OrderedDict[str, tuple[str, float, int]] = OrderedDict()
        self.used = 0


class KeyBook:
    """Every caller's live keys, each kept ``window`` seconds after its last write."""

    __slots__ = ("budget", "window", "_callers")

    def __init__(self, budget: KeyBudget, window: float) -> None:
        self.budget = budget
        self.window = window
        self._callers: dict[str, _Caller] = {}

    def claim(self, caller: str, key: str, record: str, now: float) -> str | None:
        """The record under ``key``; None when there was none and ``record`` is now there (or :class:`TooManyKeys`)."""
        held = self.get(caller, key, now)
        if held is not None:
            return held
        book = self._callers.get(caller)
        cost = max(self.budget.reserve, self._cost(key, record))
        # A caller without live keys may always claim one (even one larger than its byte budget).
        if book is not None and (len(book.entries) >= self.budget.keys or book.used + cost > self.budget.bytes):
            oldest = next(iter(book.entries.values()))
            raise TooManyKeys(len(book.entries), book.used, oldest[1] - now)
        self._put(caller, key, record, now, cost)
        return None

    def get(self, caller: str, key: str, now: float) -> str | None:
        book = self._expire(caller, now)
        found = None if book is None else book.entries.get(key)
        return None if found is None else found[0]

    def set(self, caller: str, key: str, record: str, now: float) -> None:
        """The outcome under ``key``: it counts its real size now, for ``window`` more seconds."""
        self._put(caller, key, record, now, self._cost(key, record))

    def drop(self, caller: str, key: str, now: float) -> None:
        book = self._expire(caller, now)
        if book is not None:
            found = book.entries.pop(key, None)
            if found is not None:
                book.used -= found[2]

    def usage(self, caller: str, now: float) -> tuple[int, int]:
        """(live keys, bytes counted) of ``caller``."""
        book = self._expire(caller, now)
        return (0, 0) if book is None else (len(book.entries), book.used)

    def _cost(self, key: str, record: str) -> int:
        return len(key.encode()) + len(record.encode()) + self.budget.overhead

    def _put(self, caller: str, key: str, record: str, now: float, cost: int) -> None:
        book = self._expire(caller, now) or self._callers.setdefault(caller, _Caller())
        old = book.entries.pop(key, None)
        if old is not None:
            book.used -= old[2]
        book.entries[key] = (record, now + self.window, cost)  # The latest write expires last.
        book.used += cost

    def _expire(self, caller: str, now: float) -> _Caller | None:
        book = self._callers.get(caller)
        if book is None:
            return None
        entries = book.entries
        while entries:
            key, (_, until, cost) = next(iter(entries.items()))
            if until > now:
                return book
            del entries[key]
            book.used -= cost
        del self._callers[caller]
        return None
