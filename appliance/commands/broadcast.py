"""Broadcast (``*``) and group commands: every instance delivers to its local clients and reports a count.

The sender's instance publishes one :class:`~appliance.core.events.FanOut` to every
instance (itself included), each answers with the number of local clients that got it
(a :class:`~appliance.core.events.Counted` tagged with this fan-out), and the sender adds the answers up for up to
:data:`FAN_IN_SECONDS`.
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
from ..core.events import Counted, FanOut, decode_fan_out, encode_event, encode_fan_out
from ..core.protocol_v2 import CommandId, Request
from ..recent_logs import RecentLogs
from ..registry import LocalConnections
from .handover import ClientLines

__all__ = ["FAN_IN_SECONDS", "Broadcasts"]

log = logging.getLogger(__name__)

#: How long a broadcast waits for the other instances' counts.
FAN_IN_SECONDS = 2.0


@dataclass(slots=True)
class _FanIn:
    expected: int | None = None
    answers: int = 0
    count: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


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
        finished: Callable[[str, Request, int], None],
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

    def fan_out(self, waiter: str, controller: str, request: Request) -> None:
        # Counts come back to this fan-out alone, even for several at once without ids.
        tag = f"{waiter}#{next(self._seq)}"
        fan = FanOut(self.instance, tag, request.id, controller, request.message, request.group)
        self._spawn(self._collect(waiter, request, fan))

    async def _collect(self, waiter: str, request: Request, fan: FanOut) -> None:
        key = (fan.tag, request.id if request.id is not None else "")
        fan_in = self._fan_ins[key] = _FanIn()
        try:
            try:
                async with self._lock:  # One publish at a time: broadcasts keep their order.
                    fan_in.expected = await self.broker.fan_out(encode_fan_out(fan))
            except BrokerUnavailable as exc:
                # Local clients still get it; other instances cannot be reached.
                local = self.fan_in(fan)
                fan_in.expected, fan_in.count = None, local
                log.warning("Broadcast reached only this instance: %s", exc)
            if fan_in.expected is not None and fan_in.answers < fan_in.expected:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FAN_IN_SECONDS):
                        await fan_in.done.wait()
        finally:
            del self._fan_ins[key]
        self._finished(waiter, request, fan_in.count)

    def counted(self, event: Counted) -> None:
        """One instance's count for one of this instance's fan-outs."""
        fan_in = self._fan_ins.get((event.fan_out, event.id))
        if fan_in is not None:
            fan_in.answers += 1
            fan_in.count += event.count
            if fan_in.expected is not None and fan_in.answers >= fan_in.expected:
                fan_in.done.set()

    def fan_in(self, fan: FanOut) -> int:
        """Deliver a broadcast or group command to the local clients; the count of receivers."""
        count = 0
        now = time.time()
        frame_for = ClientLines.frame_for
        for conn in self.local.local_clients(fan.group):
            if conn.deliver(frame_for(conn, fan.id, fan.controller, fan.message)):
                count += 1
                recent = self.recent_logs.log_for(conn)
                if recent is not None:  # Replies to a broadcast reach every controller: never matched.
                    recent.untracked(now, fan.controller, fan.id, fan.message)
        return count

    def fan_in_remote(self, payload: bytes) -> None:
        """A broadcast from any instance (this one too): deliver locally and report the count back."""
        try:
            fan = decode_fan_out(payload)
        except msgspec.DecodeError:
            log.warning("Ignoring a malformed broadcast")
            return
        count = self.fan_in(fan)
        event = Counted(fan.tag, fan.id if fan.id is not None else "", count)
        self.broker.send_to_instance(fan.origin, encode_event(event))
