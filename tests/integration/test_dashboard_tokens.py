"""The dashboard's Tokens page against the real token service: env store (read-only) and a real moto SSM."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from moto_support import MotoServer, seed, unique_prefix
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, timeout
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

SEED = {"LLM_SECRET_TOKEN": CONTROLLER_TOKEN, "UNITY_CLIENT_TOKEN": CLIENT_TOKEN, "ADMIN_TOKEN": ADMIN_TOKEN}


class Browser:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, follow_redirects=False, timeout=timeout(15))
        self.csrf = ""

    def get(self, path: str, **kwargs) -> httpx.Response:
        response = self.http.get(path, **kwargs)
        found = re.search(r'name="_csrf_token" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict, **kwargs) -> httpx.Response:
        return self.http.post(path, data={**data, "_csrf_token": self.csrf}, **kwargs)

    def login(self, token: str = ADMIN_TOKEN) -> httpx.Response:
        self.get("/admin/login")
        return self.post("/admin/login", {"token": token})


def ws_connect(app, client_id: str, token: str):
    return connect(f"{app.ws}/ws/{client_id}", additional_headers={"X-Auth-Token": token}, open_timeout=timeout(10))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


def test_env_store_tokens_are_listed_without_values_and_rotation_says_why_not(start_appliance):
    app = start_appliance(name="tok-env")
    b = Browser(app.http)
    b.login()
    page = b.get("/admin/tokens")
    assert page.status_code == 200
    for name in ("LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN"):
        assert f'data-token="{name}"' in page.text
    for value in (CONTROLLER_TOKEN, CLIENT_TOKEN, ADMIN_TOKEN):
        assert value not in page.text
    refused = b.post("/admin/tokens/rotate", {"name": "UNITY_CLIENT_TOKEN", "confirm": "UNITY_CLIENT_TOKEN"})
    assert refused.status_code == 409 and "TOKEN_STORE=ssm" in refused.text
    assert b.post("/admin/tokens/rotate", {"name": "NOPE", "confirm": "NOPE"}).status_code == 404


def test_rotate_shows_the_value_once_old_token_works_in_grace_then_revoke_evicts(start_appliance, moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    app = start_appliance(
        moto.appliance_env(prefix, TOKEN_ROTATION_ENABLED="true", TOKEN_GRACE_SECONDS="600"), name="tok-ssm"
    )
    b = Browser(app.http)
    assert b.login().status_code == 303
    b.get("/admin/tokens")
    with ws_connect(app, "old-token-client", CLIENT_TOKEN) as old:
        wrong = b.post("/admin/tokens/rotate", {"name": "UNITY_CLIENT_TOKEN", "confirm": "unity"})
        assert wrong.status_code == 400 and "Type UNITY_CLIENT_TOKEN to confirm" in wrong.text
        rotated = b.post(
            "/admin/tokens/rotate",
            {"name": "UNITY_CLIENT_TOKEN", "confirm": "UNITY_CLIENT_TOKEN"},
            headers={"HX-Request": "true"},
        )
        assert rotated.status_code == 200
        new_value = re.search(r'<p class="secret" id="new-token">([^<]+)</p>', rotated.text).group(1)
        assert new_value != CLIENT_TOKEN and "<html" not in rotated.text
        assert new_value not in b.get("/admin/tokens").text  # Shown once.
        # Both values open connections during the grace window.
        with ws_connect(app, "new-token-client", new_value):
            pass
        with ws_connect(app, "old-token-2", CLIENT_TOKEN):
            pass
        page = b.get("/admin/tokens").text
        assert "End grace window now" in page
        b.post("/admin/tokens/revoke", {"name": "UNITY_CLIENT_TOKEN"})
        with pytest.raises(ConnectionClosed):  # Evicted by the server.
            old.recv(timeout=timeout(10))
        assert old.close_code == 4011
    audit = b.get("/admin/audit?action=token.").text
    assert audit.count("token.rotate") == 1 and "token.revoke" in audit and "ADMIN_TOKEN" in audit
    assert new_value not in audit


def test_rotating_the_admin_token_ends_every_dashboard_session(start_appliance, moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    app = start_appliance(moto.appliance_env(prefix, TOKEN_ROTATION_ENABLED="true"), name="tok-admin")
    operator, colleague = Browser(app.http), Browser(app.http)
    operator.login()
    colleague.login()
    operator.get("/admin/tokens")
    rotated = operator.post("/admin/tokens/rotate", {"name": "ADMIN_TOKEN", "confirm": "ADMIN_TOKEN"})
    assert rotated.status_code == 200
    new_admin = re.search(r'id="new-token">([^<]+)<', rotated.text).group(1)
    assert colleague.get("/admin/clients").status_code == 303
    assert operator.get("/admin/clients").status_code == 303
    assert operator.login(ADMIN_TOKEN).status_code == 401  # The old value, in its grace window, no longer signs in.
    assert operator.login(new_admin).status_code == 303


def test_with_tokens_from_ssm_a_dashboard_post_works_on_every_instance_and_after_a_restart(moto, redis_server):
    """Production's shape (docker-compose.prod.yml): tokens only in SSM, no ADMIN_TOKEN in the environment,
    two instances behind a load balancer without sticky sessions, containers restarted by a deploy. The
    page's CSRF token must be accepted by whichever instance gets the POST, also after a restart."""
    from support import Appliance

    redis_server.command("FLUSHALL")
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    started: list[Appliance] = []

    def start(name: str) -> Appliance:
        app = Appliance(moto.appliance_env(prefix), redis_url=redis_server.url, name=name)
        del app.env["ADMIN_TOKEN"]  # Only SSM has it, as in production.
        started.append(app)
        return app.start()

    a, b = start("csrf-a"), start("csrf-b")
    browser = Browser(a.http)
    try:
        page = browser.get("/admin/login")  # The page and its CSRF token from instance a ...
        assert 'name="token"' in page.text and "dashboard is disabled" not in page.text
        browser.http.base_url = httpx.URL(b.http)  # ... the POST to instance b.
        assert browser.post("/admin/login", {"token": ADMIN_TOKEN}).status_code == 303
        b.stop()
        c = start("csrf-c")  # A restart: the browser keeps its CSRF cookie.
        browser.http.base_url = httpx.URL(c.http)
        browser.get("/admin/clients")
        assert browser.post("/admin/logout", {}).status_code in (200, 303)
    finally:
        browser.http.close()
        for app in started:
            app.stop()
