"""Live updates: one presence poll per instance, fanned out to every open dashboard's event stream.

However many dashboards are open, an instance reads cluster presence once per
``interval`` (and not at all when nobody watches). Each stream gets the counters and,
at most once per poll, a "changed" signal when the set of connections changed; the page
then re-fetches its table with its own filters, so nothing per-connection is pushed.

Page requests share the same read: :meth:`PresenceWatcher.records` returns presence at
most ``max_age`` seconds old and coalesces concurrent reads, so a "changed" signal that
makes every open dashboard re-fetch at once costs the relay one read, not one per page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from appliance.brokers.base import BrokerUnavailable

from .query import facets, summarize

__all__ = ["PresenceWatcher", "Snapshot"]

log = logging.getLogger(__name__)


class Snapshot:
    """What one poll saw: the counters, a digest of who is connected, and whether the broker answered."""

    __slots__ = ("counters", "digest", "error", "seq")

    def __init__(self, seq: int, counters: dict[str, int], digest: str, error: str = "") -> None:
        self.seq = seq
        self.counters = counters
        self.digest = digest
        self.error = error


def _digest(records: list[dict[str, Any]]) -> str:
    """Changes when a connection comes or goes (not when its message counters move)."""
    h = hashlib.blake2b(digest_size=12)
    for r in sorted((str(r.get("id")), str(r.get("instance")), str(r.get("connected_since"))) for r in records):
        h.update("\x00".join(r).encode() + b"\x01")
    return h.hexdigest()


class PresenceWatcher:
    def __init__(self, relay: Any, interval: float = 1.0) -> None:
        self.relay = relay
        self.interval = interval
        self.latest = Snapshot(0, summarize([]), "")
        self._watchers = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._records: list[dict[str, Any]] | None = None
        self._records_at = 0.0
        self._reading: asyncio.Future[list[dict[str, Any]]] | None = None
        self._described: tuple[list[dict[str, Any]], dict[str, list[str]], dict[str, int], str] | None = None

    async def records(self, max_age: float = 1.0) -> list[dict[str, Any]]:
        """Cluster presence at most ``max_age`` seconds old; raises BrokerUnavailable like the relay."""
        if self._records is not None and time.monotonic() - self._records_at <= max_age:
            return self._records
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        return await asyncio.shield(self._reading)

    def describe(self, records: list[dict[str, Any]]) -> tuple[dict[str, list[str]], dict[str, int], str]:
        """(filter menu values, counters, membership digest) of ``records``, computed once per read."""
        cached = self._described
        if cached is None or cached[0] is not records:
            cached = self._described = (records, facets(records), summarize(records), _digest(records))
        return cached[1], cached[2], cached[3]

    async def _read(self) -> list[dict[str, Any]]:
        try:
            records = await self.relay.clients()
            self._records, self._records_at = records, time.monotonic()
            return records
        finally:
            self._reading = None

    async def _poll_once(self) -> None:
        seq = self.latest.seq + 1
        try:
            records = await self.records(max_age=0.0)
        except BrokerUnavailable as exc:
            self.latest = Snapshot(seq, self.latest.counters, self.latest.digest, str(exc))
        else:
            _, counters, digest = self.describe(records)
            self.latest = Snapshot(seq, counters, digest)
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        while self._watchers > 0:
            try:
                await self._poll_once()
            except Exception:  # A bug in one poll must not end live updates for everyone.
                log.exception("Presence poll failed")
            await asyncio.sleep(self.interval)
        self._task = None

    async def snapshots(self) -> AsyncIterator[Snapshot]:
        """Every new snapshot, starting with a fresh one; polling runs while anyone iterates."""
        self._watchers += 1
        try:
            await self._poll_once()
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run(), name="dashboard-presence")
            seen = 0
            while True:
                if self.latest.seq != seen:
                    seen = self.latest.seq
                    yield self.latest
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), self.interval * 5)
        finally:
            self._watchers -= 1
