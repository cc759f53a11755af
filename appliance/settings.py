"""The one typed settings object, read once from the environment and ``.env``.

No other module reads ``os.environ``. Names of the original WebSocket Bridge
(``LLM_SECRET_TOKEN``, ``UNITY_CLIENT_TOKEN``, ``REDIS_HOST``, ``REDIS_PASSWORD``,
``WEB_SOCKET_PORT``, ``LOG_LEVEL``) are kept so existing ``.env`` files work.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .settings_oidc import DashboardOidc

__all__ = ["Settings", "default_instance_id"]


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class NewIdSettings(BaseSettings):
    """The new-id limits (appliance/core/newids.py), apart so that :class:`Settings` stays readable."""

    new_ids_per_token: int = Field(
        1000,
        ge=0,
        description="Client ids never seen before (no holder, no connect history) one token may bring per "
        "NEW_IDS_WINDOW, cluster-wide; beyond, 4015. Addresses in LIMITS_EXEMPT_IPS are not counted. 0: no limit.",
    )
    new_ids_per_address: int = Field(
        100,
        ge=0,
        description="Client ids never seen before one address (IPv6: /64) may bring per NEW_IDS_WINDOW; 0: no limit.",
    )
    new_ids_window: float = Field(3600.0, gt=0, description="Seconds of the new-id windows (NEW_IDS_PER_*).")


class CallerNames(BaseSettings):
    """Who acts with the two fixed tokens; named tokens (``controller_tokens/<name>``, ``admin_tokens/<name>``
    in SSM) carry their own ``<name>``. A part of :class:`Settings`, which inherits these fields."""

    controller_token_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Who acts with LLM_SECRET_TOKEN over HTTP and MCP (audit, recent commands, rate limit); "
        "unset: `http` and `mcp`.",
    )
    admin_token_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Who acts with ADMIN_TOKEN in the audit trail (a person: `alice`); unset: `ADMIN_TOKEN`.",
    )


class RedisTls(BaseSettings):
    """TLS to Redis (ElastiCache, or a private CA). A part of :class:`Settings`, which inherits these fields."""

    redis_tls: bool = Field(False, description="With REDIS_HOST: connect over TLS (rediss://), as ElastiCache needs.")
    redis_tls_ca_file: str | None = Field(
        None,
        description="CA bundle (PEM) that verifies the server's certificate with a rediss:// REDIS_URL or "
        "REDIS_TLS=true; unset: the system's CAs (enough for ElastiCache).",
    )

    @model_validator(mode="after")
    def _redis_tls_ca_usable(self) -> RedisTls:
        """REDIS_TLS_CA_FILE only means something with TLS, and must be a readable file at start."""
        if self.redis_tls_ca_file:
            settings: Any = self  # The whole Settings: where Redis is.
            if not (settings.redis_url or settings.redis_host) or not settings.redis_connection_url().startswith(
                "rediss://"
            ):
                raise ValueError("REDIS_TLS_CA_FILE needs a rediss:// REDIS_URL, or REDIS_TLS=true (TLS to Redis)")
            if not os.path.isfile(self.redis_tls_ca_file) or not os.access(self.redis_tls_ca_file, os.R_OK):
                raise ValueError(f"REDIS_TLS_CA_FILE {self.redis_tls_ca_file} is not a readable file")
        return self


class CommandRecordSettings(BaseSettings):
    """The bound of the command records (appliance/commands/followup.py), apart so :class:`Settings` stays short."""

    command_records_per_caller: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="Commands each caller (named token; the unnamed tokens together) can follow up "
        "(GET /api/v1/commands/{id}, MCP get_command); beyond, its oldest record goes. Bounds Redis memory.",
    )


class CommandKeySettings(BaseSettings):
    """The budget of live idempotency keys per caller (core/keybudget.py), apart so :class:`Settings` stays short."""

    command_keys_per_caller: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Live idempotency keys (HTTP id / Idempotency-Key, MCP idempotency_key, WebSocket ids) each "
        "caller (named token; the unnamed tokens together) may hold within IDEMPOTENCY_WINDOW_SECONDS; beyond, "
        "a new key is refused (429 too_many_keys) until its oldest expires. A version-2 WebSocket controller puts "
        "an id on every command: 10,000 per 600 s is 16.7 commands/s sustained. Bounds Redis memory.",
    )
    command_key_bytes_per_caller: int = Field(
        16 * 1024 * 1024,
        ge=1024 * 1024,
        le=1024**3,
        description="Bytes of idempotency records each caller may hold in Redis (a key waiting for its outcome "
        "counts MAX_MESSAGE_BYTES + 1 KiB, then its record's size + 384); beyond, a new key is refused "
        "(429 too_many_keys).",
    )


class Settings(NewIdSettings, CallerNames, RedisTls, DashboardOidc, CommandRecordSettings, CommandKeySettings):
    # hide_input_in_errors: a refused REDIS_URL holds the password; the error must not repeat it.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    # --- Authentication -------------------------------------------------------------
    llm_secret_token: SecretStr | None = Field(
        None, description="Token that makes a connection a controller (the LLM side)."
    )
    unity_client_token: SecretStr | None = Field(
        None, description="Token that makes a connection a client (Unity, devices)."
    )
    admin_token: SecretStr | None = Field(
        None, description="Token for the dashboard and the admin HTTP API; unset disables admin access."
    )

    # --- Token store (appliance/tokens) --------------------------------------------------
    token_store: Literal["env", "ssm"] = Field(
        "env", description="Where tokens come from: env (these settings, the default) or ssm (AWS SSM Parameter Store)."
    )
    ssm_prefix: str = Field(
        "/WebSocket/prod/",
        pattern=r"^/[A-Za-z0-9_.\-/]*/$",
        description="SSM parameter path holding the tokens (LLM_SECRET_TOKEN, ..., client_tokens/<name>); ends with /.",
    )
    aws_region: str | None = Field(None, description="AWS region of the SSM parameters (TOKEN_STORE=ssm).")
    ssm_endpoint_url: str | None = Field(
        None, description="SSM endpoint URL override (a VPC endpoint, or a local moto server in tests)."
    )
    token_refresh_seconds: float = Field(
        60.0, gt=0, description="Seconds between reads of the token store; Redis notifications are faster."
    )
    token_grace_seconds: float = Field(
        900.0, ge=0, description="Seconds a rotated-out token stays valid (and its connections open)."
    )
    token_rotation_enabled: bool = Field(
        False, description="Allow `wsbridge tokens rotate|revoke` and the dashboard to write SSM (needs IAM rights)."
    )

    # --- Network ----------------------------------------------------------------------
    bind_host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 in containers.")
    web_socket_port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description="Proxies trusted for X-Forwarded-For (comma-separated IPs/CIDRs, or *); shown as client addresses.",
    )
    public_url: str | None = Field(
        None, description="URL users reach the appliance at, shown in links; derived from host/port if unset."
    )

    # --- Broker -----------------------------------------------------------------------
    redis_url: SecretStr | None = Field(
        None,
        description="redis:// or rediss:// URL; wins over REDIS_HOST/REDIS_PORT/REDIS_PASSWORD. "
        "A secret (it may hold the password): never shown in repr, logs or the banner.",
    )
    redis_host: str | None = Field(None, description="Redis host; unset (with no REDIS_URL) means the embedded broker.")
    redis_port: int = Field(6379, ge=1, le=65535, description="Redis port, with REDIS_HOST.")
    redis_password: SecretStr | None = Field(None, description="Redis password, with REDIS_HOST.")
    redis_sentinels: str | None = Field(
        None,
        description="Redis Sentinels as host:port,host:port,... (with REDIS_SENTINEL_MASTER), instead of "
        "REDIS_URL/REDIS_HOST; the data password is REDIS_PASSWORD.",
    )
    redis_sentinel_master: str | None = Field(None, description="The master's name the Sentinels monitor.")
    redis_sentinel_password: SecretStr | None = Field(None, description="Password of the Sentinels themselves.")
    redis_cluster: bool = Field(
        False, description="REDIS_URL (or REDIS_HOST) names any node of a Redis Cluster (7+): sharded pub/sub."
    )
    redis_publish_pool_size: int = Field(
        8, ge=1, le=256, description="Connections for publishing and presence; constant per instance."
    )
    redis_outbox_limit: int = Field(
        100_000,
        ge=1,
        description="Messages waiting to be published to Redis; beyond it commands fail with delivery_failed.",
    )
    instance_id: str = Field(
        default_factory=default_instance_id,
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$",
        description="Name of this instance in presence; hostname-pid by default.",
    )

    # --- Limits -----------------------------------------------------------------------
    max_message_bytes: int = Field(65536, ge=16, description="Largest message accepted, in UTF-8 bytes.")
    client_rate_limit: float = Field(1000.0, ge=0, description="Client messages per second; 0 means unlimited.")
    client_rate_burst: int = Field(2000, ge=1, description="Client burst size (token-bucket capacity).")
    controller_rate_limit: float = Field(0.0, ge=0, description="Controller messages per second; 0 means unlimited.")
    controller_rate_burst: int = Field(1000, ge=1, description="Controller burst size (token-bucket capacity).")
    max_pending_messages: int = Field(
        10_000, ge=1, description="Frames queued unsent for one connection before it is closed as slow (4008)."
    )
    controller_max_pending_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="Characters of text (about bytes) queued unsent for a controller before it is closed as slow "
        "(4008); replies can be ~6x their client message after JSON escaping.",
    )
    client_max_pending_bytes: int = Field(
        32 << 20,
        ge=1024,
        description="Characters of text (about bytes) queued unsent for a client before it is closed as slow (4008).",
    )
    duplicate_policy: Literal["replace", "reject"] = Field(
        "replace", description="A second connection with a live id replaces the first (default) or is rejected."
    )

    # --- Abuse limits (appliance/core/admission.py; SECURITY.md) -----------------------------
    allowed_origins: str = Field(
        "",
        description="Comma-separated origins (https://game.example.com) whose browser pages may open WebSockets and "
        "make state-changing HTTP requests, besides the appliance's own origin; * allows any. Requests without an "
        "Origin header (non-browser clients) are not affected.",
    )
    max_connections_per_address: int = Field(
        1000,
        ge=0,
        description="WebSockets and unanswered HTTP requests one address (IPv6: one /64) may hold at once; beyond, "
        "4013 (HTTP: 429). 0: no limit.",
    )
    max_connections_per_token: int = Field(
        0, ge=0, description="WebSockets one token may hold on this instance at once; beyond, 4013. 0: no limit."
    )
    max_failed_handshakes_per_minute: int = Field(
        30,
        ge=0,
        description="Failed handshakes (4001, 4002, 4003, 4016; HTTP 401/403) one address may cause per minute before it "
        "is refused with HTTP 429 for HANDSHAKE_COOLDOWN seconds. 0: no limit.",
    )
    handshake_cooldown: float = Field(
        60.0, ge=0, description="Seconds an address that failed too many handshakes is refused (HTTP 429)."
    )
    http_requests_per_second: float = Field(
        100.0,
        ge=0,
        description="HTTP requests per second per address (health, readiness and metrics excepted); beyond, 429. "
        "0: no limit.",
    )
    http_burst: int = Field(200, ge=1, description="HTTP requests one address may make in a burst.")
    limits_exempt_ips: str = Field(
        "127.0.0.1,::1",
        description="Comma-separated addresses/CIDRs never limited per address (same-host peers by default).",
    )
    handshake_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a peer has from opening TCP (or starting a request) to sending its complete HTTP request: "
        "the headers of a WebSocket handshake, headers and body of an HTTP request; slower peers (slowloris, "
        "slow bodies) are dropped.",
    )
    log_flood_burst: int = Field(
        20, ge=1, description="Lines of one kind (logger and message) logged in a burst before lines are suppressed."
    )
    log_flood_rate: float = Field(
        1.0, gt=0, description="Lines of one kind logged per second after a burst; the rest are counted, not written."
    )

    # --- Liveness ---------------------------------------------------------------------
    ping_interval: float = Field(20.0, gt=0, description="Seconds between server pings.")
    ping_timeout: float = Field(20.0, gt=0, description="Seconds without a pong before a peer is dead.")
    presence_ttl: int = Field(30, ge=3, description="Seconds a crashed instance's presence entries survive in Redis.")
    history_per_client: int = Field(
        50, ge=1, le=10_000, description="Closed connections kept in each id's connect history (newest first)."
    )
    history_ttl_seconds: int = Field(
        7 * 86400, ge=60, description="Seconds an id's connect history is kept after its last connection closed."
    )
    history_max_clients: int = Field(
        2000,
        ge=1,
        description="Ids with a connect history, cluster-wide (Redis) or in memory; beyond, the oldest go first.",
    )
    recent_commands_per_client: int = Field(
        50,
        ge=0,
        le=1000,
        description="Commands kept per client for its detail page (sender, message, reply, round-trip time), "
        "newest first, in the memory of the instance holding the client; 0 disables.",
    )
    recent_commands_max_chars: int = Field(
        200, ge=16, le=65_536, description="Characters kept of each recorded command and reply (longer ones are cut)."
    )
    recent_commands_ttl_seconds: int = Field(
        3600, ge=1, description="Seconds a disconnected client's recent commands stay readable on its last instance."
    )
    recent_commands_max_closed: int = Field(
        1000, ge=1, description="Disconnected clients whose recent commands each instance keeps (oldest go first)."
    )
    shutdown_grace: float = Field(
        10.0, ge=0, description="Seconds SIGTERM waits for in-flight work after closing sockets with 1001."
    )

    # --- Dashboard (/admin) -----------------------------------------------------------
    viewer_token: SecretStr | None = Field(
        None, description="Optional read-only dashboard token: sees every page, can act on nothing."
    )
    token_fingerprint_key: SecretStr | None = Field(
        None,
        description="Key of the token fingerprints shown (HMAC); unset: a random key shared in Redis, or this "
        "process's own without Redis.",
    )
    allow_weak_tokens: bool = Field(
        False,
        description="Start even with tokens of fewer than about 128 bits of randomness (judged from length and "
        "alphabet); for tests and labs only.",
    )
    viewer_sees_messages: bool = Field(
        False,
        description="Whether the viewer token sees command and reply texts on a client's page; by default it sees "
        "their outcome, time and round trip only.",
    )
    grafana_url: str | None = Field(None, description="Grafana URL linked from the dashboard's System page.")
    prometheus_url: str | None = Field(None, description="Prometheus URL: the System page links it, asks its trends.")
    dashboard_idle_timeout: int = Field(
        1800, ge=1, description="Seconds without user activity after which a dashboard session ends."
    )
    dashboard_session_lifetime: int = Field(
        43200, ge=1, description="Seconds after login at which a dashboard session ends, active or not."
    )

    # --- Commands with an id (protocol version 2, HTTP API, MCP) ----------------------------
    command_timeout_ms: int = Field(
        30_000, ge=1, description="Default time a command with an id waits for its reply (or, queued, its client)."
    )
    command_timeout_max_ms: int = Field(
        300_000, ge=1, description="Largest timeout_ms / wait_ms a controller may ask for; longer is refused."
    )
    v1_reply_queue: int = Field(
        100, ge=0, description="Commands with an id that may wait behind the one in flight to a version-1 client."
    )
    offline_queue_max: int = Field(
        1000, ge=1, description="Queued commands kept per absent client (queue: true); more are refused (queue_full)."
    )
    offline_queue_max_total: int = Field(
        100_000, ge=1, description="Queued commands the embedded broker keeps for all absent clients together."
    )
    idempotency_window_seconds: int = Field(
        600,
        ge=1,
        le=86400,
        description="Seconds a command id (HTTP id, Idempotency-Key, MCP idempotency_key) is remembered: "
        "a repeat within them returns the first command's outcome instead of sending it again.",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level of the appliance."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as human-readable text (default) or one JSON object per line for log shippers.",
    )

    @model_validator(mode="before")
    @classmethod
    def _upper_log_level(cls, data):
        if isinstance(data, dict):
            for key in ("log_level", "LOG_LEVEL"):
                if isinstance(data.get(key), str):
                    data[key] = data[key].upper()
            for key in ("log_format", "LOG_FORMAT"):
                if isinstance(data.get(key), str):
                    data[key] = data[key].lower()
        return data

    @field_validator("redis_url")
    @classmethod
    def _redis_url_usable(cls, value: SecretStr | None) -> SecretStr | None:
        """A URL redis-py cannot open fails here, in one line that never repeats the URL (it may hold a password)."""
        if value is None or not value.get_secret_value():
            return value
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value.get_secret_value())
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("not a valid URL (expected redis://[:password@]host[:port][/db])") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("the scheme must be redis://, rediss:// or unix://")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("no host (expected redis://[:password@]host[:port][/db])")
        return value

    @model_validator(mode="after")
    def _redis_topology_consistent(self) -> Settings:
        if self.redis_sentinels is not None:
            self.redis_sentinel_addresses()  # Raises for an unreadable list.
            if not self.redis_sentinel_master:
                raise ValueError("REDIS_SENTINELS needs REDIS_SENTINEL_MASTER (the name the Sentinels monitor)")
            if self.redis_url or self.redis_host:
                raise ValueError("set REDIS_SENTINELS or REDIS_URL/REDIS_HOST, not both")
            if self.redis_cluster:
                raise ValueError("REDIS_CLUSTER and REDIS_SENTINELS exclude each other")
        elif self.redis_sentinel_master:
            raise ValueError("REDIS_SENTINEL_MASTER needs REDIS_SENTINELS")
        if self.redis_cluster and not (self.redis_url or self.redis_host):
            raise ValueError("REDIS_CLUSTER needs REDIS_URL or REDIS_HOST (any node of the cluster)")
        return self

    def redis_sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs."""
        addresses = []
        for item in (self.redis_sentinels or "").split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("REDIS_SENTINELS must be host:port,host:port,... (e.g. 10.0.0.5:26379)")
            addresses.append((host.strip("[]"), int(port)))
        return addresses

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> Settings:
        if self.command_timeout_ms > self.command_timeout_max_ms:
            raise ValueError("COMMAND_TIMEOUT_MS must not exceed COMMAND_TIMEOUT_MAX_MS")
        if self.idempotency_window_seconds * 1000 < self.command_timeout_max_ms:  # a retry would send it again
            raise ValueError(
                "IDEMPOTENCY_WINDOW_SECONDS must outlast COMMAND_TIMEOUT_MAX_MS: a key must outlive its command"
            )
        return self

    @property
    def redis_enabled(self) -> bool:
        return bool(self.redis_url or self.redis_host or self.redis_sentinels)

    def token_problems(self) -> list[str]:
        """Why the configured tokens are unsafe to start with (empty when they are fine).

        One token for both roles would make every device a controller; a short one is
        guessable and too short to be masked in logs.
        """
        from .logs import MIN_STRONG_LENGTH
        from .tokens.base import low_entropy

        named = {
            "LLM_SECRET_TOKEN": self.llm_secret_token,
            "UNITY_CLIENT_TOKEN": self.unity_client_token,
            "ADMIN_TOKEN": self.admin_token,
            "VIEWER_TOKEN": self.viewer_token,
        }
        values = {name: secret.get_secret_value() for name, secret in named.items() if secret is not None}
        problems = [
            f"{name} is shorter than {MIN_STRONG_LENGTH} characters"
            for name, value in values.items()
            if len(value) < MIN_STRONG_LENGTH
        ]
        if not self.allow_weak_tokens:
            problems += low_entropy({n: v for n, v in values.items() if len(v) >= MIN_STRONG_LENGTH})
        names = list(values)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                if values[first] == values[second]:
                    problems.append(f"{first} and {second} are the same token; every role needs its own")
        return problems

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redaction filter: every SecretStr setting, mixins' too
        (OIDC_CLIENT_SECRET), so a new secret setting is redacted without being listed here."""
        secrets = [s for v in self.__dict__.values() if isinstance(v, SecretStr) and (s := v.get_secret_value())]
        if self.redis_password is not None and self.redis_host:
            # The URL built from REDIS_HOST holds the password URL-quoted, which the raw value does not match.
            secrets.append(self.redis_connection_url())
        if self.redis_url is not None:
            from urllib.parse import urlsplit

            url = self.redis_url.get_secret_value()
            secrets.append(url)
            with contextlib.suppress(ValueError):
                password = urlsplit(url).password
                if password:
                    secrets.append(password)
        return secrets

    def redis_connection_url(self) -> str:
        """The Redis URL to connect to; contains the password, so never log it."""
        if self.redis_url:
            return self.redis_url.get_secret_value()
        if not self.redis_host:
            raise RuntimeError("Redis is not configured as one URL: set REDIS_URL or REDIS_HOST")
        password = self.redis_password.get_secret_value() if self.redis_password else ""
        # Quoted: a password with @ : / # % must not be read as part of the URL.
        auth = f":{quote(password, safe='')}@" if password else ""
        return f"{'rediss' if self.redis_tls else 'redis'}://{auth}{self.redis_host}:{self.redis_port}/0"

    def redis_display(self) -> str:
        """Where Redis is, without credentials, for logs and the dashboard."""
        from urllib.parse import urlsplit

        if self.redis_sentinels:
            where = ",".join(f"{host}:{port}" for host, port in self.redis_sentinel_addresses())
            return f"sentinel {self.redis_sentinel_master} via {where}"
        parts = urlsplit(self.redis_connection_url())
        where = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"
        return f"cluster via {where}" if self.redis_cluster else where
