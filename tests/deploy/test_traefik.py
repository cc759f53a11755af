"""Traefik's configuration: the compose labels, the file provider and the static flags.

Two judges. Traefik v3's JSON schema (vendored in tests/deploy/schemas/) refuses an
unknown option or a v2-only name in the dynamic configuration. The real Traefik
binary (the image's release, from tools/venvs/traefik.txt) is started with the
stack's own static flags, the file provider's files and the labels turned into the
same configuration, and its API says which routers, services and middlewares it
built and which it refused. Then the cross-checks neither can make alone: each
router's port is what the container listens on, ``traefik.docker.network`` is a
network the container is on, and the static flags enable what the labels use.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from deploy_support import COMPOSE_FILE, SCALE, TRAEFIK_DYNAMIC_DIR, compose_config, free_port, tool_venv
from test_compose import TEST_ENV, labels, write_env
from traefik_config import dynamic_from_labels, file_provider_config, load_schema, merge, static_flags

HTPASSWD = "ops:$2y$05$abcdefghijklmnopqrstuu5cU0zJqN6Tj8m8oGd3n2ZqO3G8yq1Vy"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env_file = write_env(tmp_path_factory.mktemp("traefik") / "test.env", TEST_ENV)
    return json.loads(compose_config(env_file).stdout)


def routed_services(model: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {name: labels(service) for name, service in model["services"].items() if labels(service)}


def label_config(model: dict[str, Any], host: str = "127.0.0.1") -> dict[str, Any]:
    return merge(*(dynamic_from_labels(found, host) for found in routed_services(model).values()))


def full_dynamic_config(model: dict[str, Any]) -> dict[str, Any]:
    return merge(file_provider_config(TRAEFIK_DYNAMIC_DIR), label_config(model))


def validation_errors(config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(load_schema())
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(config)]


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema())


def test_the_file_provider_configuration_matches_traefik_v3s_schema() -> None:
    config = file_provider_config(TRAEFIK_DYNAMIC_DIR)
    assert config["http"]["middlewares"], "no middleware found: the test would pass trivially"
    assert validation_errors(config) == []


def test_the_labels_match_traefik_v3s_schema(model: dict[str, Any]) -> None:
    config = label_config(model)
    assert {"wsbridge-ws", "wsbridge-web", "grafana", "prometheus"} <= set(config["http"]["routers"])
    assert validation_errors(config) == []


@pytest.mark.parametrize(
    ("section", "bad"),
    [
        ("middleware", {"headers": {"frameDenyy": True}}),  # a typo
        ("middleware", {"ipWhiteList": {"sourceRange": ["10.0.0.0/8"]}}),  # v2-only name
        ("middleware", {"rateLimit": {"average": "twenty"}}),  # a wrong type
        ("router", {"rule": "Host(`x`)", "service": "s", "entrypoints": ["websecure"]}),  # wrong case in a file
        ("router", {"rule": "Host(`x`)", "service": "s", "middlewares": "a,b"}),  # v2 label syntax in a file
    ],
)
def test_the_schema_refuses_unknown_options_and_v2_syntax(section: str, bad: dict[str, Any]) -> None:
    key = {"middleware": "middlewares", "router": "routers"}[section]
    assert validation_errors({"http": {key: {"x": bad}}}), f"the schema accepted {bad}"


# --- the real Traefik -----------------------------------------------------------------------------


class Traefik:
    def __init__(self, api: str, log: Path) -> None:
        self.api = api
        self.log = log

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=5) as response:
            return json.loads(response.read())


def traefik_binary() -> Path:
    venv = tool_venv("traefik")
    binary = venv / "bin" / "traefik"
    assert binary.exists(), f"{venv} has no traefik binary: reinstall tools/venvs/traefik.txt"
    return binary


def test_the_binary_is_the_images_release(model: dict[str, Any]) -> None:
    output = subprocess.run([traefik_binary(), "version"], capture_output=True, text=True, timeout=30).stdout
    version = re.search(r"Version:\s+(\S+)", output)
    assert version, output
    assert model["services"]["traefik"]["image"] == f"traefik:v{version.group(1)}"
    assert (COMPOSE_FILE.parent / "docker-compose.yml").read_text().count(f"traefik:v{version.group(1)}") == 1


def local_flags(command: list[str], tmp: Path, dynamic_dir: Path, api_port: int) -> list[str]:
    """The stack's static flags, pointed at loopback ports and temporary files."""
    flags = []
    for arg in command:
        name, _, value = arg.partition("=")
        if re.fullmatch(r"--entrypoints\.\w+\.address", name):
            value = f"127.0.0.1:{free_port()}"
        elif name == "--providers.docker.endpoint":
            value = f"tcp://127.0.0.1:{free_port()}"  # no Docker here: the provider retries quietly
        elif name == "--providers.file.directory":
            value = str(dynamic_dir)
        elif name == "--certificatesresolvers.letsencrypt.acme.storage":
            value = str(tmp / "acme.json")
        elif name == "--certificatesresolvers.letsencrypt.acme.caserver":
            value = f"https://127.0.0.1:{free_port()}/directory"  # never the real CA from a test
        flags.append(f"{name}={value}" if "=" in arg else arg)
    return [
        *flags,
        "--api=true",
        "--api.insecure=true",
        f"--entrypoints.traefik.address=127.0.0.1:{api_port}",
        "--log.format=json",
    ]


