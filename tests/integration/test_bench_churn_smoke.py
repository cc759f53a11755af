"""Smoke test of ``python -m bench.churn``: it runs end to end on a tiny load and sees constant cost per connect.

Not a performance test: the one figure checked, Redis commands per connect and
leave, counts commands, not time, so a busy machine cannot make it flaky.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from support import ROOT, timeout


def test_churn_runs_and_a_connect_costs_a_few_redis_commands():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "bench.churn", "--clients", "200", "--rate", "20", "--seconds", "1.5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| churn | " in result.stdout
    per_connect = float(re.search(r"Redis commands per connect\+leave: ([-\d.]+)", result.stdout).group(1))
    # About 10 (subscribe, claim, presence, release, unsubscribe); rewriting every record, as
    # before, cost one command per connected client and more.
    assert 0 < per_connect < 40, result.stdout
    assert "server closes" not in result.stdout, result.stdout
