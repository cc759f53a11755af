"""Several hosts: every host's Prometheus reaches every host's node_exporter on its private address.

The appliance role, run by Ansible for three hosts at once (a host of a group, a single
host, and a group host whose address is not private), renders the .env and picks the
compose files; the real Compose resolves them. A group host publishes node_exporter on its
private address (port 9100, what monitoring/hosts_sd.py writes and the security group
opens) and nothing else changes; a single host publishes nothing new; anything but a private
address is refused before it could be published on every address.

Then the real node_exporter listens where that model publishes it (in a network namespace
holding the private address), the real Prometheus runs the shipped prometheus.yml with a
file written by hosts_sd.py's own code, and its ``hosts`` job reports ``up == 1`` for the
host. On the host Docker forwards the published port to the container (no listening socket
of its own): the namespace stands for that forward, bound to the address and port the
resolved model names.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import ANSIBLE_DIR, ROOT, SCALE, compose_config, run, tool_env, tool_venv

ROLE = ANSIBLE_DIR / "roles" / "appliance"
HOSTS_FILE = ROOT / "docker-compose.hosts.yml"
GROUP_TAGS = {"aws:autoscaling:groupName": "websocket-bridge-prod", "Role": "wsbridge-appliance"}
ADDRESSES = {"group": "10.41.1.10", "single": "10.41.0.10", "public": "0.0.0.0"}

PLAY = """
- name: Render what the appliance role decides for each kind of host.
  hosts: all
  connection: local
  gather_facts: false
  vars_files: {vars_files}
  vars:
    # The fact the role's default reads (gathered on a real host).
    ansible_facts: {{default_ipv4: {{address: "{{{{ private_fact }}}}"}}}}
  tasks:
    - name: Check the inputs as the role does.
      ansible.builtin.import_tasks: {validate}
    - name: Make the host's folder.
      ansible.builtin.file:
        path: "{{{{ out }}}}/{{{{ inventory_hostname }}}}"
        state: directory
        mode: "0755"
    - name: Render the environment file.
      ansible.builtin.template:
        src: {env}
        dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}/.env"
        mode: "0600"
    - name: Record the compose files every compose command names.
      ansible.builtin.copy:
        content: "{{{{ appliance_compose_files | to_json }}}}"
        dest: "{{{{ out }}}}/{{{{ inventory_hostname }}}}/files.json"
        mode: "0644"
