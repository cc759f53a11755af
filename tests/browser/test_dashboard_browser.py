"""The dashboard in real headless Chromium: sign-in, the live table, filters, inert XSS, a clean CSP, sign-out."""

from __future__ import annotations

import json
import re

import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, timeout
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def ms(seconds: float) -> float:
    return timeout(seconds) * 1000


@pytest.fixture(scope="module")
def app(redis_server):
    from support import Appliance

    appliance = Appliance(redis_url=redis_server.url, name="browser").start()
    yield appliance
    appliance.stop()


def client(app, client_id: str, **headers: str):
    return connect(
        f"{app.ws}/ws/{client_id}",
        additional_headers={"X-Auth-Token": CLIENT_TOKEN, **headers},
        open_timeout=timeout(10),
    )


def sign_in(page, app, token: str = ADMIN_TOKEN, path: str = "/admin/clients") -> None:
    page.goto(app.http + path)
    page.wait_for_url(re.compile(r"/admin/login"))
    page.get_by_label("Admin or viewer token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(path) + "$"))


def wait_live(page) -> None:
    page.locator("#live-state.state-live").wait_for(timeout=ms(10))


def rows(page) -> list[str]:
    return page.locator("#clients-table tbody tr[data-client-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.clientId)"
    )


def test_sign_in_and_watch_a_client_connect_and_leave_live(page, app, console, screenshot):
    sign_in(page, app)
    wait_live(page)
    assert page.locator("#live-state").inner_text() == "Live"
    with client(app, "browser-live-1"):
        page.locator('#clients-table tr[data-client-id="browser-live-1"]').wait_for(timeout=ms(10))
        page.wait_for_function(
            "() => Number(document.querySelector('[data-counter=clients]').textContent) >= 1", timeout=ms(10)
        )
        screenshot(page, "clients")
    page.locator('#clients-table tr[data-client-id="browser-live-1"]').wait_for(state="detached", timeout=ms(10))
    console.assert_clean()


def test_filter_by_id_prefix_and_role(page, app, console, screenshot):
    with client(app, "alpha-1"), client(app, "alpha-2"), client(app, "beta-1"):
        sign_in(page, app)
        page.locator('#clients-table tr[data-client-id="beta-1"]').wait_for(timeout=ms(10))
        page.get_by_label("Search id, address or group").fill("alpha")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#clients-table tr[data-client-id]')]"
            ".every(r => r.dataset.clientId.startsWith('alpha'))",
            timeout=ms(10),
        )
        assert sorted(rows(page)) == ["alpha-1", "alpha-2"]
        assert "q=alpha" in page.url  # The filter is in the address: reload and share keep it.
        page.get_by_label("Role").select_option("controller")
        page.locator("#clients-table .empty").wait_for(timeout=ms(10))
        screenshot(page, "clients-filtered")
        page.reload()
        assert page.get_by_label("Search id, address or group").input_value() == "alpha"
        page.locator("#clients-table .empty").wait_for(timeout=ms(10))
    console.assert_clean()


def test_paused_table_is_not_refreshed_until_live_again(page, app, console):
    sign_in(page, app)
    wait_live(page)
    page.get_by_label("Live").uncheck()
    assert "Paused" in page.locator("#live-state").inner_text()
    with client(app, "while-paused"):
        # The counters still move (they are pushed); the table waits for the operator.
        page.wait_for_function(
            "() => document.querySelector('#counters').textContent.includes('Connections')", timeout=ms(5)
        )
        page.wait_for_timeout(ms(2.5))
        assert "while-paused" not in rows(page)
        page.get_by_label("Live").check()
        page.locator('#clients-table tr[data-client-id="while-paused"]').wait_for(timeout=ms(10))
    console.assert_clean()


def test_a_change_held_back_by_a_selection_shows_once_the_selection_is_cleared(page, app, console):
    with client(app, "ticked-1"):
        sign_in(page, app)
        wait_live(page)
        page.get_by_label("Select ticked-1").check()
        with client(app, "came-while-ticked"):
            # The stream says "changed" once; the ticked row holds that refresh back.
            page.wait_for_timeout(ms(2.5))
            assert "came-while-ticked" not in rows(page)
            page.get_by_label("Select ticked-1").uncheck()  # Nothing ticked: the held-back refresh runs.
            page.locator('#clients-table tr[data-client-id="came-while-ticked"]').wait_for(timeout=ms(10))
    console.assert_clean()


