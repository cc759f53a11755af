"""Jinja2 set-up for the dashboard: autoescaping stays on; filters for times and numbers."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from litestar.plugins.jinja import JinjaTemplateEngine

__all__ = ["ago", "configure_environment", "from_epoch"]


def _parse(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def ago(value: Any, now: float | None = None) -> str:
    """ "3 min ago" for an ISO time or epoch seconds; empty if it does not parse."""
    at = _parse(value)
    if at is None:
        return ""
    seconds = max(0, int((now if now is not None else time.time()) - at))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def from_epoch(value: Any) -> str:
    at = _parse(value)
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if at is not None else ""


def configure_environment(engine: JinjaTemplateEngine) -> None:
    env = engine.engine
    env.autoescape = True  # Everything a client controls (ids, messages, addresses) is escaped.
    env.trim_blocks = True
    env.lstrip_blocks = True
    env.filters["ago"] = ago
    env.filters["utc"] = from_epoch
