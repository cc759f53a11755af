"""The target's side of a command: hand it to its client's socket and match the client's reply.

A version-2 client answers with ``reply_to`` (its command's id); a version-1 client just
sends text, so its commands go out one at a time and its next message is the reply
(:class:`~appliance.core.requests.V1Matcher`). Every outcome goes back to the instance the
command's sender waits on; when that is this instance, straight to the sender's side.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..brokers.base import Broker, BrokerUnavailable
from ..connections import Connection
from ..core.events import Delivered, Failed, InstanceEvent, Outcome, Replied, encode_event
from ..core.protocol import ErrorCode
from ..core.protocol_v2 import CommandId, encode_client_command, parse_client_reply
from ..core.recent import Tracked
from ..core.requests import Held, Routed, V1Matcher
from ..recent_logs import RecentLogs
from ..registry import LocalConnections
from .followup import LATE_REPLY_SECONDS
from .outcome import IN_PROCESS

__all__ = ["ClientLines"]

log = logging.getLogger(__name__)

#: A command handed to a v2 client, the time its sender stops waiting for the reply, and its
#: entry in the client's log of recent commands (None when that log is off).
_Awaiting = tuple[Routed, float, Tracked | None]


def _keep_until(line: _Awaiting | deque[_Awaiting]) -> float:
    """Until when a v2 client's line for one id is kept: the newest command's deadline, and a
    while longer for an in-process caller's single command, whose late reply its record keeps."""
    if isinstance(line, tuple):
        return line[1] + LATE_REPLY_SECONDS if line[0].waiter.startswith(IN_PROCESS) else line[1]
    return line[-1][1]


