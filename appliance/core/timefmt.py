"""Times as shown and stored: ISO 8601 in UTC, from epoch seconds. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["iso"]


def iso(epoch: float, timespec: str = "milliseconds") -> str:
    """``epoch`` as ISO 8601 in UTC (``2026-12-07T18:52:08.123+00:00``); ``timespec`` as datetime.isoformat's."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec=timespec)
