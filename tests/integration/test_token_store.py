"""The token-store contract against both backends (env, and SSM on a real moto server), then SSM specifics:
refresh, rotation labels and grace windows, revocation, the 100-version limit, scoped tokens, outages."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError
from moto_support import REGION, MotoServer, seed, unique_prefix

from appliance import metrics
from appliance.settings import Settings
from appliance.tokens import Grant, TokenStoreError, TokenStoreUnavailable, make_token_store
from appliance.tokens.base import fingerprint
from appliance.tokens.env import EnvTokenStore
from appliance.tokens.ssm import SsmTokenStore

CONTROLLER, CLIENT, ADMIN = "controller-token-0123456789", "client-token-0123456789", "admin-token-0123456789"
SEED = {"LLM_SECRET_TOKEN": CONTROLLER, "UNITY_CLIENT_TOKEN": CLIENT, "ADMIN_TOKEN": ADMIN}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3's default chain reads these, as it reads the instance profile in production."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


class Clock:
    """The stores take their clock as a parameter; tests move it instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def ssm_store(moto: MotoServer, prefix: str, grace: float = 900.0, clock: Clock | None = None) -> SsmTokenStore:
    return SsmTokenStore(prefix, region=REGION, endpoint_url=moto.url, grace_seconds=grace, clock=clock or time.time)


@pytest.fixture(params=["env", "ssm"])
def store(request: pytest.FixtureRequest):
    """One contract, two backends: the same tests run against both."""
    if request.param == "env":
        store = EnvTokenStore(
            Settings(_env_file=None, llm_secret_token=CONTROLLER, unity_client_token=CLIENT, admin_token=ADMIN)
        )
    else:
        moto = request.getfixturevalue("moto")
        prefix = unique_prefix()
        seed(moto.ssm(), prefix, {**SEED, "REDIS_PASSWORD": "redis-password-not-a-token"})
        store = ssm_store(moto, prefix)
    store.load()
    return store


# --- the contract -----------------------------------------------------------------------------


def test_each_token_grants_its_role(store):
    assert store.lookup(CONTROLLER) == Grant("controller", "LLM_SECRET_TOKEN", 1)
    assert store.lookup(CLIENT) == Grant("client", "UNITY_CLIENT_TOKEN", 1)
    assert store.lookup(ADMIN) == Grant("admin", "ADMIN_TOKEN", 1)


@pytest.mark.parametrize("presented", [None, "", "wrong", CLIENT + "x", CLIENT[:-1], "redis-password-not-a-token"])
def test_anything_else_grants_nothing(store, presented):
    assert store.lookup(presented) is None


def test_status_shows_versions_and_fingerprints_never_values(store):
    entries = {e["name"]: e for e in store.status()}
    assert set(entries) == {"LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN"}
    client = entries["UNITY_CLIENT_TOKEN"]
    assert (client["version"], client["fingerprint"], client["previous_version"]) == (
        1,
        fingerprint(CLIENT, store.fingerprint_key),
        None,
    )
    text = json.dumps(store.status())
    assert CONTROLLER not in text and CLIENT not in text and ADMIN not in text


def test_current_versions_keep_their_connections(store):
    assert store.connection_allowed("UNITY_CLIENT_TOKEN", 1)
    assert not store.connection_allowed("UNITY_CLIENT_TOKEN", 2)
    assert not store.connection_allowed("NO_SUCH_TOKEN", 1)


def test_env_store_needs_no_aws_configuration_at_all():
    settings = Settings(_env_file=None, llm_secret_token=CONTROLLER, unity_client_token=CLIENT)
    store = make_token_store(settings)
    assert isinstance(store, EnvTokenStore)  # boto3 is not even imported for it (see test_token_rotation)
    store.load()
    assert store.lookup(CLIENT) is not None and store.health() == {"store": "env", "ok": True}


def test_env_store_without_tokens_is_a_clear_error():
    with pytest.raises(TokenStoreUnavailable, match="LLM_SECRET_TOKEN and UNITY_CLIENT_TOKEN must both be set"):
        EnvTokenStore(Settings(_env_file=None, llm_secret_token=CONTROLLER)).load()


# --- SSM ---------------------------------------------------------------------------------------