"""


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per host: its .env path and its compose files (None when the role refused it), and the run's output."""
    work = tmp_path_factory.mktemp("hosts")
    inventory = {
        "all": {
            "hosts": {
                name: {
                    "ansible_python_interpreter": sys.executable,
                    "tags": GROUP_TAGS if name != "single" else {"Role": GROUP_TAGS["Role"]},
                    "private_fact": address,
                }
                for name, address in ADDRESSES.items()
            }
        }
    }
    (work / "inventory.yml").write_text(yaml.safe_dump(inventory))
    vars_files = [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")]
    playbook = work / "play.yml"
    playbook.write_text(
        PLAY.format(
            vars_files=json.dumps(vars_files),
            validate=ROLE / "tasks" / "validate.yml",
            env=ROLE / "templates" / "env.j2",
        )
    )
    extra = {
        "out": str(work),
        "appliance_domain": "bridge.wsbridge-test.net",
        "appliance_acme_email": "ops@wsbridge-test.net",
        "appliance_alerts_sns_topic_arn": "arn:aws:sns:eu-central-1:210987654321:websocket-bridge-prod-alerts",
        "appliance_source_hash": {"stdout": "0123456789ab"},
        "appliance_secrets": {},
    }
    venv = tool_venv("ansible")
    result = run(
        ["ansible-playbook", "-i", work / "inventory.yml", playbook, "-e", json.dumps(extra)],
        env=tool_env(venv, ANSIBLE_HOME=str(work / "ansible-home"), ANSIBLE_NOCOLOR="1"),
        cwd=ANSIBLE_DIR,
        check=False,
        timeout=180,
    )
    found: dict[str, Any] = {"output": result.stdout + result.stderr}
    for name in ADDRESSES:
        files = work / name / "files.json"
        found[name] = (work / name / ".env", json.loads(files.read_text())) if files.exists() else None
    return found


def installed_sources() -> dict[str, Path]:
    """Installed compose file name -> the repository file the role copies there."""
    variables = load(ROLE / "vars" / "main.yml")
    tasks = load(ROLE / "tasks" / "main.yml")
    sources = {}
    for task in tasks:
        copy = task.get("ansible.builtin.copy", {})
        if str(copy.get("src", "")).endswith(".yml") and "compose" in copy["src"]:
            name = copy["dest"].rsplit("/", 1)[1].replace("{{ ", "").replace(" }}", "")
            sources[variables[name]] = ROOT / copy["src"].removeprefix("{{ appliance_source_dir }}/")
    return sources


def resolve(env_file: Path, files: list[str]) -> dict[str, Any]:
    sources = installed_sources()
    first, *rest = [sources[name] for name in files]
    return json.loads(compose_config(env_file, compose_file=first, overrides=tuple(rest)).stdout)["services"]


def published(services: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {name: service["ports"] for name, service in services.items() if service.get("ports")}


def test_a_group_host_publishes_node_exporter_on_its_private_address_and_a_single_host_nothing_new(
    hosts: dict[str, Any],
) -> None:
    assert hosts["group"] and hosts["single"], hosts["output"]
    group_env, group_files = hosts["group"]
    single_env, single_files = hosts["single"]
    assert group_files == ["docker-compose.yml", "docker-compose.hosts.yml"]
    assert single_files == ["docker-compose.yml"]
    assert f"\nWSBRIDGE_PRIVATE_ADDRESS={ADDRESSES['group']}\n" in group_env.read_text()
    assert "WSBRIDGE_PRIVATE_ADDRESS" not in single_env.read_text()

    group = resolve(group_env, group_files)
    single = resolve(single_env, single_files)
    traefik = published(single)["traefik"]
    # The single host publishes what it always did: Traefik's ports, nothing else.
    assert published(single) == {"traefik": traefik}
    assert sorted(int(port["published"]) for port in traefik) == [80, 443, 8443]
    # A group host adds node_exporter's port on its private address, and changes nothing else.
    node_port = {
        "mode": "ingress",
        "host_ip": ADDRESSES["group"],
        "target": 9100,
        "published": "9100",
        "protocol": "tcp",
    }
    assert published(group) == {"traefik": traefik, "node_exporter": [node_port]}
    # Docker publishes nothing for a container whose networks are all internal (moby/moby#36174):
    # node_exporter joins one that is not, of its own, which does not masquerade (no way out).
    model = json.loads(
        compose_config(group_env, compose_file=installed_sources()[group_files[0]], overrides=(HOSTS_FILE,)).stdout
    )
    networks = {name: model["networks"][name] for name in group["node_exporter"]["networks"]}
    assert set(networks) == {"metrics", "hosts"}
    assert networks["metrics"]["internal"] is True and not networks["hosts"].get("internal")
    assert networks["hosts"]["driver_opts"] == {"com.docker.network.bridge.enable_ip_masquerade": "false"}
    assert [name for name, service in group.items() if "hosts" in service.get("networks", {})] == ["node_exporter"]
    # Nothing else changes.
    group["node_exporter"].pop("ports")
    group["node_exporter"]["networks"].pop("hosts")
    alone = resolve(group_env, single_files)
    assert group == alone

    # What the other hosts scrape: hosts_sd writes this port, the security group opens it.
    hosts_sd = load(ANSIBLE_DIR / "roles" / "hosts_sd" / "defaults" / "main.yml")
    assert hosts_sd["hosts_sd_port"] == node_port["target"] == int(node_port["published"])
    # Both roles decide "a host of a group" the same way.
    defaults = load(ROLE / "defaults" / "main.yml")
    assert defaults["appliance_several_hosts"] == hosts_sd["hosts_sd_enabled"]


def test_anything_but_a_private_address_is_refused_and_none_is_never_every_address(
    hosts: dict[str, Any], tmp_path: Path
) -> None:
    assert hosts["public"] is None, "the role published node_exporter on 0.0.0.0"
    assert "appliance_private_address (0.0.0.0) must be this host's private IPv4 address" in hosts["output"]
    # Without the address, Compose refuses the group file rather than publish on every address.
    group_env, group_files = hosts["group"]
    env = tmp_path / ".env"
    env.write_text(group_env.read_text().replace(f"WSBRIDGE_PRIVATE_ADDRESS={ADDRESSES['group']}\n", ""))
    sources = installed_sources()
    refused = compose_config(env, compose_file=sources[group_files[0]], overrides=(HOSTS_FILE,), check=False)
    assert refused.returncode != 0 and "set WSBRIDGE_PRIVATE_ADDRESS" in refused.stderr, refused.stderr


# Runs as root inside `unshare --net --pid --fork`: the private address on a veth pair, the
# exporter listening where Compose publishes it, Prometheus on loopback; the probe is the
# namespace's last process, so everything else ends with it. The exporter listens before
# Prometheus starts, so the first scrape decides (a wrong setting fails at once, not at the deadline).
NAMESPACE = r"""
set -eu
ip link set lo up
ip link add wsb-private type veth peer name wsb-peer
ip addr add "$ADDRESS/24" dev wsb-private
ip link set wsb-private up && ip link set wsb-peer up
"$NODE_EXPORTER" "$@" > "$WORK/node_exporter.log" 2>&1 &
# Prometheus starts once the exporter listens: its first scrape is the verdict.
for _ in $(seq 600); do (: < "/dev/tcp/$ADDRESS/$PORT") 2>/dev/null && break; sleep 0.1; done
"$PROMETHEUS" --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/data" \
  --web.listen-address=127.0.0.1:9090 > "$WORK/prometheus.log" 2>&1 &
exec "$PYTHON" "$WORK/probe.py"
"""

PROBE = r"""
import json, os, socket, sys, time, urllib.parse, urllib.request

deadline = time.monotonic() + float(os.environ["WITHIN"])
query = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": 'up{job="hosts"}'})
found = []
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(query, timeout=5) as response:
            found = json.load(response)["data"]["result"]
    except OSError:
        found = []
    if found:  # the first scrape of the host, up or down
        break
    time.sleep(0.5)
# Bound to the private address only: loopback (and so every other address) is refused.
try:
    socket.create_connection(("127.0.0.1", int(os.environ["PORT"])), timeout=5).close()
    loopback = "open"
except OSError:
    loopback = "refused"
print(json.dumps({"up": found, "loopback": loopback}))
"""


def load_hosts_sd() -> Any:
    spec = importlib.util.spec_from_file_location("hosts_sd", ROOT / "monitoring" / "hosts_sd.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheus_scrapes_a_group_hosts_node_exporter_on_its_private_address(
    hosts: dict[str, Any], tmp_path: Path
) -> None:
    node_exporter = shutil.which("prometheus-node-exporter")
    prometheus = shutil.which("prometheus")
    assert node_exporter and prometheus, "`python3 dev.py test` installs them (tools/apt/monitoring.txt)"
    assert hosts["group"], hosts["output"]
    group_env, group_files = hosts["group"]
    service = resolve(group_env, group_files)["node_exporter"]
    (port,) = service["ports"]
    listen = f"{port['host_ip']}:{port['published']}"
    command = [arg.replace("--path.rootfs=/host", "--path.rootfs=/") for arg in service["command"]]

    # The file as the timer writes it: hosts_sd.py's own functions, one instance of the group.
    hosts_sd = load_hosts_sd()
    sd_port = load(ANSIBLE_DIR / "roles" / "hosts_sd" / "defaults" / "main.yml")["hosts_sd_port"]
    instance = {
        "InstanceId": "i-0a1b2c3d4e5f60718",
        "PrivateIpAddress": port["host_ip"],
        "Placement": {"AvailabilityZone": "eu-central-1a"},
    }
    hosts_sd.write_atomically(
        tmp_path / "hosts" / "hosts.json", json.dumps(hosts_sd.targets([instance], sd_port), indent=2) + "\n"
    )
    # The shipped prometheus.yml, only the file_sd folder moved here (the rules are promtool's).
    config = load(ROOT / "monitoring" / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "hosts"]
    assert job["file_sd_configs"][0]["files"] == ["/etc/prometheus/hosts/*.json"]
    job["file_sd_configs"][0]["files"] = [str(tmp_path / "hosts" / "*.json")]
    config["rule_files"] = []
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "probe.py").write_text(PROBE)

    within = 60 * SCALE
    result = subprocess.run(
        [
            "unshare",
            "--net",
            "--pid",
            "--fork",
            "bash",
            "-c",
            NAMESPACE,
            "namespace",
            *command,
            f"--web.listen-address={listen}",
        ],
        env={
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "ADDRESS": port["host_ip"],
            "PORT": str(port["published"]),
            "WORK": str(tmp_path),
            "NODE_EXPORTER": node_exporter,
            "PROMETHEUS": prometheus,
            "PYTHON": sys.executable,
            "WITHIN": str(within),
        },
        capture_output=True,
        text=True,
        timeout=within + 60,
    )
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (series,) = report["up"]
    assert series["metric"] == {
        "__name__": "up",
        "job": "hosts",
        "instance": instance["InstanceId"],
        "zone": "eu-central-1a",
    }, report
    assert series["value"][1] == "1", (report, logs)
    assert report["loopback"] == "refused", report
