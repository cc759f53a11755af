"""The OIDC sign-in settings (appliance/settings_oidc.py): off by default, complete or refused, nobody admin by default."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from appliance.settings import Settings

COMPLETE = {
    "public_url": "https://ops.example.com",
    "oidc_issuer": "https://login.example.com/realms/ops",
    "oidc_client_id": "wsbridge-dashboard",
    "oidc_client_secret": "client-secret-0123456789abcdef",
    "oidc_admins": "Alice@Example.com, bob@example.com",
    "oidc_viewers": "victor@example.com",
}


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def test_off_by_default_and_nothing_required():
    plain = settings()
    assert not plain.oidc_enabled and plain.oidc_client_secret is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"oidc_client_id": None}, "OIDC_CLIENT_ID"),
        ({"public_url": None}, "PUBLIC_URL"),
        ({"public_url": None, "oidc_redirect_base_url": "ops.example.com"}, "PUBLIC_URL"),
        ({"oidc_issuer": "http://login.example.com"}, "https://"),
        ({"oidc_admins": "", "oidc_viewers": ""}, "nobody could sign in"),
        ({"oidc_admin_groups": "ops"}, "OIDC_GROUPS_CLAIM"),
    ],
)
def test_an_incomplete_configuration_fails_at_start(change, message):
    with pytest.raises(ValidationError, match=message):
        settings(**{**COMPLETE, **change})


def test_roles_come_from_the_lists_and_groups_and_nobody_else_gets_one():
    configured = settings(**COMPLETE, oidc_groups_claim="groups", oidc_viewer_groups="support")
    assert configured.oidc_enabled
    assert configured.oidc_role("alice@example.com", []) == "admin"  # case-insensitive, spaces trimmed
    assert configured.oidc_role("BOB@example.com", []) == "admin"
    assert configured.oidc_role("victor@example.com", []) == "viewer"
    assert configured.oidc_role("carol@example.com", ["Support"]) == "viewer"
    assert configured.oidc_role("carol@example.com", ["sales"]) is None
    assert configured.oidc_role("", []) is None
    assert settings(**{**COMPLETE, "oidc_issuer": "http://localhost:9400"}).oidc_enabled  # local tests only


def test_the_redirect_uri_comes_from_the_settings_only():
    from ui.oidc import redirect_uri

    assert redirect_uri(settings(**COMPLETE)) == "https://ops.example.com/admin/login/oidc/callback"
    behind = settings(**COMPLETE, oidc_redirect_base_url="https://ops.example.com:8443/")  # the compose stack
    assert redirect_uri(behind) == "https://ops.example.com:8443/admin/login/oidc/callback"


def test_the_client_secret_is_a_secret_and_the_session_version_follows_the_lists():
    configured = settings(**COMPLETE)
    assert COMPLETE["oidc_client_secret"] in configured.secret_values()  # redacted from every log line
    assert COMPLETE["oidc_client_secret"] not in repr(configured)
    assert "" not in settings(**COMPLETE, viewer_token="").secret_values()  # an empty one would redact everything
    fewer = settings(**{**COMPLETE, "oidc_admins": "bob@example.com"})
    assert configured.oidc_session_version() != fewer.oidc_session_version()  # removing alice ends her session
    assert configured.oidc_session_version() == settings(**COMPLETE).oidc_session_version()


def test_an_oidc_session_ends_when_the_oidc_settings_change_or_are_removed():
    from ui.auth import OIDC_SESSION, session_problem

    def state(configured: Settings) -> object:
        class State:
            settings = configured

        return State

    before = settings(**COMPLETE)
    session = {"role": "admin", "name": OIDC_SESSION, "actor": "alice@example.com", "version": ""}
    session.update(version=before.oidc_session_version(), created=1e12, seen=1e12)
    assert session_problem(state(before), session, 1e12) is None
    assert session_problem(state(settings(**{**COMPLETE, "oidc_admins": "bob@example.com"})), session, 1e12)
    assert session_problem(state(settings()), session, 1e12) == "token changed"  # OIDC turned off


def test_an_email_the_provider_marks_unverified_names_nobody():
    from ui.oidc import OidcRefused, operator_of

    configured = settings(**COMPLETE)
    assert operator_of(configured, {"email": "alice@example.com"}) == ("alice@example.com", "admin")
    with pytest.raises(OidcRefused, match="not verified"):
        operator_of(configured, {"email": "alice@example.com", "email_verified": False})
    with pytest.raises(OidcRefused) as caught:
        operator_of(configured, {"sub": "1234"})
    assert caught.value.status == 403 and "did not say who you are" in caught.value.message


def test_an_email_marked_unverified_as_a_string_names_nobody():
    # Some providers (Cognito among them) send the boolean claims as strings.
    from ui.oidc import OidcRefused, operator_of

    configured = settings(**COMPLETE)
    for unverified in ("false", "False"):
        with pytest.raises(OidcRefused, match="not verified"):
            operator_of(configured, {"email": "alice@example.com", "email_verified": unverified})
    assert operator_of(configured, {"email": "alice@example.com", "email_verified": "true"})[1] == "admin"


def test_a_look_alike_name_is_not_the_listed_one():
    # casefold() folds the Kelvin sign to k and the long s to s: a name chosen at the provider
    # must not become a listed admin's by Unicode folding; ASCII letters still ignore case.
    configured = settings(**{**COMPLETE, "oidc_admins": "kate@example.com", "oidc_admin_groups": "ops",
                             "oidc_groups_claim": "groups"})  # fmt: skip
    assert configured.oidc_role("KATE@Example.COM", []) == "admin"
    assert configured.oidc_role("\u212aate@example.com", []) is None
    assert configured.oidc_role("ka\u017fe@example.com", []) is None
    assert configured.oidc_role("x", ["OPS"]) == "admin"
    assert configured.oidc_role("x", ["op\u017f"]) is None


def test_where_to_go_after_sign_in_is_a_printable_dashboard_path():
    # It ends up in the callback's Refresh header (and the token sign-in's Location): a CR/LF there
    # made the server refuse the response (500) after the pending sign-in was used up.
    from ui.pages import _safe_next

    assert _safe_next("/admin/audit?page=2") == "/admin/audit?page=2"
    for bad in (
        "/admin/x\r\nSet-Cookie: a=b",
        "/admin/x\x00",
        "/admin/\tx",
        "/admin/\u20ac",
        "https://evil.example/admin/",
    ):
        assert _safe_next(bad) == "/admin/clients"


def test_the_callbacks_code_and_state_never_reach_a_log_line():
    from appliance.logs import RedactSecrets

    line = '127.0.0.1:5 - "GET /admin/login/oidc/callback?code=one-time-code-123&state=s-456 HTTP/1.1" 200'
    assert RedactSecrets([]).mask(line) == '127.0.0.1:5 - "GET /admin/login/oidc/callback?*** HTTP/1.1" 200'


async def test_a_provider_that_cannot_be_reached_is_not_asked_again_by_every_waiting_sign_in(monkeypatch):
    # The discovery is read under a lock: with the provider down or slow (10 s timeouts), each
    # waiting sign-in asked again in turn, so the tenth waited 100 s. A failure is remembered briefly.
    from ui.oidc import OidcRefused, Provider

    asked = []

    async def unreachable(self: Provider, url: str) -> dict[str, Any]:
        asked.append(url)
        raise OidcRefused("unreachable", "discovery: ConnectTimeout", 502)

    monkeypatch.setattr(Provider, "_get_json", unreachable)
    sso = Provider(settings(**COMPLETE))
    for _ in range(3):
        with pytest.raises(OidcRefused) as caught:
            await sso.metadata()
        assert caught.value.status == 502
    assert len(asked) == 1


def test_a_chosen_username_that_looks_like_an_address_is_not_taken_for_the_email():
    # Providers that let people edit preferred_username would let anyone call themselves alice@...
    from ui.oidc import OidcRefused, operator_of

    configured = settings(**{**COMPLETE, "oidc_viewers": "bob"})
    with pytest.raises(OidcRefused) as caught:
        operator_of(configured, {"preferred_username": "alice@example.com"})
    assert "did not say who you are" in caught.value.message
    assert operator_of(configured, {"preferred_username": "bob"}) == ("bob", "viewer")
    assert (
        operator_of(configured, {"email": "alice@example.com", "preferred_username": "bob"})[0] == "alice@example.com"
    )