def test_ssm_refresh_picks_up_a_changed_value(moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    store = ssm_store(moto, prefix)
    store.load()
    changes = []
    store.on_change(lambda: changes.append(1))
    moto.ssm().put_parameter(
        Name=prefix + "ADMIN_TOKEN", Value="admin-token-version-2", Type="SecureString", Overwrite=True
    )
    assert store.lookup("admin-token-version-2") is None  # cached until the next refresh
    import asyncio

    assert asyncio.run(store.refresh())
    assert store.lookup("admin-token-version-2") == Grant("admin", "ADMIN_TOKEN", 2)
    # A manual overwrite (no rotation labels) has no grace window: the old value is refused at once.
    assert store.lookup(ADMIN) is None and changes == [1]


def test_ssm_rotation_keeps_the_previous_version_for_the_grace_window(moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    clock = Clock()
    store = ssm_store(moto, prefix, grace=600, clock=clock)
    store.load()
    assert store.write_rotation("UNITY_CLIENT_TOKEN", "client-token-version-two", keep_connections=False) == 2
    store.load()
    assert store.lookup("client-token-version-two") == Grant("client", "UNITY_CLIENT_TOKEN", 2)
    assert store.lookup(CLIENT) == Grant("client", "UNITY_CLIENT_TOKEN", 1)  # old and new both accepted
    assert store.connection_allowed("UNITY_CLIENT_TOKEN", 1)
    state = store.states["UNITY_CLIENT_TOKEN"]
    assert state.grace_ends == pytest.approx(state.current.modified_at + 600)
    assert store.next_expiry() == state.grace_ends
    # SSM holds the rotation state: labels any instance (or a restart) reads the same way.
    history = moto.ssm().get_parameter_history(Name=prefix + "UNITY_CLIENT_TOKEN")["Parameters"]
    assert {h["Version"]: h.get("Labels", []) for h in history} == {1: ["previous"], 2: ["current"]}
    clock.offset = 601  # the grace window is over
    assert store.lookup(CLIENT) is None
    assert not store.connection_allowed("UNITY_CLIENT_TOKEN", 1)
    assert store.lookup("client-token-version-two") is not None


def test_ssm_keep_connections_survives_the_grace_window_for_open_connections_only(moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    clock = Clock()
    store = ssm_store(moto, prefix, grace=60, clock=clock)
    store.write_rotation("UNITY_CLIENT_TOKEN", "client-token-version-two", keep_connections=True)
    store.load()
    clock.offset = 61
    assert store.lookup(CLIENT) is None  # no new connections with the old token
    assert store.connection_allowed("UNITY_CLIENT_TOKEN", 1)  # but the open ones stay
    store.write_rotation("UNITY_CLIENT_TOKEN", "client-token-version-three", keep_connections=False)
    store.load()
    assert not store.connection_allowed("UNITY_CLIENT_TOKEN", 1)  # until the next rotation


def test_ssm_revocation_ends_the_grace_window(moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    store = ssm_store(moto, prefix, grace=600)
    store.write_rotation("LLM_SECRET_TOKEN", "controller-token-version-two", keep_connections=True)
    store.load()
    assert store.lookup(CONTROLLER) is not None
    assert store.end_grace("LLM_SECRET_TOKEN") == 1
    store.load()
    assert store.lookup(CONTROLLER) is None
    assert not store.connection_allowed("LLM_SECRET_TOKEN", 1)
    assert store.end_grace("LLM_SECRET_TOKEN") is None  # nothing left to revoke


def test_a_manual_overwrite_after_a_rotation_never_revives_the_old_token(moto):
    prefix = unique_prefix()
    ssm = moto.ssm()
    seed(ssm, prefix, SEED)
    store = ssm_store(moto, prefix, grace=600)
    store.write_rotation("UNITY_CLIENT_TOKEN", "client-token-version-two", keep_connections=False)
    ssm.put_parameter(
        Name=prefix + "UNITY_CLIENT_TOKEN", Value="client-token-by-hand", Type="SecureString", Overwrite=True
    )
    store.load()
    assert store.lookup("client-token-by-hand") is not None
    assert store.lookup(CLIENT) is None and store.lookup("client-token-version-two") is None


def test_ssm_rotation_past_the_100_version_limit(moto):
    prefix = unique_prefix()
    ssm = moto.ssm()
    name = prefix + "ADMIN_TOKEN"
    seed(ssm, prefix, SEED)
    for i in range(2, 101):
        ssm.put_parameter(Name=name, Value=f"admin-token-{i:04d}-filler", Type="SecureString", Overwrite=True)
    ssm.label_parameter_version(Name=name, ParameterVersion=1, Labels=["audited"])
    # The limit is real on this server: a labelled oldest version blocks a plain overwrite.
    with pytest.raises(ClientError, match="ParameterMaxVersionLimitExceeded"):
        ssm.put_parameter(Name=name, Value="admin-token-blocked", Type="SecureString", Overwrite=True)
    store = ssm_store(moto, prefix)
    assert store.write_rotation("ADMIN_TOKEN", "admin-token-rotated-past-100", keep_connections=False) == 101
    store.load()
    assert store.lookup("admin-token-rotated-past-100") == Grant("admin", "ADMIN_TOKEN", 101)
    assert store.lookup("admin-token-0100-filler") is not None  # its grace window
    # And again: rotation keeps working once the history is full.
    assert store.write_rotation("ADMIN_TOKEN", "admin-token-rotated-again", keep_connections=False) == 102


def test_scoped_client_token_is_bound_to_its_id_pattern_and_rotation_keeps_it(moto):
    prefix = unique_prefix()
    ssm = moto.ssm()
    seed(ssm, prefix, SEED)
    seed(
        ssm,
        prefix,
        {
            "client_tokens/lights": json.dumps(
                {"ids": "lights_*", "groups": ["lights"], "token": "lights-token-0123456789"}
            ),
            "client_tokens/plain": json.dumps({"ids": "plain_*", "token": "plain-token-0123456789"}),
            "client_tokens/badgroups": json.dumps({"ids": "x_*", "groups": "lights", "token": "bad-token-0123456789"}),
        },
    )
    seed(ssm, prefix, {"client_tokens/broken": "not json"})
    store = ssm_store(moto, prefix)
    store.load()
    grant = store.lookup("lights-token-0123456789")
    assert grant == Grant("client", "client_tokens/lights", 1, "lights_*", ("lights",))
    assert grant.allows_id("lights_kitchen") and not grant.allows_id("door_1")
    assert grant.allows_groups(("lights",)) and not grant.allows_groups(("lights", "doors"))
    assert store.lookup("plain-token-0123456789").groups == ()  # no "groups": no group at all
    assert store.lookup(CLIENT).groups is None  # the shared client token: any group
    assert "client_tokens/broken" not in store.states  # ignored with a warning, not fatal
    assert "client_tokens/badgroups" not in store.states
    store.write_rotation("client_tokens/lights", "lights-token-version-two", keep_connections=False)
    store.load()
    assert store.lookup("lights-token-version-two") == Grant(
        "client", "client_tokens/lights", 2, "lights_*", ("lights",)
    )
    stored = ssm.get_parameter(Name=prefix + "client_tokens/lights", WithDecryption=True)["Parameter"]
    assert json.loads(stored["Value"]) == {"ids": "lights_*", "groups": ["lights"], "token": "lights-token-version-two"}
    assert stored["Type"] == "SecureString"


def test_rotation_of_something_that_is_not_a_token_is_refused(moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, {**SEED, "REDIS_PASSWORD": "redis-password-not-a-token"})
    store = ssm_store(moto, prefix)
    with pytest.raises(TokenStoreError, match="not a token name"):
        store.write_rotation("REDIS_PASSWORD", "x" * 40, keep_connections=False)
    with pytest.raises(TokenStoreError, match="no SSM parameter"):
        store.write_rotation("VIEWER_TOKEN", "x" * 40, keep_connections=False)


def test_missing_required_parameter_is_a_clear_error(moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, {"LLM_SECRET_TOKEN": CONTROLLER})
    with pytest.raises(TokenStoreUnavailable, match=f"missing SSM parameter.*{prefix}UNITY_CLIENT_TOKEN"):
        ssm_store(moto, prefix).load()


def test_ssm_unreachable_at_start_is_one_clear_error():
    from support import free_port

    store = SsmTokenStore("/x/", region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TokenStoreUnavailable) as raised:
        store.load()
    assert "\n" not in str(raised.value) and "cannot read /x/ from SSM" in str(raised.value)


def test_failed_refresh_keeps_the_last_good_tokens_and_says_so(caplog):
    moto = MotoServer().start()  # its own server: this test stops it
    try:
        prefix = unique_prefix()
        seed(moto.ssm(), prefix, SEED)
        store = ssm_store(moto, prefix)
        store.load()
        assert store.health()["ok"] is True
    finally:
        moto.stop()
    failures = metrics.TOKEN_REFRESH_FAILURES._value.get()
    import asyncio

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(store.refresh()) is False
    assert store.lookup(CLIENT) == Grant("client", "UNITY_CLIENT_TOKEN", 1)  # last good values kept
    health = store.health()
    assert health["ok"] is False and "serving the last good tokens" in health["error"]
    assert metrics.TOKEN_REFRESH_FAILURES._value.get() == failures + 1
    assert metrics.TOKEN_STORE_UP._value.get() == 0
    assert "keeping the last good tokens" in caplog.text
    assert CLIENT not in caplog.text and CONTROLLER not in caplog.text


async def test_service_rotation_teaches_the_log_filter_and_is_audited(moto):
    from appliance.audit import MemoryAuditLog
    from appliance.logs import RedactSecrets
    from appliance.tokens.service import TokenService

    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    settings = Settings(
        _env_file=None, token_store="ssm", ssm_prefix=prefix, token_rotation_enabled=True, token_grace_seconds=60
    )
    store = ssm_store(moto, prefix, grace=60)
    store.load()
    audit = MemoryAuditLog()
    service = TokenService(settings, store, audit)
    redact = RedactSecrets([])
    handler = logging.StreamHandler()
    handler.addFilter(redact)
    logging.getLogger().addHandler(handler)
    try:
        await service.start()
        value = await service.rotate("ADMIN_TOKEN", "tester", "127.0.0.1")
        assert store.lookup(value) == Grant("admin", "ADMIN_TOKEN", 2)  # re-read at once by the rotating process
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "leaked %s", (value,), None)
        redact.filter(record)
        assert record.getMessage() == "leaked ***"
        assert await service.revoke("ADMIN_TOKEN", "tester", "127.0.0.1") == 1
        assert store.lookup(ADMIN) is None
    finally:
        await service.stop()
        logging.getLogger().removeHandler(handler)
    events = await audit.recent()
    assert [(e.action, e.actor, e.source, e.target) for e in events] == [
        ("token.revoke", "tester", "127.0.0.1", "ADMIN_TOKEN"),
        ("token.rotate", "tester", "127.0.0.1", "ADMIN_TOKEN"),
    ]
    assert events[1].detail == {"version": 2, "grace_seconds": 60.0, "keep_connections": False}
    assert value not in repr(events)


def test_named_controller_and_admin_tokens_come_from_ssm_with_their_names_and_rotate(moto):
    prefix = unique_prefix()
    ssm = moto.ssm()
    seed(ssm, prefix, SEED)
    seed(
        ssm, prefix, {"controller_tokens/agent-a": "agent-a-token-0123456789", "admin_tokens/alice": "alice-0123456789"}
    )
    settings = Settings(
        _env_file=None,
        token_store="ssm",
        ssm_prefix=prefix,
        aws_region=REGION,
        ssm_endpoint_url=moto.url,
        controller_token_name="planner",
    )
    store = make_token_store(settings)
    store.load()
    assert store.lookup("agent-a-token-0123456789") == Grant(
        "controller", "controller_tokens/agent-a", 1, caller="agent-a"
    )
    assert store.lookup("alice-0123456789") == Grant("admin", "admin_tokens/alice", 1, caller="alice")
    assert store.lookup(CONTROLLER) == Grant("controller", "LLM_SECRET_TOKEN", 1, caller="planner")
    assert store.lookup(ADMIN) == Grant("admin", "ADMIN_TOKEN", 1)  # unnamed: the audit says ADMIN_TOKEN
    listed = {entry["name"]: entry["caller"] for entry in store.status()}
    assert listed["controller_tokens/agent-a"] == "agent-a" and listed["admin_tokens/alice"] == "alice"
    store.write_rotation("controller_tokens/agent-a", "agent-a-token-version-two", keep_connections=False)
    store.load()
    assert store.lookup("agent-a-token-version-two") == Grant(
        "controller", "controller_tokens/agent-a", 2, caller="agent-a"
    )
    assert store.lookup("agent-a-token-0123456789").version == 1  # in its grace window, under the same name
    stored = ssm.get_parameter(Name=prefix + "controller_tokens/agent-a", WithDecryption=True)["Parameter"]
    assert stored["Value"] == "agent-a-token-version-two" and stored["Type"] == "SecureString"  # the token itself