def start_traefik(model: dict[str, Any], tmp: Path, dynamic: dict[str, Any] | None = None) -> Iterator[Traefik]:
    secrets = tmp / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "monitoring_htpasswd").write_text(HTPASSWD + "\n")
    dynamic_dir = tmp / "dynamic"
    dynamic_dir.mkdir()
    for path in TRAEFIK_DYNAMIC_DIR.glob("*.yml"):
        (dynamic_dir / path.name).write_text(path.read_text().replace("/run/secrets/", f"{secrets}/"))
    (dynamic_dir / "zz-labels.yml").write_text(yaml.safe_dump(dynamic if dynamic is not None else label_config(model)))
    api_port = free_port()
    log = tmp / "traefik.log"
    command = local_flags(model["services"]["traefik"]["command"], tmp, dynamic_dir, api_port)
    with log.open("wb") as sink:
        process = subprocess.Popen([traefik_binary(), *command], stdout=sink, stderr=subprocess.STDOUT, cwd=tmp)
    traefik = Traefik(f"http://127.0.0.1:{api_port}", log)
    try:
        deadline = time.monotonic() + 20 * SCALE
        while True:
            assert process.poll() is None, f"traefik exited {process.returncode}:\n{log.read_text()}"
            errors = configuration_errors(traefik)
            assert not errors, "traefik refused the configuration:\n" + "\n".join(errors)
            try:
                routers = traefik.get("/api/http/routers")
                if any(router["provider"] == "file" for router in routers):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, f"traefik did not come up:\n{log.read_text()}"
            time.sleep(0.1)
        yield traefik
    finally:
        # No graceful shutdown needed (it can take Traefik's 10 s grace timeout).
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def traefik(model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traefik]:
    yield from start_traefik(model, tmp_path_factory.mktemp("traefik-run"))


def configuration_errors(traefik: Traefik) -> list[str]:
    errors = []
    for line in traefik.log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            errors.append(line)
            continue
        if entry.get("level") in ("error", "fatal") and entry.get("providerName") != "docker":
            errors.append(f"{entry.get('message')}: {entry.get('error')}")
    return errors


def test_traefik_accepts_the_static_flags_and_builds_every_router_without_error(
    traefik: Traefik, model: dict[str, Any]
) -> None:
    expected = set(label_config(model)["http"]["routers"])
    routers = {router["name"].removesuffix("@file"): router for router in traefik.get("/api/http/routers")}
    assert expected <= set(routers)
    for name in expected:
        router = routers[name]
        assert router["status"] == "enabled", router
        assert not router.get("error"), router
        assert router["using"] == router["entryPoints"], router
    middlewares = {m["name"]: m for m in traefik.get("/api/http/middlewares")}
    for name in file_provider_config(TRAEFIK_DYNAMIC_DIR)["http"]["middlewares"]:
        assert middlewares[f"{name}@file"]["status"] == "enabled", middlewares[f"{name}@file"]
    services = {s["name"]: s for s in traefik.get("/api/http/services")}
    for name in label_config(model)["http"]["services"]:
        assert services[f"{name}@file"]["status"] == "enabled", services[f"{name}@file"]
    assert configuration_errors(traefik) == []


def test_traefik_serves_the_metrics_and_ping_the_stack_relies_on(traefik: Traefik) -> None:
    entrypoints = {entry["name"]: entry for entry in traefik.get("/api/entrypoints")}
    assert {"web", "websocket", "websecure", "metrics", "traefik"} <= set(entrypoints)
    metrics = entrypoints["metrics"]["address"]
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
        assert b"traefik_" in response.read()
    with urllib.request.urlopen(f"{traefik.api}/ping", timeout=5) as response:
        assert response.read() == b"OK"


def refusals(model: dict[str, Any], tmp: Path, dynamic: dict[str, Any]) -> list[str]:
    """Start Traefik with ``dynamic`` and return the configuration errors it logs."""
    try:
        for running in start_traefik(model, tmp, dynamic):
            deadline = time.monotonic() + 10 * SCALE
            while not configuration_errors(running) and time.monotonic() < deadline:
                time.sleep(0.05)
            return configuration_errors(running)
    except AssertionError as error:
        return [str(error)]
    return []


