"""Commands that are safe to retry: a key repeated within the window never reaches a client twice.

HTTP, MCP and dashboard commands: :class:`IdempotentSends`; WebSocket controllers' ids: :class:`ControllerKeys`.
An agent that lost its answer (a timeout, a dropped connection, a restarted host) sends the
same request again. With a key (the HTTP ``id``, an ``Idempotency-Key`` header, the MCP
``idempotency_key``) the repeat gets the first command's outcome, or waits for it, on any
instance: the record lives in the broker (Redis when configured), claimed atomically.

A command refused before it could reach a client (offline target, rate limit, invalid, queue
full) leaves no record, so a retry runs it; one that may have reached a client (delivered,
queued, replied, timed out, delivery failed) is remembered for the window.

Each caller (a named token; the unnamed tokens together: :data:`UNNAMED`) holds a budget of
live keys (COMMAND_KEYS_PER_CALLER, COMMAND_KEY_BYTES_PER_CALLER; core/keybudget.py): beyond it
a new key is refused (429 ``too_many_keys``, nothing sent) until its oldest expires; repeats of
live keys are always answered, and a live key is never forgotten before its window ends.

An outcome whose write fails (Redis unreachable for a moment, or full) does not leave its key
"in flight" for the window: the instance keeps it, answers repeats that reach it at once, and
writes it again with backoff (:data:`RETRY_SECONDS`) until it lands, for up to the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ..brokers.base import Broker, BrokerUnavailable, KeyBudget, TooManyKeys
from ..core.protocol import ErrorCode
from ..core.protocol_v2 import CommandId, Request
from ..settings import Settings
from .followup import UNNAMED
from .outcome import Outcome

__all__ = ["ControllerKeys", "IdempotentSends", "fingerprint", "key_budget", "too_many_keys"]

log = logging.getLogger(__name__)

#: How often a repeat that waits for the first command looks at its record again.
POLL_SECONDS = 0.05

#: Pauses between the attempts to write an outcome whose write failed (the last one repeats).
RETRY_SECONDS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)

#: Outcomes not written yet that one instance keeps (the oldest go first; their keys then wait out the window).
MAX_UNWRITTEN = 10_000

#: Errors after which the command certainly reached no client: a retry may run it.
_NEVER_SENT = frozenset(
    code.value
    for code in (
        ErrorCode.TARGET_OFFLINE,
        ErrorCode.RATE_LIMITED,
        ErrorCode.INVALID_TARGET,
        ErrorCode.INVALID_MESSAGE,
        ErrorCode.MESSAGE_TOO_LARGE,
        ErrorCode.QUEUE_FULL,
        ErrorCode.TARGET_NOT_CLIENT,
        ErrorCode.DUPLICATE_ID,
    )
)


class Record(msgspec.Struct, forbid_unknown_fields=False):
    """The broker's record of one key: which command it named and, once known, its outcome."""

    command: str
    status: int = 0  # 0 while the first command is in flight
    body: dict[str, object] = {}


_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(Record).decode


def fingerprint(target: str, message: str, queue: bool) -> str:
    """What makes two requests the same command: a reused key for another command is refused."""
    return hashlib.sha256(f"{target}\0{queue:d}\0{message}".encode()).hexdigest()[:32]


def key_budget(settings: Settings) -> KeyBudget:
    """Each caller's budget of live keys; a key waiting for its outcome counts the largest usual outcome."""
    return KeyBudget(
        settings.command_keys_per_caller, settings.command_key_bytes_per_caller, settings.max_message_bytes + 1024
    )


def too_many_keys(refused: TooManyKeys, budget: KeyBudget, window_seconds: float) -> Outcome:
    """A new key beyond its caller's budget: nothing was sent; when to retry, or how to do without a key."""
    wait = max(1, math.ceil(refused.retry_after))
    detail = (
        f"this caller (its token) already holds {refused.keys} live idempotency keys ({refused.used} bytes) from "
        f"the last {window_seconds:g} s, its budget (COMMAND_KEYS_PER_CALLER={budget.keys}, "
        f"COMMAND_KEY_BYTES_PER_CALLER={budget.bytes}); nothing was sent. Retry with the same key in {wait} s, "
        "when its oldest key expires, or send without a key (then a retry may run the command twice)"
    )
    body = {"error": ErrorCode.TOO_MANY_KEYS.value, "detail": detail, "retry_after_ms": wait * 1000}
    return Outcome(429, {**body, "limit": budget.keys})


