"""This instance's heartbeat: who it is and how it is doing, published through the broker every period.

Each beat reads the counters the relay keeps anyway (appliance/metrics.py), so the message
path pays nothing; the rates since the previous beat become one point of the instance's
trend series (the last hour, in memory) and travel with the beat. The broker puts the
beat in this instance's presence summary (``at``, ``period``, ``started``, ``version``,
``memory_bytes``, the latest ``rates``; the Redis broker adds ``redis_latency_ms``), so a
dashboard on any instance sees every instance, also one that holds no connection, and
marks one stale as soon as a beat is missed (:func:`~appliance.core.series.is_stale`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
import time
from typing import Any, Protocol

from . import __version__, metrics
from .core.series import Counts, Series, point

__all__ = ["Heartbeat", "read_counts", "resident_bytes"]

log = logging.getLogger(__name__)

#: Points kept: an hour at one per beat (a short test period keeps at most this many).
HOUR = 3600.0
MAX_POINTS = 3600


class Publisher(Protocol):
    def heartbeat(self, beat: dict[str, Any], trend: dict[str, Any] | None) -> None: ...


def read_counts(now: float) -> Counts:
    """This process's cumulative counters (one pass over the connections for the frames written)."""
    frames = metrics.FRAMES_SENT.source()
    _, rtt = metrics.COMMAND_RTT.counts()
    return Counts(
        at=now,
        connections=int(metrics.counter_total(metrics.CONNECTIONS)),
        commands_in=metrics.counter_total(metrics.MESSAGES, metrics.RECEIVED_FROM_CONTROLLERS, role="controller"),
        replies_in=metrics.counter_total(metrics.MESSAGES, metrics.RECEIVED_FROM_CLIENTS, role="client"),
        commands_out=float(frames.get("client", 0.0)),
        replies_out=float(frames.get("controller", 0.0)),
        errors=metrics.counter_total(metrics.ERRORS),
        rtt=rtt,
    )


def resident_bytes() -> int:
    """Resident memory now (Linux), else the peak (``ru_maxrss``)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Heartbeat:
    """Beats every ``period`` seconds; keeps this instance's trend series."""

    def __init__(self, instance: str, period: float) -> None:
        if period <= 0:
            raise ValueError("period must be positive")
        self.instance = instance
        self.period = period
        self.started = time.time()
        self.series = Series(min(MAX_POINTS, max(2, math.ceil(HOUR / period))))
        self._last: Counts | None = None
        self.latest: dict[str, Any] | None = None

    def beat(self, now: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the beat, the new trend point or None on the first beat)."""
        counts = read_counts(now)
        trend = None
        if self._last is not None and now > self._last.at:
            trend = point(self._last, counts, metrics.COMMAND_RTT.counts()[0])
            self.series.add(trend)
        self._last = counts
        beat: dict[str, Any] = {
            "at": round(now, 3),
            "period": self.period,
            "started": round(self.started, 3),
            "version": __version__,
            "memory_bytes": resident_bytes(),
        }
        if trend is not None:
            beat["rates"] = {k: v for k, v in trend.items() if k != "t"}
        self.latest = beat
        return beat, trend

    async def run(self, broker: Publisher) -> None:
        """Beat until cancelled; a failing beat is logged and the next one tries again."""
        while True:
            try:
                broker.heartbeat(*self.beat(time.time()))
            except Exception:
                log.exception("Heartbeat failed")
            await asyncio.sleep(self.period)
