"""The monitoring stack run from the shipped files: exporters, Prometheus and Alertmanager deliver.

Each binary is Debian's build of the image's program, started once for the module with
exactly what docker-compose.prod.yml gives its container (environment, command or
entrypoint, read from Compose's resolved model), only addresses and mounted paths
rewritten to this machine:

- Redis runs the configuration the redis service's command writes (password, the
  exporter's ACL user, maxmemory); the redis exporter logs in with the service's own
  environment and reports ``redis_up 1`` (it reported 0, NOAUTH, with the exporter user
  and no password);
- Alertmanager is started through render.sh, the service's entrypoint, with the
  receivers pointing at a local webhook: a firing alert really arrives there, and the
  always-firing WSBridgeWatchdog reaches the dead man's switch URL;
- Prometheus runs monitoring/prometheus.yml (its intervals and rules as shipped) and
  scrapes the exporters, the blackbox exporter through the target its entrypoint
  writes from DOMAIN_NAME (the probe itself, against a real endpoint over TLS, is
  test_traefik.py's).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import blackbox_support
import pytest
import yaml
from deploy_support import ROOT, SCALE, compose_config, free_port
from test_compose import TEST_ENV, unescape, write_env

MONITORING = ROOT / "monitoring"
REDIS_MAXMEMORY = "64mb"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `python3 dev.py test` installs it (tools/apt/monitoring.txt)", pytrace=False)
    return path


def wait_for(condition: Any, within: float, what: str, logs: Any = lambda: "") -> Any:
    deadline = time.monotonic() + within * SCALE
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within * SCALE:.0f} s waiting for {what}\n{logs()}")
        time.sleep(0.1)


def fetch(url: str, data: bytes | None = None) -> bytes | None:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


class Webhook:
    """A receiver on loopback that keeps every notification Alertmanager posts, by path."""

    def __init__(self) -> None:
        received: list[tuple[str, dict[str, Any]]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, path: str) -> list[dict[str, Any]]:
        return [alert for where, payload in self.received if where == path for alert in payload["alerts"]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Stack:
    def __init__(self, model: dict[str, Any], work: Path, webhook: Webhook) -> None:
        self.services = model["services"]
        self.work = work
        self.webhook = webhook
        self.processes: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.ports = {
            name: free_port() for name in ("redis", "redis_exporter", "node", "alertmanager", "prometheus", "blackbox")
        }

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = self.work / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                args, stdout=sink, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin", **(env or {})}
            )
        self.processes[name] = (process, log)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{log.read_text(errors='replace')[-3000:]}" for name, (_, log) in self.processes.items()
        )

    def environment(self, service: str) -> dict[str, str]:
        return {key: unescape(str(value)) for key, value in (self.services[service].get("environment") or {}).items()}

    def stop(self) -> None:
        for process, _ in reversed(self.processes.values()):
            process.terminate()
        for process, _ in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    # --- each service, as the compose file runs it ----------------------------------------

    def start_redis(self) -> None:
        redis = self.services["redis"]
        secret = self.work / "redis_password"
        secret.write_text("redis-password-of-the-stack-test")
        script = unescape(redis["command"][2])
        script = script.replace("/run/secrets/redis_password", str(secret))
        script = script.replace("/run/redis/redis.conf", str(self.work / "redis.conf"))
        script = script.replace("exec redis-server", "true")
        env = {**self.environment("redis"), "REDIS_MAXMEMORY": REDIS_MAXMEMORY}
        subprocess.run(["sh", "-c", script], check=True, env={"PATH": "/usr/bin:/bin", **env}, timeout=30)
        local = f"port {self.ports['redis']}\nbind 127.0.0.1\ndir {self.work}\n"
        (self.work / "redis.conf").write_text((self.work / "redis.conf").read_text() + local)
        self.start("redis", [binary("redis-server"), str(self.work / "redis.conf")])

    def start_redis_exporter(self) -> None:
        service = self.services["redis_exporter"]
        # The image's entrypoint is the exporter itself: nothing else may be configured.
        assert not service.get("command") and not service.get("entrypoint")
        env = self.environment("redis_exporter")
        env["REDIS_ADDR"] = env["REDIS_ADDR"].replace("redis:6379", f"127.0.0.1:{self.ports['redis']}")
        assert env["REDIS_ADDR"] == f"redis://127.0.0.1:{self.ports['redis']}", "REDIS_ADDR changed: update the test"
        env["REDIS_EXPORTER_WEB_LISTEN_ADDRESS"] = f"127.0.0.1:{self.ports['redis_exporter']}"
        self.start("redis_exporter", [binary("prometheus-redis-exporter")], env)

    def start_node_exporter(self) -> None:
        command = [
            arg.replace("--path.rootfs=/host", "--path.rootfs=/") for arg in self.services["node_exporter"]["command"]
        ]
        self.start(
            "node_exporter",
            [binary("prometheus-node-exporter"), *command, f"--web.listen-address=127.0.0.1:{self.ports['node']}"],
        )

    def start_blackbox_exporter(self) -> None:
        service = self.services["blackbox_exporter"]
        process = blackbox_support.start(service, self.ports["blackbox"], self.work / "blackbox_exporter.log")
        self.processes["blackbox_exporter"] = (process, self.work / "blackbox_exporter.log")

    def start_alertmanager(self) -> None:
        service = self.services["alertmanager"]
        mounts = {volume["target"]: volume for volume in service["volumes"]}
        assert Path(mounts["/etc/alertmanager"]["source"]) == MONITORING / "alertmanager"
        data = self.work / "alertmanager-data"
        data.mkdir()
        paths = {"/etc/alertmanager": str(MONITORING / "alertmanager"), "/alertmanager": str(data)}
        entrypoint = []
        for arg in service["entrypoint"]:
            if arg == "/bin/alertmanager":
                arg = binary("prometheus-alertmanager")
            elif arg.startswith("--web.external-url="):
                assert arg.endswith(":8443/alertmanager/"), arg
                arg = f"--web.external-url=http://127.0.0.1:{self.ports['alertmanager']}/alertmanager/"
            else:
                for target, source in paths.items():
                    arg = re.sub(rf"(^|=){re.escape(target)}(?=/|$)", rf"\g<1>{source}", arg)
            entrypoint.append(arg)
        entrypoint.append(f"--web.listen-address=127.0.0.1:{self.ports['alertmanager']}")
        self.start("alertmanager", entrypoint, self.environment("alertmanager"))

    def start_prometheus(self) -> None:
        data = self.work / "prometheus-data"
        config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        assert config["rule_files"] == ["/etc/prometheus/rules/*.yml", "/prometheus/stack-rules/*.yml"]
        config["rule_files"] = [str(MONITORING / "rules" / "*.yml"), f"{data}/stack-rules/*.yml"]
        local = {
            "alertmanager:9093": f"127.0.0.1:{self.ports['alertmanager']}",
            "redis_exporter:9121": f"127.0.0.1:{self.ports['redis_exporter']}",
            "node_exporter:9100": f"127.0.0.1:{self.ports['node']}",
            "localhost:9090": f"127.0.0.1:{self.ports['prometheus']}",
        }
        for static in [*config["alerting"]["alertmanagers"], *config["scrape_configs"]]:
            for targets in static.get("static_configs", []):
                # Targets not run here (Traefik, cAdvisor; the appliance is found by DNS) stay as they are: down.
                targets["targets"] = [local.get(target, target) for target in targets["targets"]]
        (blackbox,) = [job for job in config["scrape_configs"] if job["job_name"] == "blackbox"]
        assert blackbox["file_sd_configs"] == [{"files": ["/prometheus/stack-targets/blackbox.yml"]}]
        blackbox["file_sd_configs"] = [{"files": [f"{data}/stack-targets/blackbox.yml"]}]
        exporter = blackbox["relabel_configs"][-1]
        assert exporter["replacement"] == "blackbox_exporter:9115"
        exporter["replacement"] = f"127.0.0.1:{self.ports['blackbox']}"
        path = self.work / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        command = []
        for arg in self.services["prometheus"]["command"]:
            name, _, _ = arg.partition("=")
            if name == "--config.file":
                arg = f"{name}={path}"
            elif name == "--storage.tsdb.path":
                arg = f"{name}={data}"
            elif name == "--web.console.templates":
                assert arg.endswith("=/etc/prometheus/consoles")
                arg = f"{name}={MONITORING / 'consoles'}"
            elif name == "--web.external-url":
                assert arg.endswith(":8443/prometheus/")
                arg = f"{name}=http://127.0.0.1:{self.ports['prometheus']}/prometheus/"
            command.append(arg)
        command.append(f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}")
        # The service's entrypoint (it writes the expected replicas as a rule, then execs Prometheus).
        shell, flag, script, name = [unescape(part) for part in self.services["prometheus"]["entrypoint"]]
        script = script.replace("/prometheus/", f"{data}/").replace(
            "exec /bin/prometheus", f"exec {binary('prometheus')}"
        )
        self.start("prometheus", [shell, flag, script, name, *command], self.environment("prometheus"))

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.ports['prometheus']}/prometheus/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        body = fetch(url)
        return json.loads(body)["data"]["result"] if body else []


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("monitoring-stack")
    webhook = Webhook()
    env = {
        **TEST_ENV,
        "ALERT_WEBHOOK_URL": f"{webhook.url}/oncall",
        "ALERT_DEADMANSSWITCH_URL": f"{webhook.url}/deadmansswitch",
    }
    model = json.loads(compose_config(write_env(work / "test.env", env)).stdout)
    stack = Stack(model, work, webhook)
    try:
        stack.start_redis()
        stack.start_redis_exporter()
        stack.start_node_exporter()
        stack.start_blackbox_exporter()
        stack.start_alertmanager()
        ports = stack.ports
        wait_for(
            lambda: fetch(f"http://127.0.0.1:{ports['alertmanager']}/alertmanager/-/ready"),
            30,
            "Alertmanager",
            stack.logs,
        )
        # A firing alert, posted now: the route's group_wait (30 s) runs while the rest starts.
        alert = [{"labels": {"alertname": "WSBridgeDeliveryTest", "severity": "critical", "instance": "stack-test"}}]
        posted = fetch(
            f"http://127.0.0.1:{ports['alertmanager']}/alertmanager/api/v2/alerts", json.dumps(alert).encode()
        )
        assert posted is not None, stack.logs()
        stack.start_prometheus()
        wait_for(
            lambda: fetch(f"http://127.0.0.1:{ports['prometheus']}/prometheus/-/ready"), 30, "Prometheus", stack.logs
        )
        yield stack
    finally:
        stack.stop()
        webhook.close()


def test_the_redis_exporter_logs_in_with_the_shipped_acl_and_environment(stack: Stack) -> None:
    def metrics() -> dict[str, float] | None:
        body = fetch(f"http://127.0.0.1:{stack.ports['redis_exporter']}/metrics")
        if not body:
            return None
        found = dict(re.findall(r"^(redis_up|redis_memory_max_bytes) (\S+)$", body.decode(), re.M))
        return {name: float(value) for name, value in found.items()} if "redis_up" in found else None

    found = wait_for(metrics, 20, "the redis exporter", stack.logs)
    assert found["redis_up"] == 1, stack.logs()
    # maxmemory arrives through INFO (the exporter's user may not run CONFIG).
    assert found["redis_memory_max_bytes"] == 64 * 1024 * 1024
    _, log = stack.processes["redis_exporter"]
    assert not re.search(r"NOAUTH|NOPERM|WRONGPASS", log.read_text()), log.read_text()


def test_prometheus_scrapes_the_exporters_with_the_shipped_configuration(stack: Stack) -> None:
    def up() -> dict[str, str] | None:
        found = {series["metric"]["job"]: series["value"][1] for series in stack.query("up")}
        return found if {"redis", "node", "alertmanager", "prometheus"} <= set(found) else None

    found = wait_for(up, 60, "Prometheus's first scrape of every job", stack.logs)
    for job in ("redis", "node", "alertmanager", "prometheus"):
        assert found[job] == "1", (job, found, stack.logs())
    (redis_up,) = wait_for(lambda: stack.query('redis_up{job="redis"}'), 30, "redis_up in Prometheus")
    assert redis_up["value"][1] == "1"


def test_prometheus_probes_the_public_endpoint_the_entrypoint_wrote_from_the_domain(stack: Stack) -> None:
    """The blackbox job's target is https://DOMAIN_NAME/ws/..., probed through the exporter (up), as instance."""
    domain = stack.environment("prometheus")["DOMAIN_NAME"]
    assert domain == stack.services["appliance"]["environment"]["PUBLIC_URL"].removeprefix("https://")
    (probe,) = wait_for(lambda: stack.query('probe_success{job="blackbox"}'), 60, "the first probe", stack.logs)
    assert probe["metric"]["instance"] == f"https://{domain}/ws/wsbridge-blackbox"
    # The test domain resolves nowhere here: the exporter answers (up 1) and the probe fails, as it would page.
    assert probe["value"][1] == "0"
    (up,) = stack.query('up{job="blackbox"}')
    assert up["value"][1] == "1", stack.logs()


