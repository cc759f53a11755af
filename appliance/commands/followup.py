"""Following a command up: ``GET /api/v1/commands/{id}`` and the MCP tool ``get_command``.

A caller that stopped waiting (``wait=false``, a queued command, a timeout, a cancelled MCP
call, an HTTP client that went away) can still learn what became of its command, on any
instance: each command sent by an in-process caller (HTTP, MCP, dashboard) has a record in
the broker (Redis when configured: ``wsb:cmd:{owner}``, appliance/brokers/redis/records.py),
kept ``IDEMPOTENCY_WINDOW_SECONDS`` after its last change. A record is its sender's: a named
token's caller reads only its own (:func:`record_key`).

Bounded, so that no caller can fill Redis: a record keeps at most :data:`TEXT_BYTES` of its
message and of its reply (``message_truncated``, ``reply_truncated`` say when they were cut),
and each caller (owner) at most ``COMMAND_RECORDS_PER_CALLER`` records: the broker drops the
caller's oldest in the same atomic write. A record names the instance (and its life, the
registry's epoch) that follows it; one whose instance is gone is reported ``lost``, not open.

The sender's instance keeps following the command after its caller stopped waiting, until
``open_until`` (its deadline plus :data:`LATE_REPLY_SECONDS`): a delivery, a reply or a
failure that arrives meanwhile is written to the record (a reply after the caller's timeout
is ``status: replied`` with ``late: true``; it used to be lost). Writes go through one task
per instance, latest version per id, gathered for :data:`FLUSH_SECONDS`: a command answered at
once costs one write, and another instance may not see a command for its first 50 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any

import msgspec

from ..brokers.base import Broker, BrokerUnavailable
from ..core.protocol_v2 import CommandId
from .outcome import Outcome

__all__ = ["LATE_REPLY_SECONDS", "TEXT_BYTES", "CommandRecord", "Followups", "bounded", "timeout_detail"]

log = logging.getLogger(__name__)

#: Most of a message, and of a reply, that a record keeps (as JSON text, escapes included).
TEXT_BYTES = 4096

#: The records of the unnamed tokens (one principal) are kept under this owner (no caller name has a "~").
UNNAMED = "~"

#: How long the list of live instances (presence) is trusted when telling whether a record is lost.
LIVE_SECONDS = 1.0

#: How long after its caller's deadline a command is still followed: a version-2 client's
#: reply (it names its command) arriving meanwhile is kept. A version-1 client's reply after
#: the deadline cannot be told from an unsolicited message, so it is not attached.
LATE_REPLY_SECONDS = 300.0

#: Commands followed at once by one instance after their callers stopped waiting; the oldest go first.
MAX_FOLLOWED = 100_000

#: How often a follow-up that waits looks at the record again.
POLL_SECONDS = 0.05

#: How long changes are gathered before they are written (a command that is answered at once is one write).
FLUSH_SECONDS = 0.05

#: How long a caller's answer waits for its record to be written (so another instance finds it).
WRITE_WAIT_SECONDS = 2.0

FINAL = frozenset({"replied", "failed"})


class CommandRecord(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """What became of one command; ``status`` and ``caller`` change independently."""

    id: CommandId
    target: str
    message: str
    sent_at: float
    open_until: float
    #: sending (not yet at the client), delivered, queued, replied, timeout (no reply yet), failed.
    status: str = "sending"
    #: waiting, answered (got its outcome), cancelled (MCP call cancelled), disconnected (HTTP client left).
    caller: str = "waiting"
    delivered: bool = False
    updated_at: float = 0.0
    sender: str | None = None
    reply: str | None = None
    rtt_ms: float | None = None
    late: bool | None = None
    error: str | None = None
    detail: str | None = None
    #: Whose record it is: the sender's named-token caller; None for the unnamed fixed tokens (one principal).
    owner: str | None = None
    message_truncated: bool | None = None
    reply_truncated: bool | None = None
    #: The instance following it, and its life (the registry's epoch): a restarted instance follows nothing.
    instance: str | None = None
    epoch: str | None = None
    #: Set when read: its instance is gone, so nothing more will be recorded.
    lost: bool | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def public(self, now: float) -> dict[str, Any]:
        """The record as ``GET /api/v1/commands/{id}`` answers it."""
        body = {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None and k not in _PRIVATE}
        body["open"] = not self.final and now < self.open_until and not self.lost
        body["message_truncated"] = bool(self.message_truncated)
        if self.reply is not None:
            body["reply_truncated"] = bool(self.reply_truncated)
        return body


_PRIVATE = frozenset({"owner", "instance", "epoch"})


_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(CommandRecord).decode


def bounded(text: str) -> tuple[str, bool]:
    """``text``, cut to at most :data:`TEXT_BYTES` of JSON, and whether it was cut."""
    if len(text) <= TEXT_BYTES // 6 or len(_encode(text)) - 2 <= TEXT_BYTES:  # An escape is at most 6 bytes.
        return text, False
    end = min(len(text), TEXT_BYTES)  # A character is at least one byte.
    size = len(_encode(text[:end])) - 2
    while size > TEXT_BYTES:  # Escapes and multi-byte characters: shrink in proportion, then check.
        end = max(0, min(end - 1, end * TEXT_BYTES // size))
        size = len(_encode(text[:end])) - 2
    return text[:end], True


def record_key(command_id: CommandId, owner: str | None = None) -> str:
    """A record's key: its id among its owner's records (two callers may pick one id; neither reads the other's).

    Unnamed tokens' keys are the id (``~/``-escaped when it starts with ``~``), a named caller's
    ``~<caller>/<id>`` (caller names hold no ``/``): no id chosen by one caller is another's key.
    """
    text = str(command_id)
    if owner is not None:
        return f"~{owner}/{text}"
    return "~/" + text if text.startswith("~") else text


class Followups:
    """This instance's command records: written to the broker, followed until ``open_until``."""

    def __init__(self, broker: Broker, instance: str = "", epoch: str = "") -> None:
        self.broker = broker
        self.instance, self.epoch = instance or None, epoch or None
        self._live: tuple[float, frozenset[tuple[str, str]]] = (float("-inf"), frozenset())
        # (waiter, id) -> record, for commands whose outcome events still come to this instance.
        self._followed: dict[tuple[str, CommandId], CommandRecord] = {}
        self._by_id: dict[str, CommandRecord] = {}  # The newest local record of each id.
        self._dirty: dict[str, CommandRecord] = {}
        self._batch: dict[str, CommandRecord] = {}  # Being written now.
        self._dirty_written: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._urgent = asyncio.Event()  # A caller waits for the records to be written: no delay.

    # --- the sender's side ------------------------------------------------------------------

    def opened(
        self, waiter: str, command_id: CommandId, target: str, message: str, timeout_ms: int, owner: str | None = None
    ) -> None:
        now = time.time()
        kept, cut = bounded(message)
        record = CommandRecord(
            command_id, target, kept, now, now + timeout_ms / 1000 + LATE_REPLY_SECONDS, updated_at=now, owner=owner
        )
        record.message_truncated = cut or None
        record.instance, record.epoch = self.instance, self.epoch
        self._followed[(waiter, command_id)] = record
        self._by_id[record_key(command_id, owner)] = record
        if len(self._followed) > MAX_FOLLOWED:
            oldest = next(iter(self._followed))
            self._forget(oldest, self._followed[oldest])
        self._mark(record)

    async def outcome_of(
        self, waiter: str, command_id: CommandId, future: Awaitable[Outcome], owner: str | None = None
    ) -> Outcome:
        """The caller's wait for its command's outcome, recorded: its answer, or that it left."""
        outcome = await self.caller_of(command_id, future, owner)
        record = self.answered(waiter, command_id, outcome)
        if record is not None and not record.final:
            await self.written()  # Then a follow-up on another instance finds it.
        return outcome

    async def caller_of(self, command_id: CommandId, wait: Awaitable[Outcome], owner: str | None = None) -> Outcome:
        """``await wait``; a caller cancelled meanwhile is recorded (``task.cancel("disconnected")``: went away)."""
        try:
            return await wait
        except asyncio.CancelledError as exc:
            why = "disconnected" if exc.args and exc.args[0] == "disconnected" else "cancelled"
            self.caller_left(command_id, why, owner)
            raise

    def answered(self, waiter: str, command_id: CommandId, outcome: Outcome) -> CommandRecord | None:
        """The caller got ``outcome``; the command is followed on if more may come."""
        record = self._followed.get((waiter, command_id))
        if record is None:
            return None
        body = outcome.body
        if record.caller == "waiting":
            record.caller = "answered"
        error = body.get("error")
        if error is not None:
            record.status, record.error, record.detail = "failed", str(error), body.get("detail")
        else:
            status = str(body.get("status", record.status))
            if status == "replied":
                self._reply(record, body.get("sender"), body.get("message"), body.get("rtt_ms"))
            else:
                record.status = status
                if status == "delivered" or body.get("delivered"):
                    record.delivered = True
                if status == "timeout":
                    record.detail = body.get("detail")
        self._changed((waiter, command_id), record)
        return record

    def caller_left(self, command_id: CommandId, why: str, owner: str | None = None) -> None:
        """The caller stopped waiting before its outcome (``cancelled``, ``disconnected``)."""
        record = self._by_id.get(record_key(command_id, owner))
        if record is not None and record.caller == "waiting":
            record.caller = why
            record.updated_at = time.time()
            self._mark(record)

    def delivered(self, waiter: str, command_id: CommandId) -> None:
        record = self._followed.get((waiter, command_id))
        if record is not None and not record.delivered:
            record.delivered = True  # A timed-out command that reached its client later stays "timeout".
            if record.status in ("sending", "queued"):
                record.status = "delivered"
            self._changed((waiter, command_id), record)

    def replied(self, waiter: str, command_id: CommandId, sender: str, message: str, now: float) -> None:
        record = self._followed.get((waiter, command_id))
        if record is None:
            return
        record.late = True if record.caller != "waiting" else None
        self._reply(record, sender, message, (now - record.sent_at) * 1000)
        self._changed((waiter, command_id), record)

    def failed(self, waiter: str, command_id: CommandId, code: str, detail: str) -> None:
        record = self._followed.get((waiter, command_id))
        if record is not None:
            record.status, record.error, record.detail = "failed", code, detail
            self._changed((waiter, command_id), record)

    def sweep(self, now: float) -> None:
        """Stop following commands whose replies can no longer come (about once a second)."""
        followed = self._followed
        while followed:
            key = next(iter(followed))
            record = followed[key]
            if record.open_until > now:
                break
            self._forget(key, record)

    @staticmethod
    def _reply(record: CommandRecord, sender: Any, message: Any, rtt_ms: Any) -> None:
        record.status, record.delivered = "replied", True
        record.sender = None if sender is None else str(sender)
        record.reply, cut = (None, False) if message is None else bounded(str(message))
        record.reply_truncated = cut or None
        record.rtt_ms = None if rtt_ms is None else round(float(rtt_ms), 3)
        record.error = record.detail = None

    def _changed(self, key: tuple[str, CommandId], record: CommandRecord) -> None:
        record.updated_at = time.time()
        if record.final:
            self._forget(key, record)
        self._mark(record)

    def _forget(self, key: tuple[str, CommandId], record: CommandRecord) -> None:
        self._followed.pop(key, None)
        id_key = record_key(record.id, record.owner)
        if self._by_id.get(id_key) is record:
            del self._by_id[id_key]

    # --- writing ----------------------------------------------------------------------------

    def _mark(self, record: CommandRecord) -> None:
        if not self._dirty:
            self._dirty_written = asyncio.get_running_loop().create_future()
        self._dirty[record_key(record.id, record.owner)] = record
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        try:
            while self._dirty:
                if not self._urgent.is_set():  # Gather a command's changes (sent, delivered, replied) into one write.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._urgent.wait(), FLUSH_SECONDS)
                self._urgent.clear()
                self._batch, written = self._dirty, self._dirty_written
                self._dirty, self._dirty_written = {}, None
                batch = self._batch
                for key, record in batch.items():
                    try:
                        await self.broker.record_put(record.owner or UNNAMED, key, _encode(record).decode())
                    except BrokerUnavailable as exc:
                        log.warning("Could not record command %r for follow-up: %s", key, exc)
                if written is not None and not written.done():
                    written.set_result(None)
        finally:
            self._writer, self._batch = None, {}

    async def written(self) -> None:
        """Until the records changed so far are in the broker (then any instance finds them)."""
        pending = self._dirty_written if self._dirty else None
        if pending is None:
            return
        self._urgent.set()
        try:
            await asyncio.wait_for(asyncio.shield(pending), WRITE_WAIT_SECONDS)
        except TimeoutError:
            log.warning("A command record took more than %g s to write", WRITE_WAIT_SECONDS)

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()

    # --- reading ----------------------------------------------------------------------------

    async def get(self, command_id: str, owner: str | None = None) -> CommandRecord | None:
        """``owner``'s record of ``command_id``: this instance's own if it sent it, else the broker's."""
        key = record_key(command_id, owner)
        local = self._by_id.get(key) or self._dirty.get(key) or self._batch.get(key)
        if local is not None:  # Followed here, or final and not yet in the broker.
            return local
        held = await self.broker.record_get(owner or UNNAMED, key)
        if held is None:
            return None
        record = _decode(held)
        if not record.final and record.instance is not None and await self._gone(record):
            record.lost = True
            if record.caller == "waiting":  # Its caller's connection was on that instance.
                record.caller = "disconnected"
        return record

    async def _gone(self, record: CommandRecord) -> bool:
        """Whether the instance (life) that followed ``record`` is gone: no later outcome can be written."""
        if time.time() >= record.open_until:
            return False  # Nothing more would come anyway.
        at, live = self._live
        if time.monotonic() - at >= LIVE_SECONDS:
            try:
                summaries = await self.broker.presence_summary()  # Redis: a crashed instance's expires with its TTL.
            except BrokerUnavailable:
                return False  # Not known: the record as it was written.
            live = frozenset((str(s.get("instance")), str(s.get("epoch"))) for s in summaries)
            self._live = (time.monotonic(), live)
        return (record.instance, str(record.epoch)) not in live

    async def wait(self, command_id: str, wait_seconds: float, owner: str | None = None) -> CommandRecord | None:
        """The record once it is final (replied, failed), can change no more, or ``wait_seconds`` passed."""
        deadline = time.monotonic() + wait_seconds
        while True:
            record = await self.get(command_id, owner)
            if record is not None and (record.final or record.lost or time.time() >= record.open_until):
                return record
            if time.monotonic() >= deadline:
                return record
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def timeout_detail(target: str, delivered: bool) -> str:
    """What a caller whose wait ran out should do: follow it up, or (never delivered) it may resend."""
    if delivered:
        return (
            f"{target} did not reply in time; a later reply is kept: follow the command up by its id "
            "(GET /api/v1/commands/{id}, MCP get_command) instead of sending it again"
        )
    return (
        f"the command never reached {target}: it waited behind an earlier command the client has not "
        "answered (a version-1 client takes one at a time), or in its queue, and was not sent; sending it again "
        "is safe once the earlier command is answered or timed out"
    )
