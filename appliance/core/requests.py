"""Bookkeeping for commands with an id: deadlines, reply matching, the offline queue. No I/O.

Three plain objects, each fed with events and a clock reading:

- :class:`PendingTable` lives on the instance of whoever sent the command (a
  controller's connection or an HTTP request). It holds each command until its one
  final outcome: a reply, an error, or its deadline (``timeout``).
- :class:`V1Matcher` lives on the instance of a version-1 client. Such a client
  cannot say which command it answers, so while one command with an id is in flight
  to it, its next message is that command's reply; later commands with an id wait
  behind it in a bounded line and are handed over one at a time.
- :class:`OfflineQueue` keeps commands for a client that is not connected, in order,
  until they expire, and remembers (controller, id) so a repeated command is never
  delivered twice. The Redis broker keeps the same records in Redis lists; this is
  the embedded broker's store and the model both follow.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

import msgspec

from .protocol import ErrorCode
from .protocol_v2 import CommandId

__all__ = [
    "Advance",
    "Enqueued",
    "Held",
    "OfflineQueue",
    "Pending",
    "PendingTable",
    "Routed",
    "V1Matcher",
]


class Routed(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """A command with an id on its way to a client's instance, with where to report its outcome.

    ``origin`` names the sender's instance, where its outcome goes, and ``waiter`` the key of
    its entry in that instance's :class:`PendingTable` (a controller connection's key, or an
    HTTP waiter's). Deadlines cross instances as a duration, so clocks of different machines
    never need to agree. Encoded as ``reply_to`` and ``owner`` (the names of queued entries
    already in Redis); the wire's ``reply_to`` is a command id, and only that.
    """

    controller: str
    id: CommandId
    message: str
    origin: str = msgspec.field(name="reply_to")
    waiter: str = msgspec.field(name="owner")
    timeout_ms: int
    #: Sent with ``"queue": true``: if its client leaves before it is handed over, it is queued, not refused.
    queue: bool = False

    @property
    def closing_error(self) -> ErrorCode:
        """Its client's connection is closing, so it was never handed over: a queueable command is
        queued by its sender for the client's return (``target_offline``), any other one failed."""
        return ErrorCode.TARGET_OFFLINE if self.queue else ErrorCode.DELIVERY_FAILED


#: A command waiting in a version-1 client's line with less time than this left is not handed
#: over: its sender (whose deadline may come first, on another instance) has told its caller or
#: is about to tell it that the command never reached the client, and that must stay true.
SEND_MARGIN_SECONDS = 0.25

#: Stale deadline-heap entries tolerated beyond twice the live ones before the heap is rebuilt.
_COMPACT_SLACK = 1024


# --- the sender's side -------------------------------------------------------------------


class Pending(msgspec.Struct, gc=False):
    """One command waiting for its outcome (a Struct: built in half the time of a dataclass, once per command)."""

    #: Who waits for the outcome: a controller connection's key or an HTTP waiter's.
    waiter: str
    id: CommandId
    target: str
    started: float
    deadline: float
    delivered: bool = False

    @property
    def key(self) -> tuple[str, CommandId]:
        return (self.waiter, self.id)


