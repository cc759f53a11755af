"""The System page: every instance from its own heartbeat (live or stale), cluster-wide and
per-instance rates, and the last hour's trends as server-drawn SVG charts (ui/charts.py).

Instances come from their presence summaries, which carry their heartbeats
(appliance/heartbeat.py): one that missed a beat is shown stale at once, long before its
presence expires. Trends are this instance's series from memory and the others' from the
broker; the cluster-wide line adds them up per heartbeat slot.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from litestar import get
from litestar.datastructures import State
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Template

from appliance.brokers.base import BrokerUnavailable
from appliance.core.series import combine, is_stale

from .auth import require_session
from .charts import CHARTS, WINDOW, chart, describe, grafana_links, span_text, values_of, window_for
from .live import summary_rates
from .pages import _common
from .prometheus import prometheus_trends

__all__ = ["SYSTEM_ROUTES"]

#: Seconds between the points asked of Prometheus: 240 over the hour.
PROMETHEUS_STEP = 15.0


def _link(url: str | None) -> str | None:
    """Only http(s) links from settings end up in an href."""
    if url and urlsplit(url).scheme in ("http", "https"):
        return url
    return None


def _token_store_health(state: State) -> dict[str, Any] | None:
    """The token store's own public health (last refresh, errors), when this build has a token store."""
    store = getattr(state, "token_store", None)
    return dict(store.health()) if store is not None else None


def _duration(seconds: float | None) -> str:
    """ "3 d 4 h", "5 h 12 min", "42 s"."""
    if seconds is None:
        return "—"
    left = int(max(0, seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size} {unit}")
            left %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def _mebibytes(value: Any) -> str:
    return f"{value / 2**20:.0f} MiB" if isinstance(value, int | float) else "—"


def _instance_view(summary: dict[str, Any], now: float) -> dict[str, Any]:
    """One instance's row: its counters and heartbeat, as values (stale when a beat was missed)."""
    at, started = summary.get("at"), summary.get("started")
    return {
        **summary,
        "stale": is_stale(summary, now),
        "beating": isinstance(at, int | float),
        "last_seen": at,
        "uptime_text": _duration(now - started if isinstance(started, int | float) else None),
        "memory_text": _mebibytes(summary.get("memory_bytes")),
        "rates": summary.get("rates") or {},
    }


async def _trends(state: State, names: list[str], now: float) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """Every instance's trend points of the last hour (this one's from memory), and an error if any."""
    heartbeat = state.heartbeat
    points = {state.relay.instance: heartbeat.series.since(now - WINDOW)}
    if not names:
        return points, ""
    try:
        points.update(await state.relay.broker.trends(names))
    except BrokerUnavailable as exc:
        return points, str(exc)
    return points, ""


@get("/system", guards=[require_session])
async def system_page(request: HTMXRequest) -> Template:
    state: State = request.app.state
    relay = state.relay
    settings = state.settings
    ready, reason = relay.status()
    now = time.time()
    # Every live instance's own summary (a few small reads): one that holds no connection is listed too.
    try:
        summaries, error = await relay.cluster_summary(), ""
    except BrokerUnavailable as exc:
        summaries, error = [], str(exc)
    instances = {str(s.get("instance")): s for s in summaries}
    instances.setdefault(relay.instance, {})  # This one, even when the broker does not answer.
    views = {name: _instance_view(s, now) for name, s in sorted(instances.items())}
    points, trends_error = await _trends(state, list(views) if not error else [], now)
    step = state.heartbeat.period
    window = window_for(list(points.values()), now, 10 * step)
    source, addresses = "heartbeats", {}
    prometheus = _link(settings.prometheus_url)
    if prometheus:  # What Prometheus kept outlives a restart: the full hour, by its scrape addresses.
        try:
            asked = await prometheus_trends(prometheus, now, WINDOW, PROMETHEUS_STEP)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            trends_error = f"Prometheus ({type(exc).__name__}); showing the heartbeats' series"
        else:
            points = {name: asked.points.get(name, []) for name in views}
            addresses, source, step, window = asked.addresses, "Prometheus", PROMETHEUS_STEP, WINDOW
    grafana = _link(settings.grafana_url)

    def charts(series: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "title": title,
                "unit": unit,
                "svg": chart(series, field, now, title=title, unit=unit, window=window),
                "text": describe(values_of(series, field, now, window)),
                "link": grafana_links(grafana, field, addresses.get(name) if name else None),
            }
            for field, title, unit in CHARTS
        ]

    trends = [
        {"name": name, "stale": views[name]["stale"], "charts": charts(series, name)}
        for name, series in sorted(points.items())
        if name in views
    ]
    cluster = combine(list(points.values()), step)
    return Template(
        "system.html",
        context=_common(
            request,
            ready=ready,
            reason=reason,
            broker=relay.broker.describe(),
            instances=list(views.items()),
            cluster_rates=summary_rates(list(views.values())),
            cluster_charts=charts(cluster),
            span=span_text(window),
            source=source,
            trends=trends,
            trends_error=trends_error,
            error=error,
            grafana=grafana,
            prometheus=prometheus,
            token_status=_token_store_health(state),
        ),
    )


SYSTEM_ROUTES = [system_page]
