"""Connect history: one entry per connection that opened and closed, bounded, with the clock passed in.

An entry says when the connection opened, from where, on which instance, with which token
version and protocol, when it closed, with which close code and reason, and who closed it
(``relay`` when the relay sent the first close frame, ``peer`` otherwise; 1006 when the
peer vanished without one). Entries are built once, at close, so the message path never
pays for them. :class:`HistoryBook` keeps them in memory (the embedded broker); the Redis
broker keeps the same entries in a capped, expiring list per id (``wsb:hist:{id}``).
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any

from .expiring import ByLastWrite
from .timefmt import iso

__all__ = ["LOST_CLOSED_BY", "MAX_REASON_CHARS", "HistoryBook", "close_entry", "lost_entry"]

#: RFC 6455 §5.5: a control frame's payload is at most 125 bytes, so a close reason fits in 123;
#: anything longer did not come from a WebSocket and is cut.
MAX_REASON_CHARS = 123


def close_entry(
    presence: dict[str, Any], *, connected_at: float, closed_at: float, code: int | None, reason: str, by_relay: bool
) -> dict[str, Any]:
    """The history entry of a closed connection, from its presence record and how it ended.

    ``code`` None (the peer sent a close frame without a code) is recorded as 1005, as
    RFC 6455 §7.1.5 says an endpoint reports it.
    """
    return {
        "connected_at": iso(connected_at),
        "closed_at": iso(closed_at),
        "duration_seconds": round(max(0.0, closed_at - connected_at), 3),
        "role": presence.get("role"),
        "instance": presence.get("instance"),
        "remote": presence.get("remote"),
        "token": presence.get("token"),
        "token_version": presence.get("token_version"),
        "protocol": presence.get("protocol", 1),
        "messages_in": presence.get("messages_in", 0),
        "messages_out": presence.get("messages_out", 0),
        "code": 1005 if code is None else int(code),
        "reason": (reason or "")[:MAX_REASON_CHARS],
        "closed_by": "relay" if by_relay else "peer",
    }


#: ``closed_by`` of a connection whose instance was lost (it crashed or was cut off for longer
#: than the presence TTL): nobody saw it close.
LOST_CLOSED_BY = "instance lost"


def lost_entry(presence: dict[str, Any], lost_at: float) -> dict[str, Any]:
    """The history entry of a connection whose instance's presence expired (crash, partition):
    code 1006 (no close frame seen), closed when the loss was noticed."""
    try:
        opened = datetime.fromisoformat(str(presence.get("connected_since"))).timestamp()
    except ValueError:
        opened = lost_at
    entry = close_entry(
        presence,
        connected_at=opened,
        closed_at=lost_at,
        code=1006,
        reason=f"instance {presence.get('instance')} lost: its heartbeat stopped and its presence expired",
        by_relay=False,
    )
    entry["closed_by"] = LOST_CLOSED_BY
    return entry


class HistoryBook:
    """Per-id connect histories in memory: at most ``per_id`` entries for each of ``max_ids`` ids,
    each id forgotten ``ttl`` seconds after its last entry (the Redis list's EXPIRE, here)."""

    __slots__ = ("per_id", "_books")

    def __init__(self, per_id: int, max_ids: int, ttl: float) -> None:
        if per_id < 1:
            raise ValueError("per_id must be at least 1")
        self.per_id = per_id
        #: id -> newest-first entries.
        self._books: ByLastWrite[deque[dict[str, Any]]] = ByLastWrite(max_ids, ttl)

    def add(self, client_id: str, entry: dict[str, Any], now: float) -> None:
        entries = self._books.pop(client_id, now)
        if entries is None:
            entries = deque(maxlen=self.per_id)
        entries.appendleft(entry)
        self._books.put(client_id, entries, now)

    def entries(self, client_id: str, limit: int, now: float) -> list[dict[str, Any]]:
        """Newest first, at most ``limit``."""
        found = self._books.get(client_id, now)
        if found is None or limit < 1:
            return []
        return list(found)[:limit]

    def __len__(self) -> int:
        return len(self._books)
