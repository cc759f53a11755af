"""Live updates: one presence poll per instance, fanned out to every open dashboard's event stream.

However many dashboards are open, an instance reads cluster presence once per
``interval`` (and not at all when nobody watches). Each stream gets the counters and,
at most once per poll, a "changed" signal when the set of connections changed; the page
then re-fetches its table with its own filters, so nothing per-connection is pushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from appliance.brokers.base import BrokerUnavailable

from .query import summarize

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

    async def _poll_once(self) -> None:
        seq = self.latest.seq + 1
        try:
            records = await self.relay.clients()
        except BrokerUnavailable as exc:
            self.latest = Snapshot(seq, self.latest.counters, self.latest.digest, str(exc))
        else:
            self.latest = Snapshot(seq, summarize(records), _digest(records))
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
