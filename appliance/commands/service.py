"""The sender's side of a command: its pending entry, its outcome, the offline queue, in-process callers."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

from .. import metrics
from ..brokers.base import Broker, BrokerUnavailable
from ..connections import Connection
from ..core.events import (
    Counted,
    Delivered,
    Disconnect,
    Drain,
    Failed,
    FanReplied,
    InstanceEvent,
    RecentAnswer,
    RecentAsk,
    Replied,
    decode_event,
)
from ..core.protocol import CONTROLLER_ID, ErrorCode, Role, encode_error
from ..core.protocol_v2 import (
    CommandId,
    Request,
    Status,
    TargetKind,
    TimeoutPolicy,
    encode_controller_reply,
    encode_delivered,
    encode_status,
)
from ..core.ratelimit import Budgets
from ..core.requests import Enqueued, Pending, PendingTable, Routed
from ..core.stopping import cancel_and_wait
from ..recent_logs import RecentLogs
from ..registry import LocalConnections
from ..settings import Settings
from .broadcast import Broadcasts
from .callers import InProcessCallers
from .followup import UNNAMED, Followups, timeout_detail
from .handover import ClientLines
from .idempotency import ControllerKeys, IdempotentSends, key_budget
from .outcome import HTTP_STATUS, IN_PROCESS, OUTCOMES, Outcome, Waiter

__all__ = ["TICK_SECONDS", "CommandService"]

log = logging.getLogger(__name__)

#: How often deadlines are checked; a timeout is reported at most this late.
TICK_SECONDS = 0.02


class CommandService(InProcessCallers):
    """This instance's part of request/reply: pending commands, outcomes, the queue; and the relay's hooks."""

    def __init__(self, settings: Settings, broker: Broker, local: LocalConnections, recent_logs: RecentLogs) -> None:
        self.settings = settings
        self.broker = broker
        self.local = local
        self.policy = TimeoutPolicy(settings.command_timeout_ms, settings.command_timeout_max_ms)
        self.instance = settings.instance_id
        self.pending = PendingTable()
        self._waiters: dict[str, Waiter] = {}
        self._next_sweep = 0.0
        self._queue_lock = asyncio.Lock()
        # Commands this instance queued and not yet seen delivered, until they expire: the offline-queue gauge.
        self._queued_here: dict[tuple[str, CommandId], float] = {}
        # Commands sent from here with "queue": true and not yet handed to a socket: if their client leaves
        # first (target_offline from its instance), they are queued for its return instead of refused.
        self._queueable: dict[tuple[str, CommandId], tuple[str, Routed]] = {}
        self._http_seq = itertools.count()
        self._id_prefix = secrets.token_hex(5)  # Ids of commands sent without one (HTTP, MCP, dashboard).
        self._id_seq = itertools.count()
        # In-process callers' rate limits: a bucket per token name (HTTP and MCP), "" for the dashboard.
        self.budgets = Budgets(settings.controller_rate_limit, settings.controller_rate_burst)
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Recent-commands questions and answers from other instances (``c``, ``C``): the recent-commands
        #: service (appliance/recent.py) sets this when it is wired.
        self.recent_event: Callable[[RecentAsk | RecentAnswer], None] = lambda event: None
        self.lines = ClientLines(
            self.instance,
            broker,
            local,
            recent_logs,
            settings.v1_reply_queue,
            outcome=self.outcome,
            delivered=self._delivered,
            replied=self._replied,
            queue_lock=self._queue_lock,
            spawn=self._spawn,
        )
        self.idempotent = IdempotentSends(broker, settings.idempotency_window_seconds, key_budget(settings))
        # GET /api/v1/commands/{id}, MCP get_command (followup.py)
        self.followups = Followups(broker, self.instance, local.epoch)
        self.keys = ControllerKeys(self.idempotent, self._submit_now, self._frame_to, self._spawn, self._caller_of)
        self.holding, self.after = self.keys.holding, self.keys.after  # The relay's, for commands without id.
        self.broadcasts = Broadcasts(
            self.instance, broker, local, recent_logs, spawn=self._spawn, finished=self._fan_out_finished
        )
        # The relay's hooks (relay.CommandHooks) that the target's side answers, bound once: no extra
        # call per frame on the hot path.
        self.matcher = self.lines.matcher
        self.client_text = self.lines.client_text
        self.hand_over = self.lines.hand_over
        self.client_opened = self.lines.client_opened
        self.client_closed = self.lines.client_closed
        self.fan_in_remote = self.broadcasts.fan_in_remote
        # A v2 reply nobody else waits for may answer a broadcast whose sender collects the replies.
        self.lines.broadcast_awaiting = self.broadcasts.awaiting
        self.lines.broadcast_reply = self.broadcasts.client_reply

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()  # get_running_loop() costs a getpid syscall (Python 3.11)
        self._ticker = self._loop.create_task(self._tick())

    async def stop(self) -> None:
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        await cancel_and_wait(tasks)  # Even one that swallowed its cancellation.
        await self.followups.stop()
        await self.idempotent.stop()
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
            OUTCOMES["timeout"].inc()
            self._report(pending, Status.TIMEOUT)
        self.lines.expire(now)
        metrics.PENDING_REQUESTS.set(len(self.pending))
        if now >= self._next_sweep:  # Forgetting v2 commands nobody answered is housekeeping: once a second.
            self._next_sweep = now + 1.0
            self.followups.sweep(now)
            for key in [k for k, expires in self._queued_here.items() if expires <= now]:
                del self._queued_here[key]
            metrics.OFFLINE_QUEUE.set(len(self._queued_here))
            self.lines.forget_unanswered(now)
            self.broadcasts.forget_unanswered(now)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the sender's side: WebSocket controllers ---------------------------------------------

    def submit(self, waiter: str, controller: str, request: Request) -> None:
        """A command with an id, or for ``*`` or a group, from ``waiter`` (a controller connection's key, or an HTTP waiter's)."""
        if request.kind is not TargetKind.CLIENT:  # Behind this connection's keyed commands, if any.
            waiting = self._waiters.get(waiter) if self._waiters else None
            # An in-process caller that waits (wait_ms) collects the v2 clients' replies for that long.
            collect_ms = request.timeout_ms if waiting is not None and waiting.want_reply else 0
            self.keys.in_order(waiter, partial(self.broadcasts.fan_out, waiter, controller, request, collect_ms))
        elif waiter.startswith(IN_PROCESS):  # Keyed by their callers (IdempotentSends), if at all.
            self._submit_now(waiter, controller, request)
        else:  # A WebSocket controller's id is its idempotency key.
            self.keys.submit(waiter, controller, request)

    def _submit_now(self, waiter: str, controller: str, request: Request) -> None:
        now = time.time()
        assert request.id is not None
        if self.pending.open(waiter, request.id, request.target, now, request.timeout_ms) is None:
            self._fail_now(waiter, request, ErrorCode.DUPLICATE_ID, f"id {request.id!r} is still in flight")
            return
        routed = Routed(
            controller, request.id, request.message, self.instance, waiter, request.timeout_ms, request.queue
        )
        if request.queue and request.target != CONTROLLER_ID:
            self._queueable[(waiter, request.id)] = (request.target, routed)
        # A partial, not a closure: no cell per captured name and no function object per command.
        self.broker.send_routed(request.target, routed, partial(self._routed_result, request.target, routed))

    def _routed_result(self, target: str, routed: Routed, code: ErrorCode | None, detail: str) -> None:
        if code is None:
            return  # The target's instance has it and reports the outcome.
        if code is ErrorCode.TARGET_OFFLINE and routed.queue:
            if target == CONTROLLER_ID:  # No client may ever hold it (4003): never queue for it.
                code, detail = ErrorCode.TARGET_NOT_CLIENT, f"{CONTROLLER_ID} is reserved for controllers"
            else:
                self._spawn(self._enqueue(target, routed))
                return
        self.outcome(Failed(routed.waiter, routed.id, target, code.value, detail))

    def _failed(self, routed: Routed, target: str, code: ErrorCode, detail: str) -> None:
        self.outcome(Failed(routed.waiter, routed.id, target, code.value, detail))

    async def _enqueue(self, target: str, routed: Routed, requeue: bool = False) -> None:
        """Queue ``routed`` for ``target``; ``requeue``: its client left before it was handed over."""
        try:
            # One at a time, so commands are queued in the order they were sent.
            async with self._queue_lock:
                enqueued = await self.broker.enqueue(target, routed, time.time(), requeue=requeue)
                holder = await self.broker.owner_of(target) if enqueued is Enqueued.QUEUED else None
        except BrokerUnavailable as exc:
            self._failed(routed, target, ErrorCode.DELIVERY_FAILED, str(exc))
            return
        if enqueued is Enqueued.FULL:
            detail = f"{target} already has {self.settings.offline_queue_max} queued commands"
            self._failed(routed, target, ErrorCode.QUEUE_FULL, detail)
            return
        if requeue and enqueued is not Enqueued.QUEUED:  # Already queued again (cannot happen twice): say so.
            self._queueable.pop((routed.waiter, routed.id), None)  # This target_offline is final.
            detail = f"{target} disconnected before the command was handed over"
            self._failed(routed, target, ErrorCode.TARGET_OFFLINE, detail)
            return
        pending = self.pending.get(routed.waiter, routed.id)
        if pending is None:
            return
        OUTCOMES["queued"].inc()
        if enqueued is Enqueued.QUEUED:
            self._queued_here[(routed.waiter, routed.id)] = time.time() + routed.timeout_ms / 1000
        remaining = max(0, round((pending.deadline - time.time()) * 1000))
        duplicate = {} if enqueued is Enqueued.QUEUED else {"duplicate": True}
        if enqueued is Enqueued.ALREADY_DELIVERED:
            # Delivered before: never again. The repeat's outcome is that delivery.
            self.pending.finish(routed.waiter, routed.id)
            self._queueable.pop((routed.waiter, routed.id), None)
            self._report(pending, Status.DELIVERED, **duplicate)
            return
        self._report(pending, Status.QUEUED, expires_in_ms=remaining, **duplicate)
        if holder is not None and holder.role is Role.CLIENT:
            # The target connected while this was being queued, after its own look at the queue.
            self.lines.tell_instance(holder.instance, Drain(target))

    def _fail_now(self, waiter: str, request: Request, code: ErrorCode, detail: str) -> None:
        frame = encode_error(code, detail, target=request.target, id=request.id)
        self._deliver_to_waiter(waiter, None, frame, code.value, detail)

    # --- the sender's side: outcomes --------------------------------------------------------

    def outcome(self, event: InstanceEvent) -> None:
        """An outcome for a command sent from this instance, or an order for it (from any instance, via the broker)."""
        if isinstance(event, Delivered):  # The commonest first.
            self._delivered(event.waiter, event.id)
        elif isinstance(event, Replied):
            self._replied(event.waiter, event.id, event.client, event.message, time.time())
        elif isinstance(event, Failed):
            self._failed_outcome(event)
        elif isinstance(event, Counted):
            self.broadcasts.counted(event)
        elif isinstance(event, FanReplied):
            self.broadcasts.replied(event)
        else:
            self._order(event)

    def _order(self, event: Disconnect | Drain | RecentAsk | RecentAnswer) -> None:
        """Orders for this instance, which holds the client they name: not outcomes of its own commands."""
        if isinstance(event, Disconnect):
            self.local.disconnect_local(event.target, event.code)
        elif isinstance(event, Drain):
            conn = self.local.local_client(event.target)
            if conn is not None:
                self._spawn(self.lines.drain(conn))
        else:  # A client's recent commands: asked for, or answered (recent.py).
            self.recent_event(event)

    def _failed_outcome(self, event: Failed) -> None:
        queueable = self._queueable.get((event.waiter, event.id))
        if queueable is not None and event.code == ErrorCode.TARGET_OFFLINE.value:
            pending = self.pending.get(event.waiter, event.id)
            if pending is not None and not pending.delivered:
                # Its client left before the command was handed over: queue it for the client's return.
                self._spawn(self._enqueue(*queueable, requeue=True))
                return
        self._queueable.pop((event.waiter, event.id), None)
        pending = self.pending.finish(event.waiter, event.id)
        if pending is None:  # Timed out already, or its caller left: only a record (followup.py) may keep it.
            self.followups.failed(event.waiter, event.id, event.code, event.detail)
            return
        metrics.COMMAND_OUTCOMES.labels(outcome=event.code or "error").inc()  # errors: rare
        frame = encode_error(ErrorCode(event.code), event.detail, target=pending.target, id=pending.id)
        self._deliver_to_waiter(pending.waiter, pending, frame, event.code, event.detail)

    def _delivered(self, waiter: str, command_id: CommandId) -> None:
        """The command reached its client's socket."""
        if self._queued_here:
            self._queued_here.pop((waiter, command_id), None)
        if self._queueable:
            self._queueable.pop((waiter, command_id), None)
        pending = self.pending.delivered(waiter, command_id)
        if pending is None:  # Timed out already, or its caller left: only a record (followup.py) may keep it.
            self.followups.delivered(waiter, command_id)
            return
        metrics.DELIVERED.count += 1
        if pending.waiter not in self._waiters:
            frame = encode_delivered(pending.id, pending.target)  # (Commands for * or a group open no entry.)
            self.keys.finished(waiter, pending.id, frame)  # Its last status, should its controller leave.
            self._frame_to(waiter, frame)
            return
        self.followups.delivered(waiter, command_id)
        self._report(pending, Status.DELIVERED)

    def _replied(self, waiter: str, command_id: CommandId, sender: str, message: str, now: float) -> None:
        """The client's reply (arrived at ``now``), to the sender only."""
        pending = self.pending.finish(waiter, command_id)
        if pending is None:  # Timed out already, or its caller left: only a record (followup.py) may keep it.
            self.followups.replied(waiter, command_id, sender, message, now)
            return
        rtt_ms = (now - pending.started) * 1000
        metrics.REPLIED.count += 1
        metrics.REPLY_SECONDS.observe(rtt_ms / 1000)
        waiting = self._waiters.get(waiter)
        if waiting is None:
            frame = encode_controller_reply(command_id, sender, message, rtt_ms)
            self.keys.finished(waiter, command_id, frame)
            self._frame_to(waiter, frame)
            return
        body = {
            "id": command_id,
            "status": Status.REPLIED.value,
            "target": pending.target,
            "sender": sender,
            "message": message,
            "rtt_ms": round(rtt_ms, 3),
        }
        self._resolve(waiter, Outcome(200, body))

    def _report(self, pending: Pending, status: Status, **extra: Any) -> None:
        """A status for ``pending``'s waiter: a status frame, or an HTTP outcome."""
        waiting = self._waiters.get(pending.waiter)
        if waiting is None:
            if status is Status.TIMEOUT:
                extra["timeout_ms"] = round((pending.deadline - pending.started) * 1000)
            frame = encode_status(pending.id, status, pending.target, **extra)
            self.keys.finished(pending.waiter, pending.id, frame)  # Final (a timeout) or not (delivered, queued).
            self._frame_to(pending.waiter, frame)
            return
        body = {"id": pending.id, "status": status.value, "target": pending.target, **extra}
        if status is Status.TIMEOUT:
            body["delivered"] = pending.delivered
            body["detail"] = timeout_detail(pending.target, pending.delivered)
            self._resolve(pending.waiter, Outcome(504, body))
        elif status is Status.QUEUED or not waiting.want_reply or extra.get("duplicate"):
            # Queued, delivered without wait_ms, or a repeat: the caller is answered now (202).
            self.pending.finish(pending.waiter, pending.id)
            self._resolve(pending.waiter, Outcome(202, body))

    def _deliver_to_waiter(self, waiter: str, pending: Pending | None, frame: str, code: str, detail: str) -> None:
        waiting = self._waiters.get(waiter)
        if waiting is None:
            self.keys.finished(waiter, None if pending is None else pending.id, frame)
            if code:
                metrics.ERRORS.labels(code=code).inc()
            self._frame_to(waiter, frame)
            return
        body = msgspec.json.decode(frame)
        self._resolve(waiter, Outcome(HTTP_STATUS.get(code, 502), body))

    def _resolve(self, waiter: str, outcome: Outcome) -> None:
        waiting = self._waiters.pop(waiter, None)
        if waiting is not None and not waiting.future.done():
            waiting.future.set_result(outcome)

    def controller_closed(self, conn: Connection) -> None:
        """A controller left: its commands still in flight have nobody to report to."""
        for pending in self.pending.drop_waiter(conn.conn_key):
            self._queueable.pop(pending.key, None)
            self.keys.abandoned(pending.waiter, pending.id, pending.target, pending.delivered)

    def _caller_of(self, waiter: str) -> str:
        """A controller connection's caller (its token's name; the unnamed tokens together): its key budget."""
        conn = self.local.connection(waiter)
        grant = conn.grant if conn is not None else None
        return (grant.caller if grant is not None else None) or UNNAMED

    def _frame_to(self, waiter: str, frame: str) -> None:
        conn = self.local.connection(waiter)
        if conn is not None:
            conn.deliver(frame)

    def _fan_out_finished(self, waiter: str, request: Request, count: int, collected: dict[str, Any] | None) -> None:
        """A fan-out reached ``count`` clients; ``collected``: the awaited v2 clients' replies and silences."""
        OUTCOMES["delivered"].inc()
        if request.id is None and waiter not in self._waiters:
            return  # A WebSocket broadcast without id gets no status frame, as in version 1.
        body = {"id": request.id, "status": Status.DELIVERED.value, "target": request.target, "count": count}
        if collected is not None and waiter in self._waiters:  # Its status: replied when all awaited answered.
            self._resolve(waiter, Outcome(200, {**body, **collected}))
        elif waiter in self._waiters:
            self._resolve(waiter, Outcome(202, body))
        else:
            conn = self.local.connection(waiter)
            if conn is not None and request.id is not None:
                conn.deliver(encode_status(request.id, Status.DELIVERED, request.target, count=count))

    def instance_event(self, payload: bytes | str) -> None:
        """The broker's per-instance channel: an outcome or an order for this instance."""
        event = _decoded(payload)
        if event is not None:
            self.outcome(event)


def _decoded(payload: bytes | str) -> InstanceEvent | None:
    try:
        return decode_event(payload)
    except msgspec.DecodeError:
        log.warning("Ignoring a malformed instance event")
        return None
