"""Broadcast (``*``) and group commands: every instance delivers to its local clients and reports a count.

The sender's instance publishes one :class:`~appliance.core.events.FanOut` to every
instance (itself included), each answers with the number of local clients that got it
(a :class:`~appliance.core.events.Counted` tagged with this fan-out), and the sender adds the answers up for up to
:data:`FAN_IN_SECONDS`.

A sender that waits (``POST /api/v1/commands`` with ``wait_ms``, the MCP ``broadcast`` tool with
``wait_seconds``, the dashboard's Send page) also collects the version-2 clients' replies: each
instance remembers which of its v2 clients it handed the command to (:attr:`Broadcasts.awaiting`)
and lists them in its count; a reply with that ``reply_to`` goes back as a
:class:`~appliance.core.events.FanReplied` (and, as always, to every controller as the client's
plain message). The sender answers when every listed client replied or the wait is over, with
the replies per client and the clients that did not answer in time. Nobody waiting costs nothing:
the map stays empty and a fan-out without ``collect_ms`` takes the same loop as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..brokers.base import Broker, BrokerUnavailable
from ..core.events import Counted, FanOut, FanReplied, decode_fan_out, encode_event, encode_fan_out
from ..core.protocol_v2 import CommandId, Request, Status
from ..recent_logs import RecentLogs
from ..registry import LocalConnections
from .handover import ClientLines

__all__ = ["FAN_IN_SECONDS", "REPLY_CHARS", "REPLY_CUT_CHARS", "Broadcasts"]

log = logging.getLogger(__name__)

#: How long a broadcast waits for the other instances' counts.
FAN_IN_SECONDS = 2.0
#: Characters of replies one waiting sender keeps whole; later replies keep their first REPLY_CUT_CHARS
#: (10,000 clients answering 64 KiB would otherwise hold 640 MB per caller). Every reply still reaches
#: the controllers and GET /api/v1/events whole.
REPLY_CHARS = 4_000_000
REPLY_CUT_CHARS = 200


@dataclass(slots=True)
class _FanIn:
    expected: int | None = None
    answers: int = 0
    count: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Collecting replies (the sender waits): the v2 receivers listed in the counts, and their replies.
    collect: bool = False
    started: float = 0.0
    awaited: set[str] = field(default_factory=set)
    replies: dict[str, tuple[str, float]] = field(default_factory=dict)
    reply_chars: int = 0
    answered: asyncio.Event = field(default_factory=asyncio.Event)

    def counts_in(self) -> bool:
        return self.expected is None or self.answers >= self.expected

    def check_answered(self) -> None:
        if self.collect and self.counts_in() and self.awaited.issubset(self.replies):
            self.answered.set()

    def collected(self) -> dict[str, Any]:
        """The replies per client (in arrival order), the v2 receivers that did not answer in time, and
        the status: replied when every awaited client answered, else delivered."""
        replies = [
            {"client": client, "message": message, "rtt_ms": round((at - self.started) * 1000, 3)}
            for client, (message, at) in self.replies.items()
        ]
        silent = sorted(self.awaited.difference(self.replies))
        status = Status.REPLIED if replies and not silent else Status.DELIVERED
        return {"status": status.value, "replies": replies, "no_reply": silent}


#: A v2 client handed a collected broadcast: (client id, command id) -> (origin instance, fan-out tag, deadline).
Awaiting = dict[tuple[str, CommandId], tuple[str, str, float]]


class Broadcasts:
    """This instance's fan-outs in flight and its part of everybody's."""

    def __init__(
        self,
        instance: str,
        broker: Broker,
        local: LocalConnections,
        recent_logs: RecentLogs,
        *,
        spawn: Callable[[Any], None],
        finished: Callable[[str, Request, int, dict[str, Any] | None], None],
    ) -> None:
        self.instance = instance
        self.broker = broker
        self.local = local
        self.recent_logs = recent_logs
        self._spawn = spawn
        self._finished = finished  # The sender's side reports the count (service.py).
        self._seq = itertools.count()
        self._lock = asyncio.Lock()
        self._fan_ins: dict[tuple[str, CommandId], _FanIn] = {}
        #: This instance's v2 clients handed a broadcast whose sender collects the replies (ClientLines
        #: looks here for a ``reply_to`` nobody else waits for; empty unless somebody waits).
        self.awaiting: Awaiting = {}

    def fan_out(self, waiter: str, controller: str, request: Request, collect_ms: int = 0) -> None:
        """Send ``request`` to every instance; ``collect_ms`` > 0 (it needs an id): collect the v2 replies that long."""
        # Counts come back to this fan-out alone, even for several at once without ids.
        tag = f"{waiter}#{next(self._seq)}"
        collect_ms = collect_ms if request.id is not None else 0
        fan = FanOut(self.instance, tag, request.id, controller, request.message, request.group, collect_ms)
        self._spawn(self._collect(waiter, request, fan))

    async def _collect(self, waiter: str, request: Request, fan: FanOut) -> None:
        key = (fan.tag, request.id if request.id is not None else "")
        fan_in = self._fan_ins[key] = _FanIn(collect=fan.collect_ms > 0, started=time.time())
        deadline = fan_in.started + fan.collect_ms / 1000
        try:
            try:
                async with self._lock:  # One publish at a time: broadcasts keep their order.
                    fan_in.expected = await self.broker.fan_out(encode_fan_out(fan))
            except BrokerUnavailable as exc:
                # Local clients still get it; other instances cannot be reached.
                local, clients = self.fan_in(fan)
                fan_in.expected, fan_in.count = None, local
                fan_in.awaited.update(clients)
                log.warning("Broadcast reached only this instance: %s", exc)
            if fan_in.expected is not None and fan_in.answers < fan_in.expected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FAN_IN_SECONDS):
                        await fan_in.done.wait()
            if fan_in.collect:
                fan_in.check_answered()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - time.time())):
                        await fan_in.answered.wait()
        finally:
            del self._fan_ins[key]
        self._finished(waiter, request, fan_in.count, fan_in.collected() if fan_in.collect else None)

    def counted(self, event: Counted) -> None:
        """One instance's count for one of this instance's fan-outs."""
        fan_in = self._fan_ins.get((event.fan_out, event.id))
        if fan_in is not None:
            fan_in.answers += 1
            fan_in.count += event.count
            if fan_in.expected is not None and fan_in.answers >= fan_in.expected:
                fan_in.done.set()
            if fan_in.collect:
                fan_in.awaited.update(event.clients)
                fan_in.check_answered()

    def replied(self, event: FanReplied) -> None:
        """A v2 client's reply to one of this instance's fan-outs whose sender waits."""
        fan_in = self._fan_ins.get((event.fan_out, event.id))
        if fan_in is not None and fan_in.collect and event.client not in fan_in.replies:
            message = event.message
            if fan_in.reply_chars + len(message) > REPLY_CHARS:
                message = message[:REPLY_CUT_CHARS] + "…" if len(message) > REPLY_CUT_CHARS else message
            fan_in.reply_chars += len(message)
            fan_in.replies[event.client] = (message, time.time())
            fan_in.check_answered()

    def client_reply(self, client_id: str, reply_to: CommandId, message: str, now: float) -> None:
        """A local v2 client answered ``reply_to`` and nothing else waited for it: a collected broadcast's reply?"""
        entry = self.awaiting.pop((client_id, reply_to), None)
        if entry is None:
            return
        origin, tag, deadline = entry
        if deadline <= now:
            return  # Its sender has answered its caller already.
        event = FanReplied(tag, reply_to, client_id, message)
        if origin == self.instance:
            self.replied(event)
        else:
            self.broker.send_to_instance(origin, encode_event(event))

    def forget_unanswered(self, now: float) -> None:
        """Forget v2 clients that never answered a collected broadcast (housekeeping, about once a second)."""
        if self.awaiting:
            for key in [k for k, entry in self.awaiting.items() if entry[2] <= now]:
                del self.awaiting[key]

    def fan_in(self, fan: FanOut) -> tuple[int, tuple[str, ...]]:
        """Deliver a broadcast or group command to the local clients: the count of receivers, and the
        v2 receivers whose replies its sender collects (none unless ``fan.collect_ms``)."""
        count = 0
        now = time.time()
        frame_for = ClientLines.frame_for
        if fan.collect_ms > 0 and fan.id is not None:
            return self._fan_in_collected(fan, now)
        for conn in self.local.local_clients(fan.group):
            if conn.deliver(frame_for(conn, fan.id, fan.controller, fan.message)):
                count += 1
                recent = self.recent_logs.log_for(conn)
                if recent is not None:  # Replies to a broadcast reach every controller: never matched.
                    recent.untracked(now, fan.controller, fan.id, fan.message)
        return count, ()

    def _fan_in_collected(self, fan: FanOut, now: float) -> tuple[int, tuple[str, ...]]:
        assert fan.id is not None
        count = 0
        clients: list[str] = []
        deadline = now + fan.collect_ms / 1000
        frame_for = ClientLines.frame_for
        for conn in self.local.local_clients(fan.group):
            if conn.deliver(frame_for(conn, fan.id, fan.controller, fan.message)):
                count += 1
                if conn.v2:
                    client_id = conn.session.client_id
                    clients.append(client_id)
                    self.awaiting[(client_id, fan.id)] = (fan.origin, fan.tag, deadline)
                recent = self.recent_logs.log_for(conn)
                if recent is not None:  # Its replies also reach every controller: not matched there.
                    recent.untracked(now, fan.controller, fan.id, fan.message)
        return count, tuple(clients)

    def fan_in_remote(self, payload: bytes) -> None:
        """A broadcast from any instance (this one too): deliver locally and report the count back."""
        try:
            fan = decode_fan_out(payload)
        except msgspec.DecodeError:
            log.warning("Ignoring a malformed broadcast")
            return
        count, clients = self.fan_in(fan)
        event = Counted(fan.tag, fan.id if fan.id is not None else "", count, clients)
        self.broker.send_to_instance(fan.origin, encode_event(event))
