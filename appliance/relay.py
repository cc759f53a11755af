"""The relay service: this instance's connections, glued to the pure core and a broker.

The WebSocket handler feeds frames to a connection's :class:`~appliance.core.session.Session`
and hands the resulting actions to :meth:`Relay.perform`; the broker reaches local
connections through the :class:`~appliance.brokers.base.Inbox` methods. The HTTP API and
the dashboard use :meth:`Relay.clients`, :meth:`Relay.status`, :meth:`Relay.history` and
:meth:`Relay.recent_commands`, never the connections themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any

from . import metrics
from .brokers.base import Broker, BrokerUnavailable, Owner
from .commands import CommandService
from .core.history import close_entry
from .core.protocol import CLOSE_REASONS, CloseCode, Command, ErrorCode, Role
from .core.protocol_v2 import TimeoutPolicy, encode_client_command
from .core.recent import CommandLog, cut
from .core.requests import Routed
from .core.session import Close, Deliver, Limits, Publish, ReplyOrPublish, SendError, Session, State, Submit
from .recent import RecentCommands
from .settings import Settings
from .tokens.base import Grant
from .wsbatch import MAX_BATCH_CHARS, batcher_for

__all__ = ["Connection", "Flusher", "Relay"]

log = logging.getLogger(__name__)

ASGISend = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]

#: A connection that lets this many messages pile up unsent is too slow to keep (close 4008).
MAX_PENDING_MESSAGES = 10_000
#: ... or this many characters of text (a character is at least one UTF-8 byte; frames are
#: JSON, mostly ASCII): 64 KiB client messages escape to ~390 KB frames, so a count alone
#: let a slow controller hold gigabytes.
MAX_PENDING_CHARS = 4 << 20


def _iso(epoch: float) -> str:
    return _iso_second(int(epoch))  # Whole seconds, as shown: cached, many records share a second.


@functools.lru_cache(maxsize=8192)
def _iso_second(second: int) -> str:
    """Formatting dominated building 10,000 presence records; most of them share a few seconds."""
    return datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")


class Flusher:
    """Writes queued frames once per event-loop pass, for every connection that has any.

    Deferring writes to the end of the pass lets a burst (a fan-out, a controller's
    replies) be routed before it is written, and one callback per pass is far cheaper
    than a task per connection: the bench measured a task per burst at a third of the
    fan-out time.
    """

    __slots__ = ("_dirty", "_loop", "_scheduled", "received_at")

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._scheduled = False
        #: The serving loop, from start to stop: asyncio.get_running_loop() costs a getpid syscall
        #: on Python 3.11, and mark() schedules once per loop pass.
        self._loop: asyncio.AbstractEventLoop | None = None
        #: When the reader got the first frame since the last flush (0: none). One histogram
        #: sample per flush, not per frame, keeps wsbridge_relay_seconds off the per-frame path.
        self.received_at = 0.0

    def mark(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush)

    def bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self._loop = loop

    def _flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        now = time.time()
        if self.received_at:
            metrics.RELAY_SECONDS.observe(now - self.received_at)
            self.received_at = 0.0
        for conn in dirty:
            conn._write_now(now)


class Connection:
    """One accepted WebSocket: its session, its outbound queue and how to close it.

    Sends never block the caller: frames are queued and written at the end of the
    loop pass by the :class:`Flusher`. uvicorn's ``send`` only suspends while the
    transport is paused (back-pressure); only then does a writer task take over this
    connection's queue, so one slow peer never stalls routing for everybody else.
    """

    __slots__ = (
        "session",
        "conn_key",
        "remote",
        "owner",
        "close_code",
        "close_reason",
        "grant",
        "rtt_from",
        "_send",
        "_batcher",
        "_flusher",
        "_pending",
        "_pending_chars",
        "_max_messages",
        "_max_chars",
        "_writer",
        "_open",
        "_marked",
        "v2",
        "groups",
        "recent",
    )

    def __init__(
        self,
        session: Session,
        send: ASGISend,
        remote: str,
        flusher: Flusher,
        max_messages: int = MAX_PENDING_MESSAGES,
        max_chars: int = MAX_PENDING_CHARS,
        *,
        v2: bool = False,
        groups: tuple[str, ...] = (),
    ) -> None:
        self.session = session
        #: Speaks protocol version 2 (subprotocol ``wsbridge.v2``): commands arrive as JSON with id and sender.
        self.v2 = v2
        self.groups = groups
        self.conn_key = uuid.uuid4().hex[:16]
        self.remote = remote
        self.owner: Owner | None = None
        self.close_code: int | None = None
        self.close_reason = ""  # The reason the relay sent with close_code (connect history).
        self.grant: Grant | None = None  # the token (name, version) that opened it, for eviction
        #: When the oldest command this client has not answered yet was written (0: none);
        #: the reader observes wsbridge_command_rtt_seconds at the client's next message.
        self.rtt_from = 0.0
        #: The client's recent commands (appliance/recent.py): None until its first command, for controllers,
        #: or when they are not recorded.
        self.recent: CommandLog | None = None
        self._send = send
        # Several frames in one transport write when uvicorn's protocol is reachable (see wsbatch).
        self._batcher = batcher_for(send)
        self._flusher = flusher
        self._pending: deque[str | tuple[int, str]] = deque()
        self._pending_chars = 0  # Text queued and not yet handed to the transport.
        self._max_messages = max_messages
        self._max_chars = max_chars
        self._writer: asyncio.Task[None] | None = None
        self._open = False
        self._marked = False

    @property
    def client_id(self) -> str:
        return self.session.client_id

    @property
    def role(self) -> Role:
        return self.session.role

    def opened(self) -> None:
        """The handshake is complete: frames queued until now may be written."""
        self._open = True
        self._schedule()

    def deliver(self, text: str) -> bool:
        """Queue ``text``: True if queued, False if it will never be written (closing, or too slow)."""
        if self.close_code is not None:
            return False
        self._pending_chars += len(text)
        if self._pending_chars > self._max_chars or len(self._pending) >= self._max_messages:
            log.warning("%s is not reading; closing it as a slow consumer", self.client_id)
            metrics.REFUSED.labels(reason="slow_consumer").inc()
            self._drop_pending()  # Free the memory now; the close goes out if the peer ever reads.
            self.close(CloseCode.SLOW_CONSUMER)
            return False
        self._pending.append(text)
        if not self._marked:  # Already marked: the flusher writes it with the rest (no call per frame).
            self._schedule()
        return True

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._pending_chars = 0

    def close(self, code: CloseCode, reason: str | None = None) -> None:
        """Close after the frames already queued; later deliveries are dropped."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason or CLOSE_REASONS[code]
        if self.session.state is State.OPEN:
            self.session.closing()
        self._pending.append((int(code), self.close_reason))
        self._schedule()

    def _schedule(self) -> None:
        if self._open and not self._marked and self._writer is None and self._pending:
            self._marked = True
            self._flusher.mark(self)

    @staticmethod
    def _event(item: str | tuple[int, str]) -> dict[str, Any]:
        if isinstance(item, str):
            return {"type": "websocket.send", "text": item}
        return {"type": "websocket.close", "code": item[0], "reason": item[1]}

    def _write_now(self, now: float) -> None:
        """Called by the flusher: write the queue synchronously while the transport has room."""
        self._marked = False
        pending, session = self._pending, self.session
        awaits_reply = session.role is Role.CLIENT  # Frames to a client are commands.
        batcher = self._batcher
        while pending and self._writer is None:
            if batcher is not None and isinstance(pending[0], str) and batcher.ready():
                # The frames uvicorn would write one by one right now, in one write.
                texts: list[str] = []
                chars = 0
                while pending and chars < MAX_BATCH_CHARS:
                    text = pending[0]
                    if not isinstance(text, str):
                        break  # A close: uvicorn's own send writes it, after these.
                    pending.popleft()
                    texts.append(text)
                    chars += len(text)
                self._pending_chars -= chars
                try:
                    batcher.write(texts)
                except Exception:  # The peer is gone (closing, OSError): the reader cleans up.
                    self._drop_pending()
                    return
                session.sent(now, len(texts))
                if awaits_reply and not self.rtt_from:
                    self.rtt_from = now
                continue
            item = pending.popleft()
            if isinstance(item, str):
                self._pending_chars -= len(item)
            else:
                self._drop_pending()
            step = self._send(self._event(item))
            try:
                waiting_on = step.send(None)
            except StopIteration:
                if isinstance(item, str):
                    session.sent(now)
                    if awaits_reply and not self.rtt_from:
                        self.rtt_from = now
                continue
            except Exception:  # The peer is gone (ClientDisconnected, OSError): the reader cleans up.
                self._drop_pending()
                return
            # Back-pressure: a writer task finishes this send and owns the queue until it is empty.
            self._writer = asyncio.get_running_loop().create_task(self._finish(step, waiting_on, item))

    def _sent(self, now: float) -> None:
        """A frame was written by the writer task (the slow path; _write_now inlines this)."""
        self.session.sent(now)
        if self.session.role is Role.CLIENT and not self.rtt_from:
            self.rtt_from = now

    def queued(self) -> tuple[int, int]:
        """Frames and characters waiting to be written (for the queue-depth gauges)."""
        return len(self._pending), self._pending_chars

    async def _finish(self, step: Any, waiting_on: Any, item: str | tuple[int, str]) -> None:
        """Drive a send that suspended to completion, as a task would, then drain the queue."""
        try:
            try:
                while True:
                    if waiting_on is None:  # A bare yield asks to run again on the next pass.
                        await asyncio.sleep(0)
                    else:
                        # Wait by callback: awaiting a future that another coroutine already
                        # yielded raises "await wasn't used with future". Resuming the send
                        # then returns the future's result (or raises its error) inside it.
                        await asyncio.wait([waiting_on])
                    waiting_on = step.send(None)
            except StopIteration:
                if isinstance(item, str):
                    self._sent(time.time())
            send, pending = self._send, self._pending
            while pending:
                item = pending.popleft()
                if isinstance(item, str):
                    self._pending_chars -= len(item)
                else:
                    self._drop_pending()
                await send(self._event(item))
                if isinstance(item, str):
                    self._sent(time.time())
        except Exception:  # The peer is gone: the reader cleans up.
            self._drop_pending()
        finally:
            self._writer = None

    async def flush(self, timeout: float) -> None:
        """Wait until the queued frames are written (or ``timeout``)."""
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(timeout):
                while self._writer is not None or self._marked:
                    if self._writer is not None:
                        await asyncio.shield(self._writer)
                    else:
                        await asyncio.sleep(0)  # The flusher runs at the end of this pass.

    def presence_record(self, instance: str) -> dict[str, Any]:
        session = self.session
        record: dict[str, Any] = {
            "id": session.client_id,
            "role": session.role.value,
            "instance": instance,
            "connected_since": _iso(session.connected_since),
            "remote": self.remote,
            "messages_in": session.messages_in,
            "messages_out": session.messages_out,
            "last_activity": _iso(session.last_activity),
            "token": self.grant.name if self.grant else None,
            "token_version": self.grant.version if self.grant else None,
        }
        # Only when set, so version-1 records keep exactly their fields.
        if self.v2:
            record["protocol"] = 2
        if self.groups:
            record["groups"] = list(self.groups)
        return record


