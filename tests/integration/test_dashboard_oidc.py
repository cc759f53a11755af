"""OpenID Connect sign-in to the dashboard against a real OpenID provider (oidc-provider-mock, in a thread).

The appliance runs in-process (Litestar's TestClient: the real app, its session, CSRF and audit);
the provider is a real one on a socket, with a registered confidential client, its own signing key
and its own one-time codes. Nothing of ours is replaced: the browser's part (following redirects,
clicking "Authorize") is done with httpx, and tests/browser/test_dashboard_oidc_browser.py does it
in Chromium once.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import oidc_provider_mock
import pytest
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.settings import Settings
from ui.oidc import CALLBACK, OidcRefused, Pending, Provider, verify_id_token

ADMIN = "a" * 32
PUBLIC = "http://testserver.local"  # TestClient's base URL: what PUBLIC_URL says users reach.


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    with oidc_provider_mock.run_server_in_thread(require_client_registration=True, require_nonce=True) as server:
        url = f"http://localhost:{server.server_port}"
        people = {
            "alice@example.com": {"email": "alice@example.com", "groups": []},
            "victor@example.com": {"email": "victor@example.com"},
            "olga": {"email": "olga@example.com", "groups": ["ops"]},
            "mallory@example.com": {"email": "mallory@example.com", "groups": ["sales"]},
        }
        for sub, claims in people.items():
            assert httpx.put(f"{url}/users/{quote(sub)}", json=claims).status_code == 204
        yield url


def register(provider: str, redirect: str = PUBLIC + CALLBACK) -> tuple[str, str]:
    answer = httpx.post(f"{provider}/oauth2/clients", json={"redirect_uris": [redirect]})
    assert answer.status_code == 201, answer.text
    return answer.json()["client_id"], answer.json()["client_secret"]


@pytest.fixture(scope="module")
def client_credentials(provider) -> tuple[str, str]:
    return register(provider)


def oidc_settings(provider: str, client_id: str, secret: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "llm_secret_token": "c" * 32,
        "unity_client_token": "u" * 32,
        "admin_token": ADMIN,
        "instance_id": "oidc",
        "public_url": PUBLIC,
        "oidc_issuer": provider,
        "oidc_client_id": client_id,
        "oidc_client_secret": secret,
        "oidc_provider_name": "Example SSO",
        "oidc_admins": "Alice@Example.com",
        "oidc_viewers": "victor@example.com",
        "oidc_groups_claim": "groups",
        "oidc_admin_groups": "ops",
    }
    return Settings(_env_file=None, **(values | extra))


@pytest.fixture(scope="module")
def app(provider, client_credentials) -> Iterator[TestClient]:
    with TestClient(create_app(oidc_settings(provider, *client_credentials))) as client:
        yield client


def authorize(location: str, sub: str) -> str:
    """The person at the provider's form: signs in as ``sub``; the provider sends the browser back."""
    answer = httpx.post(location, data={"sub": sub}, follow_redirects=False)
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def start(client: TestClient, next_path: str = "/admin/audit") -> str:
    answer = client.get(f"/admin/login/oidc?next={next_path}", follow_redirects=False)
    assert answer.status_code == 303, answer.text
    return answer.headers["location"]


def back(client: TestClient, callback_url: str) -> Any:
    parts = urlsplit(callback_url)
    assert f"{parts.scheme}://{parts.netloc}" == PUBLIC  # from PUBLIC_URL, not the Host header
    return client.get(f"{parts.path}?{parts.query}", follow_redirects=False)


def sign_in(client: TestClient, sub: str) -> Any:
    client.cookies.clear()
    return back(client, authorize(start(client), sub))


def audit(client: TestClient) -> list[Any]:
    assert client.blocking_portal is not None
    return client.blocking_portal.call(client.app.state.audit.recent)


#: The appliance's own loggers (the provider and the test's stand-in browser share the process).
OURS = ("ui", "appliance", "litestar", "uvicorn", "httpx2", "authlib.integrations")


def our_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in OURS or r.name in OURS)


def test_the_sign_in_page_offers_the_provider_and_the_flow_carries_pkce_state_and_nonce(app, client_credentials):
    app.cookies.clear()
    page = app.get("/admin/login")
    assert "Sign in with Example SSO" in page.text and 'name="token"' in page.text  # the token sign-in stays
    query = parse_qs(urlsplit(start(app)).query)
    assert query["client_id"] == [client_credentials[0]] and query["response_type"] == ["code"]
    assert query["redirect_uri"] == [PUBLIC + CALLBACK]
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert len(query["state"][0]) >= 32 and len(query["nonce"][0]) >= 32 and "openid" in query["scope"][0].split()
    pending_id = app.cookies.get("wsb_oidc")
    assert pending_id and pending_id not in query["state"][0]
    # What the callback will check is kept on the server: the same state and nonce, the verifier of the challenge.
    store = app.app.state.dashboard.session_config.get_store_from_app(app.app)
    assert app.blocking_portal is not None
    kept = json.loads(app.blocking_portal.call(store.get, f"oidc-pending:{pending_id}"))
    assert (kept["state"], kept["nonce"]) == (query["state"][0], query["nonce"][0])
    assert create_s256_code_challenge(kept["verifier"]) == query["code_challenge"][0]


