"""Smoke test of ``bench/soak.py`` on a tiny scenario: it runs end to end and accounts for every command.

Not a performance test: the real soak (10 minutes, 1,000 commands/s) is run by hand and
its figures are in bench/README.md. This checks the accounting the soak's verdict rests on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, timeout


def run_soak(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.soak", "--soak-minutes", "0.15", "--rate", "100", "--clients", "50"),
            *("--warmup", "2", "--timeout-ms", "5000", "--json", str(out), *extra),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(90),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads(out.read_text())


@pytest.mark.slow
def test_a_short_soak_gives_every_command_exactly_one_outcome_and_samples_every_process(tmp_path: Path) -> None:
    result, figures = run_soak(tmp_path)
    assert figures["sent"] == 900
    assert figures["queue"] is True and figures["timeout_ms"] == 5000
    assert figures["answered"] + figures["reported"] == figures["sent"]
    assert sum(figures["errors"].values()) == figures["reported"]
    assert figures["lost"] == 0 and figures["duplicates"] == 0 and figures["mismatched_replies"] == 0
    assert figures["reconnects"] >= 15  # 5 % of 50 clients, every second.
    assert figures["answered"] > figures["sent"] * 0.8
    # Commands for a reconnecting client are queued and handed over when it is back.
    assert figures["queued_then_delivered"] > 0
    processes = {f"{p}_{m}" for p in ("a", "b", "redis") for m in ("rss_mib", "fds")}
    assert set(figures["slopes_per_minute"]) == processes | {"redis_used_mib", "redis_keys"}
    # What Redis holds at the end, by key prefix (presence and connect histories among them).
    assert figures["redis_by_prefix"]["wsb:owner"]["keys"] > 0 and figures["redis_by_prefix"]["wsb:hist"]["keys"] > 0
    assert all(entry["bytes"] > 0 for entry in figures["redis_by_prefix"].values())
    assert "| Redis keys at the end, by prefix |" in result.stdout
    assert "| first |" in result.stdout and "| last, not queued |" in result.stdout
    assert "lost (no outcome at all): 0" in result.stdout
