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


@pytest.mark.slow
def test_a_short_soak_answers_or_reports_every_command_and_samples_every_process(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "bench.soak", "--soak-minutes", "0.15", "--rate", "100", "--clients", "50"),
            *("--warmup", "2", "--json", str(out)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(90),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["sent"] == 900
    assert figures["answered"] + figures["reported"] + figures["lost_churned"] == figures["sent"]
    assert figures["lost_other"] == 0 and figures["duplicates"] == 0
    assert figures["reconnects"] >= 15  # 5 % of 50 clients, every second.
    assert figures["answered"] > figures["sent"] * 0.8
    assert set(figures["slopes_per_minute"]) == {f"{p}_{m}" for p in ("a", "b", "redis") for m in ("rss_mib", "fds")}
    assert "| first |" in result.stdout and "| last |" in result.stdout