def test_an_allowed_person_gets_a_dashboard_session_and_the_audit_names_them(app, caplog):
    caplog.set_level(logging.DEBUG)
    done = sign_in(app, "alice@example.com")
    assert done.status_code == 200 and "Signed in as alice@example.com" in done.text
    assert done.headers["refresh"] == "0;url=/admin/audit"  # the page moves on by itself (SameSite=Strict)
    session_cookie = done.cookies.get("wsb_session") or app.cookies.get("wsb_session")
    assert session_cookie
    page = app.get("/admin/audit")
    assert page.status_code == 200 and 'title="signed in with alice@example.com"' in page.text
    assert ">admin<" in page.text
    login = next(e for e in audit(app) if e.action == "login")
    assert (login.actor, login.detail) == ("alice@example.com", {"role": "admin", "via": "oidc"})
    # Same session as a token sign-in: a CSRF-checked action works, then sign-out ends it.
    csrf = page.text.split('name="_csrf_token" value="', 1)[1].split('"', 1)[0]
    out = app.post("/admin/logout", data={"_csrf_token": csrf}, follow_redirects=False)
    assert out.status_code == 303 and app.get("/admin/audit", follow_redirects=False).status_code in (302, 303)
    assert next(e for e in audit(app) if e.action == "logout").actor == "alice@example.com"


def test_groups_and_the_viewer_list_give_their_roles(app):
    assert sign_in(app, "olga").status_code == 200  # named by her email claim, admin by the ops group
    assert 'title="signed in with olga@example.com"' in app.get("/admin/clients").text
    assert sign_in(app, "victor@example.com").status_code == 200
    page = app.get("/admin/clients")
    assert ">viewer<" in page.text
    assert app.post("/admin/logout", data={}, follow_redirects=False).status_code == 403  # no CSRF token: refused


def test_a_person_not_on_the_allow_list_is_refused_with_a_clear_page_and_no_session(app):
    refused = sign_in(app, "mallory@example.com")
    assert refused.status_code == 403
    assert "mallory@example.com may not sign in to this dashboard" in refused.text
    assert app.get("/admin/clients", follow_redirects=False).status_code in (302, 303)
    event = next(e for e in audit(app) if e.action == "login.failed")
    assert event.actor == "mallory@example.com" and event.detail["detail"] == "not on the allow-list"


def test_a_wrong_state_a_replayed_callback_and_a_replayed_code_are_refused_and_never_logged(app, caplog):
    caplog.set_level(logging.DEBUG)
    app.cookies.clear()
    callback = authorize(start(app), "alice@example.com")
    code = parse_qs(urlsplit(callback).query)["code"][0]
    wrong = back(app, callback.replace("state=", "state=x"))
    assert wrong.status_code == 400 and "expired or was already used" in wrong.text
    # The pending sign-in was spent by the wrong state: the right callback now finds nothing either.
    assert back(app, callback).status_code == 400
    # A fresh sign-in that carries a code already exchanged: the provider refuses it.
    app.cookies.clear()
    fresh = authorize(start(app), "alice@example.com")
    assert back(app, fresh).status_code == 200
    fresh_code = parse_qs(urlsplit(fresh).query)["code"][0]
    state = parse_qs(urlsplit(start(app)).query)["state"][0]
    replayed = back(app, f"{PUBLIC}{CALLBACK}?code={fresh_code}&state={state}")
    assert replayed.status_code == 400 and "did not accept this sign-in" in replayed.text
    reasons = [e.detail["detail"] for e in audit(app) if e.action == "login.failed"]
    assert "state mismatch" in reasons and "token endpoint: invalid_grant" in reasons
    # Neither the codes nor the client secret reach the log or the audit trail.
    secret = app.app.state.settings.oidc_client_secret.get_secret_value()
    trail = repr([e.as_dict() for e in audit(app)])
    for value in (code, fresh_code, secret):
        assert value not in our_log(caplog) and value not in trail


def test_the_provider_saying_no_is_shown(app):
    app.cookies.clear()
    location = start(app)
    denied = httpx.post(location, data={"action": "deny"}, follow_redirects=False)
    answer = back(app, denied.headers["location"])
    assert answer.status_code == 403 and "refused the sign-in (access_denied)" in answer.text
    # A link of anybody's making carries its own text as `error`: the page never repeats it.
    app.cookies.clear()
    state = parse_qs(urlsplit(start(app)).query)["state"][0]
    crafted = app.get(f"/admin/login/oidc/callback?state={state}&error=Call+ACME+support+on+555-0100")
    assert crafted.status_code == 403 and "555-0100" not in crafted.text and "unrecognised error" in crafted.text


def test_without_oidc_settings_nothing_changes():
    settings = Settings(_env_file=None, llm_secret_token="c" * 32, unity_client_token="u" * 32, admin_token=ADMIN)
    with TestClient(create_app(settings)) as client:
        assert "Sign in with" not in client.get("/admin/login").text
        assert client.get("/admin/login/oidc", follow_redirects=False).status_code == 404