class IdempotentSends:
    """Runs each keyed command at most once per window, cluster-wide; each caller within its key budget."""

    def __init__(self, broker: Broker, window_seconds: float, budget: KeyBudget | None = None) -> None:
        self.broker = broker
        self.window_seconds = window_seconds
        self.budget = budget or KeyBudget()
        self._settling: set[asyncio.Future[Outcome]] = set()
        self._dropping: set[asyncio.Task[None]] = set()  # Keys claimed for callers that stopped waiting.
        # (caller, key) -> (the record to write, or None to let the key go; when to give up): writes that failed.
        self._unwritten: dict[tuple[str, str], tuple[Record | None, float]] = {}
        self._retrying: asyncio.Task[None] | None = None

    async def send(
        self, caller: str, key: str, command: str, wait_seconds: float, first: Callable[[], Awaitable[Outcome]]
    ) -> Outcome:
        """``first()`` when ``caller``'s ``key`` is new; otherwise the outcome of the command that claimed it."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                held = await self._claim(caller, key, command)
                if held is not None:
                    outcome = await self.follow(caller, key, command, held, deadline)
                    if outcome is not None:
                        return outcome
                    continue  # The first command was refused before reaching a client and let the key go.
            except BrokerUnavailable as exc:  # Nothing was sent: the caller may retry once Redis is back.
                return Outcome(503, {"error": ErrorCode.BROKER_UNAVAILABLE.value, "detail": str(exc)})
            except TooManyKeys as refused:  # Nothing was sent, nothing kept.
                return too_many_keys(refused, self.budget, self.window_seconds)
            return await self._run(caller, key, command, first)

    async def _claim(self, caller: str, key: str, command: str) -> str | None:
        """The broker's claim, shielded: a caller that stops waiting while its claim is on the way
        (a closed HTTP connection, a cancelled MCP call) lets the key go once the claim turns out
        its own, rather than leaving it "in flight" for the window with nothing sent."""
        claim = asyncio.ensure_future(self.broker.idempotency_claim(caller, key, _encode(Record(command)).decode()))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            claim.add_done_callback(lambda done: self._let_go(caller, key, done))
            raise

    def _let_go(self, caller: str, key: str, claim: asyncio.Future[str | None]) -> None:
        if claim.cancelled() or claim.exception() is not None or claim.result() is not None:
            return  # Not claimed, or another command's key.
        task = asyncio.ensure_future(self._drop(caller, key))
        self._dropping.add(task)
        task.add_done_callback(self._dropping.discard)

    async def _drop(self, caller: str, key: str) -> None:
        with contextlib.suppress(BrokerUnavailable):  # Then the key waits out the window, as before.
            await self.broker.idempotency_drop(caller, key)

    async def _run(self, caller: str, key: str, command: str, first: Callable[[], Awaitable[Outcome]]) -> Outcome:
        # Shielded: a caller that stops waiting (a cancelled MCP call, a closed HTTP connection)
        # must not leave the record "in flight" for the whole window; the outcome still lands.
        task = asyncio.ensure_future(self._settle(caller, key, command, first))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return await asyncio.shield(task)

    async def _settle(self, caller: str, key: str, command: str, first: Callable[[], Awaitable[Outcome]]) -> Outcome:
        try:
            outcome = await first()
        except Exception:
            with contextlib.suppress(BrokerUnavailable):
                await self.broker.idempotency_drop(caller, key)
            raise
        await self.resolve(caller, key, command, outcome.http_status, outcome.body)
        return outcome

    async def resolve(self, caller: str, key: str, command: str, status: int, body: dict[str, Any]) -> None:
        """Record the outcome of the command that claimed ``key``, or let the key go if it reached no client.

        A failed write is kept, answered to repeats on this instance, and retried until it lands.
        """
        record = None if body.get("error") in _NEVER_SENT else Record(command, status, body)
        try:
            await self._write(caller, key, record)
        except BrokerUnavailable as exc:
            log.warning("Could not record the outcome of an idempotent command (retrying): %s", exc)
            self._unwritten.pop((caller, key), None)
            self._unwritten[(caller, key)] = (record, time.monotonic() + self.window_seconds)
            while len(self._unwritten) > MAX_UNWRITTEN:
                del self._unwritten[next(iter(self._unwritten))]
            if self._retrying is None:
                self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def _write(self, caller: str, key: str, record: Record | None) -> None:
        if record is None:
            await self.broker.idempotency_drop(caller, key)
        else:
            await self.broker.idempotency_set(caller, key, _encode(record).decode())

    async def _retry(self) -> None:
        """Write the outcomes whose write failed, with backoff, until all landed or their window ended."""
        attempt = 0
        try:
            while self._unwritten:
                await asyncio.sleep(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
                attempt += 1
                for key, entry in list(self._unwritten.items()):
                    record, until = entry
                    if time.monotonic() < until:
                        try:
                            await self._write(*key, record)
                        except BrokerUnavailable:
                            break  # Still down: all of them wait for the next attempt.
                        attempt = 0
                    if self._unwritten.get(key) is entry:  # Not replaced meanwhile.
                        del self._unwritten[key]
        finally:
            self._retrying = None

    async def stop(self) -> None:
        if self._retrying is not None:
            self._retrying.cancel()

    async def follow(self, caller: str, key: str, command: str, held: str, deadline: float) -> Outcome | None:
        """Wait for the first command's outcome; None when its key was let go meanwhile."""
        record = _decode(held)
        while True:
            unwritten = self._unwritten.get((caller, key))
            if unwritten is not None and unwritten[0] is not None:  # Its outcome, not written yet: from here.
                record = unwritten[0]
            if record.command != command:
                return Outcome(
                    409,
                    {
                        "error": ErrorCode.DUPLICATE_ID.value,
                        "detail": f"this id was used for a different command (other target, message or queue) "
                        f"within the last {self.window_seconds:g} s: use a new id for a new command",
                    },
                )
            if record.status:
                return Outcome(record.status, {**record.body, "replayed": True})
            if time.monotonic() >= deadline:
                return Outcome(
                    409,
                    {
                        "error": ErrorCode.DUPLICATE_ID.value,
                        "detail": "a command with this id is still in flight: send the same request again "
                        "later to get its outcome (it will not be sent twice)",
                    },
                )
            await asyncio.sleep(POLL_SECONDS)
            again = await self.broker.idempotency_get(caller, key)
            if again is None:
                return None
            record = _decode(again)


