"""The command service: commands with an id, their outcomes, replies, broadcast, the offline queue.

One object per instance, on ``app.state.commands``. The WebSocket relay hands it
controller commands that carry an ``id`` (or name ``*`` or a group) and every
client message; the HTTP API, the MCP tools and the dashboard call
:meth:`CommandService.send_command` and :meth:`CommandService.disconnect`.

A command travels from the sender's instance (where its :class:`PendingTable` entry
waits, with its deadline) to the target's instance, which frames it for the client
(version-1 text, or version-2 JSON), keeps version-1 clients' replies in order
(:class:`V1Matcher`), and reports every outcome back to the sender's instance as an
:class:`Event` through the broker's per-instance channel. The decisions are the pure
objects of :mod:`appliance.core.requests`; this module only moves their results.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from . import metrics
from .brokers.base import BrokerUnavailable
from .core.protocol import CONTROLLER_ID, CloseCode, ErrorCode, ProtocolError, Role, encode_error
from .core.protocol_v2 import (
    CommandId,
    Request,
    Status,
    TargetKind,
    TimeoutPolicy,
    encode_client_command,
    encode_controller_reply,
    encode_delivered,
    encode_status,
    parse_client_reply,
    request_from_fields,
)
from .core.ratelimit import TokenBucket
from .core.recent import Tracked
from .core.requests import Enqueued, Held, Pending, PendingTable, Routed, V1Matcher

if TYPE_CHECKING:
    from .relay import Connection, Relay

__all__ = ["CommandService", "Event", "FanOut", "Outcome"]

log = logging.getLogger(__name__)

#: How often deadlines are checked; a timeout is reported at most this late.
TICK_SECONDS = 0.02
#: How long a broadcast waits for the other instances' counts.
FAN_IN_SECONDS = 2.0
#: The controller name HTTP commands carry (v2 clients see it as "from").
HTTP_CONTROLLER = "http"


class Event(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """An outcome travelling back to the sender's instance.

    ``kind``: ``d`` delivered, ``r`` reply (``sender``, ``message``), ``e`` error
    (``code``, ``detail``), ``n`` fan-out count (``count``), ``x`` close a local
    connection (``target``, ``code``), ``q`` hand over what is queued for ``target``,
    ``c`` send ``target``'s recent commands (at most ``count``) to instance ``sender``,
    ``C`` those commands (``message``, JSON) for the question ``owner``.
    """

    kind: str
    owner: str = ""
    id: CommandId | None = None
    target: str = ""
    sender: str = ""
    message: str = ""
    code: str = ""
    detail: str = ""
    count: int = 0


class FanOut(msgspec.Struct, frozen=True):
    """A broadcast or group command, sent to every instance; each counts its local receivers."""

    origin: str
    owner: str
    id: CommandId | None
    controller: str
    message: str
    group: str | None


#: Bound once: a label lookup costs more than the increment (as in metrics.py).
_OUTCOME = {
    name: metrics.COMMAND_OUTCOMES.labels(outcome=name) for name in ("delivered", "queued", "replied", "timeout")
}
_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_fan_encoder = msgspec.json.Encoder()
_fan_decoder = msgspec.json.Decoder(FanOut)


@dataclass(slots=True)
class Outcome:
    """What an HTTP caller learns: an HTTP status and a JSON body."""

    http_status: int
    body: dict[str, Any]


@dataclass(slots=True)
class _Waiter:
    """An HTTP request (or another in-process caller) waiting for one command's outcome."""

    future: asyncio.Future[Outcome]
    want_reply: bool
    target: str


@dataclass(slots=True)
class _FanIn:
    expected: int | None = None
    answers: int = 0
    count: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


#: A command handed to a v2 client, the time its sender stops waiting for the reply, and its
#: entry in the client's log of recent commands (None when that log is off).
_Awaiting = tuple[Routed, float, Tracked | None]


def _last_deadline(line: _Awaiting | deque[_Awaiting]) -> float:
    """When the newest command of a v2 client's line for one id stops waiting."""
    return line[1] if isinstance(line, tuple) else line[-1][1]


