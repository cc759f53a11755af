"""The Dockerfile: its structure, and its health probe run against a real appliance.

No Docker engine runs here, so the image is not built; what can be checked without
one is: the stages, the base image pins, the user, the stop signal, and that the
exact HEALTHCHECK command (and the compose file's copy of it) reports a live
appliance healthy and a dead one unhealthy, and that SIGTERM ends the appliance well
within the stack's stop grace period after closing sessions with 1001.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from deploy_support import COMPOSE_FILE, ROOT, free_port
from support import closed_with

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def healthcheck_command() -> list[str]:
    (rest,) = [rest for keyword, rest in stages()[-1] if keyword == "HEALTHCHECK"]
    exec_form = rest[rest.index("CMD") + 3 :].strip()
    return json.loads(exec_form)


def test_the_image_is_multi_stage_on_a_pinned_slim_base() -> None:
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert len(froms) >= 2
    for image in froms:
        name = image.split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", name), f"base image not pinned: {name}"
    final = stages()[-1]
    # Only the virtualenv comes from the build stage; no compiler or package install.
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert not re.search(r"apt-get|apk |pip install|gcc|build-essential", runs), runs


def test_the_image_runs_wsbridge_as_an_unprivileged_user() -> None:
    final = dict(stages()[-1])
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) >= 1000
    assert json.loads(final["CMD"]) == ["wsbridge", "serve"]
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert "BIND_HOST=0.0.0.0" in final["ENV"]
    assert final["EXPOSE"] == "8000"


def test_the_build_context_is_only_what_the_build_needs() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1:] and "*" in ignored
    copied = {part for keyword, rest in stages()[0] if keyword == "COPY" for part in rest.split()[:-1]}
    for path in copied:
        assert f"!{path}" in ignored or f"!{path}/" in ignored, f"{path} is copied but excluded by .dockerignore"


def compose_probe() -> list[str]:
    test = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["appliance"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


@pytest.mark.parametrize("probe", [healthcheck_command, compose_probe], ids=["Dockerfile", "compose"])
def test_the_health_probe_tells_a_live_appliance_from_a_dead_one(probe, start_appliance) -> None:
    command = probe()
    assert command[0] == "python" and "/healthz" in command[-1]
    app = start_appliance()
    env = {"PATH": "", "WEB_SOCKET_PORT": str(app.port)}
    alive = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=10)
    assert alive.returncode == 0, alive.stderr
    dead = subprocess.run(
        [sys.executable, *command[1:]],
        env={**env, "WEB_SOCKET_PORT": str(free_port())},
        capture_output=True,
        timeout=10,
    )
    assert dead.returncode != 0


async def test_sigterm_closes_sessions_with_1001_well_within_the_stop_grace_period(start_appliance) -> None:
    stack = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["appliance"]
    grace_period = int(stack["stop_grace_period"].removesuffix("s"))
    shutdown_grace = float(stack["environment"]["SHUTDOWN_GRACE"].split(":-")[-1].rstrip("}"))
    assert shutdown_grace < grace_period
    app = start_appliance({"SHUTDOWN_GRACE": str(shutdown_grace)})
    async with app.connect("unity_client_1") as client:
        started = time.monotonic()
        app.process.send_signal(signal.SIGTERM)
        code, _ = await closed_with(client, within=grace_period)
        exit_code = await asyncio.to_thread(app.process.wait, grace_period)
        elapsed = time.monotonic() - started
    app.process = None
    assert code == 1001  # going away: reconnect, possibly to the other replica
    # uvicorn re-raises SIGTERM after its graceful shutdown; Docker reports 143.
    assert exit_code in (0, -signal.SIGTERM)
    # Docker sends SIGKILL at the stop grace period; the appliance must be long gone.
    assert elapsed < grace_period / 2, f"SIGTERM took {elapsed:.1f} s"
