"""Trends (appliance/core/series.py), the heartbeat's reading (appliance/heartbeat.py) and the
server-drawn charts (ui/charts.py): in process, with the clock passed in."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from appliance import metrics
from appliance.core.history import LOST_CLOSED_BY, lost_entry
from appliance.core.series import Counts, Series, combine, is_stale, point, quantile, stale_after
from appliance.heartbeat import Heartbeat
from ui.charts import WINDOW, chart, grafana_links
from ui.live import mark_stale, stale_instances, summary_digest, summary_rates

BOUNDS = [0.01, 0.1, 1.0, math.inf]


def counts(at: float, n: float = 0, rtt: tuple[int, ...] = (0, 0, 0, 0), connections: int = 3) -> Counts:
    return Counts(at, connections, n, 2 * n, 3 * n, 4 * n, n / 10, rtt)


def test_a_point_holds_rates_per_second_between_two_readings():
    p = point(counts(100.0, 0), counts(110.0, 50, rtt=(0, 100, 0, 0)), BOUNDS)
    assert p["t"] == 110.0 and p["connections"] == 3
    assert (p["commands_in"], p["commands_out"], p["replies_in"], p["replies_out"]) == (5.0, 10.0, 15.0, 20.0)
    assert p["errors"] == 0.5
    assert p["p99_ms"] == pytest.approx(0.01 * 1000 + 0.09 * 1000 * 0.99)  # Within the (10 ms, 100 ms] bucket.


def test_a_counter_that_went_back_reads_zero_and_no_sample_no_p99():
    p = point(counts(0.0, 100, rtt=(5, 0, 0, 0)), counts(10.0, 20, rtt=(1, 0, 0, 0)), BOUNDS)
    assert p["commands_in"] == 0 and p["p99_ms"] is None
    with pytest.raises(ValueError):
        point(counts(10.0), counts(10.0), BOUNDS)


def test_quantile_interpolates_as_prometheus_and_stops_at_the_last_finite_bound():
    assert quantile(BOUNDS, [0, 0, 0, 0], 0.99) is None
    assert quantile(BOUNDS, [10, 0, 0, 0], 0.5) == pytest.approx(0.005)
    assert quantile(BOUNDS, [0, 0, 0, 7], 0.99) == 1.0  # All beyond the last bound.
    assert quantile(BOUNDS, [50, 50, 0, 0], 0.99) == pytest.approx(0.01 + 0.09 * 0.98)


def test_the_series_keeps_the_newest_points_only():
    series = Series(3)
    for t in range(5):
        series.add({"t": float(t)})
    assert len(series) == 3 and [p["t"] for p in series.since(0)] == [2.0, 3.0, 4.0]
    assert [p["t"] for p in series.since(3.5)] == [4.0]
    with pytest.raises(ValueError):
        Series(0)


def test_combine_adds_instances_per_slot_and_keeps_the_worst_p99():
    a = [{"t": 10.0, "connections": 2, "commands_in": 1.0, "p99_ms": 5.0}, {"t": 20.0, "connections": 2}]
    b = [{"t": 11.0, "connections": 3, "commands_in": 2.5, "p99_ms": 9.0}, {"t": 12.0, "connections": 99}]
    merged = combine([a, b], 10.0)
    assert [m["t"] for m in merged] == [20.0, 30.0]
    assert merged[0]["connections"] == 5 and merged[0]["commands_in"] == 3.5 and merged[0]["p99_ms"] == 9.0
    assert merged[1]["connections"] == 2 and merged[1]["p99_ms"] is None
    with pytest.raises(ValueError):
        combine([a], 0)


def test_one_missed_beat_is_stale_and_no_heartbeat_is_never_stale():
    beat = {"at": 1000.0, "period": 10.0}
    assert stale_after(10.0) == 15.0 and stale_after(2.0) == 3.0
    assert not is_stale(beat, 1014.9)
    assert is_stale(beat, 1015.1)
    assert not is_stale({}, 5000.0) and not is_stale({"at": "x", "period": 10}, 5000.0)


def test_the_heartbeat_reads_the_metrics_and_rates_appear_from_the_second_beat():
    heartbeat = Heartbeat("me", 10.0)
    assert heartbeat.series.maxlen == 360  # An hour at one point per beat.
    first, trend = heartbeat.beat(1000.0)
    assert trend is None and "rates" not in first
    assert first["period"] == 10.0 and first["memory_bytes"] > 0 and first["version"]
    metrics.RECEIVED_FROM_CONTROLLERS.count += 30  # What the message path counts, unfolded.
    metrics.COMMAND_RTT.observe(0.004)
    try:
        beat, trend = heartbeat.beat(1010.0)
    finally:
        metrics.RECEIVED_FROM_CONTROLLERS.count -= 30  # Other tests of this process see the counter as it was.
    assert trend is not None and trend["commands_in"] >= 3.0 and trend["p99_ms"] is not None
    assert beat["rates"]["commands_in"] == trend["commands_in"] and len(heartbeat.series) == 1


def test_lost_entry_says_the_instance_was_lost():
    entry = lost_entry(
        {"id": "u1", "instance": "i-1", "role": "client", "connected_since": "2026-01-01T00:00:00+00:00"}, 1767225660.0
    )
    assert entry["code"] == 1006 and entry["closed_by"] == LOST_CLOSED_BY
    assert "i-1 lost" in entry["reason"] and entry["duration_seconds"] == 60.0


def test_stale_instances_mark_their_connections_and_move_the_digest():
    summaries = [
        {"instance": "a", "at": 100.0, "period": 2.0, "rates": {"commands_in": 4.0}},
        {"instance": "b", "at": 90.0, "period": 2.0, "rates": {"commands_in": 7.0}},
    ]
    assert stale_instances(summaries, 101.0) == ["b"]
    records = [{"id": "x", "instance": "a"}, {"id": "y", "instance": "b"}]
    mark_stale(records, ["b"])
    assert "stale" not in records[0] and records[1]["stale"] is True
    fresh = [{**s, "at": 1e12} for s in summaries]
    assert summary_digest(fresh) != summary_digest([fresh[0], summaries[1]])  # b turning stale is a change.
    assert summary_rates(fresh)["commands_in"] == 11.0
    assert summary_rates([fresh[0], summaries[1]])["commands_in"] == 4.0  # A stale instance counts 0.


def test_a_chart_is_plain_svg_over_the_last_hour_and_breaks_at_gaps():
    now = 10_000.0
    points = [{"t": now - WINDOW - 5, "x": 100.0}]  # Older than the window: not drawn.
    points += [{"t": now - 600 + 10 * i, "x": float(i)} for i in range(10)]
    points += [{"t": now - 100, "x": 3.0}, {"t": now - 90, "x": None}]  # After a gap; no value.
    svg = str(chart(points, "x", now, title="Commands in", unit="/s"))
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.get("data-points") == "11" and "style" not in svg and "<script" not in svg
    assert len(root.findall(f"{ns}polyline") or root.findall("polyline")) == 1
    assert len(root.findall(f"{ns}circle") or root.findall("circle")) == 1  # The lone point after the gap.
    assert "latest 3, max 9" in root.get("aria-label", "")
    empty = ET.fromstring(str(chart([], "x", now, title="<b>", unit="")))
    assert empty.get("data-points") == "0" and "no data yet" in empty.get("aria-label", "")
    assert "<b>" not in str(chart([], "x", now, title="<b>"))


def test_grafana_links_name_the_panel_and_the_instance_when_known():
    assert grafana_links(None, "errors") is None and grafana_links("https://g", "unknown") is None
    assert grafana_links("https://g/", "errors") == "https://g/d/wsbridge-instance/?viewPanel=11&from=now-1h&to=now"
    assert grafana_links("https://g", "p99_ms", "10.0.0.5:8000").endswith("&var-instance=10.0.0.5%3A8000")


def test_every_linked_grafana_panel_is_in_the_shipped_dashboards():
    import json
    from pathlib import Path

    from ui.charts import GRAFANA_PANELS

    root = Path(__file__).resolve().parents[2] / "monitoring" / "grafana" / "dashboards"
    panels = {}
    for path in root.glob("*.json"):
        board = json.loads(path.read_text())
        panels[board["uid"]] = {p["id"]: p["title"] for p in board["panels"]}
    for field, (uid, panel) in GRAFANA_PANELS.items():
        assert panel in panels[uid], (field, uid, panel)


def test_client_rates_since_the_previous_look_else_since_connected():
    from ui.live import ClientRates

    rates = ClientRates(max_entries=2)
    record = {"id": "u", "instance": "a", "connected_since": "2026-01-01T00:00:00+00:00", "messages_in": 100}
    opened = 1767225600.0
    first = rates.rates({**record, "messages_out": 50}, opened + 100)
    assert first == {"in": 1.0, "out": 0.5, "over": None}  # No earlier look: the average since connected.
    later = rates.rates({**record, "messages_in": 130, "messages_out": 50}, opened + 110)
    assert later == {"in": 3.0, "out": 0.0, "over": 10}
    for other in ("v", "w"):  # Bounded: the connection looked at longest ago is forgotten.
        rates.rates({**record, "id": other}, opened + 120)
    assert rates.rates({**record, "messages_in": 200}, opened + 200)["over"] is None
