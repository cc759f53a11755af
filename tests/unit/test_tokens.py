"""Token pieces without I/O: the one comparator, grants, the subprotocol negotiation, log redaction."""

from __future__ import annotations

import hmac
import logging
import secrets

import pytest

from appliance.client import FINAL_CLOSE_CODES
from appliance.core.protocol import CLOSE_REASONS, CloseCode, negotiate_subprotocol
from appliance.logs import RedactSecrets, learn_secrets
from appliance.settings import Settings
from appliance.tokens import Grant, TokenStoreNotStarted
from appliance.tokens.base import TokenState, TokenVersion, fingerprint, low_entropy, role_of
from appliance.tokens.env import EnvTokenStore

CONTROLLER, CLIENT, ADMIN = "controller-token-0123456789", "client-token-0123456789", "admin-token-0123456789"


def env_store(**extra) -> EnvTokenStore:
    settings = Settings(_env_file=None, llm_secret_token=CONTROLLER, unity_client_token=CLIENT, **extra)
    store = EnvTokenStore(settings)
    store.load()
    return store


@pytest.mark.parametrize("presented", [CONTROLLER, CLIENT, "wrong-but-long-enough", "", None])
def test_lookup_compares_every_candidate_whatever_matches(monkeypatch, presented):
    """Constant-time in the number of tokens: no early exit when the first candidate matches."""
    store = env_store(admin_token=ADMIN)
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr("appliance.tokens.base.hmac.compare_digest", counting)
    store.lookup(presented)
    if presented:
        assert calls == [(32, 32)] * 3  # SHA-256 digests: equal lengths, so length leaks nothing either
    else:
        assert calls == []


def test_lookup_before_load_fails_loudly():
    store = EnvTokenStore(Settings(_env_file=None, llm_secret_token=CONTROLLER, unity_client_token=CLIENT))
    with pytest.raises(TokenStoreNotStarted, match="before load"):
        store.lookup(CLIENT)


def test_previous_version_is_accepted_until_its_grace_end_only():
    now = [1000.0]
    store = EnvTokenStore(Settings(_env_file=None, llm_secret_token=CONTROLLER, unity_client_token=CLIENT))
    store.clock = lambda: now[0]
    state = TokenState(
        "UNITY_CLIENT_TOKEN", "client", TokenVersion(2, "client-v2-0123456789"), TokenVersion(1, CLIENT), 1010.0
    )
    store._publish({"UNITY_CLIENT_TOKEN": state})
    assert store.lookup(CLIENT) == Grant("client", "UNITY_CLIENT_TOKEN", 1)
    assert store.next_expiry() == 1010.0
    now[0] = 1010.0
    assert store.lookup(CLIENT) is None and store.lookup("client-v2-0123456789") is not None
    assert not store.connection_allowed("UNITY_CLIENT_TOKEN", 1) and store.next_expiry() is None


def test_token_names_and_roles():
    assert role_of("LLM_SECRET_TOKEN") == "controller" and role_of("ADMIN_TOKEN") == "admin"
    assert role_of("client_tokens/lights") == "client"
    assert role_of("REDIS_PASSWORD") is None and role_of("client_tokens/a/b") is None
    assert Grant("client", "client_tokens/x", 1, "lights_*").allows_id("lights_1")
    assert not Grant("client", "client_tokens/x", 1, "lights_*").allows_id("xlights_1")
    key, other = b"k" * 32, b"o" * 32
    assert fingerprint(CLIENT, key) == fingerprint(CLIENT, key) != fingerprint(CONTROLLER, key)
    assert fingerprint(CLIENT, key) != fingerprint(CLIENT, other)  # keyed: no offline guessing without the key
    assert CLIENT not in fingerprint(CLIENT, key) and len(fingerprint(CLIENT, key)) == len("hmac:") + 8


@pytest.mark.parametrize(
    ("value", "weak"),
    [
        (secrets.token_urlsafe(32), False),
        (secrets.token_urlsafe(22), False),  # 132 bits
        (secrets.token_hex(16), False),  # 128 bits
        (secrets.token_hex(12), True),  # 96 bits
        ("12345678901234567890", True),  # a 20-digit PIN: 66 bits
        ("Summer2024!Summer", True),  # 17 printable characters: 111 bits at most
    ],
    ids=["urlsafe-32", "urlsafe-22", "hex-16", "hex-12", "pin-20", "password-17"],  # same ids in every process
)
def test_tokens_with_fewer_than_128_bits_are_named_with_a_clear_line(value, weak):
    problems = low_entropy({"ADMIN_TOKEN": value})
    assert bool(problems) is weak
    if weak:
        assert problems[0].startswith("ADMIN_TOKEN holds at most ") and "ALLOW_WEAK_TOKENS=true" in problems[0]
        assert value not in problems[0]


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        ([], (None, None)),
        (["wsbridge.v1"], (None, "wsbridge.v1")),
        (["wsbridge.token.abc"], ("abc", None)),
        (["wsbridge.v1", "wsbridge.token.abc"], ("abc", "wsbridge.v1")),
        (["wsbridge.token.abc", "wsbridge.v1"], ("abc", "wsbridge.v1")),
        (["chat", "wsbridge.v9"], (None, None)),
    ],
)
def test_subprotocol_negotiation_never_selects_the_token(offered, expected):
    assert negotiate_subprotocol(offered) == expected


def test_token_expired_is_a_documented_final_close_code():
    assert CloseCode.TOKEN_EXPIRED == 4011
    assert "reconnect with the current token" in CLOSE_REASONS[CloseCode.TOKEN_EXPIRED]
    assert CloseCode.TOKEN_EXPIRED in FINAL_CLOSE_CODES


def test_redaction_learns_new_values():
    redact = RedactSecrets([CLIENT])
    handler = logging.StreamHandler()
    handler.addFilter(redact)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        learn_secrets(["rotated-token-0123456789", "short"])
    finally:
        root.removeHandler(handler)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a %s b %s", (CLIENT, "rotated-token-0123456789"), None)
    redact.filter(record)
    assert record.getMessage() == "a *** b ***"
    assert "short" not in redact.secrets  # too short to mask without mangling every line


def test_token_settings_are_read_by_their_agreed_names(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key, value in {
        "TOKEN_STORE": "ssm",
        "SSM_PREFIX": "/WebSocket/staging/",
        "AWS_REGION": "eu-west-1",
        "SSM_ENDPOINT_URL": "http://127.0.0.1:5000",
        "TOKEN_REFRESH_SECONDS": "30",
        "TOKEN_GRACE_SECONDS": "120",
        "TOKEN_ROTATION_ENABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.token_store, settings.ssm_prefix, settings.aws_region) == (
        "ssm",
        "/WebSocket/staging/",
        "eu-west-1",
    )
    assert settings.ssm_endpoint_url == "http://127.0.0.1:5000"
    assert (settings.token_refresh_seconds, settings.token_grace_seconds, settings.token_rotation_enabled) == (
        30,
        120,
        True,
    )


def test_token_settings_defaults_and_validation(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert (settings.token_store, settings.ssm_prefix) == ("env", "/WebSocket/prod/")
    assert (settings.token_refresh_seconds, settings.token_grace_seconds, settings.token_rotation_enabled) == (
        60,
        900,
        False,
    )
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(ssm_prefix="WebSocket/prod")  # must be an absolute path ending in /
    with pytest.raises(ValidationError):
        Settings(token_store="vault")