def test_the_watchdog_reaches_the_dead_mans_switch_and_nothing_else(stack: Stack) -> None:
    (watchdog, *_) = wait_for(
        lambda: stack.webhook.alerts("/deadmansswitch"),
        90,
        "the Watchdog heartbeat at the dead man's switch",
        stack.logs,
    )
    assert watchdog["labels"] == {"alertname": "WSBridgeWatchdog", "severity": "none", "stack": "wsbridge"}
    assert watchdog["status"] == "firing"
    # Its runbook link is absolute and answers, at the section of the alert.
    runbook = f"http://127.0.0.1:{stack.ports['prometheus']}/prometheus/consoles/runbook.html#wsbridgewatchdog"
    assert watchdog["annotations"]["runbook_url"] == runbook
    page = fetch(runbook)
    assert page and b'id="wsbridgewatchdog"' in page
    assert all(alert["labels"]["alertname"] == "WSBridgeWatchdog" for alert in stack.webhook.alerts("/deadmansswitch"))
    assert not any(alert["labels"]["alertname"] == "WSBridgeWatchdog" for alert in stack.webhook.alerts("/oncall"))


def test_a_firing_alert_reaches_the_oncall_webhook(stack: Stack) -> None:
    def delivered() -> list[dict[str, Any]]:
        return [a for a in stack.webhook.alerts("/oncall") if a["labels"]["alertname"] == "WSBridgeDeliveryTest"]

    (alert,) = wait_for(delivered, 90, "the notification at the oncall webhook", stack.logs)
    assert alert["status"] == "firing"
    assert alert["labels"]["severity"] == "critical"


def test_the_alerts_expect_as_many_replicas_as_the_stack_runs(stack: Stack) -> None:
    """The entrypoint wrote WSBRIDGE_REPLICAS (the appliance's deploy.replicas) as wsbridge:replicas:expected."""
    replicas = stack.services["appliance"]["deploy"]["replicas"]
    assert stack.environment("prometheus")["WSBRIDGE_REPLICAS"] == str(replicas)
    (expected,) = wait_for(
        lambda: stack.query("wsbridge:replicas:expected"), 60, "the recorded expectation", stack.logs
    )
    assert expected["value"][1] == str(replicas)
    # The rule unit tests use a copy of that file: it must be what the entrypoint writes.
    written = yaml.safe_load((stack.work / "prometheus-data" / "stack-rules" / "replicas.yml").read_text())
    assert written == yaml.safe_load((MONITORING / "rules" / "tests" / "stack.rules.yml").read_text())
