"""Jinja2 set-up for the dashboard: autoescaping stays on; filters for times and values.

Every time on every page goes through :func:`when`: relative ("3 min ago"), the absolute time
on hover, in UTC, or in the browser's zone when the operator chooses "local" (dashboard.js
rewrites the hover text from ``datetime``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from litestar.plugins.jinja import JinjaTemplateEngine
from markupsafe import Markup, escape

__all__ = ["ago", "configure_environment", "from_epoch", "shown", "when"]


def _parse(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def ago(value: Any, now: float | None = None) -> str:
    """ "3 min ago" (or "in 3 min") for an ISO time or epoch seconds; empty if it does not parse."""
    at = _parse(value)
    if at is None:
        return ""
    delta = int((now if now is not None else time.time()) - at)
    seconds = abs(delta)
    text = f"{seconds} s"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            text = f"{seconds // size} {unit}"
            break
    return f"in {text}" if delta < -1 else f"{text} ago"


def from_epoch(value: Any) -> str:
    at = _parse(value)
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if at is not None else ""


def when(value: Any, never: str = "—", now: float | None = None) -> Markup:
    """``<time>`` for an ISO time or epoch seconds: relative text, absolute UTC on hover; ``never`` if none."""
    at = _parse(value) if value not in (None, "") else None
    if at is None:
        return Markup(escape(never))
    stamp = datetime.fromtimestamp(at, UTC)
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        stamp.isoformat(timespec="seconds").replace("+00:00", "Z"),
        stamp.strftime("%Y-%m-%d %H:%M:%S UTC"),
        ago(at, now),
    )


#: Names of values that are times (epoch seconds) wherever they appear in a status mapping.
_TIME_KEYS = ("_at", "_refresh", "_seen", "_ends", "_since")


def shown(value: Any, key: str = "") -> Markup | str:
    """A status value as an operator reads it: yes/no, times, lists; never a Python repr."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and key.endswith(_TIME_KEYS):
        return when(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {shown(v, str(k))}" for k, v in value.items()) or "—"
    if isinstance(value, list | tuple | set):
        return ", ".join(str(shown(v)) for v in value) or "—"
    return str(value)


def configure_environment(engine: JinjaTemplateEngine) -> None:
    env = engine.engine
    env.autoescape = True  # Everything a client controls (ids, messages, addresses) is escaped.
    env.trim_blocks = True
    env.lstrip_blocks = True
    env.filters["ago"] = ago
    env.filters["utc"] = from_epoch
    env.filters["when"] = when
    env.filters["shown"] = shown
