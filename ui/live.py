"""Live updates: one presence-summary poll per instance, fanned out to every open dashboard's event stream.

However many dashboards are open, an instance polls once per ``interval`` (and not at all
when nobody watches), and a poll is cheap: :meth:`Relay.cluster_summary` reads each
instance's counters and membership version (a few small Redis keys, never the 10,000
records), so an idle dashboard costs the relay next to nothing. Each stream gets the
counters and, at most once per poll, a "changed" signal when a membership version moved
(a connection came or went on any instance); the page then re-fetches its table with its
own filters, and only that reads the full presence list.

Page requests share that read: :meth:`PresenceWatcher.records` returns presence at most
``max_age`` seconds old and coalesces concurrent reads, so a "changed" signal that makes
every open dashboard re-fetch at once costs the relay one read, not one per page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any

from appliance.brokers.base import BrokerUnavailable
from appliance.core.series import RATES, is_stale

from .query import facets, summarize

__all__ = [
    "ClientRates",
    "PresenceWatcher",
    "Snapshot",
    "mark_stale",
    "stale_instances",
    "summary_counters",
    "summary_digest",
    "summary_rates",
]

log = logging.getLogger(__name__)


class Snapshot:
    """What one poll saw: the counters, a digest of who is connected, and whether the broker answered."""

    __slots__ = ("counters", "digest", "error", "seq")

    def __init__(self, seq: int, counters: dict[str, Any], digest: str, error: str = "") -> None:
        self.seq = seq
        self.counters = counters
        self.digest = digest
        self.error = error


def summary_rates(summaries: list[dict[str, Any]]) -> dict[str, float]:
    """Cluster-wide rates per second, from each instance's latest heartbeat (a stale one counts 0)."""
    now = time.time()
    live = [s.get("rates") or {} for s in summaries if not is_stale(s, now)]
    return {key: round(sum(float(r.get(key) or 0) for r in live), 1) for key in RATES}


def stale_instances(summaries: list[dict[str, Any]], now: float) -> list[str]:
    """The instances that missed a heartbeat (still listed until their presence expires)."""
    return sorted(str(s.get("instance")) for s in summaries if is_stale(s, now))


def mark_stale(records: list[dict[str, Any]], stale: list[str]) -> None:
    """Mark the connections held by stale instances: nobody knows whether they are still there."""
    if stale:
        gone = set(stale)
        for record in records:
            if record.get("instance") in gone:
                record["stale"] = True


class ClientRates:
    """Per-connection rates for the pages that show a few connections (a client's page): messages
    per second in and out since the previous look at the same connection (at least ``least`` seconds
    ago), else the average since it connected. Bounded: the oldest connections looked at go first."""

    def __init__(self, max_entries: int = 10_000, least: float = 1.0) -> None:
        self._seen: dict[tuple[str, str, str], tuple[float, float, float]] = {}
        self._max = max_entries
        self._least = least

    def rates(self, record: dict[str, Any], now: float) -> dict[str, Any]:
        key = (str(record.get("id")), str(record.get("instance")), str(record.get("connected_since")))
        messages_in, messages_out = float(record.get("messages_in") or 0), float(record.get("messages_out") or 0)
        before = self._seen.get(key)
        found: dict[str, Any]
        if before is not None and now - before[0] >= self._least and messages_in >= before[1]:
            span = now - before[0]
            found = {
                "in": (messages_in - before[1]) / span,
                "out": (messages_out - before[2]) / span,
                "over": round(span),
            }
        else:
            try:
                since = datetime.fromisoformat(str(record.get("connected_since"))).timestamp()
            except ValueError:
                since = now
            span = max(1.0, now - since)
            found = {"in": messages_in / span, "out": messages_out / span, "over": None}
        if before is None or now - before[0] >= self._least:
            self._seen.pop(key, None)
            self._seen[key] = (now, messages_in, messages_out)
            if len(self._seen) > self._max:
                del self._seen[next(iter(self._seen))]
        return {**found, "in": round(found["in"], 2), "out": round(found["out"], 2)}


