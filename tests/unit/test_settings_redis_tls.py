"""REDIS_TLS_CA_FILE: accepted with rediss:// only, passed to every client; a certificate failure said plainly."""

import ssl

import pytest
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError

from appliance.brokers.redis import RedisTarget
from appliance.brokers.redis.link import reason
from appliance.settings import Settings


def make(monkeypatch, tmp_path, **env):
    monkeypatch.chdir(tmp_path)  # No .env from the developer's tree.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_the_ca_file_reaches_the_target_and_the_clients(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = make(
        monkeypatch, tmp_path, REDIS_URL="rediss://:pw-123456789@cache.internal:6379/0", REDIS_TLS_CA_FILE=str(ca)
    )
    target = RedisTarget.from_settings(settings)
    assert target.tls_ca_file == str(ca)
    client = target.sync_client()
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(ca)


def test_redis_tls_turns_redis_host_into_rediss(monkeypatch, tmp_path):
    settings = make(
        monkeypatch, tmp_path, REDIS_HOST="primary.cache.internal", REDIS_PASSWORD="auth-123456789", REDIS_TLS="true"
    )
    assert settings.redis_connection_url() == "rediss://:auth-123456789@primary.cache.internal:6379/0"
    assert settings.redis_display() == "rediss://primary.cache.internal:6379"


def test_the_ca_file_is_refused_without_tls_or_when_unreadable(monkeypatch, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ValidationError, match="REDIS_TLS_CA_FILE needs a rediss:// REDIS_URL"):
        make(monkeypatch, tmp_path, REDIS_URL="redis://cache.internal:6379/0", REDIS_TLS_CA_FILE=str(ca))
    with pytest.raises(ValidationError, match="is not a readable file"):
        make(monkeypatch, tmp_path, REDIS_URL="rediss://cache.internal:6379/0", REDIS_TLS_CA_FILE=str(tmp_path / "no"))


def test_a_certificate_failure_is_named_without_the_errors_text():
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] at cache.internal:6379")
        except ssl.SSLError as exc:
            raise RedisConnectionError("Error connecting to cache.internal:6379") from exc
    except RedisConnectionError as exc:
        said = reason(exc)
    assert said == "ConnectionError: TLS certificate verify failed, check REDIS_TLS_CA_FILE"
    assert reason(RedisConnectionError("Error 111 connecting to cache.internal:6379")) == "ConnectionError"
