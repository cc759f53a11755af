"""One accepted WebSocket (:class:`Connection`) and the writer that flushes every connection once per loop pass.

The outbound queue, the close handshake and the slow-consumer policy live here; the
relay (appliance/relay.py) decides what goes into the queue, and the local-connections
registry (appliance/registry.py) finds connections by id, key, role and group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from . import metrics
from .brokers.base import Owner
from .core.protocol import CLOSE_REASONS, CloseCode, Role
from .core.recent import CommandLog
from .core.session import Session, State
from .core.timefmt import iso
from .tokens.base import Grant
from .wsbatch import MAX_BATCH_CHARS, batcher_for

__all__ = ["MAX_PENDING_CHARS", "MAX_PENDING_MESSAGES", "ASGISend", "Connection", "Flusher"]

log = logging.getLogger(__name__)

ASGISend = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]

#: A connection that lets this many messages pile up unsent is too slow to keep (close 4008).
MAX_PENDING_MESSAGES = 10_000
#: ... or this many characters of text (a character is at least one UTF-8 byte; frames are
#: JSON, mostly ASCII): 64 KiB client messages escape to ~390 KB frames, so a count alone
#: let a slow controller hold gigabytes.
MAX_PENDING_CHARS = 4 << 20


@functools.lru_cache(maxsize=8192)
def _iso_second(second: int) -> str:
    """Whole seconds, as shown, cached: formatting dominated building 10,000 presence records, and most
    of them share a few seconds."""
    return iso(second, "seconds")


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
        "manifest",
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
        #: The commands a version-2 client declared (appliance/core/manifest.py), None until it sends a manifest.
        self.manifest: dict[str, Any] | None = None
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
            metrics.CLOSED_BY_RELAY.labels(reason="slow_consumer").inc()
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
            "connected_since": _iso_second(int(session.connected_since)),
            "remote": self.remote,
            "messages_in": session.messages_in,
            "messages_out": session.messages_out,
            "last_activity": _iso_second(int(session.last_activity)),
            "token": self.grant.name if self.grant else None,
            "token_version": self.grant.version if self.grant else None,
        }
        # Only when set, so version-1 records keep exactly their fields.
        if self.v2:
            record["protocol"] = 2
        if self.groups:
            record["groups"] = list(self.groups)
        if self.manifest is not None:
            record["manifest"] = self.manifest
        return record