class PendingTable:
    """Commands in flight, each with a deadline; every entry leaves by exactly one outcome."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, CommandId], Pending] = {}
        self._deadlines: list[tuple[float, int, tuple[str, CommandId]]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, waiter: str, command_id: CommandId, target: str, now: float, timeout_ms: int) -> Pending | None:
        """Start waiting; None when ``waiter`` already has ``command_id`` in flight."""
        key = (waiter, command_id)
        if key in self._entries:
            return None
        pending = Pending(waiter, command_id, target, now, now + timeout_ms / 1000)
        self._entries[key] = pending
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(self._entries) + _COMPACT_SLACK:
            deadlines = self._deadlines = self._compacted()
        heapq.heappush(deadlines, (pending.deadline, next(self._seq), key))
        return pending

    def _compacted(self) -> list[tuple[float, int, tuple[str, CommandId]]]:
        """The deadline heap without the entries of commands that already left.

        Replies remove entries long before their deadline, so without this the heap would
        hold every command of the last ``timeout_ms`` (a minute of traffic at the default
        ceiling): memory, and garbage-collector work over it. Rebuilt when it is more than
        twice the live entries, so the cost per command stays constant.
        """
        entries = self._entries
        live = [
            entry for entry in self._deadlines if (p := entries.get(entry[2])) is not None and p.deadline == entry[0]
        ]
        heapq.heapify(live)
        return live

    def get(self, waiter: str, command_id: CommandId) -> Pending | None:
        return self._entries.get((waiter, command_id))

    def delivered(self, waiter: str, command_id: CommandId) -> Pending | None:
        """The command reached the target's socket; it still waits for a reply or its deadline.

        None when the entry is gone (already timed out) or was already reported delivered,
        so each status frame is sent once.
        """
        pending = self._entries.get((waiter, command_id))
        if pending is None or pending.delivered:
            return None
        pending.delivered = True
        return pending

    def finish(self, waiter: str, command_id: CommandId) -> Pending | None:
        """The final outcome (reply or error) arrived: the entry leaves; None if it already left."""
        return self._entries.pop((waiter, command_id), None)

    def expire(self, now: float) -> list[Pending]:
        """Entries whose deadline has passed, removed: each gets a ``timeout``."""
        expired = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, key = heapq.heappop(deadlines)
            pending = self._entries.get(key)
            if pending is not None and pending.deadline <= now:
                del self._entries[key]
                expired.append(pending)
        return expired

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work (entries that left early are skipped lazily)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2] not in self._entries:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def drop_waiter(self, waiter: str) -> list[Pending]:
        """The waiter went away (controller disconnected): forget its entries without outcomes."""
        gone = [key for key in self._entries if key[0] == waiter]
        return [self._entries.pop(key) for key in gone]


# --- a version-1 client's side -----------------------------------------------------------


@dataclass(slots=True)
class _Line:
    in_flight: Routed | None = None
    in_flight_deadline: float = 0.0
    waiting: deque[tuple[Routed, float]] = field(default_factory=deque)


class Held(enum.Enum):
    """What :meth:`V1Matcher.submit` decided."""

    SEND = "send"  # hand it to the socket now: it is the one in flight
    WAIT = "wait"  # another command is in flight: it waits its turn
    FULL = "full"  # the line is full: refuse it


@dataclass(frozen=True, slots=True)
class Advance:
    """The outcome of a step in one client's line.

    ``replied`` is the command the client's message answers (if one was in flight);
    ``send`` is the next command to hand to the socket now; ``expired`` were waiting
    and passed their deadline unsent (their senders time them out on their own).
    """

    replied: Routed | None = None
    send: Routed | None = None
    expired: tuple[Routed, ...] = ()


class V1Matcher:
    """FIFO reply matching for version-1 clients: one command with an id in flight per client."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._lines: dict[str, _Line] = {}
        # (deadline, seq, client) of each command put in flight; stale entries are skipped when popped,
        # so a timer tick costs O(expired), not O(clients).
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def _fly(self, client: str, line: _Line, routed: Routed, deadline: float) -> None:
        line.in_flight, line.in_flight_deadline = routed, deadline
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(self._lines) + _COMPACT_SLACK:  # Stale: answered before their deadline.
            deadlines = self._deadlines = [entry for entry in deadlines if self._current(entry)]
            heapq.heapify(deadlines)
        heapq.heappush(deadlines, (deadline, next(self._seq), client))

    def has_line(self, client: str) -> bool:
        """Whether ``client`` has a command in flight (then its next message is a reply)."""
        return client in self._lines

    def in_flight(self, client: str) -> Routed | None:
        line = self._lines.get(client)
        return line.in_flight if line else None

    def deadline(self, client: str) -> float | None:
        """When the command in flight to ``client`` stops waiting for its reply."""
        line = self._lines.get(client)
        return line.in_flight_deadline if line is not None and line.in_flight is not None else None

    def waiting(self, client: str) -> int:
        line = self._lines.get(client)
        return len(line.waiting) if line else 0

    def submit(self, client: str, routed: Routed, now: float) -> Held:
        line = self._lines.setdefault(client, _Line())
        deadline = now + routed.timeout_ms / 1000
        if line.in_flight is None:
            self._fly(client, line, routed, deadline)
            return Held.SEND
        if len(line.waiting) >= self.max_waiting:
            return Held.FULL
        line.waiting.append((routed, deadline))
        return Held.WAIT

    def client_message(self, client: str, now: float) -> Advance:
        """The client sent a message: it answers the command in flight, if any."""
        line = self._lines.get(client)
        if line is None or line.in_flight is None:
            return Advance()
        replied = line.in_flight
        return self._next(client, line, now, replied)

    def expire(self, now: float) -> dict[str, Advance]:
        """Commands in flight whose deadline passed stop waiting for a reply; the next one goes."""
        advanced = {}
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, client = heapq.heappop(deadlines)
            line = self._lines.get(client)
            if line is not None and line.in_flight is not None and line.in_flight_deadline <= now:
                advanced[client] = self._next(client, line, now, None)
        return advanced

    def next_deadline(self) -> float | None:
        deadlines = self._deadlines
        while deadlines and not self._current(deadlines[0]):
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def _current(self, entry: tuple[float, int, str]) -> bool:
        line = self._lines.get(entry[2])
        return line is not None and line.in_flight is not None and line.in_flight_deadline == entry[0]

    def disconnect(self, client: str) -> list[Routed]:
        """The client left: the commands still waiting were never handed over (the one in flight was)."""
        line = self._lines.pop(client, None)
        return [routed for routed, _ in line.waiting] if line else []

    def _next(self, client: str, line: _Line, now: float, replied: Routed | None) -> Advance:
        expired = []
        line.in_flight = None
        while line.waiting:
            routed, deadline = line.waiting.popleft()
            if deadline <= now + SEND_MARGIN_SECONDS:
                expired.append(routed)
                continue
            self._fly(client, line, routed, deadline)
            break
        if line.in_flight is None:
            del self._lines[client]
        return Advance(replied, line.in_flight, tuple(expired))


