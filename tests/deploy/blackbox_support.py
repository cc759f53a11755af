"""Debian's blackbox exporter run as the compose file's blackbox_exporter service runs it.

The service's command, with its one mounted path (the configuration) turned into the
repository's file: exactly the shipped modules. The public name resolves to loopback
through a private /etc/hosts (a mount namespace of the exporter's own, as the test
machine's DNS cannot know the test domain), and the exporter trusts the test's
self-signed certificate through SSL_CERT_FILE (Go's system roots), as it trusts Let's
Encrypt's in the image: nothing of its configuration changes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import ROOT
from test_compose import unescape

CONFIG_MOUNT = "/etc/blackbox_exporter/config.yml"


def binary() -> str:
    path = shutil.which("prometheus-blackbox-exporter")
    if path is None:
        pytest.fail("prometheus-blackbox-exporter not found: `python3 dev.py test` installs it", pytrace=False)
    return path


def command(service: dict[str, Any], port: int) -> list[str]:
    """The service's command on this machine: the shipped configuration, a loopback port."""
    assert not service.get("entrypoint"), "the image's entrypoint is the exporter: update the test"
    (mount,) = [volume for volume in service["volumes"] if volume["target"] == CONFIG_MOUNT]
    assert Path(mount["source"]) == ROOT / "monitoring" / "blackbox" / "blackbox.yml"
    args = [
        arg.replace(f"--config.file={CONFIG_MOUNT}", f"--config.file={mount['source']}") for arg in service["command"]
    ]
    assert args != service["command"], "the command no longer reads the mounted configuration"
    return [binary(), *args, f"--web.listen-address=127.0.0.1:{port}"]


def start(
    service: dict[str, Any], port: int, log: Path, hosts: dict[str, str] | None = None, ca: Path | None = None
) -> subprocess.Popen[bytes]:
    args = command(service, port)
    if hosts:
        hosts_file = log.with_suffix(".hosts")
        hosts_file.write_text(
            "".join(f"{address} {name}\n" for name, address in {"localhost": "127.0.0.1", **hosts}.items())
        )
        mount = 'mount --bind "$0" /etc/hosts && exec "$@"'
        args = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", mount, str(hosts_file), *args]
    env = {"PATH": "/usr/bin:/bin", **({"SSL_CERT_FILE": str(ca)} if ca else {})}
    with log.open("wb") as sink:
        return subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env)


def probe(port: int, target: str, module: str) -> dict[str, float] | None:
    """One probe through the exporter's /probe, as Prometheus scrapes it: its unlabelled results."""
    query = urllib.parse.urlencode({"target": target, "module": module, "debug": "false"})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/probe?{query}", timeout=15) as response:
            body = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return {name: float(value) for name, value in re.findall(r"^(probe_\w+) (\S+)$", body, re.M)}


def rendered_targets(prometheus: dict[str, Any], work: Path) -> list[str]:
    """What the prometheus service's entrypoint writes as the blackbox job's targets, with its environment."""
    shell, flag, script, name = [unescape(part) for part in prometheus["entrypoint"]]
    script = script.replace("/prometheus/", f"{work}/").replace("exec /bin/prometheus", "exec true")
    env = {"PATH": "/usr/bin:/bin", **{key: str(value) for key, value in prometheus["environment"].items()}}
    subprocess.run([shell, flag, script, name], check=True, env=env, timeout=30)
    (group,) = yaml.safe_load((work / "stack-targets" / "blackbox.yml").read_text())
    return list(group["targets"])


def module_of_the_job() -> str:
    """The module the blackbox job asks for (prometheus.yml's params)."""
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "blackbox"]
    (module,) = job["params"]["module"]
    return str(module)
