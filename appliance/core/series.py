"""Trends: rates from two readings of an instance's counters, a bounded series of them, staleness.

An instance reads its cumulative counters once per heartbeat (:class:`Counts`, from the
metrics it keeps anyway: the message path does no extra work); :func:`point` turns two
readings into per-second rates and a p99 round trip from the histogram's bucket deltas;
:class:`Series` keeps the last hour of points. :func:`combine` adds instances' points into
cluster-wide ones. Pure: the clock is passed in.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RATES",
    "TREND_FIELDS",
    "Counts",
    "Series",
    "combine",
    "is_stale",
    "point",
    "quantile",
    "stale_after",
]

#: The per-second rates of a point: commands from controllers and frames written to clients,
#: messages (replies) from clients and frames written to controllers, error frames.
RATES = ("commands_in", "commands_out", "replies_in", "replies_out", "errors")
#: Everything a point charts: the rates, open connections and the p99 round trip (ms, None without samples).
TREND_FIELDS = ("connections", *RATES, "p99_ms")


@dataclass(frozen=True, slots=True)
class Counts:
    """An instance's cumulative counters at wall time ``at`` (``rtt``: per-bucket counts, not cumulative)."""

    at: float
    connections: int
    commands_in: float
    commands_out: float
    replies_in: float
    replies_out: float
    errors: float
    rtt: tuple[int, ...]


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile of a histogram's per-bucket ``counts`` (upper ``bounds``, the last +Inf),
    interpolated within its bucket as Prometheus' ``histogram_quantile`` does; None without samples."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            upper = bounds[i]
            lower = bounds[i - 1] if i > 0 else 0.0
            if math.isinf(upper):  # Beyond the last bound: the last finite one, as Prometheus says.
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return bounds[-2] if len(bounds) > 1 else None


def point(before: Counts, after: Counts, bounds: Sequence[float]) -> dict[str, Any]:
    """Rates per second between two readings (a counter that went back, as after a restart, reads 0)."""
    span = after.at - before.at
    if span <= 0:
        raise ValueError("the readings must be in time order")
    out: dict[str, Any] = {"t": round(after.at, 3), "connections": after.connections}
    for name in RATES:
        out[name] = round(max(0.0, getattr(after, name) - getattr(before, name)) / span, 3)
    deltas = [max(0, b - a) for a, b in zip(before.rtt, after.rtt, strict=True)]
    p99 = quantile(bounds, deltas, 0.99)
    out["p99_ms"] = None if p99 is None else round(p99 * 1000, 3)
    return out


class Series:
    """The newest ``maxlen`` points of one instance, oldest first (one per heartbeat: an hour's worth)."""

    __slots__ = ("_points",)

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self._points: deque[dict[str, Any]] = deque(maxlen=maxlen)

    def add(self, entry: dict[str, Any]) -> None:
        self._points.append(entry)

    def since(self, start: float) -> list[dict[str, Any]]:
        """The points at or after ``start``, oldest first."""
        return [p for p in self._points if p["t"] >= start]

    @property
    def maxlen(self) -> int:
        return self._points.maxlen or 0

    def __len__(self) -> int:
        return len(self._points)


def combine(series: Iterable[list[dict[str, Any]]], step: float) -> list[dict[str, Any]]:
    """Cluster-wide points: the instances' points summed per ``step``-wide slot (rates and
    connections), the worst instance's p99 (quantiles do not add up). Oldest first."""
    if step <= 0:
        raise ValueError("step must be positive")
    slots: dict[int, dict[str, Any]] = {}
    for points in series:
        seen: set[int] = set()
        for p in points:
            slot = int(p["t"] // step)
            if slot in seen:  # One point per instance per slot: a faster heartbeat does not count twice.
                continue
            seen.add(slot)
            total = slots.setdefault(
                slot, {"t": (slot + 1) * step, **dict.fromkeys(TREND_FIELDS[:-1], 0), "p99_ms": None}
            )
            for name in TREND_FIELDS[:-1]:
                total[name] += p.get(name) or 0
            p99 = p.get("p99_ms")
            if p99 is not None and (total["p99_ms"] is None or p99 > total["p99_ms"]):
                total["p99_ms"] = p99
    return [{**v, **{k: round(v[k], 3) for k in RATES}} for _, v in sorted(slots.items())]


def stale_after(period: float) -> float:
    """Seconds without a heartbeat after which an instance is stale: one missed beat, with slack
    for a write that settles (0.2 s) and a busy event loop."""
    return period + max(1.0, period / 2)


def is_stale(summary: dict[str, Any], now: float) -> bool:
    """Whether an instance's summary says it missed a heartbeat (one without a heartbeat never is)."""
    at, period = summary.get("at"), summary.get("period")
    if not isinstance(at, int | float) or not isinstance(period, int | float) or period <= 0:
        return False
    return now - at > stale_after(period)