def test_traefik_reports_a_broken_dynamic_configuration(model: dict[str, Any], tmp_path: Path) -> None:
    """The judge itself can fail: a router naming a middleware that does not exist, an option typo."""
    broken = label_config(model)
    broken["http"]["routers"]["wsbridge-ws"]["middlewares"] = ["wsbridge-missing@file"]
    errors = refusals(model, tmp_path / "missing", broken)
    assert any('middleware "wsbridge-missing@file" does not exist' in error for error in errors), errors
    typo = label_config(model)
    typo["http"]["routers"]["wsbridge-ws"]["entryPointz"] = ["websocket"]
    errors = refusals(model, tmp_path / "typo", typo)
    assert any("field not found" in error for error in errors), errors


# --- cross-checks ----------------------------------------------------------------------------------


def listening_port(service: dict[str, Any], name: str) -> int:
    known = {
        "appliance": lambda: int(service["environment"]["WEB_SOCKET_PORT"]),
        "grafana": lambda: 3000,  # Grafana's default http_port; GF_SERVER_HTTP_PORT unset
        "prometheus": lambda: int(
            next(
                (arg.split(":")[-1] for arg in service["command"] if arg.startswith("--web.listen-address=")),
                "9090",
            )
        ),
    }
    return known[name]()


def test_each_routers_service_port_is_where_the_container_listens(model: dict[str, Any]) -> None:
    services = model["services"]
    for name, found in routed_services(model).items():
        ports = {key: value for key, value in found.items() if key.endswith(".loadbalancer.server.port")}
        assert ports, f"{name} is routed but names no port"
        for key, value in ports.items():
            assert int(value) == listening_port(services[name], name), f"{name}: {key}={value}"
        assert "GF_SERVER_HTTP_PORT" not in services[name].get("environment", {})


def test_traefik_docker_network_names_a_network_the_container_and_traefik_are_on(model: dict[str, Any]) -> None:
    services = model["services"]
    network_names = {key: network["name"] for key, network in model["networks"].items()}
    traefik_networks = {network_names[key] for key in services["traefik"]["networks"]}
    flags = static_flags(services["traefik"]["command"])
    assert flags["providers.docker.network"] in traefik_networks
    for name, found in routed_services(model).items():
        network = found.get("traefik.docker.network")
        assert network, f"{name} does not say which network Traefik reaches it on"
        container_networks = {network_names[key] for key in services[name]["networks"]}
        assert network in container_networks, f"{name}: {network} is not one of {container_networks}"
        assert network in traefik_networks, f"{name}: Traefik is not on {network}"
        assert (
            not model["networks"][_key(model, network)].get("internal") or network == flags["providers.docker.network"]
        )


def _key(model: dict[str, Any], network_name: str) -> str:
    return next(key for key, network in model["networks"].items() if network["name"] == network_name)


def test_the_static_flags_enable_what_the_labels_and_health_checks_use(model: dict[str, Any]) -> None:
    services = model["services"]
    flags = static_flags(services["traefik"]["command"])
    entrypoints = {match.group(1) for key in flags if (match := re.fullmatch(r"entrypoints\.(\w+)\.address", key))}
    resolvers = {match.group(1) for key in flags if (match := re.fullmatch(r"certificatesresolvers\.(\w+)\..+", key))}
    config = full_dynamic_config(model)
    for name, router in config["http"]["routers"].items():
        assert set(router["entryPoints"]) <= entrypoints, f"{name}: unknown entrypoint"
        resolver = router.get("tls", {}).get("certResolver")
        assert resolver in resolvers, f"{name}: unknown resolver {resolver}"
        for middleware in router.get("middlewares", []):
            middleware_name, _, provider = middleware.partition("@")
            assert provider == "file", f"{name}: {middleware} must come from the file provider"
            assert middleware_name in config["http"]["middlewares"], f"{name}: {middleware} is not defined"
    # The health check runs `traefik healthcheck --ping`: ping must be on.
    assert "--ping" in services["traefik"]["healthcheck"]["test"]
    assert flags["ping"] == "true"
    assert flags["metrics.prometheus"] == "true"
    assert flags["metrics.prometheus.entrypoint"] in entrypoints
    assert flags["providers.file.watch"] == "true"
    # Every HTTPS entrypoint has a resolver, and port 80 only redirects.
    assert flags["entrypoints.web.http.redirections.entrypoint.to"] in entrypoints


def test_the_basic_auth_users_file_is_a_mounted_secret(model: dict[str, Any]) -> None:
    config = file_provider_config(TRAEFIK_DYNAMIC_DIR)
    auth = config["http"]["middlewares"]["wsbridge-monitoring-auth"]["basicAuth"]
    assert "users" not in auth, "the hash belongs in a users file"
    targets = {
        entry.get("target") or f"/run/secrets/{entry['source']}" for entry in model["services"]["traefik"]["secrets"]
    }
    assert auth["usersFile"] in targets


def test_the_traefik_folder_holds_only_dynamic_configuration() -> None:
    for path in TRAEFIK_DYNAMIC_DIR.iterdir():
        assert path.suffix == ".yml", f"{path.name}: the file provider reads *.yml here"
    assert shutil.which("sh")  # (the appliance entrypoint test needs it too)
