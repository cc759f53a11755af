"""Named controller and admin tokens in-process: who a token's holder is, and what that name buys
(its own name on commands, its own rate-limit bucket, the person in the dashboard's audit)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from appliance.app import wire_relay
from appliance.brokers.memory import MemoryBroker
from appliance.settings import Settings
from appliance.tokens import make_token_store
from appliance.tokens.base import Grant, TokenState, TokenVersion, caller_of, role_of
from appliance.tokens.env import EnvTokenStore
from ui.auth import Principal, authenticate, principal_of, session_problem

CONTROLLER, CLIENT, ADMIN = "controller-token-0123456789", "client-token-0123456789", "admin-token-0123456789"


def settings(**extra: Any) -> Settings:
    return Settings(_env_file=None, llm_secret_token=CONTROLLER, unity_client_token=CLIENT, **extra)


def test_named_token_names_grant_their_role_and_name_their_holder():
    assert role_of("controller_tokens/agent-a") == "controller" and role_of("admin_tokens/alice") == "admin"
    assert caller_of("controller_tokens/agent-a") == "agent-a" and caller_of("admin_tokens/alice") == "alice"
    for not_a_token in ("controller_tokens/", "controller_tokens/a/b", "admin_tokens/al ice", "viewer_tokens/x"):
        assert role_of(not_a_token) is None and caller_of(not_a_token) is None
    assert role_of("admin_tokens/" + "a" * 65) is None  # as long as a scoped token's name at most
    # The fixed tokens are nobody in particular unless a setting names them: callers keep their old names.
    assert caller_of("LLM_SECRET_TOKEN") is None and caller_of("client_tokens/lights") is None
    assert caller_of("LLM_SECRET_TOKEN", {"LLM_SECRET_TOKEN": "planner"}) == "planner"
    assert Grant("controller", "LLM_SECRET_TOKEN", 1).actor("http") == "http"
    named = Grant("controller", "controller_tokens/agent-a", 3, caller="agent-a")
    assert named.actor("http") == "agent-a" and named.budget == "controller_tokens/agent-a"


def test_the_settings_name_the_fixed_tokens_and_every_grant_carries_its_holder():
    store = make_token_store(settings(admin_token=ADMIN, controller_token_name="planner", admin_token_name="alice"))
    store.load()
    assert store.lookup(CONTROLLER) == Grant("controller", "LLM_SECRET_TOKEN", 1, caller="planner")
    assert store.lookup(ADMIN) == Grant("admin", "ADMIN_TOKEN", 1, caller="alice")
    assert store.lookup(CLIENT) == Grant("client", "UNITY_CLIENT_TOKEN", 1)
    callers = {entry["name"]: entry["caller"] for entry in store.status()}
    assert callers == {"ADMIN_TOKEN": "alice", "LLM_SECRET_TOKEN": "planner", "UNITY_CLIENT_TOKEN": None}


def test_a_named_token_keeps_its_name_through_a_rotation_grace_window():
    store = EnvTokenStore(settings())
    name = "controller_tokens/agent-a"
    old, new = "agent-a-token-version-one", "agent-a-token-version-two"
    store._publish({name: TokenState(name, "controller", TokenVersion(2, new), TokenVersion(1, old), 2e9)})
    assert store.lookup(old) == Grant("controller", name, 1, caller="agent-a")
    assert store.lookup(new) == Grant("controller", name, 2, caller="agent-a")


@pytest.mark.parametrize("field", ["controller_token_name", "admin_token_name"])
@pytest.mark.parametrize("bad", ["", "al ice", "a/b", "x" * 65])
def test_a_caller_name_setting_is_refused_unless_it_is_a_plain_name(field, bad):
    with pytest.raises(ValidationError):
        settings(**{field: bad})


async def test_each_budget_has_its_own_bucket_and_the_caller_name_reaches_the_client():
    wired = wire_relay(settings(controller_rate_limit=0.01, controller_rate_burst=2), MemoryBroker())
    await wired.relay.start()
    try:
        send = wired.commands.send_command
        first = [(await send("nobody", "m", controller="agent-a", budget="a")).http_status for _ in range(3)]
        other = [(await send("nobody", "m", controller="agent-b", budget="b")).http_status for _ in range(2)]
        third = await send("nobody", "m", controller="agent-b", budget="b")
    finally:
        await wired.relay.stop()
    assert first == [404, 404, 429]  # agent-a spent its burst ...
    assert other == [404, 404] and third.http_status == 429  # ... and agent-b had its own


class _Scope(dict):
    """Enough of a connection for ui.auth: its session and the app state."""

    def __init__(self, session: dict[str, Any]) -> None:
        super().__init__(session=session)
        self.scope = self


def test_a_named_admin_token_signs_in_as_its_person_and_the_session_follows_its_token():
    store = EnvTokenStore(settings())
    name, value = "admin_tokens/alice", "alice-admin-token-0123456789"
    store._publish({name: TokenState(name, "admin", TokenVersion(1, value))})

    class State:
        token_store = store

    State.settings = settings()
    principal = authenticate(State, value)
    assert principal is not None and principal.name == "alice" and principal.token_name == name
    session = {"role": principal.role, "name": name, "actor": "alice", "version": principal.version}
    session.update(created=1e12, seen=1e12)
    assert session_problem(State, session, 1e12) is None
    assert principal_of(_Scope(session)) == Principal("admin", "alice", principal.version, name)
    # A session from before named operators (no "actor") still reads as its token.
    older = {k: v for k, v in session.items() if k != "actor"}
    assert principal_of(_Scope(older)).name == name
    # A new value of alice's token ends her session, as for ADMIN_TOKEN.
    store._publish({name: TokenState(name, "admin", TokenVersion(2, "alice-admin-token-version-two"))})
    assert session_problem(State, session, 1e12) == "token changed"
    assert authenticate(State, value) is None


def test_without_a_token_store_the_admin_token_name_names_the_operator():
    class State:
        pass

    State.settings = settings(admin_token=ADMIN, admin_token_name="bob")
    principal = authenticate(State, ADMIN)
    assert principal is not None and (principal.name, principal.token_name) == ("bob", "ADMIN_TOKEN")