class ControllerKeys:
    """A WebSocket controller's command ``id`` as an idempotency key of that controller, cluster-wide.

    The same id again within the window (on the same connection or after a reconnect to any
    instance) is not sent: the repeat gets the first command's final frame (reply, error or
    timeout) marked ``"replayed": true``, waiting for it while it is in flight; the same id for
    another command is ``duplicate_id``. Each keyed command costs a claim (one broker round trip)
    before it is sent and one write when it finishes; the claims of one connection run at once,
    its sends keep their order. A repeat waits for its outcome aside: the connection's later
    commands do not wait for it.
    """

    def __init__(
        self,
        sends: IdempotentSends,
        send_now: Callable[[str, str, Request], None],
        frame_to: Callable[[str, str], None],
        spawn: Callable[[Any], None],
        caller_of: Callable[[str], str] = lambda waiter: UNNAMED,
    ) -> None:
        self._sends = sends
        self._caller_of = caller_of  # A connection's (by its key) caller: its token's, whatever its controller id.
        self._send_now = send_now  # The command service's submit, once the key is ours.
        self._frame_to = frame_to  # A frame for a controller connection (by its key), if it is here.
        self._spawn = spawn
        # (conn, id) -> [(caller, key), fingerprint, its last status frame (delivered, queued) or None]
        self._keys: dict[tuple[str, CommandId], list[Any]] = {}
        self._last: dict[str, asyncio.Future[None]] = {}  # Per connection: its latest command's turn to send.

    def submit(self, waiter: str, controller: str, request: Request) -> None:
        # Its caller now: the connection may close before the claim runs (then it would be nobody's).
        caller = self._caller_of(waiter)
        self._queue(waiter, self._claim(waiter, caller, controller, request, self._last.get(waiter)))

    def holding(self, sender: str) -> bool:
        """Whether a keyed command of this connection waits for its claim (then later frames wait too)."""
        return sender in self._last

    def in_order(self, waiter: str, then: Callable[[], None]) -> None:
        if waiter in self._last:
            self.after(waiter, then)
        else:
            then()

    def after(self, sender: str, then: Callable[[], None]) -> None:
        """Run ``then`` once this connection's earlier keyed commands were sent: its frames keep their order."""
        self._queue(sender, _after(self._last.get(sender), then))

    def _queue(self, waiter: str, turn: Awaitable[None]) -> None:
        task = asyncio.ensure_future(turn)
        self._last[waiter] = task
        task.add_done_callback(lambda done: self._last.pop(waiter) if self._last.get(waiter) is done else None)

    async def _claim(
        self, waiter: str, caller: str, controller: str, request: Request, previous: asyncio.Future[None] | None
    ) -> None:
        assert request.id is not None
        key = (caller, f"ws:{controller}:id:{request.id!r}")
        command = fingerprint(request.target, request.message, request.queue)
        replay: Outcome | None = None
        try:
            held = await self._sends.broker.idempotency_claim(*key, _encode(Record(command)).decode())
        except BrokerUnavailable:
            held, replay = None, _WS_UNAVAILABLE
        except TooManyKeys as refused:
            held, replay = None, too_many_keys(refused, self._sends.budget, self._sends.window_seconds)
        if held is not None:
            # A repeat sends nothing (unless its first command lets the key go): the connection's
            # later commands do not wait for its outcome (a retry held them up to the first's timeout).
            deadline = time.monotonic() + request.timeout_ms / 1000 + 1.0
            self._spawn(self._repeat(waiter, controller, request, key, command, held, deadline))
            return
        if previous is not None:  # Keep this connection's order of sends.
            with contextlib.suppress(BaseException):
                await previous
        self._send_or_answer(waiter, controller, request, key, command, replay)

    async def _repeat(
        self,
        waiter: str,
        controller: str,
        request: Request,
        key: tuple[str, str],
        command: str,
        held: str,
        deadline: float,
    ) -> None:
        """A repeated id: the first command's outcome once known; sent after all if the first let its key go."""
        replay: Outcome | None = None
        try:
            while True:
                replay = await self._sends.follow(*key, command, held, deadline)
                if replay is not None:
                    break
                again = await self._sends.broker.idempotency_claim(*key, _encode(Record(command)).decode())
                if again is None:
                    break  # Ours now: sent (after the commands this connection sent meanwhile).
                held = again
        except BrokerUnavailable:
            replay = _WS_UNAVAILABLE
        except TooManyKeys as refused:
            replay = too_many_keys(refused, self._sends.budget, self._sends.window_seconds)
        self._send_or_answer(waiter, controller, request, key, command, replay)

    def _send_or_answer(
        self,
        waiter: str,
        controller: str,
        request: Request,
        key: tuple[str, str],
        command: str,
        replay: Outcome | None,
    ) -> None:
        assert request.id is not None
        if replay is None:
            self._keys[(waiter, request.id)] = [key, command, None]
            self._send_now(waiter, controller, request)
            return
        body = replay.body
        if "error" in body:
            body = {**body, "id": request.id, "target": request.target}
        self._frame_to(waiter, _encode(body).decode())

    def finished(self, waiter: str, command_id: CommandId | None, frame: str) -> None:
        """A keyed command's frame: the final one (reply, error, timeout) is recorded for repeats."""
        if not self._keys:
            return
        if command_id is None:  # Refused before it had an entry: the error frame names its id.
            command_id = msgspec.json.decode(frame).get("id")
        found = self._keys.get((waiter, command_id))
        if found is None:
            return
        body = msgspec.json.decode(frame)
        if body.get("status") in ("delivered", "queued") and not body.pop("final", False):
            found[2] = body
        else:
            del self._keys[(waiter, command_id)]
            self._spawn(self._record(found[0], found[1], body))

    def abandoned(self, waiter: str, command_id: CommandId, target: str, delivered: bool) -> None:
        """Its controller left before the outcome: a repeat gets the last status (or a timeout), never a resend."""
        found = self._keys.get((waiter, command_id))
        if found is None:
            return
        detail = "the controller disconnected before this command's outcome; it is not sent again"
        last = found[2] or {"id": command_id, "status": "timeout", "target": target, "delivered": delivered}
        self.finished(waiter, command_id, _encode({**last, "final": True, "detail": detail}).decode())

    async def _record(self, key: tuple[str, str], command: str, body: dict[str, Any]) -> None:
        await self._sends.resolve(*key, command, 200, body)


#: A keyed WebSocket command while Redis is unreachable: nothing was sent. Controllers get the error
#: code their error tree already has (broker_unavailable is the HTTP API's 503 only, protocol.md).
_WS_UNAVAILABLE = Outcome(
    503,
    {
        "error": ErrorCode.DELIVERY_FAILED.value,
        "detail": "Redis cannot be reached, so this id cannot be checked for a repeat: nothing was sent; "
        "send it again with the same id once the appliance is ready",
    },
)


async def _after(previous: asyncio.Future[None] | None, then: Callable[[], None]) -> None:
    if previous is not None:
        with contextlib.suppress(BaseException):
            await previous
    then()