# --- the ID token checks, on tokens the real provider issued ------------------------------------


def issued(provider: str, client_id: str, secret: str, nonce: str = "n-0123456789") -> dict[str, Any]:
    """A token response for ``client_id``, as the provider gives it after alice signs in."""
    query = {"client_id": client_id, "response_type": "code", "scope": "openid email", "nonce": nonce}
    query |= {"redirect_uri": PUBLIC + CALLBACK, "state": "s"}
    location = httpx.Request("GET", f"{provider}/oauth2/authorize", params=query).url
    code = parse_qs(urlsplit(authorize(str(location), "alice@example.com")).query)["code"][0]
    token = httpx.post(
        f"{provider}/oauth2/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": PUBLIC + CALLBACK},
        auth=(client_id, secret),
    )
    assert token.status_code == 200, token.text
    return token.json()


def test_id_tokens_for_another_audience_expired_badly_signed_or_with_another_nonce_are_refused(
    provider, client_credentials
):
    client_id, secret = client_credentials
    keys = httpx.get(f"{provider}/jwks").json()
    mine = issued(provider, client_id, secret)
    check = {"issuer": provider, "client_id": client_id, "nonce": "n-0123456789"}
    claims = verify_id_token(mine["id_token"], keys, access_token=mine["access_token"], **check)
    assert claims["email"] == "alice@example.com" and claims["aud"] in (client_id, [client_id])

    def refused(token: str, **changes: Any) -> str:
        with pytest.raises(OidcRefused) as caught:
            verify_id_token(token, keys, **{**check, **changes})
        assert "could not be verified" in caught.value.message
        return caught.value.reason

    other = issued(provider, *register(provider))  # a real token of the same provider, for another client
    assert "aud" in refused(other["id_token"])
    assert "exp" in refused(mine["id_token"], now=time.time() + 7200)
    assert "nonce" in refused(mine["id_token"], nonce="another-nonce")
    assert "iss" in refused(mine["id_token"], issuer="https://elsewhere.example.com")
    header, payload, signature = mine["id_token"].split(".")
    forged = base64.urlsafe_b64encode(base64.urlsafe_b64decode(payload + "==").replace(b"alice", b"admin")).rstrip(b"=")
    assert "signature" in refused(f"{header}.{forged.decode()}.{signature}")
    flipped = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    assert "signature" in refused(f"{header}.{payload}.{flipped}")
    assert "signature" in refused(f"{header}.{payload}.")  # unsigned


def test_sign_ins_started_from_one_address_are_bounded(provider, client_credentials, monkeypatch):
    """Starting needs no credentials and keeps a pending entry for ten minutes: a flood must not fill the store."""
    monkeypatch.setattr("ui.oidc.STARTS_PER_ADDRESS", 3)
    with TestClient(create_app(oidc_settings(provider, *client_credentials))) as client:
        answers = [client.get("/admin/login/oidc", follow_redirects=False) for _ in range(5)]
        store = client.app.state.dashboard.session_config.get_store_from_app(client.app)
        pending = sum(1 for key in store._store if key.startswith("oidc-pending:"))  # a MemoryStore
    assert [a.status_code for a in answers] == [303, 303, 303, 429, 429]
    assert "Too many sign-ins" in answers[-1].text and pending == 3


def test_single_sign_on_alone_and_an_unreachable_provider_give_clear_pages(client_credentials):
    alone = oidc_settings("http://127.0.0.1:9", *client_credentials, admin_token=None)  # no dashboard token at all
    with TestClient(create_app(alone)) as client:
        page = client.get("/admin/login")
        answer = client.get("/admin/login/oidc", follow_redirects=False)
    assert "Sign in with Example SSO" in page.text and 'name="token"' not in page.text
    assert "The dashboard is disabled" not in page.text
    assert answer.status_code == 502 and "could not be reached" in answer.text
    assert 'name="token"' not in answer.text and 'role="alert"' in answer.text


async def test_a_token_endpoint_that_cannot_be_reached_is_a_clear_refusal(provider, client_credentials):
    """The provider's documents are read, then its token endpoint is down: a 502 page, not a 500."""
    sso = Provider(oidc_settings(provider, *client_credentials))
    metadata = await sso.metadata()
    metadata["token_endpoint"] = "http://127.0.0.1:9/token"
    with pytest.raises(OidcRefused) as caught:
        await sso.finish(Pending("state", "nonce", "verifier", "/admin/clients"), "a-code")
    assert caught.value.status == 502 and "could not be reached" in caught.value.message


def test_with_redis_the_pending_sign_in_and_the_session_live_in_redis(provider, client_credentials, redis_server):
    """Several instances share Redis: the callback may land on another instance than the start."""
    settings = oidc_settings(provider, *client_credentials, redis_url=redis_server.url, instance_id="oidc-redis")
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as other:
        location = start(one)
        other.cookies = one.cookies  # the same browser reaching another instance
        done = back(other, authorize(location, "alice@example.com"))
        assert done.status_code == 200 and "Signed in as alice@example.com" in done.text
        assert back(other, authorize(location, "alice@example.com")).status_code == 400  # taken once, cluster-wide
