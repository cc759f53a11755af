"""Small trend charts drawn on the server as inline SVG: no script, no style attribute, so the
dashboard's strict CSP (no inline script or style) holds. Colours come from dashboard.css.

A chart spans a fixed window (the last hour) so charts side by side share their time axis;
gaps (an instance that was down, a missed beat) break the line instead of being bridged.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any
from urllib.parse import quote

from markupsafe import Markup, escape

__all__ = ["CHARTS", "WINDOW", "chart", "describe", "grafana_links", "values_of", "window_for"]

#: Seconds of trend shown.
WINDOW = 3600.0
#: (field, title, unit) of each chart of the System page's Trends.
CHARTS = (
    ("connections", "Connections", ""),
    ("commands_in", "Commands in", "/s"),
    ("replies_in", "Replies in", "/s"),
    ("errors", "Errors", "/s"),
    ("p99_ms", "p99 round trip", " ms"),
)
#: The Grafana panels (dashboard uid, panel id in monitoring/grafana/dashboards/) matching each chart.
GRAFANA_PANELS = {
    "connections": ("wsbridge-instance", 6),
    "commands_in": ("wsbridge-instance", 10),
    "replies_in": ("wsbridge-instance", 10),
    "errors": ("wsbridge-instance", 11),
    "p99_ms": ("wsbridge-overview", 10),
}

WIDTH, HEIGHT, PAD = 240, 56, 2


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.3g}"


def span_text(seconds: float) -> str:
    """ "hour", "12 min", "40 s"."""
    if seconds >= WINDOW:
        return "hour"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def describe(values: Sequence[float]) -> str:
    """ "latest 3, max 12" for a screen reader and the caption."""
    if not values:
        return "no data yet"
    return f"latest {_number(values[-1])}, max {_number(max(values))}"


def window_for(series: Sequence[Sequence[dict[str, Any]]], now: float, least: float) -> float:
    """The span every chart of a page shares: from the oldest point shown (at least ``least``
    seconds, at most :data:`WINDOW`), so a young cluster's few minutes fill the chart."""
    oldest = min((float(p["t"]) for points in series for p in points[:1]), default=now)
    return min(WINDOW, max(least, now - oldest))


def values_of(points: Sequence[dict[str, Any]], field: str, now: float, window: float = WINDOW) -> list[float]:
    return [float(p[field]) for p in points if p.get(field) is not None and p["t"] >= now - window]


def chart(
    points: Sequence[dict[str, Any]], field: str, now: float, *, title: str, unit: str = "", window: float = WINDOW
) -> Markup:
    """An SVG line of ``field`` over the ``window`` seconds ending at ``now``.

    ``points`` are oldest first with a time ``t``; a point without a value (no round trip measured)
    or a gap longer than three beats splits the line.
    """
    start = now - window
    shown = [(float(p["t"]), float(p[field])) for p in points if p.get(field) is not None and p["t"] >= start]
    values = [v for _, v in shown]
    top = max(values, default=0.0) or 1.0
    steps = sorted(b[0] - a[0] for a, b in pairwise(shown))
    gap = 3 * steps[len(steps) // 2] if steps else window

    def xy(t: float, v: float) -> str:
        x = PAD + (t - start) / window * (WIDTH - 2 * PAD)
        y = HEIGHT - PAD - v / top * (HEIGHT - 2 * PAD)
        return f"{x:.1f},{y:.1f}"

    lines: list[list[str]] = []
    previous: float | None = None
    for t, v in shown:
        if previous is None or t - previous > gap:
            lines.append([])
        lines[-1].append(xy(t, v))
        previous = t
    label = f"{title}{unit and ' (' + unit.strip() + ')'}, last {span_text(window)}: {describe(values)}"
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{escape(label)}" data-field="{escape(field)}" data-points="{len(shown)}">',
        f"<title>{escape(label)}</title>",
        f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>',
    ]
    for line in lines:
        if len(line) == 1:
            x, y = line[0].split(",")
            parts.append(f'<circle class="dot" cx="{x}" cy="{y}" r="1.5"/>')
        else:
            parts.append(f'<polyline class="line" points="{" ".join(line)}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def grafana_links(grafana: str | None, field: str, address: str | None = None) -> str | None:
    """The Grafana panel matching ``field``: one instance's when its scrape ``address`` is known."""
    if not grafana or field not in GRAFANA_PANELS:
        return None
    uid, panel = GRAFANA_PANELS[field]
    url = f"{grafana.rstrip('/')}/d/{uid}/?viewPanel={panel}&from=now-1h&to=now"
    if address:
        url += "&var-instance=" + quote(address, safe="")
    return url
