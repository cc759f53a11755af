import pytest
from pydantic import ValidationError

from appliance.settings import Settings


def make(monkeypatch, tmp_path, **env):
    monkeypatch.chdir(tmp_path)  # No .env from the developer's tree.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_seed_variable_names_are_read(monkeypatch, tmp_path):
    settings = make(
        monkeypatch,
        tmp_path,
        LLM_SECRET_TOKEN="a",
        UNITY_CLIENT_TOKEN="b",
        REDIS_HOST="redis",
        REDIS_PASSWORD="pw",
        WEB_SOCKET_PORT="9000",
        LOG_LEVEL="debug",
    )
    assert settings.llm_secret_token.get_secret_value() == "a"
    assert settings.unity_client_token.get_secret_value() == "b"
    assert settings.web_socket_port == 9000
    assert settings.log_level == "DEBUG"
    assert settings.redis_connection_url() == "redis://:pw@redis:6379/0"


def test_dotenv_file_is_read(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("LLM_SECRET_TOKEN=from-file\nDUPLICATE_POLICY=reject\n")
    settings = make(monkeypatch, tmp_path)
    assert settings.llm_secret_token.get_secret_value() == "from-file"
    assert settings.duplicate_policy == "reject"


def test_redis_url_wins_and_display_hides_password(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, REDIS_URL="redis://:secret@cache:6380/0", REDIS_HOST="other")
    assert settings.redis_enabled
    assert settings.redis_connection_url() == "redis://:secret@cache:6380/0"
    assert settings.redis_display() == "redis://cache:6380"


def test_embedded_by_default(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path)
    assert not settings.redis_enabled
    assert (settings.max_message_bytes, settings.client_rate_limit, settings.client_rate_burst) == (65536, 1000, 2000)
    assert settings.controller_rate_limit == 0


def test_secrets_do_not_show_in_repr(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, LLM_SECRET_TOKEN="top-secret-value")
    assert "top-secret-value" not in repr(settings)


def test_invalid_values_are_refused(monkeypatch, tmp_path):
    with pytest.raises(ValidationError):
        make(monkeypatch, tmp_path, DUPLICATE_POLICY="sometimes")
    with pytest.raises(ValidationError):
        make(monkeypatch, tmp_path, WEB_SOCKET_PORT="70000")


def test_redis_password_with_url_characters_is_quoted(monkeypatch, tmp_path):
    settings = make(monkeypatch, tmp_path, REDIS_HOST="redis", REDIS_PASSWORD="p@ss:w0rd/x#%41")
    assert settings.redis_connection_url() == "redis://:p%40ss%3Aw0rd%2Fx%23%2541@redis:6379/0"
    assert settings.redis_display() == "redis://redis:6379"


def test_instance_id_cannot_break_owner_encoding(monkeypatch, tmp_path):
    with pytest.raises(ValidationError):
        make(monkeypatch, tmp_path, INSTANCE_ID="web|1")


def test_an_idempotency_window_shorter_than_the_longest_command_is_refused(monkeypatch, tmp_path):
    # A key that expired while its command still ran would let a retry send the command again.
    with pytest.raises(ValidationError, match="IDEMPOTENCY_WINDOW_SECONDS must outlast COMMAND_TIMEOUT_MAX_MS"):
        make(monkeypatch, tmp_path, IDEMPOTENCY_WINDOW_SECONDS="60", COMMAND_TIMEOUT_MAX_MS="120000")
    settings = make(monkeypatch, tmp_path, IDEMPOTENCY_WINDOW_SECONDS="120", COMMAND_TIMEOUT_MAX_MS="120000")
    assert settings.idempotency_window_seconds * 1000 == settings.command_timeout_max_ms
