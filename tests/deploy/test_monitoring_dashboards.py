"""The provisioned Grafana dashboards: valid, stable uids, the provisioned datasource, runbook links.

What their queries return is tested against a real Prometheus in
tests/integration/test_prometheus.py, which evaluates every panel query found here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
RUNBOOK = ROOT / "monitoring" / "runbook.md"

#: Pinned: bookmarks, alert links and docs/deploy.md use these; changing one breaks them.
STABLE_UIDS = {"wsbridge-overview.json": "wsbridge-overview", "wsbridge-instance.json": "wsbridge-instance"}
#: The runbook Prometheus serves (monitoring/consoles/runbook.html), on the same host as Grafana.
RUNBOOK_LINK = re.compile(r"^/prometheus/consoles/runbook\.html(#([a-z0-9-]+))?$")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # Collapsed rows hold their panels.
    return [p for p in found if p["type"] != "row"]


def datasource_refs(node: Any) -> list[Any]:
    """Every "datasource" value anywhere in the dashboard."""
    if isinstance(node, dict):
        refs = [node["datasource"]] if "datasource" in node else []
        return refs + [ref for value in node.values() for ref in datasource_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in datasource_refs(value)]
    return []


def provisioned_datasource() -> dict[str, Any]:
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    return source


def runbook_anchors() -> set[str]:
    return {line[3:].strip().lower() for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}


def test_the_dashboards_are_the_expected_ones_with_stable_unique_uids() -> None:
    uids = {path.name: load(path)["uid"] for path in DASHBOARDS}
    assert uids == STABLE_UIDS
    titles = [load(path)["title"] for path in DASHBOARDS]
    assert len(set(titles)) == len(titles)


def test_the_provisioning_reads_this_folder_with_the_datasource_uid() -> None:
    source = provisioned_datasource()
    assert (source["type"], source["uid"]) == ("prometheus", "wsbridge-prometheus")
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "wsbridge.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_datasource_reference_is_the_provisioned_one(path: Path) -> None:
    source = provisioned_datasource()
    refs = datasource_refs(load(path))
    assert refs, "no datasource references at all"
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": source["uid"]}, ref


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_has_queries_and_links_to_the_runbook(path: Path) -> None:
    dashboard = load(path)
    anchors = runbook_anchors()
    every = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    ids = [panel["id"] for panel in every]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    for panel in panels(dashboard):
        exprs = [target.get("expr", "").strip() for target in panel["targets"]]
        assert exprs and all(exprs), f"{panel['title']}: a target without a query"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        links = [RUNBOOK_LINK.match(link["url"]) for link in panel.get("links", [])]
        assert links and all(links), f"{panel['title']}: no runbook link"
        for match in links:
            if match.group(2):
                assert match.group(2) in anchors, f"{panel['title']}: no runbook section #{match.group(2)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_has_the_instance_variable_and_the_runbook_base(path: Path) -> None:
    variables = {v["name"]: v for v in load(path)["templating"]["list"]}
    instance = variables["instance"]
    assert instance["type"] == "query"
    # Shown: the appliance's own instance id (exported_instance: Prometheus keeps the target's
    # address as instance); filtered on: the address. Scrape addresses change on every recreate.
    assert instance["definition"] == 'query_result(wsbridge_build_info{job="appliance"})'
    assert "(?<text>" in instance["regex"] and "exported_instance" in instance["regex"].split("(?<text>")[0]
    assert "(?<value>" in instance["regex"]
    # Every appliance query is scoped by the variable, so the picker means something.
    for panel in panels(load(path)):
        for target in panel["targets"]:
            if 'job="appliance"' in target["expr"]:
                assert 'instance=~"$instance"' in target["expr"], f"{panel['title']}: ignores $instance"


def test_the_overview_shows_what_the_on_call_needs() -> None:
    overview = load(GRAFANA / "dashboards" / "wsbridge-overview.json")
    exprs = " ".join(t["expr"] for panel in panels(overview) for t in panel["targets"])
    for metric in (
        "wsbridge_connections{",  # connections by role
        "wsbridge_messages_received_total",  # message rates
        "wsbridge_command_rtt_seconds_bucket",  # round-trip percentiles
        "wsbridge_errors_total",  # errors by code
        "wsbridge_closes_total",  # closes by code and who closed
        "wsbridge_connections_closed_total",  # refusals by reason
        "wsbridge_client_throttled_total",  # throttling
        "wsbridge_broker_up",  # Redis
        "wsbridge_build_info",  # build versions
        "wsbridge_admission_refused_total",  # abuse: refused before the app
        "wsbridge_address_cooldowns_total",
        "wsbridge_handshake_timeouts_total",
        "wsbridge_http_requests_error_total",
        "redis_memory_max_bytes",  # Redis memory against its limit
    ):
        assert metric in exprs, metric
    assert load(GRAFANA / "dashboards" / "wsbridge-overview.json")["templating"]["list"][0]["multi"] is True
    assert load(GRAFANA / "dashboards" / "wsbridge-instance.json")["templating"]["list"][0]["multi"] is False


def _ref_ids_with_override(panel: dict[str, Any], prop: str) -> dict[str, Any]:
    found = {}
    for override in panel["fieldConfig"].get("overrides", []):
        if override["matcher"]["id"] == "byFrameRefID":
            for item in override["properties"]:
                if item["id"] == prop:
                    found[override["matcher"]["options"]] = item["value"]
    return found


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_one_unit_per_axis(path: Path) -> None:
    """A query of bytes is drawn in bytes; a query in another unit than the panel's has an axis of its own."""
    for panel in panels(load(path)):
        default = panel["fieldConfig"]["defaults"].get("unit")
        units = _ref_ids_with_override(panel, "unit")
        axes = _ref_ids_with_override(panel, "custom.axisPlacement")
        for target in panel["targets"]:
            unit = units.get(target["refId"], default)
            if re.search(r"_bytes\b", target["expr"]) and "/" not in target["expr"]:
                assert unit == "bytes", f"{panel['title']}: {target['refId']} is bytes drawn as {unit}"
            if unit != default:
                assert axes.get(target["refId"]) in ("left", "right"), f"{panel['title']}: two units on one axis"
                assert len({units.get(t["refId"], default) for t in panel["targets"]}) <= 2, panel["title"]


#: Panels that show an alert's threshold: (dashboard, panel title start, the threshold value).
THRESHOLDS = [
    ("wsbridge-overview.json", "Disk space left", 0.1),  # WSBridgeDiskPressure
    ("wsbridge-overview.json", "Memory available", 0.1),  # WSBridgeMemoryPressure
    ("wsbridge-overview.json", "Days until certificates expire", 14),  # WSBridgeCertificateExpiring
    ("wsbridge-overview.json", "Request/reply round trip", 2),  # WSBridgeCommandLatencyHigh
    ("wsbridge-overview.json", "Abuse:", 0.5),  # WSBridgeAuthFailureSpike
    ("wsbridge-overview.json", "Ready replicas", 1),
    ("wsbridge-instance.json", "Reply round trip", 2),
    ("wsbridge-instance.json", "Ready and broker up", 1),
]


@pytest.mark.parametrize(("name", "title", "value"), THRESHOLDS)
def test_panels_draw_the_thresholds_their_alerts_use(name: str, title: str, value: float) -> None:
    (panel,) = [p for p in panels(load(GRAFANA / "dashboards" / name)) if p["title"].startswith(title)]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert value in [step["value"] for step in steps], steps
    assert "red" in [step["color"] for step in steps]
    if panel["type"] == "timeseries":
        assert panel["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off"