class Relay:
    """This instance's side of the cluster: local connections, routing, presence, shutdown."""

    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.instance = settings.instance_id
        self.local: dict[str, Connection] = {}
        self.controllers: set[Connection] = set()
        self.draining = False
        self._claiming: dict[str, tuple[asyncio.Lock, int]] = {}
        self._kicked: dict[str, float] = {}  # conn_keys replaced before they finished opening
        timeouts = TimeoutPolicy(settings.command_timeout_ms, settings.command_timeout_max_ms)
        self._limits = {
            Role.CLIENT: Limits(settings.max_message_bytes, settings.client_rate_limit, settings.client_rate_burst),
            Role.CONTROLLER: Limits(
                settings.max_message_bytes, settings.controller_rate_limit, settings.controller_rate_burst, timeouts
            ),
        }
        self._groups: dict[str, set[Connection]] = {}
        self.commands = CommandService(self)
        self._connections: dict[str, Connection] = {}  # by conn_key
        #: The open connection with this conn_key, or None (the command service's owners). The dict's
        #: own ``get``: called for every status and reply frame, and a method around it is a Python frame.
        self.connection: Callable[[str], Connection | None] = self._connections.get
        # Moves on every connect and leave (never per message): the dashboard's cheap "list changed" test.
        self.membership = 0
        self.epoch = uuid.uuid4().hex[:8]  # Tells a restarted instance's counter from its previous life.
        self._flusher = Flusher()
        self.flusher = self._flusher  # The reader stamps received_at on it.
        # Frames written to connections that are gone, by role; live ones are summed at scrape
        # time from their sessions' counts, so the write path pays nothing for the metric.
        self._sent_by_gone = {Role.CONTROLLER.value: 0, Role.CLIENT.value: 0}
        metrics.FRAMES_SENT.source = self.frames_sent
        metrics.watch(metrics.SEND_QUEUE_MESSAGES_MAX, lambda: self.fullest_queue()[0])
        metrics.watch(metrics.SEND_QUEUE_BYTES_MAX, lambda: self.fullest_queue()[1])
        self._cleanups: set[asyncio.Task[None]] = set()
        self.recent = RecentCommands(self)
        self._recording = bool(settings.recent_commands_per_client)

    async def start(self) -> None:
        self._flusher.bind(asyncio.get_running_loop())
        await self.broker.start(self)
        self.commands.start()

    async def stop(self) -> None:
        await self.commands.stop()
        await self.broker.stop()
        self._flusher.bind(None)

    def new_connection(
        self,
        client_id: str,
        role: Role,
        send: ASGISend,
        remote: str,
        grant: Grant | None = None,
        *,
        v2: bool = False,
        groups: tuple[str, ...] = (),
    ) -> Connection:
        session = Session(client_id, role, self._limits[role], time.time(), v2=v2)
        settings = self.settings
        max_chars = (
            settings.controller_max_pending_bytes if role is Role.CONTROLLER else settings.client_max_pending_bytes
        )
        conn = Connection(
            session, send, remote, self._flusher, settings.max_pending_messages, max_chars, v2=v2, groups=groups
        )
        conn.grant = grant
        return conn

    # --- lifecycle of one connection ----------------------------------------------------

    async def open(self, conn: Connection) -> CloseCode | None:
        """Claim the connection's id cluster-wide and register it; a close code refuses it."""
        if self.draining:
            return CloseCode.GOING_AWAY
        client_id = conn.client_id
        # One claim per id at a time on this instance: a reconnect storm resolves in order.
        lock, users = self._claiming.get(client_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._claiming[client_id] = (lock, users + 1)
        try:
            async with lock:
                started = time.perf_counter()
                try:
                    claim = await self.broker.claim(
                        client_id,
                        self.instance,
                        conn.conn_key,
                        conn.role,
                        self.settings.duplicate_policy == "reject",
                    )
                except BrokerUnavailable as exc:
                    log.warning("Refusing %s: %s", client_id, exc)
                    return CloseCode.TRY_AGAIN_LATER
                finally:
                    metrics.CLAIM_SECONDS.observe(time.perf_counter() - started)
                if not claim.accepted:
                    return CloseCode.ROLE_CONFLICT if claim.role_conflict else CloseCode.DUPLICATE_REJECTED
                assert claim.owner is not None
                try:
                    refusal = self._register(conn, claim.owner, claim.previous)
                except BaseException:  # A bug after the claim must not leave the id held by nobody.
                    await self._release_surely(client_id, claim.owner)
                    raise
                if refusal is not None:
                    await self._release_surely(client_id, claim.owner)
                elif conn.role is Role.CLIENT:
                    self.commands.client_opened(conn)  # Commands queued while it was away go first.
                return refusal
        finally:
            lock, users = self._claiming[client_id]
            if users == 1:
                del self._claiming[client_id]
            else:
                self._claiming[client_id] = (lock, users - 1)

    def _register(self, conn: Connection, owner: Owner, previous: Owner | None) -> CloseCode | None:
        """The claim succeeded: make ``conn`` the local holder of its id, unless it lost meanwhile."""
        client_id = conn.client_id
        if previous is not None:
            self.replaced(client_id, previous)
        if self._kicked.pop(conn.conn_key, None) is not None:
            return CloseCode.REPLACED
        if self.draining:  # SIGTERM arrived during the claim: drain() has already run.
            return CloseCode.GOING_AWAY
        older = self.local.get(client_id)
        if older is not None:  # Claims for one id are serialized here, so this one is newer.
            self._close_replaced(older)
        if conn.role is Role.CLIENT:
            self.recent.opened(conn, older)
        conn.owner = owner
        self.local[client_id] = conn
        self._connections[conn.conn_key] = conn
        self.membership += 1
        if conn.role is Role.CONTROLLER:
            self.controllers.add(conn)
        for group in conn.groups:
            self._groups.setdefault(group, set()).add(conn)
        metrics.CONNECTIONS.labels(role=conn.role.value).inc()
        return None

    async def _release_surely(self, client_id: str, owner: Owner) -> None:
        """Release an id even if the caller is being cancelled: the release runs to its end."""
        task = asyncio.get_running_loop().create_task(self.broker.release(client_id, owner))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    async def close(self, conn: Connection) -> None:
        """The connection is gone: unregister it, and release its id unless a newer one holds it."""
        conn.session.closed()
        if self._connections.pop(conn.conn_key, None) is None:
            return
        self.membership += 1
        self.controllers.discard(conn)
        for group in conn.groups:
            members = self._groups.get(group)
            if members is not None:
                members.discard(conn)
                if not members:
                    del self._groups[group]
        if self.local.get(conn.client_id) is conn:
            del self.local[conn.client_id]
            if conn.role is Role.CLIENT:
                self.commands.client_closed(conn)
                self.recent.closed(conn)
        if conn.role is Role.CONTROLLER:
            self.commands.controller_closed(conn)
        metrics.CONNECTIONS.labels(role=conn.role.value).dec()
        self._sent_by_gone[conn.role.value] += conn.session.messages_out
        if conn.owner is not None:
            await self._release_surely(conn.client_id, conn.owner)

    def frames_sent(self) -> dict[str, float]:
        """Frames written so far by receiving role (wsbridge_frames_sent_total, summed when scraped)."""
        totals: dict[str, float] = dict(self._sent_by_gone)
        for conn in self._connections.values():
            totals[conn.role.value] += conn.session.messages_out
        return totals

    def fullest_queue(self) -> tuple[int, int]:
        """(frames, characters) waiting in the fullest send queue, when scraped."""
        return max((conn.queued() for conn in self._connections.values()), default=(0, 0))

    # --- actions from the core ---------------------------------------------------------

    def perform(self, conn: Connection, action: Any) -> None:
        """Carry out what the session decided about one received frame.

        Synchronous on purpose (no coroutine per frame); a :class:`Throttle` is the
        reader's to honour, since pausing the reader is what slows the peer down.
        """
        if type(action) is Deliver:
            self._deliver(conn, action.command)
        elif type(action) is Publish:
            metrics.RECEIVED_FROM_CLIENTS.count += 1
            # Only v1 clients with a command in flight cost a look (their reply line).
            if self.commands.matcher.has_line(conn.client_id):
                self.commands.client_text(conn, action.text)
            self.broker.send_to_controllers(action.frame)
        elif type(action) is Submit:
            metrics.RECEIVED_FROM_CONTROLLERS.count += 1
            self.commands.submit(conn.conn_key, conn.session.client_id, action.request)
        elif type(action) is ReplyOrPublish:
            metrics.RECEIVED_FROM_CLIENTS.count += 1
            if not self.commands.client_text(conn, action.text):  # A reply_to answer goes to its sender only.
                self.broker.send_to_controllers(action.frame)
        elif type(action) is SendError:
            metrics.ERRORS.labels(code=action.code.value).inc()
            conn.deliver(action.frame)
        elif type(action) is Close:
            conn.close(action.code, action.reason)

    def _deliver(self, conn: Connection, command: Command) -> None:
        metrics.RECEIVED_FROM_CONTROLLERS.count += 1

        def done(code: ErrorCode | None, detail: str) -> None:
            # Success needs no frame in protocol v1; status frames would go here.
            if code is not None:
                self.perform(conn, conn.session.delivery_failed(command, code, detail))

        self.broker.send(command.target, command.message, done, conn.client_id)

    # --- Inbox: what the broker hands us ---------------------------------------------------

    def deliver(self, client_id: str, text: str, sender: str = "") -> ErrorCode | None:
        conn = self.local.get(client_id)
        if conn is None:
            return ErrorCode.TARGET_OFFLINE
        if conn.session.role is Role.CONTROLLER:
            # Controllers send to clients only: raw text pushed into a controller could
            # forge another client's {"sender": ...} reply.
            return ErrorCode.TARGET_NOT_CLIENT
        if conn.deliver(encode_client_command(None, sender, text) if conn.v2 else text):
            recent = conn.recent
            if recent is None and self._recording:
                recent = self.recent.log_for(conn)
            if recent is not None:
                # CommandLog.untracked, inlined on the version-1 hot path: the call cost as much as
                # the append (0.12 against 0.09 us a command in-process; a round trip costs ~20 us
                # of server CPU). Stamped and cut now, formatted only when somebody reads.
                recent.entries.append(
                    (time.time(), sender, None, text if len(text) <= recent.max_chars else cut(text, recent.max_chars))
                )
            return None
        return ErrorCode.DELIVERY_FAILED

    def deliver_routed(self, client_id: str, routed: Routed) -> ErrorCode | None:
        """A command with an id for a local client: the command service frames and tracks it."""
        conn = self.local.get(client_id)
        if conn is None:
            return ErrorCode.TARGET_OFFLINE
        if conn.session.role is Role.CONTROLLER:
            return ErrorCode.TARGET_NOT_CLIENT
        if conn.close_code is not None:
            return routed.closing_error
        self.commands.hand_over(conn, routed, time.time())
        return None

    def instance_event(self, payload: bytes) -> None:
        """An outcome or an order on this instance's channel."""
        self.commands.instance_event(payload)

    def fan_in(self, payload: bytes) -> None:
        """A broadcast or group command from any instance: deliver locally, report the count."""
        self.commands.fan_in_remote(payload)

    def deliver_to_controllers(self, frame: str) -> None:
        for conn in self.controllers:
            conn.deliver(frame)

    def replaced(self, client_id: str, owner: Owner) -> None:
        conn = self._connections.get(owner.conn_key)
        if conn is not None and conn.owner == owner:
            self._close_replaced(conn)
            return
        if owner.instance == self.instance:
            now = time.monotonic()
            self._kicked[owner.conn_key] = now
            for key, at in list(self._kicked.items()):
                if now - at > 60:
                    del self._kicked[key]

    def _close_replaced(self, conn: Connection) -> None:
        if conn.close_code is None:  # The broker and the local check may both report it.
            metrics.REFUSED.labels(reason="replaced").inc()
            conn.close(CloseCode.REPLACED)

    def presence_records(self) -> list[dict[str, Any]]:
        return [conn.presence_record(self.instance) for conn in self._connections.values() if conn.owner is not None]

    def presence_summary(self) -> dict[str, Any]:
        """This instance's counters and membership version, without building a record per connection."""
        clients = messages_in = messages_out = 0
        for conn in self._connections.values():
            session = conn.session
            messages_in += session.messages_in
            messages_out += session.messages_out
            if conn.role is Role.CLIENT:
                clients += 1
        connections = len(self._connections)
        return {
            "instance": self.instance,
            "epoch": self.epoch,
            "membership": self.membership,
            "connections": connections,
            "clients": clients,
            "controllers": connections - clients,
            "messages_in": messages_in,
            "messages_out": messages_out,
        }

    def presence_record(self, client_id: str) -> dict[str, Any] | None:
        conn = self.local.get(client_id)
        return conn.presence_record(self.instance) if conn is not None and conn.owner is not None else None

    # --- lookups for the command service --------------------------------------------------

    def local_client(self, client_id: str) -> Connection | None:
        conn = self.local.get(client_id)
        return conn if conn is not None and conn.role is Role.CLIENT and conn.close_code is None else None

    def local_clients(self, group: str | None) -> list[Connection]:
        """Local clients, or the local members of ``group``."""
        if group is None:
            return [c for c in self.local.values() if c.role is Role.CLIENT and c.close_code is None]
        return [c for c in self._groups.get(group, ()) if c.close_code is None]

    def disconnect_local(self, client_id: str, code: int | str) -> bool:
        """Close the local connection holding ``client_id`` with ``code``; False if there is none here."""
        conn = self.local.get(client_id)
        if conn is None or conn.close_code is not None:
            return False
        metrics.REFUSED.labels(reason="disconnected").inc()
        conn.close(CloseCode(int(code)))
        return True

    # --- service interface for the HTTP API and the dashboard ----------------------------

    def record_close(self, conn: Connection, code: int | None, reason: str, by_relay: bool) -> None:
        """Add a connection that was open to its id's connect history (once, at close; never waits)."""
        if conn.owner is None:
            return  # Refused before it was registered: never connected.
        entry = close_entry(
            conn.presence_record(self.instance),
            connected_at=conn.session.connected_since,
            closed_at=time.time(),
            code=code,
            reason=reason,
            by_relay=by_relay,
        )
        try:
            self.broker.record_history(conn.client_id, entry)
        except Exception:  # History is best effort: a bug here must not keep the id from being released.
            log.exception("Could not record the connect history of %s", conn.client_id)

    async def history(self, client_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """``client_id``'s connect history, cluster-wide, newest first (raises BrokerUnavailable)."""
        return await self.broker.history(client_id, min(limit, self.settings.history_per_client))

    async def recent_commands(
        self, client_id: str, history: Iterable[dict[str, Any]] = ()
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """``client_id``'s recent commands, cluster-wide, newest first, and the instances that did not answer.

        ``history`` is its connect history: the instances that held it recently keep their part
        (appliance/recent.py).
        """
        return await self.recent.read(client_id, history)

    async def clients(self, *, ordered: bool = True) -> list[dict[str, Any]]:
        """Cluster presence, by id then instance; ``ordered=False`` skips the sort for callers that
        select their own page (the dashboard's table)."""
        records = await self.broker.presence()
        if not ordered:
            return records
        return sorted(records, key=lambda r: (r["id"], r["instance"]))

    async def cluster_summary(self) -> list[dict[str, Any]]:
        """Per instance: connection and message counters and a membership version (see Broker.presence_summary).

        A few small reads however many connections there are: what an idle dashboard polls.
        """
        return await self.broker.presence_summary()

    def status(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        return self.broker.health()

    # --- tokens (appliance/tokens/service.py) --------------------------------------------

    def grants(self) -> Counter[tuple[str, int]]:
        """Local connections by the token (name, version) that opened them."""
        return Counter((c.grant.name, c.grant.version) for c in self._connections.values() if c.grant is not None)

    def evict(self, token_name: str, version: int, code: CloseCode) -> int:
        """Close every local connection opened with this token version (expired or revoked)."""
        victims = [
            conn
            for conn in self._connections.values()
            if conn.grant is not None and conn.grant.name == token_name and conn.grant.version == version
        ]
        for conn in victims:
            conn.close(code)
        return len(victims)

    async def drain(self, grace: float) -> None:
        """SIGTERM: refuse newcomers, close every socket with 1001 after its queued frames."""
        self.draining = True
        conns = list(self._connections.values())
        log.info("Shutting down: closing %d connections with 1001", len(conns))
        for conn in conns:
            conn.close(CloseCode.GOING_AWAY)
        if conns:
            await asyncio.gather(*(c.flush(grace) for c in conns))
