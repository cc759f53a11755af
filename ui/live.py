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
import logging
import time
from collections.abc import AsyncGenerator
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
    """Changes when a connection comes or goes (not when its message counters move).

    An order-independent sum of per-connection hashes: one pass, no sort (10,000 records in
    about a millisecond). Python's string hashes differ between processes, so a page rendered
    by one instance and a stream served by another disagree once: one extra refresh, no harm.
    """
    total = 0
    for r in records:
        total += hash((r.get("id"), r.get("instance"), r.get("connected_since")))
    return f"{len(records):x}-{total & 0xFFFFFFFFFFFFFFFF:016x}"


#: Polling never takes more than this share of the instance's time: a slow read (10,000 entries
#: on a busy machine) spaces the polls out instead of costing the relay throughput.
POLL_BUDGET = 0.02
MAX_INTERVAL = 10.0


class PresenceWatcher:
    def __init__(self, relay: Any, interval: float = 1.0) -> None:
        self.relay = relay
        self.min_interval = interval
        self.interval = interval
        self.latest = Snapshot(0, summarize([]), "")
        self._watchers = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._records: list[dict[str, Any]] | None = None
        self._records_at = 0.0
        self._reading: asyncio.Future[list[dict[str, Any]]] | None = None
        self._described: tuple[list[dict[str, Any]], dict[str, int], str] | None = None
        self._facets: tuple[list[dict[str, Any]], dict[str, list[str]]] | None = None

    async def records(self, max_age: float = 1.0) -> list[dict[str, Any]]:
        """Cluster presence at most ``max_age`` seconds old; raises BrokerUnavailable like the relay."""
        if self._records is not None and time.monotonic() - self._records_at <= max_age:
            return self._records
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read())
        return await asyncio.shield(self._reading)

    def describe(self, records: list[dict[str, Any]]) -> tuple[dict[str, int], str]:
        """(counters, membership digest) of ``records``, computed once per read."""
        cached = self._described
        if cached is None or cached[0] is not records:
            cached = self._described = (records, summarize(records), _digest(records))
        return cached[1], cached[2]

    def facets(self, records: list[dict[str, Any]]) -> dict[str, list[str]]:
        """The filter menus' values, computed once per read and only when a page asks."""
        cached = self._facets
        if cached is None or cached[0] is not records:
            cached = self._facets = (records, facets(records))
        return cached[1]

    async def _read(self) -> list[dict[str, Any]]:
        try:
            records = await self.relay.clients()
            self._records, self._records_at = records, time.monotonic()
            return records
        finally:
            self._reading = None

    async def _poll_once(self, max_age: float = 0.0) -> None:
        seq = self.latest.seq + 1
        started = time.perf_counter()
        try:
            records = await self.records(max_age)
        except BrokerUnavailable as exc:
            self.latest = Snapshot(seq, self.latest.counters, self.latest.digest, str(exc))
        else:
            counters, digest = self.describe(records)
            self.latest = Snapshot(seq, counters, digest)
            spent = time.perf_counter() - started
            self.interval = min(MAX_INTERVAL, max(self.min_interval, spent / POLL_BUDGET))
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

    async def snapshots(self) -> AsyncGenerator[Snapshot, None]:
        """Every new snapshot, starting with a fresh one; polling runs while anyone iterates."""
        self._watchers += 1
        try:
            await self._poll_once(max_age=self.min_interval)  # A page's own read is recent enough.
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run(), name="dashboard-presence")
            seen = 0
            while True:
                # A draining relay is reported within a second, so streams end before the shutdown grace.
                if self.latest.seq != seen or self.relay.draining:
                    seen = self.latest.seq
                    yield self.latest
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 1.0)
        finally:
            self._watchers -= 1