class ClientLines:
    """Commands handed to this instance's clients and waiting for their replies."""

    def __init__(
        self,
        instance: str,
        broker: Broker,
        local: LocalConnections,
        recent_logs: RecentLogs,
        v1_reply_queue: int,
        *,
        outcome: Callable[[InstanceEvent], None],
        delivered: Callable[[str, CommandId], None],
        replied: Callable[[str, CommandId, str, str, float], None],
        queue_lock: asyncio.Lock,
        spawn: Callable[[Any], None],
    ) -> None:
        self.instance = instance
        self.broker = broker
        self.local = local
        self.recent_logs = recent_logs
        self.matcher = V1Matcher(v1_reply_queue)
        # (client, command id) -> the command handed to that v2 client awaiting its reply, with its
        # deadline and recent-commands entry: one such triple, or a deque of them, oldest first, when
        # controllers use the same id for one client (rare; a deque for every command cost 0.1 us).
        self._awaiting: dict[tuple[str, CommandId], _Awaiting | deque[_Awaiting]] = {}
        #: The sender's side (service.py), for outcomes of commands sent from this instance.
        self._outcome = outcome
        self._delivered = delivered
        self._replied = replied
        self._queue_lock = queue_lock  # Shared with the queueing side: hand-overs keep the queue's order.
        self._spawn = spawn
        #: Broadcasts whose sender collects the v2 replies (commands/broadcast.py sets both): looked at
        #: only for a ``reply_to`` nothing else waits for, and only while the map is not empty.
        self.broadcast_awaiting: dict[Any, Any] = {}
        self.broadcast_reply: Callable[[str, CommandId, str, float], None] = lambda *args: None

    @staticmethod
    def frame_for(conn: Connection, command_id: CommandId | None, controller: str, message: str) -> str:
        return encode_client_command(command_id, controller, message) if conn.v2 else message

    def hand_over(self, conn: Connection, routed: Routed, now: float) -> None:
        recent = conn.recent
        if recent is None:  # Its first command (log_for makes the log), or commands are not recorded.
            recent = self.recent_logs.log_for(conn)
        if conn.v2:
            if conn.deliver(encode_client_command(routed.id, routed.controller, routed.message)):
                client_id = conn.session.client_id
                key = (client_id, routed.id)
                deadline = now + routed.timeout_ms / 1000
                tracked = (
                    None
                    if recent is None
                    else recent.tracked(now, routed.controller, routed.id, routed.message, deadline, routed)
                )
                entry = (routed, deadline, tracked)
                line = self._awaiting.setdefault(key, entry)
                if line is not entry:  # Another command with this id waits for this client's reply.
                    if isinstance(line, tuple):
                        line = self._awaiting[key] = deque((line,))
                    line.append(entry)
                if routed.origin == self.instance:  # Sent from here: no event to build and dispatch.
                    self._delivered(routed.waiter, routed.id)
                else:
                    self._tell(routed, Delivered(routed.waiter, routed.id, client_id))
            else:
                self._note_failed(conn, routed, "delivery_failed: the client is disconnecting")
                self._tell_gone(routed, conn.client_id)
            return
        held = self.matcher.submit(conn.client_id, routed, now)
        if held is Held.SEND:
            self._send_v1(conn, routed, now)
        elif held is Held.FULL:
            detail = f"{self.matcher.max_waiting} commands already wait for {conn.client_id}'s replies"
            self._fail(conn, routed, ErrorCode.QUEUE_FULL, detail)

    def _fail(self, conn: Connection, routed: Routed, code: ErrorCode, detail: str) -> None:
        self._note_failed(conn, routed, f"{code.value}: {detail}")
        self._tell_error(routed, conn.client_id, code, detail)

    def _note_failed(self, conn: Connection, routed: Routed, detail: str) -> None:
        """The client's log of recent commands shows one that never reached its socket."""
        recent = self.recent_logs.log_for(conn)
        if recent is not None:
            recent.failed(time.time(), routed.controller, routed.id, routed.message, detail)

    def _send_v1(self, conn: Connection, routed: Routed, now: float) -> None:
        if conn.deliver(routed.message):
            recent = self.recent_logs.log_for(conn)
            if recent is not None:
                deadline = self.matcher.deadline(conn.client_id) or now + routed.timeout_ms / 1000
                recent.tracked(now, routed.controller, routed.id, routed.message, deadline, routed)
            self._tell(routed, Delivered(routed.waiter, routed.id, conn.client_id))
        else:
            self._note_failed(conn, routed, "delivery_failed: the client is disconnecting")
            self._tell_gone(routed, conn.client_id)
            self._abandon_line(conn.client_id)

    def _tell_gone(self, routed: Routed, client_id: str) -> None:
        """``routed`` was never handed over: its client's connection is closing."""
        detail = f"{client_id} is disconnecting" if routed.queue else "the client is disconnecting"
        self._tell_error(routed, client_id, routed.closing_error, detail)

    def _abandon_line(self, client_id: str) -> None:
        """The client's connection is closing: the commands waiting in its line get their outcome now."""
        for routed in self.matcher.disconnect(client_id):
            self._tell_error(routed, client_id, ErrorCode.TARGET_OFFLINE, f"{client_id} disconnected")

    def client_text(self, conn: Connection, text: str) -> bool:
        """A client's message; True when it was a version-2 reply (then it goes to its sender only)."""
        now = time.time()
        if conn.v2:
            reply = parse_client_reply(text)
            if reply is None:
                return False
            key = (conn.session.client_id, reply.reply_to)
            line = self._awaiting.get(key)
            if line is None:
                if self.broadcast_awaiting:  # A broadcast's caller may be collecting the replies.
                    self.broadcast_reply(key[0], reply.reply_to, reply.message, now)
                return False  # Nobody waits for it (a broadcast's, never asked, or late): it reaches every controller.
            if isinstance(line, tuple):
                del self._awaiting[key]
                routed, deadline, tracked = line
                if deadline <= now:  # Late: its sender has reported the timeout already.
                    if routed.waiter.startswith(IN_PROCESS):  # Its record keeps it (followup.py).
                        self._tell(routed, Replied(routed.waiter, routed.id, key[0], reply.message))
                    return False  # And it reaches every controller, as any late reply does.
            else:
                while line and line[0][1] <= now:
                    line.popleft()  # Its sender has reported the timeout already.
                if not line:
                    del self._awaiting[key]
                    return False
                routed, _, tracked = line.popleft()
                if not line:
                    del self._awaiting[key]
            if tracked is not None and conn.recent is not None:
                conn.recent.answered(tracked, now, reply.message)
            if routed.origin == self.instance:
                self._replied(routed.waiter, routed.id, key[0], reply.message, now)
            else:
                self._tell(routed, Replied(routed.waiter, routed.id, key[0], reply.message))
            return True
        if self.matcher.in_flight(conn.client_id) is not None:
            advance = self.matcher.client_message(conn.client_id, now)
            if advance.replied is not None and conn.recent is not None:
                conn.recent.replied(advance.replied, now, text)
            self.advance(conn.client_id, advance, now, text)
        return False

    def advance(self, client_id: str, advance: Any, now: float, text: str | None = None) -> None:
        """A version-1 client's line moved (a reply, or a deadline): report, and send its next command."""
        if advance.replied is not None and text is not None:
            routed = advance.replied
            self._tell(routed, Replied(routed.waiter, routed.id, client_id, text))
        if advance.send is not None:
            conn = self.local.local_client(client_id)
            if conn is not None:
                self._send_v1(conn, advance.send, now)
            else:  # Closing: the next command was never handed over, nor were those behind it.
                self._tell_gone(advance.send, client_id)
                self._abandon_line(client_id)

    def expire(self, now: float) -> None:
        for client, advance in self.matcher.expire(now).items():
            self.advance(client, advance, now)

    def forget_unanswered(self, now: float) -> None:
        """Forget v2 commands nobody answered in time (housekeeping, about once a second)."""
        for key in [k for k, line in self._awaiting.items() if _keep_until(line) <= now]:
            del self._awaiting[key]

    def client_opened(self, conn: Connection) -> None:
        """A client connected: hand over what was queued for it, oldest first."""
        self._spawn(self.drain(conn))

    async def drain(self, conn: Connection) -> None:
        try:
            async with self._queue_lock:  # Two drains must not hand over out of order.
                queued = await self.broker.take_queued(conn.client_id, time.time())
                now = time.time()
                for routed in queued:
                    self.hand_over(conn, routed, now)
        except BrokerUnavailable as exc:
            log.warning("Queued commands for %s stay queued: %s", conn.client_id, exc)

    def client_closed(self, conn: Connection) -> None:
        self._abandon_line(conn.client_id)
        if conn.v2:
            for key in [k for k in self._awaiting if k[0] == conn.client_id]:
                del self._awaiting[key]

    def _tell(self, routed: Routed, event: Outcome) -> None:
        self.tell_instance(routed.origin, event)

    def tell_instance(self, instance: str, event: InstanceEvent) -> None:
        if instance == self.instance:
            self._outcome(event)
        else:
            self.broker.send_to_instance(instance, encode_event(event))

    def _tell_error(self, routed: Routed, target: str, code: ErrorCode, detail: str) -> None:
        self._tell(routed, Failed(routed.waiter, routed.id, target, code.value, detail))
