"""The Redis broker itself: wires the parts, runs their tasks, and answers the broker contract."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from ... import metrics
from ...core.keybudget import DEFAULT_KEY_BUDGET, KeyBudget
from ...core.newids import WindowCount
from ...core.protocol import Role
from ...core.requests import Enqueued, Routed
from ...core.stopping import cancel_and_wait
from ..base import Broker, BrokerNotStarted, Claim, Inbox, OnResult, Owner
from .admission import AdmissionRecords
from .cluster import ClusterSubscriber
from .codec import decode_owner, decode_routed
from .history import HistoryLog
from .idempotency import IdempotencyRecords
from .keys import FAN_CHANNEL
from .link import Link, unavailable
from .outbox import Outbox
from .outcomes import OUTCOME_TIMEOUT_SECONDS
from .ownership import Ownership
from .presence import Presence
from .queue import RedisQueue
from .records import CommandRecords
from .subscriber import Subscriber
from .target import RedisTarget

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)


class RedisBroker(Broker):
    name = "redis"

    def __init__(
        self,
        target: str | RedisTarget,
        *,
        instance: str,
        presence_ttl: int = 30,
        pool_size: int = 8,
        display: str = "redis",
        outbox_limit: int = 100_000,
        outcome_timeout: float = OUTCOME_TIMEOUT_SECONDS,
        queue_max: int = 1000,
        queue_remember_seconds: float = 300.0,
        history_per_client: int = 50,
        history_ttl: int = 7 * 86400,
        history_max_clients: int = 2000,
        idempotency_window: float = 600.0,
        records_per_owner: int = 1000,
        key_budget: KeyBudget = DEFAULT_KEY_BUDGET,
    ) -> None:
        self.instance = instance
        self._origin = instance.encode()
        self.presence_ttl = presence_ttl
        self._inbox: Inbox | None = None
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        if isinstance(target, str):
            target = RedisTarget(url=target)
        self._link = link = Link(target, display=display, pool_size=pool_size)
        subscriber = ClusterSubscriber if target.cluster else Subscriber
        self._subscriber = subscriber(
            link, link.keys.instance_channel(instance), self._on_message, self._lost, self._came_back
        )
        self._client_of = link.keys.client_of
        self._outbox = Outbox(
            link,
            instance,
            lambda: self.inbox,
            self._publish_failed,
            limit=outbox_limit,
            outcome_timeout=outcome_timeout,
        )
        self._outcomes = self._outbox.outcomes
        self._history = HistoryLog(link, per_client=history_per_client, ttl=history_ttl, max_ids=history_max_clients)
        self._presence = Presence(link, instance, lambda: self.inbox, self._history, ttl=presence_ttl)
        self._ownership = Ownership(
            link, self._subscriber, lambda: self.inbox, self._presence.changed, self._spawn, ttl=presence_ttl
        )
        self._queue = RedisQueue(link, max_per_client=queue_max, remember_seconds=queue_remember_seconds)
        self._idempotency = IdempotencyRecords(link, window=idempotency_window, budget=key_budget)
        self._records = CommandRecords(link, window=idempotency_window, per_owner=records_per_owner)
        self._admission = AdmissionRecords(link, self._history)

    # --- lifecycle --------------------------------------------------------------------

    @property
    def inbox(self) -> Inbox:
        if self._inbox is None:
            raise BrokerNotStarted("RedisBroker used before `await broker.start(inbox)`")
        return self._inbox

    def describe(self) -> str:
        return f"redis ({self._link.display})"

    async def start(self, inbox: Inbox) -> None:
        self._inbox = inbox
        metrics.BROKER_UP.set(0)  # Until the subscriber is confirmed; then kept by _lost/_reassert_all.
        metrics.watch(metrics.REDIS_OUTBOX, lambda: len(self._outbox))
        self._link.open()
        self._ownership.open()
        self._presence.open()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._subscriber.run(), name="redis-subscriber"),
            loop.create_task(self._resilient("publisher", self._outbox.run), name="redis-publisher"),
            loop.create_task(self._resilient("heartbeat", self._heartbeat), name="redis-presence"),
            loop.create_task(self._resilient("outcomes", self._outcomes.expire), name="redis-outcomes"),
        ]
        # Give Redis a moment so a healthy start is ready at once; an outage is not fatal.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscriber.ready.wait(), 5)
        if not self._link.up:
            log.warning(
                "Redis at %s is not reachable yet (%s); retrying in the background",
                self._link.display,
                self._link.reason,
            )

    async def stop(self) -> None:
        self._stopping = self._subscriber.stopping = True
        await cancel_and_wait([*self._tasks, *self._background])  # Even one that swallowed its cancel.
        if self._link.redis is not None:
            with contextlib.suppress(RedisError, OSError):
                async with self._link.redis.pipeline(transaction=False) as pipe:
                    self._ownership.release_all(pipe)
                    self._presence.withdraw(pipe)
                    await pipe.execute()
        self._outcomes.fail_all("the instance is shutting down")
        await self._subscriber.close()
        await self._link.close()

    def health(self) -> tuple[bool, str]:
        return self._link.health()

    def _lost(self, exc: BaseException) -> None:
        """Redis failed, as any part saw it: down, and nothing left waiting for an answer."""
        self._link.went_down(exc)
        self._subscriber.lost()
        self._outcomes.fail_counted(f"outcome unknown: {self.health()[1]}")

    def _publish_failed(self, exc: BaseException) -> None:
        self._lost(exc)
        self._subscriber.request_reconnect()  # The subscriber may not have noticed yet.

    async def _resilient(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Keep a background task alive: an unexpected error is logged and counted, never fatal."""
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Redis broker task %s failed; restarting it", name)
                metrics.BROKER_TASK_ERRORS.labels(task=name).inc()
                await asyncio.sleep(0.1)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _came_back(self) -> None:
        """Redis is reachable (again): reassert local ids, then report ready; retried until it works."""
        backoff = 0.1
        while not await self._reassert_all():
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _reassert_all(self) -> bool:
        try:
            await self._refresh_owners()
            await self._presence.write(full=True)
        except (RedisError, OSError) as exc:
            self._link.reason = type(exc).__name__
            log.warning("Redis is back but re-registering local ids failed: %s: %s", type(exc).__name__, exc)
            return False
        self._link.came_up()
        self._subscriber.ready.set()
        return True

    async def _refresh_owners(self) -> None:
        await self._ownership.release_leftovers()
        await self._ownership.reassert()

    async def _heartbeat(self) -> None:
        await self._presence.heartbeat(self._refresh_owners)

    # --- what arrives -------------------------------------------------------------------

    def _on_message(self, channel: bytes, data: bytes) -> None:
        inbox = self.inbox
        if channel == b"wsb:controllers":
            inbox.deliver_to_controllers(data.decode())
            return
        if channel == b"wsb:fan":
            inbox.fan_in(data)
            return
        kind = data[:1]
        if kind == b"m":
            head, _, text = data.partition(b"\n")
            seq, _, rest = head[1:].partition(b"|")
            origin, _, sender = rest.partition(b"|")
            if origin == self._origin and self._outcomes.get(int(seq)) is None:
                return  # Ours, and reported already (delivered locally when Redis failed, or failed): never twice.
            failure = inbox.deliver(self._client_of(channel), text.decode(), sender.decode())
            self._outcomes.answer(origin, seq, failure)
        elif kind == b"a":
            self._outcomes.on_answers(data[1:])
        elif kind == b"e":
            inbox.instance_event(data[1:])
        elif kind == b"r":
            head, _, body = data.partition(b"\n")
            seq, _, origin = head[1:].partition(b"|")
            if origin == self._origin and self._outcomes.get(int(seq)) is None:
                return  # As above.
            failure = inbox.deliver_routed(self._client_of(channel), decode_routed(body))
            self._outcomes.answer(origin, seq, failure)
        elif kind == b"k":
            replaced = decode_owner(data[1:])
            if replaced is not None:
                inbox.replaced(self._client_of(channel), replaced)

    # --- the contract ---------------------------------------------------------------------

    async def claim(self, client_id: str, instance: str, conn_key: str, role: Role, reject_if_taken: bool) -> Claim:
        return await self._ownership.claim(client_id, instance, conn_key, role, reject_if_taken)

    async def release(self, client_id: str, owner: Owner) -> None:
        await self._ownership.release(client_id, owner)

    async def owner_of(self, client_id: str) -> Owner | None:
        return await self._ownership.owner_of(client_id)

    def send(self, target: str, text: str, on_result: OnResult, sender: str = "") -> None:
        self._outbox.send(target, text, on_result, sender)

    def send_routed(self, target: str, routed: Routed, on_result: OnResult) -> None:
        self._outbox.send_routed(target, routed, on_result)

    def send_to_instance(self, instance: str, payload: bytes) -> None:
        if instance == self.instance:
            self.inbox.instance_event(payload)
        else:
            self._outbox.send_to_instance(instance, payload)

    def send_to_controllers(self, frame: str) -> None:
        self._outbox.send_to_controllers(frame)

    async def fan_out(self, payload: bytes) -> int:
        redis = self._link.client()
        try:
            if self._link.sharded:
                return int(await redis.execute_command("SPUBLISH", FAN_CHANNEL, payload))
            return int(await redis.publish(FAN_CHANNEL, payload))
        except (RedisError, OSError) as exc:
            raise unavailable(exc, "Redis unreachable: {}") from exc

    async def enqueue(self, target: str, routed: Routed, now: float, *, requeue: bool = False) -> Enqueued:
        return await self._queue.enqueue(target, routed, now, requeue=requeue)

    async def take_queued(self, target: str, now: float) -> list[Routed]:
        return await self._queue.take(target, now)

    async def idempotency_claim(self, caller: str, key: str, record: str) -> str | None:
        return await self._idempotency.claim(caller, key, record)

    async def idempotency_get(self, caller: str, key: str) -> str | None:
        return await self._idempotency.get(caller, key)

    async def idempotency_set(self, caller: str, key: str, record: str) -> None:
        await self._idempotency.set(caller, key, record)

    async def idempotency_drop(self, caller: str, key: str) -> None:
        await self._idempotency.drop(caller, key)

    async def record_put(self, owner: str, key: str, record: str) -> None:
        await self._records.put(owner, key, record)

    async def record_get(self, owner: str, key: str) -> str | None:
        return await self._records.get(owner, key)

    async def presence(self) -> list[dict[str, Any]]:
        return await self._presence.records()

    async def presence_summary(self) -> list[dict[str, Any]]:
        return await self._presence.summaries()

    def heartbeat(self, beat: dict[str, Any], trend: dict[str, Any] | None) -> None:
        self._presence.beat(beat, trend)

    async def trends(self, instances: list[str]) -> dict[str, list[dict[str, Any]]]:
        return await self._presence.trends(instances)

    def presence_changed(self, client_id: str) -> None:
        self._presence.changed(client_id)

    async def presence_of(self, client_id: str) -> dict[str, Any] | None:
        """The local record, else the holder's record in its instance's presence hash: two small reads."""
        local = self.inbox.presence_record(client_id)
        if local is not None:
            return local
        owner = await self.owner_of(client_id)
        return None if owner is None else await self._presence.record(owner.instance, client_id)

    def record_history(self, client_id: str, entry: dict[str, Any]) -> None:
        self._history.record(client_id, entry)
        self._presence.history_recorded()

    async def history(self, client_id: str, limit: int) -> list[dict[str, Any]]:
        return await self._history.read(client_id, limit)

    async def id_known(self, client_id: str) -> bool:
        return await self._admission.id_known(client_id)

    async def count_in_window(self, key: str, window: float) -> WindowCount:
        return await self._admission.count_in_window(key, window)

    async def put_ban(self, key: str, record: str, until: float) -> None:
        await self._admission.put_ban(key, record, until)

    async def drop_ban(self, key: str) -> bool:
        return await self._admission.drop_ban(key)

    async def bans(self, seen: int | None) -> tuple[int, dict[str, str] | None]:
        return await self._admission.bans(seen)
