#!/usr/bin/env python3
"""Replace the appliance's replicas one at a time, dropping nobody (docs/deploy.md, "Upgrading").

The play runs it on the host before ``docker compose up``, which would recreate every
replica at once (docker/compose#5124). For each replica whose configuration is not the
compose file's (a new image tag, a changed setting), in turn:

1. SIGUSR1: it answers /readyz with 503 and refuses newcomers, so the load balancer's
   health check takes it out of rotation; wait that long (the check's interval plus its
   timeout, read from the container's Traefik labels).
2. SIGTERM (``docker stop``): it closes every socket with 1001 after its queued frames;
   the clients reconnect (with their backoff) to the replicas still in rotation. Wait
   until those hold as many connections as all replicas did before, or
   ``--reconnect-timeout`` seconds (clients that left for good do not come back).
3. A replacement from the compose file (``up --no-recreate --scale``, this service
   only), and wait until it answers /readyz with 200 before the next replica.

Rollback is the same run with the previous tag in WSBRIDGE_VERSION. Standard library only:
it runs with the host's python3. tests/deploy/test_rolling_upgrade.py runs ``roll`` on two
real appliances behind the real Traefik with steady traffic.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Protocol

SERVICE = "appliance"
LABEL = "traefik.http.services.wsbridge.loadbalancer.healthcheck."

# Run inside a replica (its image has python): /readyz's status and its open connections.
PROBE = """
import os, re, urllib.error, urllib.request
base = "http://127.0.0.1:" + os.environ.get("WEB_SOCKET_PORT", "8000")
try:
    status = urllib.request.urlopen(base + "/readyz", timeout=3).status
except urllib.error.HTTPError as error:
    status = error.code
metrics = urllib.request.urlopen(base + "/metrics", timeout=3).read().decode()
print(status, sum(float(v) for v in re.findall(r"^wsbridge_connections\\{[^}]*\\} (\\S+)$", metrics, re.M)))
"""


class Replicas(Protocol):
    """Where the replicas run: Docker Compose on the host, processes in the test."""

    def outdated(self) -> list[str]: ...
    def build(self) -> None:
        """This source's image, before any replica leaves: the build never runs one replica short."""
        self.run(*self.compose, "build", SERVICE)

    def running(self) -> list[str]: ...
    def probe(self, name: str) -> tuple[int, float] | None: ...
    def leave_rotation(self, name: str) -> None: ...
    def stop(self, name: str) -> None: ...
    def start_replacement(self) -> str: ...
    def notice(self, name: str) -> float: ...


def wait(condition: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def roll(
    replicas: Replicas,
    reconnect_timeout: float,
    ready_timeout: float,
    say: Callable[[str], None] = print,
) -> list[str]:
    """Replace each outdated replica in turn; the names replaced."""
    replaced = []
    for name in replicas.outdated():
        replace_one(replicas, name, reconnect_timeout, ready_timeout, say)
        replaced.append(name)
    return replaced


def replace_one(
    replicas: Replicas, name: str, reconnect_timeout: float, ready_timeout: float, say: Callable[[str], None]
) -> None:
    def connections(names: list[str]) -> float:
        return sum(found[1] for found in map(replicas.probe, names) if found)

    def status(name: str) -> int | None:
        found = replicas.probe(name)
        return found[0] if found else None

    others = [other for other in replicas.running() if other != name]
    if not others:
        raise SystemExit(f"{name} is the only replica: a rolling upgrade needs two (WSBRIDGE_REPLICAS)")
    before = connections([name, *others])
    replicas.leave_rotation(name)
    if not wait(lambda: status(name) == 503, 30):
        raise SystemExit(f"{name} did not leave the rotation (/readyz still not 503 after SIGUSR1)")
    notice = replicas.notice(name)
    say(f"{name}: out of rotation, {before:.0f} connections on all replicas; waiting {notice:.0f} s for the balancer")
    time.sleep(notice)
    replicas.stop(name)
    back = wait(lambda: connections(others) >= before, reconnect_timeout)
    late = "" if back else f" after {reconnect_timeout:.0f} s"
    say(f"{name}: stopped; {connections(others):.0f} of {before:.0f} connections back on the others{late}")
    new = replicas.start_replacement()
    if not wait(lambda: status(new) == 200, ready_timeout):
        raise SystemExit(f"the replacement {new} is not ready after {ready_timeout:.0f} s: stopping here")
    say(f"{name}: replaced by {new}, ready")


class ComposeReplicas:
    """The appliance service's containers, driven with the docker CLI."""

    def __init__(self, project_dir: str, *compose_files: str) -> None:
        # Every file `compose up` is given (a host of a group adds docker-compose.hosts.yml).
        self.compose = ["docker", "compose", "--project-directory", project_dir]
        for compose_file in compose_files:
            self.compose += ["-f", compose_file]
        model = json.loads(self.run(*self.compose, "config", "--format", "json"))
        self.replicas = int(model["services"][SERVICE].get("deploy", {}).get("replicas", 1))
        hashes = self.run(*self.compose, "config", "--hash", SERVICE).split()
        self.hash = hashes[-1]

    @staticmethod
    def run(*args: str) -> str:
        return subprocess.run(args, check=True, capture_output=True, text=True, timeout=600).stdout

    def running(self) -> list[str]:
        return self.run(*self.compose, "ps", "-q", SERVICE).split()

    def outdated(self) -> list[str]:
        label = '{{index .Config.Labels "com.docker.compose.config-hash"}}'
        return [c for c in self.running() if self.run("docker", "inspect", "-f", label, c).strip() != self.hash]

    def probe(self, name: str) -> tuple[int, float] | None:
        try:
            status, count = self.run("docker", "exec", name, "python", "-c", PROBE).split()
        except (subprocess.CalledProcessError, ValueError):
            return None
        return int(status), float(count)

    def leave_rotation(self, name: str) -> None:
        self.run("docker", "kill", "--signal", "SIGUSR1", name)

    def notice(self, name: str) -> float:
        labels = json.loads(self.run("docker", "inspect", "-f", "{{json .Config.Labels}}", name))
        return seconds(labels[LABEL + "interval"]) + seconds(labels[LABEL + "timeout"])

    def stop(self, name: str) -> None:
        self.run("docker", "stop", name)  # SIGTERM, within the service's stop_grace_period
        self.run("docker", "rm", name)

    def start_replacement(self) -> str:
        before = set(self.running())
        self.run(
            *self.compose, "up", "-d", "--no-deps", "--no-recreate", "--scale", f"{SERVICE}={self.replicas}", SERVICE
        )
        (new,) = set(self.running()) - before
        return new


def seconds(value: str) -> float:
    """A Traefik duration as the labels spell it: 5s, 500ms, 1m."""
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if value.endswith(unit):
            return float(value.removesuffix(unit)) * factor
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", required=True)
    parser.add_argument("--compose-file", required=True, help="the files, in order, ':'-separated as COMPOSE_FILE")
    parser.add_argument("--reconnect-timeout", type=float, default=30.0)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    args = parser.parse_args()
    replicas = ComposeReplicas(args.project_dir, *args.compose_file.split(":"))
    if replicas.outdated():
        replicas.build()
    replaced = roll(replicas, args.reconnect_timeout, args.ready_timeout)
    print(f"replaced {len(replaced)} replicas" if replaced else "every replica is current")
    sys.exit(0)


if __name__ == "__main__":
    main()
