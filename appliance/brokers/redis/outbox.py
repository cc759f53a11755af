"""The outbox: everything this instance publishes, sent in order as pipelines on one connection.

While Redis is lost, what waits here (and what is sent meanwhile) is delivered to the
local connections instead, in order; commands for other instances fail with
``delivery_failed``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from redis.exceptions import RedisError

from ... import metrics
from ...core.protocol import ErrorCode
from ...core.requests import Routed
from ..base import Inbox, OnResult, failure_detail
from .codec import encode_json
from .keys import CONTROLLERS
from .link import Link
from .outcomes import Outcomes, Pending

__all__ = ["PUBLISH_BATCH", "Outbox"]

PUBLISH_BATCH = 512

#: What waits in the outbox: (channel, payload, seq of a command or 0, target, text).
#: Commands carry target and text, controller frames a text, outcome batches neither:
#: what a fallback to local delivery needs during an outage.
_Item = tuple[str, bytes, int, str | None, str | None]


class Outbox:
    """Bounded (``limit`` messages; outcome batches bypass it, being bounded by the commands received).

    ``inbox()`` is the local instance; ``on_lost(exc)`` is called when a publish fails.
    """

    def __init__(
        self,
        link: Link,
        instance: str,
        inbox: Callable[[], Inbox],
        on_lost: Callable[[BaseException], None],
        *,
        limit: int,
        outcome_timeout: float,
    ) -> None:
        self._link = link
        self._inbox = inbox
        self._on_lost = on_lost
        self._limit = limit
        self._keys = link.keys
        self.outcomes = Outcomes(instance, link.keys, self.publish_answers, outcome_timeout)
        self._items: deque[_Item] = deque()
        self._ready = asyncio.Event()
        self._publishing = False
        origin = instance.encode()
        self._origin_tail = b"|" + origin + b"\n"
        self._origin_sep = b"|" + origin + b"|"

    def __len__(self) -> int:
        return len(self._items)

    # --- what is sent -----------------------------------------------------------------------

    def send(self, target: str, text: str, on_result: OnResult, sender: str = "") -> None:
        if self._bypass():
            self._deliver_locally(target, text, on_result, sender)
            return
        if len(self._items) >= self._limit:
            metrics.BROKER_OUTBOX_FULL.inc()
            on_result(ErrorCode.DELIVERY_FAILED, f"{target}: too many messages waiting for Redis; retry later")
            return
        seq = self.outcomes.add(Pending(on_result, target, sender))
        head = b"m" + str(seq).encode() + self._origin_sep + sender.encode() + b"\n"
        self._items.append((self._keys.client_channel(target), head + text.encode(), seq, target, text))
        self._ready.set()

    def send_routed(self, target: str, routed: Routed, on_result: OnResult) -> None:
        if self._bypass():
            self._deliver_locally(target, routed, on_result)
            return
        if len(self._items) >= self._limit:
            metrics.BROKER_OUTBOX_FULL.inc()
            on_result(ErrorCode.DELIVERY_FAILED, f"{target}: too many messages waiting for Redis; retry later")
            return
        seq = self.outcomes.add(Pending(on_result, target, routed=routed))
        payload = b"r" + str(seq).encode() + self._origin_tail + encode_json(routed)
        # On the target's channel, so it keeps its order with the commands without id.
        self._items.append((self._keys.client_channel(target), payload, seq, target, None))
        self._ready.set()

    def send_to_instance(self, instance: str, payload: bytes) -> None:
        if not self._link.up:
            return  # Best effort: the sender's own deadline reports the timeout.
        self._items.append((self._keys.instance_channel(instance), b"e" + payload, 0, None, None))
        self._ready.set()

    def send_to_controllers(self, frame: str) -> None:
        if self._bypass():
            self._inbox().deliver_to_controllers(frame)
            return
        if len(self._items) >= self._limit:
            metrics.BROKER_OUTBOX_FULL.inc()
            return
        self._items.append((CONTROLLERS, frame.encode(), 0, None, frame))
        self._ready.set()

    def publish_answers(self, channel: str, payload: bytes) -> None:
        # Outcomes bypass the outbox limit: they are bounded by the commands received.
        self._items.append((channel, payload, 0, None, None))
        self._ready.set()

    def _bypass(self) -> bool:
        """During an outage deliver locally at once, but never ahead of older queued messages."""
        return not self._link.up and not self._items and not self._publishing

    def _deliver_locally(self, target: str, text: str | Routed, on_result: OnResult, sender: str = "") -> None:
        inbox = self._inbox()
        if isinstance(text, Routed):
            failure = inbox.deliver_routed(target, text)
        else:
            failure = inbox.deliver(target, text, sender)
        if failure is None:
            on_result(None, "")
        elif failure is ErrorCode.TARGET_OFFLINE:
            on_result(ErrorCode.DELIVERY_FAILED, f"cross-instance delivery failed: {self._link.health()[1]}")
        else:
            on_result(failure, failure_detail(failure, target))

    # --- the publisher ----------------------------------------------------------------------

    async def run(self) -> None:
        """Send queued messages as pipelines on one connection: in order, one round trip per batch."""
        redis = self._link.redis
        assert redis is not None
        items = self._items
        sharded = self._link.sharded
        while True:
            await self._ready.wait()
            self._ready.clear()
            while items:
                batch = [items.popleft() for _ in range(min(PUBLISH_BATCH, len(items)))]
                if not self._link.up:  # Down while these waited: local delivery, in order.
                    self._fall_back(batch)
                    continue
                self._publishing = True
                started = time.perf_counter()
                try:
                    async with redis.pipeline(transaction=False) as pipe:
                        if sharded:
                            for channel, payload, *_ in batch:
                                pipe.execute_command("SPUBLISH", channel, payload)
                        else:
                            for channel, payload, *_ in batch:
                                pipe.publish(channel, payload)
                        receivers = await pipe.execute()
                    metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
                except (RedisError, OSError) as exc:
                    self._on_lost(exc)
                    self._fall_back(batch)
                    continue
                except BaseException:
                    self._fall_back(batch)  # Never lose a batch silently, whatever went wrong.
                    raise
                finally:
                    self._publishing = False
                counted = self.outcomes.counted
                for (_, _, seq, _, _), count in zip(batch, receivers, strict=True):
                    if seq:
                        counted(seq, count)

    def _fall_back(self, batch: list[_Item]) -> None:
        for _, _, seq, target, text in batch:
            if target is None:
                if text is not None:
                    self._inbox().deliver_to_controllers(text)
                continue  # Else an outcome batch for another instance: it times out there.
            pending = self.outcomes.pop(seq)
            if pending is not None:  # None: resolved already; never deliver what was reported failed.
                body = pending.routed if pending.routed is not None else text
                assert body is not None
                self._deliver_locally(target, body, pending.on_result, pending.sender)