class CommandService:
    """This instance's part of request/reply: pending commands, client lines, outcomes."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        settings = relay.settings
        self.policy = TimeoutPolicy(settings.command_timeout_ms, settings.command_timeout_max_ms)
        self.instance = relay.instance
        self.pending = PendingTable()
        self.matcher = V1Matcher(settings.v1_reply_queue)
        # (client, command id) -> the command handed to that v2 client awaiting its reply, with its
        # deadline and recent-commands entry: one such triple, or a deque of them, oldest first, when
        # controllers use the same id for one client (rare; a deque for every command cost 0.1 us).
        self._awaiting: dict[tuple[str, CommandId], _Awaiting | deque[_Awaiting]] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._next_sweep = 0.0
        self._queue_lock = asyncio.Lock()
        # Commands this instance queued and not yet seen delivered, until they expire: the offline-queue gauge.
        self._queued_here: dict[tuple[str, CommandId], float] = {}
        # Commands sent from here with "queue": true and not yet handed to a socket: if their client leaves
        # first (target_offline from its instance), they are queued for its return instead of refused.
        self._queueable: dict[tuple[str, CommandId], tuple[str, Routed]] = {}
        self._fan_seq = itertools.count()
        self._http_seq = itertools.count()
        self._id_prefix = secrets.token_hex(5)  # Ids of commands sent without one (HTTP, MCP, dashboard).
        self._id_seq = itertools.count()
        self._fan_lock = asyncio.Lock()
        self._fan_ins: dict[tuple[str, CommandId], _FanIn] = {}
        # HTTP, MCP and dashboard commands share the controller token, so they share its rate limit.
        self._http_bucket = TokenBucket(settings.controller_rate_limit, settings.controller_rate_burst, time.time())
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()  # get_running_loop() costs a getpid syscall (Python 3.11)
        self._ticker = self._loop.create_task(self._tick())

    async def stop(self) -> None:
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loop = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.expire(time.time())
            except Exception:  # A bug here must not stop every later timeout.
                log.exception("Expiring commands failed")

    def expire(self, now: float) -> None:
        for pending in self.pending.expire(now):
            self._queueable.pop(pending.key, None)
            _OUTCOME["timeout"].inc()
            self._report(pending, Status.TIMEOUT)
        for client, advance in self.matcher.expire(now).items():
            self._advance(client, advance, now)
        metrics.PENDING_REQUESTS.set(len(self.pending))
        if now >= self._next_sweep:  # Forgetting v2 commands nobody answered is housekeeping: once a second.
            self._next_sweep = now + 1.0
            for key in [k for k, expires in self._queued_here.items() if expires <= now]:
                del self._queued_here[key]
            metrics.OFFLINE_QUEUE.set(len(self._queued_here))
            for key in [k for k, line in self._awaiting.items() if _last_deadline(line) <= now]:
                del self._awaiting[key]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the sender's side: WebSocket controllers ---------------------------------------------

    def submit(self, owner: str, controller: str, request: Request) -> None:
        """A command with an id, or for ``*`` or a group, from ``owner`` (a controller's connection or a waiter)."""
        now = time.time()
        if request.kind is not TargetKind.CLIENT:
            self._fan_out(owner, controller, request)
            return
        assert request.id is not None
        if self.pending.open(owner, request.id, request.target, now, request.timeout_ms) is None:
            self._fail_now(owner, request, ErrorCode.DUPLICATE_ID, f"id {request.id!r} is still in flight")
            return
        routed = Routed(
            controller, request.id, request.message, self.instance, owner, request.timeout_ms, request.queue
        )
        if request.queue and request.target != CONTROLLER_ID:
            self._queueable[(owner, request.id)] = (request.target, routed)
        # A partial, not a closure: no cell per captured name and no function object per command.
        self.relay.broker.send_routed(request.target, routed, partial(self._routed_result, request.target, routed))

    def _routed_result(self, target: str, routed: Routed, code: ErrorCode | None, detail: str) -> None:
        if code is None:
            return  # The target's instance has it and reports the outcome.
        if code is ErrorCode.TARGET_OFFLINE and routed.queue:
            if target == CONTROLLER_ID:  # No client may ever hold it (4003): never queue for it.
                code, detail = ErrorCode.TARGET_NOT_CLIENT, f"{CONTROLLER_ID} is reserved for controllers"
            else:
                self._spawn(self._enqueue(target, routed))
                return
        self.outcome(Event("e", routed.owner, routed.id, target, code=code.value, detail=detail))

    async def _enqueue(self, target: str, routed: Routed, requeue: bool = False) -> None:
        """Queue ``routed`` for ``target``; ``requeue``: its client left before it was handed over."""
        try:
            # One at a time, so commands are queued in the order they were sent.
            async with self._queue_lock:
                enqueued = await self.relay.broker.enqueue(target, routed, time.time(), requeue=requeue)
                owner = await self.relay.broker.owner_of(target) if enqueued is Enqueued.QUEUED else None
        except BrokerUnavailable as exc:
            self.outcome(Event("e", routed.owner, routed.id, target, code="delivery_failed", detail=str(exc)))
            return
        if enqueued is Enqueued.FULL:
            detail = f"{target} already has {self.relay.settings.offline_queue_max} queued commands"
            self.outcome(Event("e", routed.owner, routed.id, target, code="queue_full", detail=detail))
            return
        if requeue and enqueued is not Enqueued.QUEUED:  # Already queued again (cannot happen twice): say so.
            self._queueable.pop((routed.owner, routed.id), None)  # This target_offline is final.
            detail = f"{target} disconnected before the command was handed over"
            self.outcome(Event("e", routed.owner, routed.id, target, code="target_offline", detail=detail))
            return
        pending = self.pending.get(routed.owner, routed.id)
        if pending is None:
            return
        _OUTCOME["queued"].inc()
        if enqueued is Enqueued.QUEUED:
            self._queued_here[(routed.owner, routed.id)] = time.time() + routed.timeout_ms / 1000
        remaining = max(0, round((pending.deadline - time.time()) * 1000))
        duplicate = {} if enqueued is Enqueued.QUEUED else {"duplicate": True}
        if enqueued is Enqueued.ALREADY_DELIVERED:
            # Delivered before: never again. The repeat's outcome is that delivery.
            self.pending.finish(routed.owner, routed.id)
            self._queueable.pop((routed.owner, routed.id), None)
            self._report(pending, Status.DELIVERED, **duplicate)
            return
        self._report(pending, Status.QUEUED, expires_in_ms=remaining, **duplicate)
        if owner is not None and owner.role is Role.CLIENT:
            # The target connected while this was being queued, after its own look at the queue.
            self._tell_instance(owner.instance, Event("q", target=target))

    def _fail_now(self, owner: str, request: Request, code: ErrorCode, detail: str) -> None:
        self._deliver_to_owner(
            owner, None, encode_error(code, detail, target=request.target, id=request.id), code.value, detail
        )

    # --- the sender's side: outcomes --------------------------------------------------------

    def outcome(self, event: Event) -> None:
        """An outcome for a command sent from this instance (from any instance, via the broker)."""
        if event.kind == "x":
            self.relay.disconnect_local(event.target, event.code)
            return
        if event.kind == "q":
            conn = self.relay.local_client(event.target)
            if conn is not None:
                self._spawn(self._drain(conn))
            return
        if event.kind in ("c", "C"):  # A client's recent commands: asked for, or answered (relay.py).
            self.relay.recent.event(event)
            return
        if event.kind == "n":
            fan_in = self._fan_ins.get((event.owner, event.id if event.id is not None else ""))
            if fan_in is not None:
                fan_in.answers += 1
                fan_in.count += event.count
                if fan_in.expected is not None and fan_in.answers >= fan_in.expected:
                    fan_in.done.set()
            return
        assert event.id is not None
        if event.kind == "d":
            self._delivered(event.owner, event.id)
            return
        if event.kind == "r":
            self._replied(event.owner, event.id, event.sender, event.message, time.time())
            return
        queueable = self._queueable.get((event.owner, event.id))
        if queueable is not None and event.code == ErrorCode.TARGET_OFFLINE.value:
            pending = self.pending.get(event.owner, event.id)
            if pending is not None and not pending.delivered:
                # Its client left before the command was handed over: queue it for the client's return.
                self._spawn(self._enqueue(*queueable, requeue=True))
                return
        self._queueable.pop((event.owner, event.id), None)
        pending = self.pending.finish(event.owner, event.id)
        if pending is None:
            return  # Timed out already, or the controller left: the outcome has nobody to go to.
        metrics.COMMAND_OUTCOMES.labels(outcome=event.code or "error").inc()  # errors: rare
        frame = encode_error(ErrorCode(event.code), event.detail, target=pending.target, id=pending.id)
        self._deliver_to_owner(pending.owner, pending, frame, event.code, event.detail)

    def _delivered(self, owner: str, command_id: CommandId) -> None:
        """The ``d`` outcome: the command reached its client's socket."""
        if self._queued_here:
            self._queued_here.pop((owner, command_id), None)
        if self._queueable:
            self._queueable.pop((owner, command_id), None)
        pending = self.pending.delivered(owner, command_id)
        if pending is None:
            return
        metrics.DELIVERED.count += 1
        if pending.owner not in self._waiters:
            conn = self.relay.connection(owner)
            if conn is not None:  # pending.target is a client id: commands for * or a group open no entry.
                conn.deliver(encode_delivered(pending.id, pending.target))
            return
        self._report(pending, Status.DELIVERED)

    def _replied(self, owner: str, command_id: CommandId, sender: str, message: str, now: float) -> None:
        """The ``r`` outcome: the client's reply (arrived at ``now``), to the sender only."""
        pending = self.pending.finish(owner, command_id)
        if pending is None:
            return  # Timed out already, or the controller left: the reply has nobody to go to.
        rtt_ms = (now - pending.started) * 1000
        metrics.REPLIED.count += 1
        metrics.REPLY_SECONDS.observe(rtt_ms / 1000)
        waiter = self._waiters.get(owner)
        if waiter is None:
            conn = self.relay.connection(owner)
            if conn is not None:
                conn.deliver(encode_controller_reply(command_id, sender, message, rtt_ms))
            return
        body = {
            "id": command_id,
            "status": Status.REPLIED.value,
            "target": pending.target,
            "sender": sender,
            "message": message,
            "rtt_ms": round(rtt_ms, 3),
        }
        self._resolve(owner, Outcome(200, body))

    def _report(self, pending: Pending, status: Status, **extra: Any) -> None:
        """A status for ``pending``'s owner: a status frame, or an HTTP outcome."""
        waiter = self._waiters.get(pending.owner)
        if waiter is None:
            if status is Status.TIMEOUT:
                extra["timeout_ms"] = round((pending.deadline - pending.started) * 1000)
            conn = self.relay.connection(pending.owner)
            if conn is not None:
                conn.deliver(encode_status(pending.id, status, pending.target, **extra))
            return
        body = {"id": pending.id, "status": status.value, "target": pending.target, **extra}
        if status is Status.TIMEOUT:
            body["detail"] = f"{pending.target} did not reply in time"
            self._resolve(pending.owner, Outcome(504, body))
        elif status is Status.QUEUED or not waiter.want_reply or extra.get("duplicate"):
            # Queued, delivered without wait_ms, or a repeat: the caller is answered now (202).
            self.pending.finish(pending.owner, pending.id)
            self._resolve(pending.owner, Outcome(202, body))

    def _deliver_to_owner(self, owner: str, pending: Pending | None, frame: str, code: str, detail: str) -> None:
        waiter = self._waiters.get(owner)
        if waiter is None:
            conn = self.relay.connection(owner)
            if conn is not None:
                if code:
                    metrics.ERRORS.labels(code=code).inc()
                conn.deliver(frame)
            return
        body = msgspec.json.decode(frame)
        self._resolve(owner, Outcome(_HTTP_STATUS.get(code, 502), body))

    def _resolve(self, owner: str, outcome: Outcome) -> None:
        waiter = self._waiters.pop(owner, None)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(outcome)

    def controller_closed(self, conn: Connection) -> None:
        """A controller left: its commands still in flight have nobody to report to."""
        for pending in self.pending.drop_owner(conn.conn_key):
            self._queueable.pop(pending.key, None)

    # --- broadcast and groups -----------------------------------------------------------------

    def _fan_out(self, owner: str, controller: str, request: Request) -> None:
        # Counts come back to this fan-out alone, even for several at once without ids.
        tag = f"{owner}#{next(self._fan_seq)}"
        fan = FanOut(self.instance, tag, request.id, controller, request.message, request.group)
        self._spawn(self._collect(owner, request, fan))

    async def _collect(self, owner: str, request: Request, fan: FanOut) -> None:
        key = (fan.owner, request.id if request.id is not None else "")
        fan_in = self._fan_ins[key] = _FanIn()
        try:
            try:
                async with self._fan_lock:  # One publish at a time: broadcasts keep their order.
                    fan_in.expected = await self.relay.broker.fan_out(_fan_encoder.encode(fan))
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
        _OUTCOME["delivered"].inc()
        if request.id is None and owner not in self._waiters:
            return  # A WebSocket broadcast without id gets no status frame, as in version 1.
        body = {"id": request.id, "status": Status.DELIVERED.value, "target": request.target, "count": fan_in.count}
        if owner in self._waiters:
            self._resolve(owner, Outcome(202, body))
        else:
            conn = self.relay.connection(owner)
            if conn is not None and request.id is not None:
                conn.deliver(encode_status(request.id, Status.DELIVERED, request.target, count=fan_in.count))

    def fan_in(self, fan: FanOut) -> int:
        """Deliver a broadcast or group command to the local clients; the count of receivers."""
        count = 0
        now = time.time()
        for conn in self.relay.local_clients(fan.group):
            if conn.deliver(self._frame_for(conn, fan.id, fan.controller, fan.message)):
                count += 1
                recent = self.relay.recent.log_for(conn)
                if recent is not None:  # Replies to a broadcast reach every controller: never matched.
                    recent.untracked(now, fan.controller, fan.id, fan.message)
        return count

    def fan_in_remote(self, payload: bytes) -> None:
        """A broadcast from any instance (this one too): deliver locally and report the count back."""
        try:
            fan = _fan_decoder.decode(payload)
        except msgspec.DecodeError:
            log.warning("Ignoring a malformed broadcast")
            return
        count = self.fan_in(fan)
        event = Event("n", fan.owner, fan.id if fan.id is not None else "", count=count)
        self.relay.broker.send_to_instance(fan.origin, encode_event(event))

    # --- the target's side ------------------------------------------------------------------

    @staticmethod
    def _frame_for(conn: Connection, command_id: CommandId | None, controller: str, message: str) -> str:
        return encode_client_command(command_id, controller, message) if conn.v2 else message

    def hand_over(self, conn: Connection, routed: Routed, now: float) -> None:
        recent = conn.recent
        if recent is None:  # Its first command (log_for makes the log), or commands are not recorded.
            recent = self.relay.recent.log_for(conn)
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
                if routed.reply_to == self.instance:  # Sent from here: no event to build and dispatch.
                    self._delivered(routed.owner, routed.id)
                else:
                    self._tell(routed, Event("d", routed.owner, routed.id, client_id))
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
        recent = self.relay.recent.log_for(conn)
        if recent is not None:
            recent.failed(time.time(), routed.controller, routed.id, routed.message, detail)

    def _send_v1(self, conn: Connection, routed: Routed, now: float) -> None:
        if conn.deliver(routed.message):
            recent = self.relay.recent.log_for(conn)
            if recent is not None:
                deadline = self.matcher.deadline(conn.client_id) or now + routed.timeout_ms / 1000
                recent.tracked(now, routed.controller, routed.id, routed.message, deadline, routed)
            self._tell(routed, Event("d", routed.owner, routed.id, conn.client_id))
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
                return False  # Nobody waits for it (never asked, or late): it reaches every controller.
            if isinstance(line, tuple):
                del self._awaiting[key]
                routed, deadline, tracked = line
                if deadline <= now:
                    return False  # Late: its sender has reported the timeout already.
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
            if routed.reply_to == self.instance:
                self._replied(routed.owner, routed.id, key[0], reply.message, now)
            else:
                self._tell(routed, Event("r", routed.owner, routed.id, key[0], key[0], reply.message))
            return True
        if self.matcher.in_flight(conn.client_id) is not None:
            advance = self.matcher.client_message(conn.client_id, now)
            if advance.replied is not None and conn.recent is not None:
                conn.recent.replied(advance.replied, now, text)
            self._advance(conn.client_id, advance, now, text)
        return False

    def _advance(self, client_id: str, advance: Any, now: float, text: str | None = None) -> None:
        if advance.replied is not None and text is not None:
            routed = advance.replied
            self._tell(routed, Event("r", routed.owner, routed.id, client_id, client_id, text))
        if advance.send is not None:
            conn = self.relay.local_client(client_id)
            if conn is not None:
                self._send_v1(conn, advance.send, now)
            else:  # Closing: the next command was never handed over, nor were those behind it.
                self._tell_gone(advance.send, client_id)
                self._abandon_line(client_id)

    def client_opened(self, conn: Connection) -> None:
        """A client connected: hand over what was queued for it, oldest first."""
        self._spawn(self._drain(conn))

    async def _drain(self, conn: Connection) -> None:
        try:
            async with self._queue_lock:  # Two drains must not hand over out of order.
                queued = await self.relay.broker.take_queued(conn.client_id, time.time())
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

    def _tell(self, routed: Routed, event: Event) -> None:
        self._tell_instance(routed.reply_to, event)

    def _tell_instance(self, instance: str, event: Event) -> None:
        if instance == self.instance:
            self.outcome(event)
        else:
            self.relay.broker.send_to_instance(instance, encode_event(event))

    def _tell_error(self, routed: Routed, target: str, code: ErrorCode, detail: str) -> None:
        self._tell(routed, Event("e", routed.owner, routed.id, target, code=code.value, detail=detail))

    # --- service interface: HTTP API, MCP tools, dashboard -------------------------------------

    def parse(self, fields: dict[str, Any]) -> Request | ProtocolError:
        return request_from_fields(fields, self.policy)

    async def send_command(
        self,
        target: str,
        message: str,
        *,
        command_id: CommandId | None = None,
        wait_ms: int | None = None,
        timeout_ms: int | None = None,
        queue: bool = False,
        controller: str = HTTP_CONTROLLER,
    ) -> Outcome:
        """Send one command and wait for its outcome (the reply too, with ``wait_ms``).

        Returns the HTTP status and body of ``POST /api/v1/commands``: 200 replied, 202
        delivered or queued, 504 timeout, 404 offline, 409 duplicate id or queue full,
        413 too large, 422 invalid, 503 when the target's instance cannot be reached.
        """
        wait = self._http_bucket.try_take(time.time())
        if wait > 0:
            retry_ms = max(1, round(wait * 1000))
            body = {"error": "rate_limited", "detail": "too many commands; retry later", "retry_after_ms": retry_ms}
            return Outcome(429, body)
        if command_id is None:
            # Unique across instances and restarts (the offline queue's de-duplication is by (controller, id)):
            # this process's random prefix and a counter. A random id per command cost a getrandom syscall.
            command_id = f"{controller}-{self._id_prefix}{next(self._id_seq):x}"
        fields: dict[str, Any] = {"target": target, "message": message, "id": command_id, "queue": queue}
        effective = wait_ms if wait_ms is not None else timeout_ms
        if effective is not None:
            fields["timeout_ms"] = effective
        if len(message.encode()) > self.relay.settings.max_message_bytes:
            limit = self.relay.settings.max_message_bytes
            body = {"error": "message_too_large", "detail": f"message exceeds {limit} bytes", "limit": limit}
            return Outcome(413, body)
        request = self.parse(fields)
        if isinstance(request, ProtocolError):
            return Outcome(422, {"error": request.code.value, "detail": request.detail, **dict(request.extra)})
        owner = f"h:{next(self._http_seq)}"  # Unique in this instance, which is where outcomes come back.
        future: asyncio.Future[Outcome] = (self._loop or asyncio.get_running_loop()).create_future()
        self._waiters[owner] = _Waiter(future, wait_ms is not None, target)
        try:
            self.submit(owner, controller, request)
            return await future
        finally:
            self._waiters.pop(owner, None)
            if request.id is not None:  # This owner's only entry (a broadcast opens none): no scan of them all.
                self.pending.finish(owner, request.id)
                self._queueable.pop((owner, request.id), None)

    async def disconnect(self, client_id: str, code: int = CloseCode.DISCONNECTED) -> bool:
        """Close ``client_id``'s connection wherever it is (admin action); False if it is not connected."""
        if self.relay.disconnect_local(client_id, code):
            return True
        owner = await self.relay.broker.owner_of(client_id)
        if owner is None:
            return False
        event = Event("x", target=client_id, code=str(int(code)))
        self.relay.broker.send_to_instance(owner.instance, encode_event(event))
        return True

    def instance_event(self, payload: bytes | str) -> None:
        """The broker's per-instance channel: an outcome or an order for this instance."""
        try:
            event = _event_decoder.decode(payload)
        except msgspec.DecodeError:
            log.warning("Ignoring a malformed instance event")
            return
        self.outcome(event)


def encode_event(event: Event) -> bytes:
    return _event_encoder.encode(event)


_HTTP_STATUS = {
    "": 200,
    ErrorCode.TARGET_OFFLINE.value: 404,
    ErrorCode.INVALID_TARGET.value: 422,
    ErrorCode.INVALID_MESSAGE.value: 422,
    ErrorCode.MESSAGE_TOO_LARGE.value: 413,
    ErrorCode.RATE_LIMITED.value: 429,
    ErrorCode.DELIVERY_FAILED.value: 503,
    "duplicate_id": 409,
    "queue_full": 409,
    "target_not_client": 422,
}
