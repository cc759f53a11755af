"""The alert unit tests can fail: each mutation of a rule below must make `promtool test rules` fail.

And the deployment's monitoring and edge files: each mutation of DEPLOY_MUTATIONS, applied to a
copy of the repository, must fail the test that claims to catch it (as tests/deploy/README.md's
table does for the rest of the deployment).

A threshold, a `for`, a severity, a label filter or a template that could change without a
failing test would be a promise nobody checks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deploy_support import SCALE, copy_repository

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "rules"

#: (what breaks, text in wsbridge.rules.yml, replacement). The text must occur; every occurrence is replaced.
MUTATIONS = [
    ("auth-failure threshold", "> 0.5\n", "> 5\n"),
    (
        "instance-down delay",
        'expr: up{job="appliance"} == 0\n        for: 2m',
        'expr: up{job="appliance"} == 0\n        for: 10m',
    ),
    ("replicas compared with <=", "wsbridge:replicas:up < on()", "wsbridge:replicas:up <= on()"),
    ("target_offline counted as an error", 'code!="target_offline"', 'code!="none"'),
    ("tmpfs counted as disk", "tmpfs|overlay|squashfs|ramfs", "overlay|squashfs|ramfs"),
    (
        "token alert without the failure condition",
        "\n            and on(instance) increase(wsbridge_token_refresh_failures_total",
        "\n            or on(instance) increase(wsbridge_token_refresh_failures_total",
    ),
    (
        "Redis down demoted",
        'expr: redis_up{job="redis"} == 0\n        for: 1m\n        labels:\n          severity: critical',
        'expr: redis_up{job="redis"} == 0\n        for: 1m\n        labels:\n          severity: warning',
    ),
    ("description of not-ready changed", "answered /readyz with 503 for 2 minutes", "answered /readyz with 503"),
    ("runbook link of the certificate alert", "runbook.html#wsbridgecertificateexpiring", "runbook.html#certificates"),
    ("p99 latency threshold", "wsbridge:reply_seconds:p99_5m > 2", "wsbridge:reply_seconds:p99_5m > 5"),
    (
        "latency measured on v1 idle time again",
        'rate(wsbridge_reply_seconds_bucket{job="appliance"}[5m])',
        'rate(wsbridge_command_rtt_seconds_bucket{job="appliance"}[5m])',
    ),
    (
        "cool-down refusals left out of the auth alert",
        'reason="cooldown"}[5m])) or vector(0))',
        'reason="none"}[5m])) or vector(0))',
    ),
    ("every token rotation notifying", "severity: info", "severity: warning"),
    ("fast availability burn threshold", "ratio_rate1h > 14.4 * 0.005", "ratio_rate1h > 14.4 * 0.05"),
    (
        "Redis memory against the wrong limit",
        '(redis_memory_max_bytes{job="redis"} > 0) > 0.8',
        '(redis_memory_max_bytes{job="redis"} > 0) > 0.9',
    ),
    ("container metrics missing unnoticed", 'up{job="cadvisor"} == 1 unless on()', 'up{job="cadvisor"} == 1 and on()'),
    ("slow consumers over a shorter window", 'slow_consumer"}[15m])) > 5', 'slow_consumer"}[5m])) > 5'),
    ("grace alert after the window", "- time() < 300 > 0", "- time() < 300"),
    ("host-down delay", 'expr: up{job="hosts"} == 0\n        for: 5m', 'expr: up{job="hosts"} == 0\n        for: 10m'),
    ("host down read from the single host's job", 'expr: up{job="hosts"} == 0', 'expr: up{job=~"hosts|node"} == 0'),
]


@pytest.mark.parametrize(("what", "old", "new"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_the_rule_tests_catch(tmp_path: Path, what: str, old: str, new: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: `python3 dev.py test` installs it (tools/apt/monitoring.txt)", pytrace=False)
    copy = tmp_path / "rules"
    shutil.copytree(RULES, copy)
    rules = copy / "wsbridge.rules.yml"
    text = rules.read_text()
    assert old in text, f"{what}: the mutation no longer applies; update it"
    rules.write_text(text.replace(old, new))
    result = subprocess.run(
        [promtool, "test", "rules", "tests/wsbridge.test.yml"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=180 * SCALE,
    )
    assert result.returncode != 0, f"{what}: promtool test rules still passes\n{result.stdout}"


# --- the deployment's monitoring and edge: one mutation per blocker class of the deploy issue -----------

#: (what breaks, file, text that occurs exactly once, replacement, the test that must fail).
DEPLOY_MUTATIONS = [
    (
        "a read-only image's start-up write refused (the socket proxy's /tmp)",
        "docker-compose.prod.yml",
        "# /tmp/haproxy.cfg (the entrypoint renders it) and /run/haproxy.pid.\n      - /run\n      - /tmp\n",
        "# /tmp/haproxy.cfg (the entrypoint renders it) and /run/haproxy.pid.\n      - /run\n",
        "test_compose.py::test_every_read_only_container_can_write_what_its_image_writes_at_start",
    ),
    (
        "the socket proxy that writes into its image again",
        "docker-compose.prod.yml",
        "image: tecnativa/docker-socket-proxy:0.4.1",
        "image: tecnativa/docker-socket-proxy:0.3.0",
        "test_compose.py::test_every_read_only_container_can_write_what_its_image_writes_at_start",
    ),
    (
        "the cAdvisor that sees no container of Docker Engine 29",
        "docker-compose.prod.yml",
        "image: ghcr.io/google/cadvisor:v0.60.5",
        "image: gcr.io/cadvisor/cadvisor:v0.52.1",
        "test_compose.py::test_every_read_only_container_can_write_what_its_image_writes_at_start",
    ),
    (
        "the redis exporter without a password (NOAUTH, redis_up 0)",
        "docker-compose.prod.yml",
        "      REDIS_PASSWORD: exporter-acl-nopass\n",
        "",
        "test_monitoring_stack.py::test_the_redis_exporter_logs_in_with_the_shipped_acl_and_environment",
    ),
    (
        "the exporter's ACL user able to read requirepass",
        "docker-compose.prod.yml",
        "+info +ping +client|list",
        "+info +ping +config|get +client|list",
        "test_compose.py::test_redis_configuration_is_accepted_by_a_real_redis",
    ),
    (
        "Alertmanager starting with no receiver",
        "monitoring/alertmanager/render.sh",
        '(monitoring/alertmanager/README.md)" >&2\n    exit 1\n',
        '(monitoring/alertmanager/README.md)" >&2\n',
        "test_monitoring.py::test_alertmanager_refuses_to_start_without_any_receiver",
    ),
    (
        "the Watchdog paging the on-call receiver",
        "monitoring/alertmanager/alertmanager.yml",
        "receiver: deadmansswitch\n      group_wait: 0s",
        "receiver: oncall\n      group_wait: 0s",
        "test_monitoring_stack.py::test_the_watchdog_reaches_the_dead_mans_switch_and_nothing_else",
    ),
    (
        "slow headers held open on :443",
        "docker-compose.prod.yml",
        "--entrypoints.websocket.transport.respondingtimeouts.readtimeout=10s",
        "--entrypoints.websocket.transport.respondingtimeouts.readtimeout=0s",
        "test_traefik.py::test_slow_headers_are_cut_by_the_websocket_entrypoints_read_timeout",
    ),
    (
        "/metrics/ routed publicly",
        "docker-compose.prod.yml",
        "&& !PathPrefix(`/metrics`)",
        "&& !Path(`/metrics`)",
        "test_traefik.py::test_metrics_is_never_served_through_traefik_in_any_spelling",
    ),
    (
        "https://HOST/mcp not routed on :443",
        "docker-compose.prod.yml",
        "(Path(`/mcp`) || PathPrefix(`/mcp/`) || ",
        "(",
        "test_traefik.py::test_the_dashboard_and_the_controllers_api_answer_over_tls_where_the_docs_say",
    ),
    (
        "one dashboard load throttled on :8443",
        "traefik/dynamic/middlewares.yml",
        "average: 30\n        burst: 200",
        "average: 10\n        burst: 50",
        "test_traefik.py::test_one_grafana_dashboard_load_is_not_throttled_but_a_flood_is",
    ),
]


def test_the_deploy_mutations_apply_to_the_files_as_they_are() -> None:
    for what, file, old, _new, test in DEPLOY_MUTATIONS:
        assert (ROOT / file).read_text().count(old) == 1, f"{what}: the text must occur exactly once in {file}"
        module, _, name = test.partition("::")
        assert f"def {name}(" in (ROOT / "tests" / "deploy" / module).read_text(), f"{what}: no test {test}"


def _caught(mutation: tuple[str, str, str, str, str], base: Path) -> tuple[str, int, str]:
    what, file, old, new, test = mutation
    copy = base / re.sub(r"\W+", "-", what)[:40]
    copy_repository(copy)
    path = copy / file
    path.write_text(path.read_text().replace(old, new))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"tests/deploy/{test}"],
        cwd=copy,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=600 * SCALE,
    )
    shutil.rmtree(copy, ignore_errors=True)
    return what, result.returncode, result.stdout[-2000:]


@pytest.mark.timeout(1200)  # 11 copies, each starting what its test needs (Traefik, the exporters): minutes
def test_every_deploy_mutation_fails_the_test_that_claims_to_catch_it(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda mutation: _caught(mutation, tmp_path), DEPLOY_MUTATIONS))
    # 1: a test failed (or errored in a fixture); 0 or 5 (nothing collected) is a miss.
    survived = [f"{what}: exit {code}\n{output}" for what, code, output in outcomes if code != 1]
    assert not survived, "mutations not caught:\n" + "\n".join(survived)
