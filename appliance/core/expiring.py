"""Values by id that are forgotten a while after their last write, and beyond a count. No I/O.

The embedded broker's connect histories and the recent commands of clients that left
both need this (the Redis broker has EXPIRE): one implementation, clock passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["ByLastWrite"]

V = TypeVar("V")


class ByLastWrite(Generic[V]):
    """Each id's value, forgotten ``ttl`` seconds after it was last written; at most ``max_ids``
    of them (the id written longest ago goes first)."""

    __slots__ = ("max_ids", "ttl", "_items")

    def __init__(self, max_ids: int, ttl: float) -> None:
        if max_ids < 1 or ttl <= 0:
            raise ValueError("max_ids must be at least 1 and ttl positive")
        self.max_ids = max_ids
        self.ttl = ttl
        #: id -> (time of the last write, value); written longest ago first.
        self._items: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def put(self, key: str, value: V, now: float) -> None:
        """Write ``value`` for ``key`` (it becomes the newest), then forget what is too old or too many."""
        self._items.pop(key, None)
        self._items[key] = (now, value)
        self._expire(now)
        while len(self._items) > self.max_ids:
            self._items.popitem(last=False)

    def get(self, key: str, now: float) -> V | None:
        self._expire(now)
        found = self._items.get(key)
        return found[1] if found is not None else None

    def pop(self, key: str, now: float) -> V | None:
        self._expire(now)
        found = self._items.pop(key, None)
        return found[1] if found is not None else None

    def _expire(self, now: float) -> None:
        items = self._items
        while items:
            key, (at, _) = next(iter(items.items()))
            if now - at < self.ttl:
                return
            del items[key]

    def __len__(self) -> int:
        return len(self._items)
