"""monitoring/: checked by the tools that read it (promtool, amtool), plus the promises they cannot see.

- prometheus.yml passes ``promtool check config`` with the rules loaded, scrapes the agreed
  targets, and every scrape timeout is below its interval;
- the rules pass ``promtool check rules`` and their unit tests (``promtool test rules``),
  and every alert is tested both ways (does not fire yet / fires with exact labels and
  annotations), has a severity, a one-sentence summary, a templated description and a
  runbook_url whose anchor is a runbook section with meaning, impact, checks and fix;
- Alertmanager's template renders into a configuration ``amtool check-config`` accepts
  for every combination of receivers, and refuses to start without a required setting;
- the appliance's real /metrics exposition passes ``promtool check metrics``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "rules" / "wsbridge.rules.yml"
RULE_TESTS = MONITORING / "rules" / "tests" / "wsbridge.test.yml"
RUNBOOK = MONITORING / "runbook.md"
ALERTMANAGER = MONITORING / "alertmanager"

sys.path.insert(0, str(ROOT / "tests"))
from support import Appliance, command, recv, timeout  # noqa: E402


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `python3 dev.py test` installs it (tools/apt/monitoring.txt)", pytrace=False)
    return path


def run(*args: str | Path, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [str(a) for a in args], input=stdin, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout(180)
    )


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def records() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "record" in rule]


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    sections: dict[str, str] = {}
    for block in re.split(r"^## ", RUNBOOK.read_text(), flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        sections[anchor(heading)] = body
    return sections


# --- Prometheus configuration ------------------------------------------------------------


@pytest.fixture
def prometheus_config(tmp_path: Path) -> Path:
    """prometheus.yml with its rule_files pointed at the repository's rules (as mounted in production)."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml", "/prometheus/stack-rules/*.yml"]
    # The second is written by the service's entrypoint (test_monitoring_stack.py runs it); its test copy here.
    config["rule_files"] = [str(MONITORING / "rules" / "*.yml"), str(RULE_TESTS.parent / "stack.rules.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_prometheus_config_passes_promtool_with_its_rules(prometheus_config: Path) -> None:
    result = run(tool("promtool"), "check", "config", prometheus_config)
    assert result.returncode == 0, result.stdout + result.stderr
    # The glob must find the rules file (an empty match would also be "valid").
    assert f"SUCCESS: {len(alerts()) + len(records())} rules found" in result.stdout + result.stderr
    assert "SUCCESS: 1 rules found" in result.stdout + result.stderr  # wsbridge:replicas:expected


def test_every_scrape_timeout_is_below_its_interval() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())

    def seconds(value: str) -> float:
        number, unit = re.fullmatch(r"(\d+)(ms|s|m)", value).groups()
        return int(number) * {"ms": 0.001, "s": 1, "m": 60}[unit]

    default_interval = seconds(config["global"]["scrape_interval"])
    default_timeout = seconds(config["global"]["scrape_timeout"])
    assert default_timeout < default_interval
    for job in config["scrape_configs"]:
        interval = seconds(job.get("scrape_interval", config["global"]["scrape_interval"]))
        job_timeout = seconds(job.get("scrape_timeout", config["global"]["scrape_timeout"]))
        assert job_timeout < interval, job["job_name"]
    # Rule windows of [5m] need several samples: at least 4 per minute-scale window.
    assert default_interval <= 60 / 4
    assert seconds(config["global"]["evaluation_interval"]) <= default_interval


def test_prometheus_scrapes_the_stack_with_the_agreed_jobs() -> None:
    """The job names and addresses agreed with docker-compose.prod.yml (rules and dashboards filter on job)."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    appliance = jobs["appliance"]["dns_sd_configs"]
    assert appliance == [{"names": ["appliance"], "type": "A", "port": 8000, "refresh_interval": "15s"}]
    static = {name: job["static_configs"][0]["targets"] for name, job in jobs.items() if "static_configs" in job}
    assert static == {
        "traefik": ["traefik:8082"],
        "redis": ["redis_exporter:9121"],
        "node": ["node_exporter:9100"],
        "cadvisor": ["cadvisor:8080"],
        "alertmanager": ["alertmanager:9093"],
        "prometheus": ["localhost:9090"],
    }
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    # The probe's target file is the entrypoint's (test_monitoring_stack.py runs it); the exporter is the service.
    blackbox = jobs["blackbox"]
    assert blackbox["file_sd_configs"] == [{"files": ["/prometheus/stack-targets/blackbox.yml"]}]
    assert blackbox["relabel_configs"][-1] == {"target_label": "__address__", "replacement": "blackbox_exporter:9115"}
    modules = yaml.safe_load((MONITORING / "blackbox" / "blackbox.yml").read_text())["modules"]
    assert blackbox["params"]["module"] == ["wss_endpoint"] and "wss_endpoint" in modules
    # Several hosts only (test_hosts_sd.py): the file the host's timer writes; none on one host.
    assert jobs["hosts"]["file_sd_configs"] == [{"files": ["/etc/prometheus/hosts/*.json"], "refresh_interval": "1m"}]
    assert set(jobs) == {"appliance", "blackbox", "hosts", *static}
    rule_jobs = set(re.findall(r'job=~?"([^"]+)"', RULES.read_text()))
    known = set(jobs) | {"traefik|redis|node|cadvisor|alertmanager|blackbox"}
    assert rule_jobs <= known, f"rules filter on jobs prometheus.yml does not have: {rule_jobs - known}"


# --- rules -----------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    result = run(tool("promtool"), "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    result = run(tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


#: Fires always, on purpose (the dead man's switch heartbeat): no "does not fire" case exists.
WATCHDOG = "WSBridgeWatchdog"


def test_every_alert_is_unit_tested_both_ways() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alerts():
        name = rule["alert"]
        mine = [case for case in cases if case["alertname"] == name]
        if name != WATCHDOG:
            assert any(not case.get("exp_alerts") for case in mine), f"{name}: no 'does not fire yet' case"
        firing = [alert for case in mine for alert in case.get("exp_alerts") or []]
        assert firing, f"{name}: no 'fires' case"
        for alert in firing:
            assert alert["exp_labels"]["severity"] == rule["labels"]["severity"], name
            assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}, name


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    sections = runbook_sections()
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for rule in alerts():
        name = rule["alert"]
        assert re.fullmatch(r"WSBridge[A-Z][A-Za-z]+", name), name
        # info: shown, never sent (Alertmanager's quiet receiver); none: the Watchdog's heartbeat.
        assert rule["labels"]["severity"] in ({"none"} if name == WATCHDOG else {"critical", "warning", "info"}), name
        annotations = rule["annotations"]
        summary = annotations["summary"]
        assert summary.endswith(".") and summary.count(". ") == 0 and "\n" not in summary, name
        assert "{{" in annotations["description"], f"{name}: description is not templated"
        # Absolute: the runbook page Prometheus serves under its external URL.
        assert annotations["runbook_url"] == f"{{{{ $externalURL }}}}/consoles/runbook.html#{name.lower()}", name
        assert name.lower() in sections, f"{name}: no runbook section"


def test_runbook_has_one_complete_section_per_alert_and_no_other() -> None:
    sections = runbook_sections()
    assert set(sections) == {rule["alert"].lower() for rule in alerts()}
    for key, body in sections.items():
        for part in ("**Meaning**", "**Impact**", "**Check**", "**Fix**"):
            assert part in body, f"{key}: no {part}"
    # Links between sections point at sections that exist.
    for target in re.findall(r"\]\(#([\w-]+)\)", RUNBOOK.read_text()):
        assert target in sections, target


def test_the_served_runbook_page_is_the_runbook_rendered_with_an_anchor_per_alert() -> None:
    sys.path.insert(0, str(MONITORING))
    from render_runbook import PAGE, render

    assert PAGE.read_text() == render(RUNBOOK.read_text()), "run python3 monitoring/render_runbook.py"
    ids = set(re.findall(r' id="([\w-]+)"', PAGE.read_text()))
    assert {rule["alert"].lower() for rule in alerts()} <= ids
    for target in re.findall(r'href="#([\w-]+)"', PAGE.read_text()):
        assert target in ids, target
    assert "{{" not in PAGE.read_text(), "Prometheus would read it as a template action"


# --- Alertmanager ---------------------------------------------------------------------------

RECEIVER_SETTINGS = {
    "sns": {
        "ALERTS_SNS_TOPIC_ARN": "arn:aws:sns:eu-central-1:123456789012:wsbridge-alerts",
        "AWS_REGION": "eu-central-1",
    },
    "webhook": {"ALERT_WEBHOOK_URL": "https://hooks.example.com/alerts?team=ops&key='k1'"},
    "slack": {
        "ALERT_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/XXXX",
        "ALERT_SLACK_CHANNEL": "#ops",
    },
    "email": {
        "ALERT_EMAIL_TO": "oncall@example.com",
        "ALERT_EMAIL_FROM": "alertmanager@example.com",
        "ALERT_SMTP_SMARTHOST": "smtp.example.com:587",
        "ALERT_SMTP_USERNAME": "alertmanager",
        "ALERT_SMTP_PASSWORD": "smtp-password-with-'quote'",
    },
}


def render_alertmanager(out: Path, settings: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], **settings}
    return run("sh", ALERTMANAGER / "render.sh", ALERTMANAGER, out, env=env)


DEADMANSSWITCH = {"ALERT_DEADMANSSWITCH_URL": "https://hc-ping.com/0b1c2d3e-aaaa-bbbb-cccc-0123456789ab"}


@pytest.mark.parametrize(
    "receivers", [("sns",), ("webhook",), ("slack",), ("email",), ("sns", "webhook", "slack", "email")]
)
@pytest.mark.parametrize("deadmansswitch", [True, False], ids=["deadmansswitch", "no-deadmansswitch"])
def test_alertmanager_config_renders_for_every_receiver_and_passes_amtool(
    tmp_path: Path, receivers: tuple[str, ...], deadmansswitch: bool
) -> None:
    settings = {key: value for name in receivers for key, value in RECEIVER_SETTINGS[name].items()}
    settings.update(DEADMANSSWITCH if deadmansswitch else {})
    rendered = render_alertmanager(tmp_path, settings)
    assert rendered.returncode == 0, rendered.stderr
    assert ("ALERT_DEADMANSSWITCH_URL is not set" in rendered.stderr) == (not deadmansswitch)
    check = run(tool("amtool"), "check-config", tmp_path / "alertmanager.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "1 templates" in check.stdout

    config = yaml.safe_load((tmp_path / "alertmanager.yml").read_text())
    assert config["route"]["receiver"] == "oncall"
    oncall, quiet, heartbeat = config["receivers"]
    assert quiet == {"name": "quiet"}
    kinds = {"sns": "sns_configs", "webhook": "webhook_configs", "slack": "slack_configs", "email": "email_configs"}
    assert oncall["name"] == "oncall"
    assert set(oncall) - {"name"} == {kinds[name] for name in receivers}
    assert heartbeat["name"] == "deadmansswitch"
    if deadmansswitch:
        assert heartbeat["webhook_configs"] == [
            {"url": DEADMANSSWITCH["ALERT_DEADMANSSWITCH_URL"], "send_resolved": False}
        ]
    else:
        assert set(heartbeat) == {"name"}
    if "sns" in receivers:
        (sns,) = oncall["sns_configs"]
        assert sns["topic_arn"] == settings["ALERTS_SNS_TOPIC_ARN"]
        assert sns["sigv4"] == {"region": "eu-central-1"}  # credentials: the instance role
    # Values arrive exactly, quotes and ampersands included.
    if "webhook" in receivers:
        assert oncall["webhook_configs"][0]["url"] == settings["ALERT_WEBHOOK_URL"]
    if "slack" in receivers:
        assert oncall["slack_configs"][0]["api_url"] == settings["ALERT_SLACK_WEBHOOK_URL"]
        assert oncall["slack_configs"][0]["channel"] == "#ops"
    if "email" in receivers:
        email = oncall["email_configs"][0]
        assert (email["to"], email["smarthost"]) == ("oncall@example.com", "smtp.example.com:587")
        assert email["auth_password"] == settings["ALERT_SMTP_PASSWORD"]


def test_alertmanager_refuses_to_start_without_any_receiver(tmp_path: Path) -> None:
    """No silent default: with no receiver (the dead man's switch alone is none) render.sh fails and execs nothing."""
    env = {"PATH": os.environ["PATH"], **DEADMANSSWITCH, "AWS_REGION": "eu-central-1", "ALERT_SLACK_CHANNEL": "#ops"}
    result = run("sh", ALERTMANAGER / "render.sh", ALERTMANAGER, tmp_path, "echo", "started", env=env)
    assert result.returncode == 1
    assert "started" not in result.stdout
    assert "no alert receiver is configured: set ALERTS_SNS_TOPIC_ARN" in result.stderr
    assert not (tmp_path / "alertmanager.yml").exists()


def test_the_sns_receiver_needs_its_region(tmp_path: Path) -> None:
    rendered = render_alertmanager(tmp_path, {"ALERTS_SNS_TOPIC_ARN": RECEIVER_SETTINGS["sns"]["ALERTS_SNS_TOPIC_ARN"]})
    assert rendered.returncode != 0
    assert "AWS_REGION must be set" in rendered.stderr


def test_the_watchdog_goes_to_the_dead_mans_switch_only_and_often(tmp_path: Path) -> None:
    """amtool's own routing: the Watchdog reaches deadmansswitch (not oncall), every other alert oncall."""
    assert render_alertmanager(tmp_path, {**RECEIVER_SETTINGS["webhook"], **DEADMANSSWITCH}).returncode == 0
    config = tmp_path / "alertmanager.yml"

    def receivers(*labels: str) -> str:
        result = run(tool("amtool"), "config", "routes", "test", f"--config.file={config}", *labels)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout.strip()

    assert receivers("alertname=WSBridgeWatchdog", "severity=none") == "deadmansswitch"
    assert receivers("alertname=WSBridgeRedisDown", "severity=critical") == "oncall"
    assert receivers("alertname=WSBridgeDiskPressure", "severity=warning") == "oncall"
    assert receivers("alertname=WSBridgeTokenGraceEnding", "severity=info") == "quiet"
    (watchdog,) = [
        route
        for route in yaml.safe_load(config.read_text())["route"]["routes"]
        if route["receiver"] == "deadmansswitch"
    ]
    # A heartbeat about every minute: dead man's switch services allow a few minutes' grace.
    assert (watchdog["group_wait"], watchdog["group_interval"], watchdog["repeat_interval"]) == ("0s", "1m", "1m")


def test_the_unrendered_alertmanager_config_is_valid_and_notifies_nobody() -> None:
    """The committed template is itself a valid configuration (amtool checks it), though render.sh never uses it as is."""
    check = run(tool("amtool"), "check-config", ALERTMANAGER / "alertmanager.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load((ALERTMANAGER / "alertmanager.yml").read_text())
    assert config["receivers"] == [{"name": "oncall"}, {"name": "quiet"}, {"name": "deadmansswitch"}]


def test_alertmanager_refuses_to_start_without_a_required_setting(tmp_path: Path) -> None:
    rendered = render_alertmanager(
        tmp_path, {"ALERT_EMAIL_TO": "oncall@example.com", "ALERT_EMAIL_FROM": "a@b.example"}
    )
    assert rendered.returncode != 0
    assert "ALERT_SMTP_SMARTHOST must be set" in rendered.stderr


def test_alertmanager_render_execs_the_command_after_rendering(tmp_path: Path) -> None:
    """As the container entrypoint: render, then become Alertmanager (here: a command that reads the result)."""
    env = {"PATH": os.environ["PATH"], **RECEIVER_SETTINGS["webhook"]}
    result = run(
        "sh", ALERTMANAGER / "render.sh", ALERTMANAGER, tmp_path, "cat", tmp_path / "alertmanager.yml", env=env
    )
    assert result.returncode == 0, result.stderr
    assert "webhook_configs" in result.stdout


def test_notifications_link_to_the_runbook(tmp_path: Path) -> None:
    base = "https://git.example.com/ops/websocket-bridge/blob/main/"
    assert (
        render_alertmanager(tmp_path, {**RECEIVER_SETTINGS["webhook"], "ALERT_RUNBOOK_BASE_URL": base}).returncode == 0
    )
    result = run(
        tool("amtool"),
        "template",
        "render",
        f"--template.glob={tmp_path / 'templates' / '*.tmpl'}",
        '--template.text={{ template "wsbridge.text" . }}',
    )
    assert result.returncode == 0, result.stderr
    assert f"Runbook: {base}" in result.stdout


# --- the appliance's exposition ----------------------------------------------------------------


async def _some_traffic(app: Appliance) -> None:
    async with app.connect("unity_client_1") as client, app.controller() as controller:
        await controller.send(command("unity_client_1", "MoveForward 10"))
        assert await recv(client) == "MoveForward 10"
        await client.send("done")
        await recv(controller)
        await controller.send(command("nobody_here", "x"))
        await recv(controller)


def test_appliance_metrics_pass_promtool_check_metrics() -> None:
    app = Appliance(name="metrics-lint")
    app.start()
    try:
        asyncio.run(_some_traffic(app))
        status, body = app.get("/metrics")
        assert status == 200
    finally:
        app.stop()
    result = run(tool("promtool"), "check", "metrics", stdin=body)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("wsbridge_frames_sent_total", "wsbridge_command_rtt_seconds_bucket", "process_cpu_seconds_total"):
        assert name in body
