"""Commands that are safe to retry: a key repeated within the window never reaches a client twice.

An agent that lost its answer (a timeout, a dropped connection, a restarted host) sends the
same request again. With a key (the HTTP ``id``, an ``Idempotency-Key`` header, the MCP
``idempotency_key``) the repeat gets the first command's outcome, or waits for it, on any
instance: the record lives in the broker (Redis when configured), claimed atomically.

A command refused before it could reach a client (offline target, rate limit, invalid, queue
full) leaves no record, so a retry runs it; one that may have reached a client (delivered,
queued, replied, timed out, delivery failed) is remembered for the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec

from ..brokers.base import Broker, BrokerUnavailable
from ..core.protocol import ErrorCode
from .outcome import Outcome

__all__ = ["IdempotentSends", "fingerprint"]

log = logging.getLogger(__name__)

#: How often a repeat that waits for the first command looks at its record again.
POLL_SECONDS = 0.05

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


class IdempotentSends:
    """Runs each keyed command at most once per window, cluster-wide."""

    def __init__(self, broker: Broker, window_seconds: float) -> None:
        self.broker = broker
        self.window_seconds = window_seconds
        self._settling: set[asyncio.Future[Outcome]] = set()

    async def send(
        self, key: str, command: str, wait_seconds: float, first: Callable[[], Awaitable[Outcome]]
    ) -> Outcome:
        """``first()`` when ``key`` is new; otherwise the outcome of the command that claimed it."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                held = await self.broker.idempotency_claim(key, _encode(Record(command)).decode())
                if held is not None:
                    outcome = await self._follow(key, command, held, deadline)
                    if outcome is not None:
                        return outcome
                    continue  # The first command was refused before reaching a client and let the key go.
            except BrokerUnavailable as exc:  # Nothing was sent: the caller may retry once Redis is back.
                return Outcome(503, {"error": ErrorCode.BROKER_UNAVAILABLE.value, "detail": str(exc)})
            return await self._run(key, command, first)

    async def _run(self, key: str, command: str, first: Callable[[], Awaitable[Outcome]]) -> Outcome:
        # Shielded: a caller that stops waiting (a cancelled MCP call, a closed HTTP connection)
        # must not leave the record "in flight" for the whole window; the outcome still lands.
        task = asyncio.ensure_future(self._settle(key, command, first))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return await asyncio.shield(task)

    async def _settle(self, key: str, command: str, first: Callable[[], Awaitable[Outcome]]) -> Outcome:
        try:
            outcome = await first()
        except Exception:
            with contextlib.suppress(BrokerUnavailable):
                await self.broker.idempotency_drop(key)
            raise
        try:
            if outcome.body.get("error") in _NEVER_SENT:
                await self.broker.idempotency_drop(key)
            else:
                record = Record(command, outcome.http_status, outcome.body)
                await self.broker.idempotency_set(key, _encode(record).decode())
        except BrokerUnavailable:
            # The caller still gets the outcome; a retry meanwhile finds the key in flight and waits.
            log.warning("Could not record the outcome of an idempotent command: Redis is unreachable")
        return outcome

    async def _follow(self, key: str, command: str, held: str, deadline: float) -> Outcome | None:
        """Wait for the first command's outcome; None when its key was let go meanwhile."""
        record = _decode(held)
        while True:
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
            again = await self.broker.idempotency_get(key)
            if again is None:
                return None
            record = _decode(again)
