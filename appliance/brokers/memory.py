"""The embedded broker: one process, everything in memory, nothing to install."""

from __future__ import annotations

import itertools
import time
from typing import Any

from .. import metrics
from ..core.expiring import ByLastWrite
from ..core.history import HistoryBook
from ..core.keybudget import DEFAULT_KEY_BUDGET, KeyBook, KeyBudget
from ..core.newids import FixedWindows, WindowCount
from ..core.protocol import Role
from ..core.requests import Enqueued, OfflineQueue, Routed
from .base import Broker, BrokerNotStarted, Claim, Inbox, OnResult, Owner, failure_detail

__all__ = ["MemoryBroker"]


class MemoryBroker(Broker):
    name = "memory"

    def __init__(
        self,
        *,
        queue_max: int = 1000,
        queue_remember_seconds: float = 300.0,
        queue_max_total: int = 100_000,
        history_per_client: int = 50,
        history_ttl: float = 7 * 86400,
        history_max_clients: int = 2000,
        idempotency_window: float = 600.0,
        key_budget: KeyBudget = DEFAULT_KEY_BUDGET,
        records_per_owner: int = 1000,
    ) -> None:
        self._inbox: Inbox | None = None
        self._history = HistoryBook(history_per_client, history_max_clients, history_ttl)
        self._owners: dict[str, Owner] = {}
        self._generations = itertools.count(1)
        self._queue = OfflineQueue(queue_max, queue_remember_seconds, queue_max_total)
        # Bounded per caller (the callers are the configured tokens: few); a live key is never forgotten early.
        self._idempotency = KeyBook(key_budget, idempotency_window)
        self._records: dict[str, ByLastWrite[str]] = {}  # owner -> its command records
        self._records_per_owner = records_per_owner
        self._windows = FixedWindows()
        self._bans: dict[str, tuple[str, float]] = {}  # key -> (record, until)
        self._bans_version = 0
        self._beat: dict[str, Any] = {}

    @property
    def inbox(self) -> Inbox:
        if self._inbox is None:
            raise BrokerNotStarted("MemoryBroker used before `await broker.start(inbox)`")
        return self._inbox

    async def start(self, inbox: Inbox) -> None:
        self._inbox = inbox
        metrics.BROKER_UP.set(1)  # In-process: reachable as long as the process runs.

    async def stop(self) -> None:
        self._owners.clear()

    async def claim(self, client_id: str, instance: str, conn_key: str, role: Role, reject_if_taken: bool) -> Claim:
        inbox = self.inbox
        previous = self._owners.get(client_id)
        if previous is not None and previous.role is not role:
            return Claim(False, None, previous, role_conflict=True)
        if previous is not None and reject_if_taken:
            return Claim(False, None, previous)
        owner = Owner(instance, conn_key, next(self._generations), role)
        self._owners[client_id] = owner
        if previous is not None:
            inbox.replaced(client_id, previous)
        return Claim(True, owner, previous)

    async def release(self, client_id: str, owner: Owner) -> None:
        if self._owners.get(client_id) == owner:
            del self._owners[client_id]

    def send(self, target: str, text: str, on_result: OnResult, sender: str = "") -> None:
        failure = self.inbox.deliver(target, text, sender)
        if failure is None:
            on_result(None, "")
        else:
            on_result(failure, failure_detail(failure, target))

    def send_routed(self, target: str, routed: Routed, on_result: OnResult) -> None:
        failure = self.inbox.deliver_routed(target, routed)
        if failure is None:
            on_result(None, "")
        else:
            on_result(failure, failure_detail(failure, target))

    def send_to_instance(self, instance: str, payload: bytes) -> None:
        self.inbox.instance_event(payload)  # One process: every instance is this one.

    async def fan_out(self, payload: bytes) -> int:
        self.inbox.fan_in(payload)
        return 1

    async def enqueue(self, target: str, routed: Routed, now: float, *, requeue: bool = False) -> Enqueued:
        return self._queue.enqueue(target, routed, now, requeue=requeue)

    async def take_queued(self, target: str, now: float) -> list[Routed]:
        return self._queue.take(target, now)

    async def owner_of(self, client_id: str) -> Owner | None:
        return self._owners.get(client_id)

    def send_to_controllers(self, frame: str) -> None:
        self.inbox.deliver_to_controllers(frame)

    async def presence(self) -> list[dict[str, Any]]:
        return self.inbox.presence_records()

    async def presence_summary(self) -> list[dict[str, Any]]:
        return [{**self.inbox.presence_summary(), **self._beat}]

    def heartbeat(self, beat: dict[str, Any], trend: dict[str, Any] | None) -> None:
        self._beat = dict(beat)  # One process: no other instance reads the trend.

    async def trends(self, instances: list[str]) -> dict[str, list[dict[str, Any]]]:
        return {}

    def presence_changed(self, client_id: str) -> None:
        pass  # Records are read live from the connections.

    async def presence_of(self, client_id: str) -> dict[str, Any] | None:
        return self.inbox.presence_record(client_id)

    def record_history(self, client_id: str, entry: dict[str, Any]) -> None:
        self._history.add(client_id, entry, time.time())

    async def history(self, client_id: str, limit: int) -> list[dict[str, Any]]:
        return self._history.entries(client_id, limit, time.time())

    async def idempotency_claim(self, caller: str, key: str, record: str) -> str | None:
        return self._idempotency.claim(caller, key, record, time.time())

    async def idempotency_get(self, caller: str, key: str) -> str | None:
        return self._idempotency.get(caller, key, time.time())

    async def idempotency_set(self, caller: str, key: str, record: str) -> None:
        self._idempotency.set(caller, key, record, time.time())

    async def idempotency_drop(self, caller: str, key: str) -> None:
        self._idempotency.drop(caller, key, time.time())

    async def record_put(self, owner: str, key: str, record: str) -> None:
        records = self._records.get(owner)
        if records is None:  # Owners are callers (the configured tokens): few.
            records = self._records[owner] = ByLastWrite(self._records_per_owner, self._idempotency.window)
        records.put(key, record, time.time())

    async def record_get(self, owner: str, key: str) -> str | None:
        records = self._records.get(owner)
        return None if records is None else records.get(key, time.time())

    async def id_known(self, client_id: str) -> bool:
        return client_id in self._owners or bool(self._history.entries(client_id, 1, time.time()))

    async def count_in_window(self, key: str, window: float) -> WindowCount:
        return self._windows.add(key, window, time.monotonic())

    async def put_ban(self, key: str, record: str, until: float) -> None:
        self._bans[key] = (record, until)
        self._bans_version += 1

    async def drop_ban(self, key: str) -> bool:
        self._bans_version += 1
        return self._bans.pop(key, None) is not None

    async def bans(self, seen: int | None) -> tuple[int, dict[str, str] | None]:
        now = time.time()
        for key in [k for k, (_, until) in self._bans.items() if until <= now]:
            del self._bans[key]  # Expired: gone from the list, as Redis drops them.
        if seen == self._bans_version:
            return seen, None
        return self._bans_version, {key: record for key, (record, _) in self._bans.items()}

    def health(self) -> tuple[bool, str]:
        return (self._inbox is not None, "ok" if self._inbox is not None else "broker not started")
