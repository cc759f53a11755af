"""OpenID Connect sign-in in real Chromium: the appliance (a real process) and a real OpenID provider.

The provider (oidc-provider-mock, in a thread of this process) has the dashboard registered as a
confidential client with the appliance's redirect URI; the person types who they are on the
provider's page, as they would at the company's identity provider, and lands in the dashboard
signed in under that name. The session cookie is SameSite=Strict, which Chromium does not send on a
navigation the provider's redirect started: this is the test that the callback's own page moves on
with it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import oidc_provider_mock
import pytest
from leak_scan import SCAN, secrets_in_env
from support import Appliance, timeout

pytestmark = pytest.mark.slow


def test_an_operator_signs_in_through_the_provider_and_the_audit_names_them(page, console, screenshot):
    with oidc_provider_mock.run_server_in_thread(require_client_registration=True, require_nonce=True) as server:
        provider = f"http://localhost:{server.server_port}"
        assert (
            httpx.put(f"{provider}/users/{quote('alice@example.com')}", json={"email": "alice@example.com"}).status_code
            == 204
        )
        app = Appliance(name="oidc-browser")
        registered = httpx.post(
            f"{provider}/oauth2/clients", json={"redirect_uris": [f"{app.http}/admin/login/oidc/callback"]}
        ).json()
        app.env |= {
            "PUBLIC_URL": app.http,
            "OIDC_ISSUER": provider,
            "OIDC_CLIENT_ID": registered["client_id"],
            "OIDC_CLIENT_SECRET": registered["client_secret"],
            "OIDC_PROVIDER_NAME": "Example SSO",
            "OIDC_ADMINS": "alice@example.com",
        }
        SCAN.add_secrets(secrets_in_env(app.env))  # the client secret must never reach the appliance's log
        # The provider's page styles itself from a CDN this machine cannot reach.
        page.route(
            re.compile(r"https://cdn\.jsdelivr\.net/.*"), lambda route: route.fulfill(body="", content_type="text/css")
        )
        try:
            app.start()
            page.goto(app.http + "/admin/audit")
            screenshot(page, "oidc-sign-in")
            page.get_by_role("link", name="Sign in with Example SSO").click()
            page.wait_for_url(re.compile(re.escape(provider) + r"/oauth2/authorize"))
            page.get_by_placeholder("sub").fill("alice@example.com")
            callbacks: list[str] = []
            page.on("request", lambda r: callbacks.append(r.url) if "/admin/login/oidc/callback" in r.url else None)
            page.get_by_role("button", name="Authorize").click()
            page.wait_for_url(re.compile(r"/admin/audit$"), timeout=timeout(20) * 1000)
            who = page.locator("header .who .role")
            assert who.inner_text() == "admin" and who.get_attribute("title") == "signed in with alice@example.com"
            row = page.locator("#audit tbody tr", has_text="alice@example.com").first
            assert row.locator("td:nth-child(2)").inner_text().strip() == "login"
            screenshot(page, "oidc-signed-in")
            page.get_by_role("button", name="Sign out").click()
            page.wait_for_url(re.compile(r"/admin/login"))
            assert page.get_by_role("link", name="Sign in with Example SSO").is_visible()
            assert page.get_by_label("Admin or viewer token").is_visible()  # the token sign-in stays
        finally:
            app.stop()
        # The one-time code crossed the browser's address bar, never the appliance's log.
        (code,) = parse_qs(urlsplit(callbacks[0]).query)["code"]
        assert len(code) >= 16 and code not in app.log()
        console.assert_clean()
