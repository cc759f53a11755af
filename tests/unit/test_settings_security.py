"""Start-up refuses unsafe tokens; the Redis URL is a secret everywhere."""

import logging

from appliance.logs import RedactSecrets
from appliance.settings import Settings

STRONG_A, STRONG_B = "controller-token-0123456789", "client-token-0123456789"


def make(monkeypatch, tmp_path, **env):
    monkeypatch.chdir(tmp_path)  # No .env from the developer's tree.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_distinct_strong_tokens_pass(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, LLM_SECRET_TOKEN=STRONG_A, UNITY_CLIENT_TOKEN=STRONG_B)
    assert settings.token_problems() == []


def test_the_same_token_for_both_roles_is_refused(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, LLM_SECRET_TOKEN=STRONG_A, UNITY_CLIENT_TOKEN=STRONG_A)
    assert settings.token_problems() == [
        "LLM_SECRET_TOKEN and UNITY_CLIENT_TOKEN are the same token; every role needs its own"
    ]


def test_the_admin_token_must_differ_too(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, LLM_SECRET_TOKEN=STRONG_A, UNITY_CLIENT_TOKEN=STRONG_B, ADMIN_TOKEN=STRONG_B)
    assert settings.token_problems() == [
        "UNITY_CLIENT_TOKEN and ADMIN_TOKEN are the same token; every role needs its own"
    ]


def test_a_token_shorter_than_the_minimum_is_refused(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, LLM_SECRET_TOKEN="short-token-15c", UNITY_CLIENT_TOKEN=STRONG_B)
    assert settings.token_problems() == ["LLM_SECRET_TOKEN is shorter than 16 characters"]


def test_the_redis_url_is_not_in_repr(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, REDIS_URL="redis://:hunter2-redis-password@cache:6380/0")
    assert "hunter2-redis-password" not in repr(settings)
    assert "hunter2-redis-password" not in str(settings.model_dump())
    assert settings.redis_connection_url() == "redis://:hunter2-redis-password@cache:6380/0"
    assert settings.redis_display() == "redis://cache:6380"


def test_the_redis_url_and_its_password_are_masked_in_logs(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, REDIS_URL="redis://:hunter2-redis-password@cache:6380/0")
    mask = RedactSecrets(settings.secret_values())
    for text in ("redis://:hunter2-redis-password@cache:6380/0", "auth hunter2-redis-password failed"):
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "%s", (text,), None)
        mask.filter(record)
        assert "hunter2" not in record.getMessage()


def test_tracebacks_are_masked_too():
    mask = RedactSecrets(["s3cret-token-in-a-traceback"])
    try:
        raise ConnectionError("could not connect with s3cret-token-in-a-traceback")
    except ConnectionError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, __import__("sys").exc_info())
    mask.filter(record)
    formatted = logging.Formatter().format(record)
    assert "ConnectionError: could not connect with ***" in formatted
    assert "s3cret" not in formatted


def test_a_refused_redis_url_is_not_repeated_in_the_error(monkeypatch, tmp_path):
    """Settings() raised anywhere (a traceback, a test report) must not print the password it refused."""
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        make(monkeypatch, tmp_path, REDIS_URL="notaurl://:hunter2-redis-password@cache:6380/0")
    assert "REDIS_URL" in str(refused.value).upper()
    assert "hunter2-redis-password" not in str(refused.value)


def test_the_connection_url_built_from_redis_host_is_masked_whole(monkeypatch, tmp_path):
    """REDIS_HOST + REDIS_PASSWORD: the URL the appliance builds holds the password URL-quoted,
    a form the raw password does not match."""
    settings = make(monkeypatch, tmp_path, REDIS_HOST="cache", REDIS_PASSWORD="p@ss:w0rd/hunter2#%41")
    masked = RedactSecrets(settings.secret_values()).mask(f"cannot reach {settings.redis_connection_url()}")
    assert "hunter2" not in masked and "w0rd" not in masked, masked
