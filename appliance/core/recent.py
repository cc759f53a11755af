"""Recent commands of one client: what was handed to its socket, by whom, and what came back. No I/O.

The instance that holds a client sees every command written to it (whatever path it took:
a WebSocket controller, ``POST /api/v1/commands``, the dashboard, a broadcast, the offline
queue) and every reply it matches (version 2 by ``reply_to``, version 1 by FIFO order), so
it keeps the log there, in memory, in a ring of the last ``size`` commands. Recording is
one ``deque.append`` of a tuple on the version-1 hot path; nothing is formatted until
someone reads (:meth:`CommandLog.view`). Texts are cut to ``max_chars`` when recorded, so a
client's log holds at most ``size * (2 * max_chars)`` characters of text.

:class:`ClosedLogs` keeps the logs of clients that disconnected for ``ttl`` seconds (at most
``max_ids`` of them), so a reconnect on the same instance continues its log and a detail
page still shows the last commands of a client that has just left.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import msgspec

from .expiring import ByLastWrite
from .timefmt import iso

__all__ = ["ClosedLogs", "CommandLog", "Tracked", "cut"]

#: Marks a text that was cut to the length cap.
ELLIPSIS = "…"


def cut(text: str, max_chars: int) -> str:
    """``text``, or its first ``max_chars`` characters and an ellipsis."""
    return text if len(text) <= max_chars else text[:max_chars] + ELLIPSIS


class Tracked(msgspec.Struct, gc=False):
    """A command with an id whose reply the relay can match: its outcome is filled in later.

    ``key`` is whatever identifies it to the matcher (the routed command object itself);
    it is compared by identity and never shown. A Struct: built once per command with an
    id, in half the time of a class with ``__slots__`` and an ``__init__``.
    """

    at: float
    controller: str
    id: Any
    message: str
    deadline: float
    key: object
    outcome: str = ""  # "" while waiting; "replied" or "error" once known
    reply: str = ""
    replied_at: float = 0.0  # rtt_ms is worked out when somebody reads (round(x, 3) costs 0.26 us)
    detail: str = ""


class CommandLog:
    """The last ``size`` commands handed to one client's socket, oldest first.

    Entries are ``(at, controller, id, message)`` tuples for commands whose reply cannot
    be matched (no id, or a broadcast), and :class:`Tracked` objects for the rest.
    """

    __slots__ = ("entries", "max_chars")

    def __init__(self, size: int, max_chars: int) -> None:
        if size < 1 or max_chars < 1:
            raise ValueError("size and max_chars must be at least 1")
        self.entries: deque[tuple[float, str, Any, str] | Tracked] = deque(maxlen=size)
        self.max_chars = max_chars

    def untracked(self, now: float, controller: str, command_id: Any, message: str) -> None:
        """A command no reply will be matched to (the version-1 hot path: one append)."""
        if len(message) > self.max_chars:
            message = cut(message, self.max_chars)
        self.entries.append((now, controller, command_id, message))

    def tracked(
        self, now: float, controller: str, command_id: Any, message: str, deadline: float, key: object
    ) -> Tracked:
        """A command whose reply the relay will match (an id, sent to this one client); its entry."""
        if len(message) > self.max_chars:
            message = cut(message, self.max_chars)
        entry = Tracked(now, controller, command_id, message, deadline, key)
        self.entries.append(entry)
        return entry

    def failed(self, now: float, controller: str, command_id: Any, message: str, detail: str) -> None:
        """A command that never reached the socket (line full, client disconnecting)."""
        entry = Tracked(now, controller, command_id, cut(message, self.max_chars), now, None)
        entry.outcome, entry.detail = "error", detail
        self.entries.append(entry)

    def replied(self, key: object, now: float, text: str) -> bool:
        """The reply to the command ``key`` arrived; False when it is no longer in the ring."""
        for entry in reversed(self.entries):  # Replies answer recent commands: newest first.
            if type(entry) is Tracked and entry.key is key:
                return self.answered(entry, now, text)
        return False

    def answered(self, entry: Tracked, now: float, text: str) -> bool:
        """The reply to ``entry`` (as :meth:`tracked` returned it) arrived; False if it had an outcome.

        The caller kept the entry, so no search: if the ring dropped it meanwhile, nobody sees this.
        """
        if entry.outcome:
            return False
        entry.outcome = "replied"
        if len(text) > self.max_chars:
            text = cut(text, self.max_chars)
        entry.reply = text
        entry.replied_at = now
        entry.key = None  # The matcher's object is not kept alive by the log.
        return True

    def view(self, now: float, limit: int | None = None) -> list[dict[str, Any]]:
        """Newest first, at most ``limit``, as plain dicts (JSON-ready); timeouts are decided here."""
        shown: list[dict[str, Any]] = []
        for entry in reversed(self.entries):
            if limit is not None and len(shown) >= limit:
                break
            if type(entry) is tuple:
                at, controller, command_id, message = entry
                shown.append(
                    {
                        "at": iso(at),
                        "controller": controller,
                        "id": command_id,
                        "message": message,
                        "outcome": "uncorrelated",
                    }
                )
                continue
            assert isinstance(entry, Tracked)
            outcome = entry.outcome or ("timeout" if now >= entry.deadline else "pending")
            item: dict[str, Any] = {
                "at": iso(entry.at),
                "controller": entry.controller,
                "id": entry.id,
                "message": entry.message,
                "outcome": outcome,
            }
            if outcome == "replied":
                item["reply"] = entry.reply
                item["rtt_ms"] = round(max(0.0, entry.replied_at - entry.at) * 1000, 3)
            elif outcome == "error":
                item["detail"] = entry.detail
            shown.append(item)
        return shown

    def __len__(self) -> int:
        return len(self.entries)


class ClosedLogs:
    """Logs of clients that disconnected, each forgotten ``ttl`` seconds after it closed,
    at most ``max_ids`` (the one closed longest ago goes first)."""

    __slots__ = ("_logs",)

    def __init__(self, max_ids: int, ttl: float) -> None:
        self._logs: ByLastWrite[CommandLog] = ByLastWrite(max_ids, ttl)

    def keep(self, client_id: str, log: CommandLog, now: float) -> None:
        if len(log):
            self._logs.put(client_id, log, now)
        else:
            self._logs.pop(client_id, now)

    def take(self, client_id: str, now: float) -> CommandLog | None:
        """The id reconnected here: its log continues on the new connection."""
        return self._logs.pop(client_id, now)

    def get(self, client_id: str, now: float) -> CommandLog | None:
        return self._logs.get(client_id, now)

    def __len__(self) -> int:
        return len(self._logs)
