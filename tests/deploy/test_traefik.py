"""Traefik's configuration: the compose labels, the file provider and the static flags.

The module's Traefik also carries real traffic to a real appliance over TLS on both
entrypoints: a WebSocket session on :443 that outlives the entrypoint's read timeout,
slow headers cut by it, the controllers' API there, the dashboard on :8443, /metrics in
no spelling, and one Grafana dashboard's worth of requests not throttled.

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

import asyncio
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blackbox_support
import jsonschema
import pytest
import yaml
from deploy_support import COMPOSE_FILE, SCALE, TRAEFIK_DYNAMIC_DIR, compose_config, free_port, tool_venv
from test_compose import TEST_ENV, labels, write_env
from traefik_config import dynamic_from_labels, file_provider_config, load_schema, merge, static_flags
from websockets.asyncio.client import connect

sys.path.insert(0, str(COMPOSE_FILE.parent / "tests"))
from support import CONTROLLER_TOKEN, Appliance, command, recv

HTPASSWD = "ops:$2y$05$abcdefghijklmnopqrstuu5cU0zJqN6Tj8m8oGd3n2ZqO3G8yq1Vy"
DOMAIN = TEST_ENV["DOMAIN_NAME"]


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


def self_signed(tmp: Path, name: str, san: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-subj", f"/CN={name}", "-addext", f"subjectAltName={san}", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


class AcmeStub:
    """A stand-in for Let's Encrypt that listens, completes TLS and never answers.

    Traefik asks the CA for the routers' certificate soon after start. Pointed at a port
    where nothing listened, it logged "connection refused" as an error a few seconds in,
    which the checks below read as a refused configuration whenever the machine was slow
    enough for them to look after it (a flaky test). This stub listens before Traefik
    starts, and Traefik trusts its certificate and waits for an answer longer than any
    test runs: no error from the CA's side, ever.
    """

    def __init__(self, tmp: Path) -> None:
        self.cert, key = self_signed(tmp, "acme-stub", "IP:127.0.0.1")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))  # listening from here on
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}/directory"
        self.held: list[socket.socket] = []
        self.closed = threading.Event()

        def serve() -> None:
            while not self.closed.is_set():
                try:
                    client, _ = self.listener.accept()
                    client.settimeout(10)
                    self.held.append(context.wrap_socket(client, server_side=True))  # and never answer
                except OSError:
                    continue

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for held in self.held:
            held.close()


def local_flags(command: list[str], tmp: Path, dynamic_dir: Path, api_port: int, acme: AcmeStub) -> list[str]:
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
            value = acme.url  # never the real CA from a test
        flags.append(f"{name}={value}" if "=" in arg else arg)
    return [
        *flags,
        f"--certificatesresolvers.letsencrypt.acme.cacertificates={acme.cert}",
        "--certificatesresolvers.letsencrypt.acme.clienttimeout=1h",
        "--certificatesresolvers.letsencrypt.acme.clientresponseheadertimeout=1h",
        "--api=true",
        "--api.insecure=true",
        f"--entrypoints.traefik.address=127.0.0.1:{api_port}",
        "--log.format=json",
    ]


def start_traefik(model: dict[str, Any], tmp: Path, dynamic: dict[str, Any] | None = None) -> Iterator[Traefik]:
    tmp.mkdir(parents=True, exist_ok=True)
    acme = AcmeStub(tmp)
    secrets = tmp / "secrets"
    secrets.mkdir()
    (secrets / "monitoring_htpasswd").write_text(HTPASSWD + "\n")
    dynamic_dir = tmp / "dynamic"
    dynamic_dir.mkdir()
    for path in TRAEFIK_DYNAMIC_DIR.glob("*.yml"):
        (dynamic_dir / path.name).write_text(path.read_text().replace("/run/secrets/", f"{secrets}/"))
    (dynamic_dir / "zz-labels.yml").write_text(yaml.safe_dump(dynamic if dynamic is not None else label_config(model)))
    api_port = free_port()
    log = tmp / "traefik.log"
    command = local_flags(model["services"]["traefik"]["command"], tmp, dynamic_dir, api_port, acme)
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
        acme.close()


@pytest.fixture(scope="module")
def appliance() -> Iterator[Appliance]:
    app = Appliance(name="behind-traefik")
    app.start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def site_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("site"), DOMAIN, f"DNS:{DOMAIN}")


@pytest.fixture(scope="module")
def traefik(
    model: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    appliance: Appliance,
    site_cert: tuple[Path, Path],
) -> Iterator[Traefik]:
    """The stack's Traefik in front of a real appliance, serving a certificate for the domain (ACME cannot here)."""
    dynamic = label_config(model)
    (server,) = dynamic["http"]["services"]["wsbridge"]["loadBalancer"]["servers"]
    server["url"] = appliance.http
    dynamic["tls"] = {"certificates": [{"certFile": str(site_cert[0]), "keyFile": str(site_cert[1])}]}
    yield from start_traefik(model, tmp_path_factory.mktemp("traefik-run"), dynamic)


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
        "alertmanager": lambda: int(
            next(
                (arg.split(":")[-1] for arg in service["entrypoint"] if arg.startswith("--web.listen-address=")),
                "9093",
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


# --- real traffic over TLS ------------------------------------------------------------------------

TRAEFIK_404 = b"404 page not found\n"


def entrypoint_port(traefik: Traefik, name: str) -> int:
    entrypoints = {entry["name"]: entry for entry in traefik.get("/api/entrypoints")}
    return int(entrypoints[name]["address"].rsplit(":", 1)[1])


def tls_context(site_cert: tuple[Path, Path]) -> ssl.SSLContext:
    """Trusts only the site's certificate, for the domain: the client checks what Traefik serves."""
    return ssl.create_default_context(cafile=str(site_cert[0]))


def https(
    port: int, site_cert: tuple[Path, Path], path: str, method: str = "GET", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """A request to https://DOMAIN:port``path`` sent to 127.0.0.1, the path exactly as given."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10 * SCALE)
    connection = http.client.HTTPConnection(DOMAIN, port, timeout=10 * SCALE)
    connection.sock = tls_context(site_cert).wrap_socket(raw, server_hostname=DOMAIN)
    try:
        body = b"{}" if method == "POST" else None
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def read_timeout(model: dict[str, Any], entrypoint: str) -> float:
    value = static_flags(model["services"]["traefik"]["command"])[
        f"entrypoints.{entrypoint}.transport.respondingtimeouts.readtimeout"
    ]
    return float(value.removesuffix("s"))


def test_a_websocket_session_crosses_traefik_over_tls_and_outlives_the_read_timeout(
    traefik: Traefik, model: dict[str, Any], site_cert: tuple[Path, Path]
) -> None:
    port = entrypoint_port(traefik, "websocket")
    idle = read_timeout(model, "websocket") + 2

    async def session() -> None:
        def open_as(client_id: str, token: str) -> Any:
            return connect(
                f"wss://{DOMAIN}:{port}/ws/{client_id}",
                host="127.0.0.1",
                port=port,
                ssl=tls_context(site_cert),
                server_hostname=DOMAIN,
                additional_headers={"X-Auth-Token": token},
                ping_interval=None,  # nothing crosses the connection while it is idle
                open_timeout=10 * SCALE,
            )

        from support import CLIENT_TOKEN

        async with open_as("unity_client_1", CLIENT_TOKEN) as client, open_as("LLM", CONTROLLER_TOKEN) as llm:
            await llm.send(command("unity_client_1", "MoveForward 10"))
            assert await recv(client) == "MoveForward 10"
            await asyncio.sleep(idle)  # longer than :443's read timeout, no frame at all
            await client.send("done")
            assert json.loads(await recv(llm)) == {"sender": "unity_client_1", "message": "done"}

    asyncio.run(session())


def test_slow_headers_are_cut_by_the_websocket_entrypoints_read_timeout(
    traefik: Traefik, model: dict[str, Any], site_cert: tuple[Path, Path]
) -> None:
    port = entrypoint_port(traefik, "websocket")
    limit = read_timeout(model, "websocket")
    raw = socket.create_connection(("127.0.0.1", port), timeout=10 * SCALE)
    with tls_context(site_cert).wrap_socket(raw, server_hostname=DOMAIN) as tls:
        tls.sendall(f"GET /ws/slow HTTP/1.1\r\nHost: {DOMAIN}\r\n".encode())  # and never the blank line
        tls.settimeout(limit + 20 * SCALE)
        started = time.monotonic()
        try:
            answer = tls.recv(1024)
        except (ConnectionResetError, ssl.SSLError):
            answer = b""
        except TimeoutError:
            pytest.fail(f"a request whose headers never end was still open after {limit + 20 * SCALE:.0f} s")
    assert time.monotonic() - started >= limit - 1, "cut before the read timeout"
    assert not answer.startswith(b"HTTP/1.1 2"), answer


def test_the_dashboard_and_the_controllers_api_answer_over_tls_where_the_docs_say(
    traefik: Traefik, site_cert: tuple[Path, Path]
) -> None:
    admin = entrypoint_port(traefik, "websecure")
    public = entrypoint_port(traefik, "websocket")
    status, headers, _ = https(admin, site_cert, "/healthz")
    assert status == 200
    assert headers["strict-transport-security"].startswith("max-age=31536000")
    status, _, body = https(admin, site_cert, "/admin/")
    assert status in (200, 302, 303, 401) and body != TRAEFIK_404
    # README: https://HOST/mcp and the HTTP command API, on the public entrypoint.
    for method, path in (("POST", "/mcp"), ("POST", "/api/v1/commands"), ("GET", "/api/v1/clients")):
        status, _, body = https(public, site_cert, path, method, Authorization=f"Bearer {CONTROLLER_TOKEN}")
        assert body != TRAEFIK_404, f"{method} {path} is not routed on :443"
    status, _, body = https(public, site_cert, "/api/v1/clients", "GET", **{"X-Auth-Token": CONTROLLER_TOKEN})
    assert status == 200, body
    # The admin surfaces are not on :443.
    for path in ("/admin/", "/grafana/", "/prometheus/", "/alertmanager/", "/healthz"):
        assert https(public, site_cert, path)[2] == TRAEFIK_404, path
    assert https(public, site_cert, "/api/v1/clients/x", "DELETE")[2] == TRAEFIK_404


def not_after(cert: Path) -> float:
    end = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(cert)], capture_output=True, text=True)
    return ssl.cert_time_to_seconds(end.stdout.strip().removeprefix("notAfter="))


def test_the_blackbox_probe_sees_the_wss_endpoint_and_its_certificate_as_a_client_does(
    traefik: Traefik, model: dict[str, Any], site_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    """Debian's blackbox exporter, the shipped modules, the target Prometheus's entrypoint writes."""
    (target,) = blackbox_support.rendered_targets(model["services"]["prometheus"], tmp_path)
    port = entrypoint_port(traefik, "websocket")
    local = target.replace(f"https://{DOMAIN}/", f"https://{DOMAIN}:{port}/")  # :443 here is a free port
    assert local != target, target
    module, listen, log = blackbox_support.module_of_the_job(), free_port(), tmp_path / "blackbox.log"
    service = model["services"]["blackbox_exporter"]
    exporter = blackbox_support.start(service, listen, log, hosts={DOMAIN: "127.0.0.1"}, ca=site_cert[0])
    try:
        deadline = time.monotonic() + 20 * SCALE
        while (found := blackbox_support.probe(listen, local, module)) is None:
            assert exporter.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert found["probe_success"] == 1, (found, log.read_text())
        assert found["probe_http_status_code"] == 405  # the appliance's WebSocket route, not Traefik's
        assert found["probe_ssl_earliest_cert_expiry"] == not_after(site_cert[0])
        # Traefik answering by itself (no router for the path: 404) is no reachable endpoint.
        elsewhere = blackbox_support.probe(listen, local.replace("/ws/", "/not-routed/"), module)
        assert elsewhere and elsewhere["probe_success"] == 0 and elsewhere["probe_http_status_code"] == 404, elsewhere
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)
    # And a certificate the exporter does not trust (here: the system's roots only) fails it.
    exporter = blackbox_support.start(service, listen, log, hosts={DOMAIN: "127.0.0.1"})
    try:
        deadline = time.monotonic() + 20 * SCALE
        while (found := blackbox_support.probe(listen, local, module)) is None:
            assert exporter.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert found["probe_success"] == 0, found
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)


@pytest.mark.parametrize("path", ["/metrics", "//metrics", "/metrics/", "/%6detrics", "/./metrics", "/x/../metrics"])
def test_metrics_is_never_served_through_traefik_in_any_spelling(
    traefik: Traefik, site_cert: tuple[Path, Path], appliance: Appliance, path: str
) -> None:
    """The appliance itself answers some of these spellings; Traefik matches the normalised path and refuses them all."""
    for entrypoint in ("websecure", "websocket"):
        status, _, body = https(entrypoint_port(traefik, entrypoint), site_cert, path)
        assert b"wsbridge_" not in body and b"# HELP" not in body, f"{entrypoint} served {path}"
        assert status in (400, 404), (entrypoint, path, status)


def test_one_grafana_dashboard_load_is_not_throttled_but_a_flood_is(
    traefik: Traefik, site_cert: tuple[Path, Path]
) -> None:
    port = entrypoint_port(traefik, "websecure")
    dashboards = (COMPOSE_FILE.parent / "monitoring" / "grafana" / "dashboards").glob("*.json")
    queries = max(json.dumps(json.loads(path.read_text())).count('"expr"') for path in dashboards)
    load = queries + 90  # the queries plus Grafana's scripts, styles, fonts and API calls on a cold cache

    def burst(count: int) -> list[int]:
        with ThreadPoolExecutor(max_workers=32) as pool:
            return list(pool.map(lambda i: https(port, site_cert, f"/grafana/public/x{i}")[0], range(count)))

    statuses = burst(load)
    assert 429 not in statuses, f"{statuses.count(429)} of {load} requests of one dashboard load were throttled"
    time.sleep(2)  # let the bucket refill
    assert 429 in burst(400), "no rate limit on the admin entrypoint"