# --- commands for clients that are not connected -----------------------------------------


class Enqueued(enum.Enum):
    """What :meth:`OfflineQueue.enqueue` did."""

    QUEUED = "queued"
    ALREADY_QUEUED = "already_queued"  # same (controller, id) waits already: not queued twice
    ALREADY_DELIVERED = "already_delivered"  # same (controller, id) was delivered: never again
    FULL = "full"


@dataclass(slots=True)
class _Queued:
    routed: Routed
    expires: float
    gone: bool = False  # Taken or expired; still in its deque or the deadline heap until swept.


class OfflineQueue:
    """Per-target queues of commands for absent clients, bounded, ordered, expiring, de-duplicated.

    Every operation is O(log n) (deadlines and de-duplication marks in heaps), never a scan of
    everything queued: 10,000 queued commands once took seconds to add (issue 20). ``max_total``
    bounds the commands queued for all targets together.
    """

    def __init__(self, max_per_target: int, remember_seconds: float, max_total: int = 100_000) -> None:
        self.max_per_target = max_per_target
        self.max_total = max_total
        #: How long a delivered (controller, id) is remembered, so a late repeat is not delivered again.
        self.remember_seconds = remember_seconds
        self._queues: dict[str, deque[_Queued]] = {}
        self._live: dict[str, int] = {}  # Per target: entries neither taken nor expired.
        self._total = 0
        self._deadlines: list[tuple[float, int, str, _Queued]] = []
        self._order = itertools.count()
        # (controller, id) -> (delivered?, forget at): a repeat within the command's lifetime is recognised.
        self._seen: dict[tuple[str, CommandId], tuple[bool, float]] = {}
        self._forget: list[tuple[float, int, tuple[str, CommandId]]] = []

    def __len__(self) -> int:
        return self._total

    def enqueue(self, target: str, routed: Routed, now: float, *, requeue: bool = False) -> Enqueued:
        """Queue ``routed``; ``requeue``: it was taken from the queue but never handed over, so again."""
        self.expire(now)
        key = (routed.controller, routed.id)
        seen = self._seen.get(key)
        if seen is not None and not (requeue and seen[0]):
            return Enqueued.ALREADY_DELIVERED if seen[0] else Enqueued.ALREADY_QUEUED
        if self._live.get(target, 0) >= self.max_per_target or self._total >= self.max_total:
            return Enqueued.FULL
        expires = now + routed.timeout_ms / 1000
        item = _Queued(routed, expires)
        self._queues.setdefault(target, deque()).append(item)
        self._live[target] = self._live.get(target, 0) + 1
        self._total += 1
        heapq.heappush(self._deadlines, (expires, next(self._order), target, item))
        self._remember(key, False, expires)
        return Enqueued.QUEUED

    def _remember(self, key: tuple[str, CommandId], delivered: bool, forget_at: float) -> None:
        self._seen[key] = (delivered, forget_at)
        heapq.heappush(self._forget, (forget_at, next(self._order), key))

    def take(self, target: str, now: float) -> list[Routed]:
        """The target connected: its unexpired commands, oldest first, now marked delivered."""
        queue = self._queues.pop(target, None)
        self._total -= self._live.pop(target, 0)
        if not queue:
            return []
        taken = []
        for item in queue:
            if item.gone:
                continue
            item.gone = True  # Its deadline entry is now stale.
            if item.expires > now:
                taken.append(item.routed)
                forget_at = max(item.expires, now + self.remember_seconds)
                self._remember((item.routed.controller, item.routed.id), True, forget_at)
        return taken

    def expire(self, now: float) -> list[Routed]:
        """Drop what outlived its deadline (its sender reports the timeout) and old de-duplication marks."""
        expired = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, target, item = heapq.heappop(deadlines)
            if item.gone:
                continue  # Taken already.
            item.gone = True
            expired.append(item.routed)
            self._total -= 1
            live = self._live[target] - 1
            queue = self._queues[target]
            if live:
                self._live[target] = live
                while queue and queue[0].gone:  # Entries expired out of order are swept as they reach the front.
                    queue.popleft()
            else:
                del self._live[target], self._queues[target]
        forget = self._forget
        while forget and forget[0][0] <= now:
            forget_at, _, key = heapq.heappop(forget)
            seen = self._seen.get(key)
            if seen is not None and seen[1] == forget_at:  # Else renewed since: a later entry forgets it.
                del self._seen[key]
        return expired