def summary_counters(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The counters at the top of the page, from the instances' summaries (same keys as ``summarize``)."""
    counters: dict[str, Any] = {
        key: sum(int(s.get(key) or 0) for s in summaries)
        for key in ("connections", "clients", "controllers", "messages_in", "messages_out")
    }
    counters["instances"] = len(summaries)  # Every live instance, also one that holds no connection.
    counters["stale"] = stale_instances(summaries, time.time())
    counters["rates"] = summary_rates(summaries)
    return counters


def summary_digest(summaries: list[dict[str, Any]]) -> str:
    """Changes when a connection comes or goes anywhere (not when message counters move).

    Built from every instance's (name, epoch, membership version): a restarted instance has a
    new epoch, so its counter starting again from zero still reads as a change.
    """
    now = time.time()  # An instance turning stale is a change too: its rows are marked.
    parts = sorted(f"{s.get('instance')}|{s.get('epoch')}|{s.get('membership')}|{is_stale(s, now)}" for s in summaries)
    digest = hashlib.blake2b("\n".join(parts).encode(), digest_size=8).hexdigest()
    return f"{sum(int(s.get('connections') or 0) for s in summaries):x}-{digest}"


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
        # The read in flight and the poll seq when it started.
        self._reading: tuple[asyncio.Future[list[dict[str, Any]]], int] | None = None
        self._digest = ""  # the membership digest read just before self._records
        self._instances = 0  # how many instances answered that read (some may hold no connection)
        self._extra: dict[str, Any] = {}  # that read's stale instances and rates, for the counters
        self.client_rates = ClientRates()
        self._moved = 0  # seq of the last poll whose digest differed from the one before
        self._described: tuple[list[dict[str, Any]], dict[str, int]] | None = None
        self._facets: tuple[list[dict[str, Any]], dict[str, list[str]]] | None = None

    async def records(self, max_age: float = 1.0) -> list[dict[str, Any]]:
        """Cluster presence at most ``max_age`` seconds old; raises BrokerUnavailable like the relay.

        Never older than the last "changed" a stream sent: a page re-fetching on that signal gets
        a read that started after the poll which saw the change (one read shared by every page).
        """
        current = self._watchers == 0 or self._digest == self.latest.digest
        if self._records is not None and current and time.monotonic() - self._records_at <= max_age:
            return self._records
        reading = self._reading
        if reading is None or reading[1] < self._moved:
            future = asyncio.ensure_future(self._read())
            reading = self._reading = (future, self.latest.seq)
            future.add_done_callback(self._done_reading)
        return await asyncio.shield(reading[0])

    def _done_reading(self, future: asyncio.Future[list[dict[str, Any]]]) -> None:
        if self._reading is not None and self._reading[0] is future:
            self._reading = None

    def describe(self, records: list[dict[str, Any]]) -> tuple[dict[str, int], str]:
        """(counters, membership digest) of ``records``, computed once per read.

        The digest is the one read just before these records, so a connection that came while
        they were read makes the page's stream say "changed" once more (never one too few).
        """
        cached = self._described
        if cached is None or cached[0] is not records:
            counters = summarize(records)
            if records is self._records:  # Instances with no connection have no record: count them too.
                counters["instances"] = max(counters["instances"], self._instances)
                counters.update(self._extra)
            cached = self._described = (records, counters)
        return cached[1], self._digest if records is self._records else ""

    def facets(self, records: list[dict[str, Any]]) -> dict[str, list[str]]:
        """The filter menus' values, computed once per read and only when a page asks."""
        cached = self._facets
        if cached is None or cached[0] is not records:
            cached = self._facets = (records, facets(records))
        return cached[1]

    async def _read(self) -> list[dict[str, Any]]:
        started = time.monotonic()
        summaries = await self.relay.cluster_summary()
        digest = summary_digest(summaries)
        records = await self.relay.clients(ordered=False)  # run_query selects its page itself.
        stale = stale_instances(summaries, time.time())
        mark_stale(records, stale)
        if started >= self._records_at:  # An older read finishing late never replaces a newer one.
            self._records, self._records_at, self._digest = records, started, digest
            self._instances = len(summaries)
            self._extra = {"stale": stale, "rates": summary_rates(summaries)}
        return records

    async def _poll_once(self) -> None:
        seq = self.latest.seq + 1
        started = time.perf_counter()
        try:
            summaries = await self.relay.cluster_summary()
        except BrokerUnavailable as exc:
            self.latest = Snapshot(seq, self.latest.counters, self.latest.digest, str(exc))
        else:
            digest = summary_digest(summaries)
            if digest != self.latest.digest:
                self._moved = seq
            self.latest = Snapshot(seq, summary_counters(summaries), digest)
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
            await self._poll_once()
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
