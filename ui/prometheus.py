"""Trends from Prometheus' HTTP query API, when ``PROMETHEUS_URL`` is set: the same charts as the
heartbeat series (ui/charts.py), over the same window, from what Prometheus scraped (it outlives
an instance's restart, which the in-memory series does not).

Prometheus labels each series with the scrape address (``instance``); ``wsbridge_build_info``
carries the appliance's own name (kept by Prometheus as ``exported_instance``), which maps one to
the other, and the address is what the Grafana dashboards' ``instance`` variable takes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

__all__ = ["QUERIES", "PrometheusTrends", "prometheus_trends"]

_SEL = 'job="appliance"'
#: The PromQL of each chart's field, by scrape address.
QUERIES = {
    "connections": f"sum by (instance) (wsbridge_connections{{{_SEL}}})",
    "commands_in": f'sum by (instance) (rate(wsbridge_messages_received_total{{{_SEL}, role="controller"}}[1m]))',
    "replies_in": f'sum by (instance) (rate(wsbridge_messages_received_total{{{_SEL}, role="client"}}[1m]))',
    "errors": f"sum by (instance) (rate(wsbridge_errors_total{{{_SEL}}}[1m]))",
    "p99_ms": "1000 * histogram_quantile(0.99, sum by (instance, le) "
    f"(rate(wsbridge_command_rtt_seconds_bucket{{{_SEL}}}[1m])))",
}
NAMES = f"wsbridge_build_info{{{_SEL}}}"


class PrometheusTrends:
    """What Prometheus answered: points by instance name (oldest first) and scrape address by name."""

    def __init__(self, points: dict[str, list[dict[str, Any]]], addresses: dict[str, str]) -> None:
        self.points = points
        self.addresses = addresses


async def _get(http: httpx.AsyncClient, url: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    response = await http.get(url, params=params)
    response.raise_for_status()
    body = response.json()
    if body.get("status") != "success":
        raise ValueError(body.get("error") or "Prometheus did not answer with success")
    return list(body["data"]["result"])


async def prometheus_trends(
    base: str, now: float, window: float, step: float, timeout: float = 2.0
) -> PrometheusTrends:
    """Every field of :data:`QUERIES` over ``window`` seconds up to ``now``; raises httpx.HTTPError or
    ValueError when Prometheus cannot be asked (the page then shows the heartbeat series)."""
    api = base.rstrip("/") + "/api/v1"
    async with httpx.AsyncClient(timeout=timeout) as http:
        span = {"start": now - window, "end": now, "step": max(1.0, step)}
        answers = await asyncio.gather(
            _get(http, api + "/query", {"query": NAMES, "time": now}),
            *(_get(http, api + "/query_range", {"query": q, **span}) for q in QUERIES.values()),
        )
    names: dict[str, str] = {}
    for series in answers[0]:
        labels = series.get("metric", {})
        address = labels.get("instance", "")
        names[address] = labels.get("exported_instance") or address
    slots: dict[str, dict[float, dict[str, Any]]] = {}
    for field, result in zip(QUERIES, answers[1:], strict=True):
        for series in result:
            address = series.get("metric", {}).get("instance", "")
            points = slots.setdefault(names.get(address, address), {})
            for t, value in series.get("values", []):
                number = float(value)
                if number == number:  # NaN: no sample in that step (a quantile of nothing).
                    points.setdefault(float(t), {"t": float(t)})[field] = round(number, 3)
    return PrometheusTrends(
        {name: [p for _, p in sorted(points.items())] for name, points in slots.items()},
        {name: address for address, name in names.items()},
    )
