"""Rate-limited logging: a flood of refused handshakes must not become a flood of log lines.

Each kind of line (logger and message template, so "Refused connection for id %r" is
one kind whatever the id) may be written in bursts of ``burst`` and then ``rate`` per
second; the rest are dropped and counted in ``wsbridge_log_lines_suppressed_total``
(labelled by logger, a bounded set). Errors and worse are never dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import Counter

from .core.ratelimit import TokenBucket
from .metrics import REGISTRY

__all__ = ["SUPPRESSED", "LogFlood", "install"]

SUPPRESSED = Counter(
    "wsbridge_log_lines_suppressed_total",
    "Log lines dropped by the log-flood limit (LOG_FLOOD_BURST, LOG_FLOOD_RATE), by logger.",
    ["logger"],
    registry=REGISTRY,
)

#: Distinct kinds kept before the table is cleared: templates are few, this only bounds a pathological logger.
_MAX_KINDS = 10_000


class LogFlood(logging.Filter):
    def __init__(self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.rate, self.clock = burst, rate, clock
        self._buckets: dict[tuple[str, object], TokenBucket] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.msg)
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_KINDS:
                self._buckets.clear()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        if bucket.try_take(now) == 0.0:
            return True
        SUPPRESSED.labels(logger=record.name).inc()
        return False


def install(burst: int, rate: float) -> LogFlood:
    """Add the limit to every handler of the root logger (where ``logs.configure_logging`` sends everything)."""
    flood = LogFlood(burst, rate)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flood)
    return flood
