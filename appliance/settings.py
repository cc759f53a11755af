"""The one typed settings object, read once from the environment and ``.env``.

No other module reads ``os.environ``. Names of the original WebSocket Bridge
(``LLM_SECRET_TOKEN``, ``UNITY_CLIENT_TOKEN``, ``REDIS_HOST``, ``REDIS_PASSWORD``,
``WEB_SOCKET_PORT``, ``LOG_LEVEL``) are kept so existing ``.env`` files work.
"""

from __future__ import annotations

import os
import socket
from typing import Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "default_instance_id"]


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True)

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
    redis_url: str | None = Field(
        None, description="redis:// or rediss:// URL; wins over REDIS_HOST/REDIS_PORT/REDIS_PASSWORD."
    )
    redis_host: str | None = Field(None, description="Redis host; unset (with no REDIS_URL) means the embedded broker.")
    redis_port: int = Field(6379, ge=1, le=65535, description="Redis port, with REDIS_HOST.")
    redis_password: SecretStr | None = Field(None, description="Redis password, with REDIS_HOST.")
    redis_publish_pool_size: int = Field(
        8, ge=1, le=256, description="Connections for publishing and presence; constant per instance."
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
    duplicate_policy: Literal["replace", "reject"] = Field(
        "replace", description="A second connection with a live id replaces the first (default) or is rejected."
    )

    # --- Liveness ---------------------------------------------------------------------
    ping_interval: float = Field(20.0, gt=0, description="Seconds between server pings.")
    ping_timeout: float = Field(20.0, gt=0, description="Seconds without a pong before a peer is dead.")
    presence_ttl: int = Field(30, ge=3, description="Seconds a crashed instance's presence entries survive in Redis.")
    shutdown_grace: float = Field(
        10.0, ge=0, description="Seconds SIGTERM waits for in-flight work after closing sockets with 1001."
    )

    # --- Dashboard (/admin) -----------------------------------------------------------
    viewer_token: SecretStr | None = Field(
        None, description="Optional read-only dashboard token: sees every page, can act on nothing."
    )
    grafana_url: str | None = Field(None, description="Grafana URL linked from the dashboard's System page.")
    prometheus_url: str | None = Field(None, description="Prometheus URL linked from the dashboard's System page.")
    dashboard_idle_timeout: int = Field(
        1800, ge=1, description="Seconds without user activity after which a dashboard session ends."
    )
    dashboard_session_lifetime: int = Field(
        43200, ge=1, description="Seconds after login at which a dashboard session ends, active or not."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level of the appliance."
    )

    @model_validator(mode="before")
    @classmethod
    def _upper_log_level(cls, data):
        if isinstance(data, dict):
            for key in ("log_level", "LOG_LEVEL"):
                if isinstance(data.get(key), str):
                    data[key] = data[key].upper()
        return data

    @property
    def redis_enabled(self) -> bool:
        return bool(self.redis_url or self.redis_host)

    def redis_connection_url(self) -> str:
        """The Redis URL to connect to; contains the password, so never log it."""
        if self.redis_url:
            return self.redis_url
        if not self.redis_host:
            raise RuntimeError("Redis is not configured: set REDIS_URL or REDIS_HOST")
        password = self.redis_password.get_secret_value() if self.redis_password else ""
        # Quoted: a password with @ : / # % must not be read as part of the URL.
        auth = f":{quote(password, safe='')}@" if password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/0"

    def redis_display(self) -> str:
        """Where Redis is, without credentials, for logs and the dashboard."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.redis_connection_url())
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"
