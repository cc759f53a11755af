"""The alert unit tests can fail: each mutation of a rule below must make `promtool test rules` fail.

A threshold, a `for`, a severity, a label filter or a template that could change without a
failing test would be a promise nobody checks.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_support import SCALE

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
    ("runbook link of the certificate alert", "runbook.md#wsbridgecertificateexpiring", "runbook.md#certificates"),
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