def test_html_in_client_controlled_fields_stays_inert(page, app, redis_server, console, screenshot):
    evil = "<img src=x onerror=alert(document.domain)>"
    forged = {
        "id": "<script>alert(1)</script>",
        "role": "client",
        "instance": "forged",
        "connected_since": "2026-01-01T00:00:00+00:00",
        "remote": evil,
        "messages_in": 0,
        "messages_out": 0,
        "last_activity": "2026-01-01T00:00:00+00:00",
    }
    redis_server.command("HSET", "wsb:instance:forged", "x", json.dumps(forged))
    redis_server.command("EXPIRE", "wsb:instance:forged", "60")
    # A live instance's summary: without it the instance is lost and its records are not listed.
    redis_server.command("SET", "wsb:summary:forged", json.dumps({"instance": "forged", "epoch": "x"}), "EX", "60")
    redis_server.command("SADD", "wsb:instances", "forged")  # As every instance names itself.
    try:
        # A real connection sends markup in a trusted proxy's header too: it must never reach the page
        # (appliance/forwarded.py puts the peer's address in its place; the forged record above covers escaping).
        with client(app, "xss-remote", **{"X-Forwarded-For": '"><svg onload=alert(3)>'}):
            sign_in(page, app)
            cell = page.locator("#clients-table td.id", has_text="<script>alert(1)</script>")
            cell.wait_for(timeout=ms(10))
            assert page.locator("#clients-table img").count() == 0
            assert page.locator("#clients-table svg").count() == 0
            assert page.locator("#clients-table script").count() == 0
            assert page.get_by_text(evil).count() == 1  # Shown as text.
            screenshot(page, "clients-xss-inert")
            cell.locator("a").click()
            page.wait_for_url(re.compile(r"/admin/client\?id="))
            page.get_by_role("heading", name="Client <script>alert(1)</script>").wait_for(timeout=ms(5))
            assert page.locator("main img, main svg, main script").count() == 0
    finally:
        redis_server.command("DEL", "wsb:instance:forged", "wsb:summary:forged")
        redis_server.command("SREM", "wsb:instances", "forged")
    console.assert_clean()


def test_system_and_audit_pages(page, app, console, screenshot):
    sign_in(page, app, path="/admin/system")
    assert page.get_by_text("ready", exact=True).count() == 1
    screenshot(page, "system")
    page.get_by_role("link", name="Audit").click()
    page.wait_for_url(re.compile(r"/admin/audit"))
    assert page.locator("#audit td", has_text="login").count() >= 1
    screenshot(page, "audit")
    console.assert_clean()


def test_sign_out_elsewhere_sends_a_live_page_to_the_login(new_page, app, console):
    live = new_page()
    sign_in(live, app)
    wait_live(live)
    other = new_page()
    other.goto(app.http + "/admin/system")
    other.get_by_role("button", name="Sign out").click()
    other.wait_for_url(re.compile(r"/admin/login"))
    # The live page's stream notices within its re-check period and the whole page goes to the login.
    live.wait_for_url(re.compile(r"/admin/login"), timeout=ms(15))
    assert live.get_by_label("Admin or viewer token").is_visible()
    console.assert_clean()


def test_sign_out(page, app, console):
    sign_in(page, app)
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r"/admin/login$"))
    page.goto(app.http + "/admin/clients")
    page.wait_for_url(re.compile(r"/admin/login"))
    console.assert_clean()


def test_the_banner_shows_a_lost_connection_and_recovers(page, start_appliance, console):
    app = start_appliance(name="banner")
    sign_in(page, app)
    wait_live(page)
    app.terminate()
    page.locator("#live-state.state-lost").wait_for(timeout=ms(15))
    assert "reconnecting" in page.locator("#live-state").inner_text()
    app.start()  # Same port: the page's stream reconnects by itself.
    # The restarted instance has no sessions in memory: the page is sent to the login, not left stale.
    page.wait_for_url(re.compile(r"/admin/login"), timeout=ms(30))
    console.errors.clear()  # The browser logs each failed reconnection attempt while the server is down.
    console.assert_clean()


def test_usable_on_a_phone(context, app, console, screenshot):
    phone = context.browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = phone.new_page()
        page.on("console", lambda m: console.errors.append(m.text) if m.type == "error" else None)
        with client(app, "phone-1"):
            sign_in(page, app)
            page.locator('#clients-table tr[data-client-id="phone-1"]').wait_for(timeout=ms(10))
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 400, f"the page scrolls sideways on a phone ({width} px); only the table may"
            assert page.get_by_label("Search id, address or group").is_visible()
            screenshot(page, "clients-phone")
    finally:
        phone.close()
    console.assert_clean()


def test_an_htmx_request_without_a_session_takes_the_whole_page_to_the_login(page, context, app, console):
    sign_in(page, app)
    wait_live(page)
    context.clear_cookies()  # As if the session had expired: the next htmx request is refused.
    page.get_by_label("Role").select_option("client")
    page.wait_for_url(re.compile(r"/admin/login"), timeout=ms(10))
    assert page.locator("#clients-table").count() == 0  # The login replaced the page, not a table cell.
    console.assert_clean()
