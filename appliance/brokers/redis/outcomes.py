"""Outcomes: every published command gets exactly one, from the instances that received it.

Every instance that receives a command answers on the origin's channel, batched per
event-loop pass (:func:`~.codec.encode_answers`). The origin resolves each command's
``on_result`` exactly once: at the first success, or when every counted receiver failed; a
command without answer after 1 to 2 timeouts (its receiver died) or when Redis is lost
fails with ``delivery_failed``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from ...core.protocol import ErrorCode
from ...core.requests import Routed
from ..base import OnResult, failure_detail
from .codec import encode_answer, encode_answers, parse_answers
from .keys import Keys

__all__ = ["ANSWER_DELAY_SECONDS", "OUTCOME_TIMEOUT_SECONDS", "Outcomes", "Pending"]

#: Outcomes are gathered this long before they are published to their origin.
ANSWER_DELAY_SECONDS = 0.002
#: A command nobody answered for this long (its receiver died) fails after 1 to 2 periods.
OUTCOME_TIMEOUT_SECONDS = 10.0


class Pending:
    """A published command waiting for its outcome from the instances that received it."""

    __slots__ = ("on_result", "target", "receivers", "failures", "failure", "sender", "routed")

    def __init__(self, on_result: OnResult, target: str, sender: str = "", routed: Routed | None = None) -> None:
        self.on_result = on_result
        self.target = target
        self.sender = sender  # For local delivery when Redis is lost (the payload is not kept).
        self.routed = routed
        self.receivers = -1  # Unknown until PUBLISH answers.
        self.failures = 0
        self.failure: ErrorCode | None = None


class Outcomes:
    """Commands this instance published and not resolved yet, and answers owed to other instances.

    ``publish(channel, payload)`` sends an answer batch (through the outbox, in order).
    Pending commands live in two generations, so timing them out is O(1) per command.
    """

    def __init__(self, origin: str, keys: Keys, publish: Callable[[str, bytes], None], timeout: float) -> None:
        self._origin = origin.encode()
        self._keys = keys
        self._publish = publish
        self.timeout = timeout
        self._seq = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._pending_old: dict[int, Pending] = {}
        self._answers: dict[bytes, list[bytes]] = {}  # Outcomes to send to other instances, per origin.
        self._answers_scheduled = False

    def add(self, pending: Pending) -> int:
        seq = next(self._seq)
        self._pending[seq] = pending
        return seq

    def get(self, seq: int) -> Pending | None:
        return self._pending.get(seq) or self._pending_old.get(seq)

    def pop(self, seq: int) -> Pending | None:
        return self._pending.pop(seq, None) or self._pending_old.pop(seq, None)

    # --- on a receiving instance ------------------------------------------------------------

    def answer(self, origin: bytes, seq: bytes, failure: ErrorCode | None) -> None:
        """Tell the instance that published command ``seq`` what became of it here."""
        if origin == self._origin:
            self.received(int(seq), failure)
            return
        answer = encode_answer(seq, failure)
        answers = self._answers.get(origin)
        if answers is None:
            self._answers[origin] = [answer]
        else:
            answers.append(answer)
        if not self._answers_scheduled:
            # One batch per origin every ANSWER_DELAY: under load that is one published answer
            # for many commands, not one per command (the bench saw +20 % CPU per round trip).
            self._answers_scheduled = True
            asyncio.get_running_loop().call_later(ANSWER_DELAY_SECONDS, self._send_answers)

    def _send_answers(self) -> None:
        self._answers_scheduled = False
        answers, self._answers = self._answers, {}
        for origin, batch in answers.items():
            self._publish(self._keys.instance_channel(origin.decode()), encode_answers(batch))

    # --- on the publishing instance ---------------------------------------------------------

    def on_answers(self, payload: bytes) -> None:
        for seq, failure in parse_answers(payload):
            self.received(seq, failure)

    def received(self, seq: int, failure: ErrorCode | None) -> None:
        """One receiver's outcome: the first success resolves; failures resolve once all counted failed."""
        pending = self._pending.get(seq) or self._pending_old.get(seq)
        if pending is None:
            return  # Resolved already (another receiver delivered it, or it timed out).
        if failure is None:
            self.resolve(seq, None)
            return
        pending.failures += 1
        if pending.failure is None:
            pending.failure = failure
        if 0 <= pending.receivers <= pending.failures:
            self.resolve(seq, pending.failure)

    def counted(self, seq: int, receivers: int) -> None:
        """PUBLISH said how many instances received command ``seq``."""
        pending = self._pending.get(seq) or self._pending_old.get(seq)
        if pending is None:
            return  # Already delivered: its answer came before PUBLISH's.
        if receivers == 0:
            self.resolve(seq, ErrorCode.TARGET_OFFLINE)
        else:
            pending.receivers = receivers
            if pending.failures >= receivers:
                self.resolve(seq, pending.failure)

    def resolve(self, seq: int, failure: ErrorCode | None, detail: str = "") -> None:
        pending = self._pending.pop(seq, None) or self._pending_old.pop(seq, None)
        if pending is None:
            return
        if failure is None:
            pending.on_result(None, "")
        else:
            pending.on_result(failure, detail or failure_detail(failure, pending.target))

    def fail_counted(self, why: str) -> None:
        """Redis is lost: commands published and counted may never be answered; say so at once."""
        for pending in (self._pending, self._pending_old):
            counted = {seq: p for seq, p in pending.items() if p.receivers >= 0}
            for seq in counted:
                del pending[seq]
            _fail(counted, why)

    def fail_all(self, why: str) -> None:
        _fail(self._pending, why)
        _fail(self._pending_old, why)

    async def expire(self) -> None:
        """Commands left without an answer (the receiving instance died) fail after 1 to 2 periods."""
        while True:
            await asyncio.sleep(self.timeout)
            expired, self._pending_old, self._pending = self._pending_old, self._pending, {}
            # Not yet counted (still in the outbox or being published): keep waiting for PUBLISH.
            for seq in [seq for seq, p in expired.items() if p.receivers < 0]:
                self._pending_old[seq] = expired.pop(seq)
            # Counted by PUBLISH, so the holder received it: a stalled holder may still deliver it late.
            _fail(expired, f"outcome unknown: no answer from the instance holding it within {self.timeout:g} s")


def _fail(pending: dict[int, Pending], why: str) -> None:
    for entry in pending.values():
        entry.on_result(ErrorCode.DELIVERY_FAILED, f"{entry.target}: {why}")
    pending.clear()
