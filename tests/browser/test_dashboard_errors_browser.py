"""Every dashboard action shows its error in the page, in real headless Chromium (issue 24 items 1 and 2).

htmx swaps only 2xx answers by default: before dashboard.js handled the others, a refused
rotation (409), a wrong typed confirmation (400) or a refused bulk disconnect (409) left the
page unchanged, with the only trace in the console.
"""

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

    appliance = Appliance(redis_url=redis_server.url, name="browser-errors").start()  # TOKEN_STORE=env
    yield appliance
    appliance.stop()


def sign_in(page, app, path: str) -> None:
    page.goto(app.http + path)
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(path) + "$"))


def forge_instance(redis_server, name: str, count: int, prefix: str) -> None:
    """Presence of ``count`` connections on an instance that only Redis knows (no sockets needed)."""
    fields: list[str] = []
    for i in range(count):
        record = {
            "id": f"{prefix}{i:05d}",
            "role": "client",
            "instance": name,
            "connected_since": "2026-01-01T00:00:00+00:00",
            "remote": "10.0.0.1",
            "messages_in": 0,
            "messages_out": 0,
            "last_activity": "2026-01-01T00:00:00+00:00",
        }
        fields += [record["id"], json.dumps(record)]
    summary = {"instance": name, "epoch": "forged", "membership": count, "connections": count, "clients": count}
    redis_server.command("HSET", f"wsb:instance:{name}", *fields)
    redis_server.command("SET", f"wsb:summary:{name}", json.dumps(summary), "EX", "120")
    redis_server.command("EXPIRE", f"wsb:instance:{name}", "120")
    redis_server.command("SADD", "wsb:instances", name)


def unforge_instance(redis_server, name: str) -> None:
    redis_server.command("DEL", f"wsb:instance:{name}", f"wsb:summary:{name}")
    redis_server.command("SREM", "wsb:instances", name)


def test_a_refused_rotation_shows_why_in_the_page(page, app, console):
    sign_in(page, app, "/admin/tokens")
    row = page.locator('tr[data-token="UNITY_CLIENT_TOKEN"]')
    # A stale page (or one where the store changed since it was drawn) still offers the action: the
    # server's 409 must reach the operator.
    page.evaluate(
        """() => htmx.ajax('POST', '/admin/tokens/rotate', {target: '#tokens-panel',
             values: {name: 'UNITY_CLIENT_TOKEN', confirm: 'UNITY_CLIENT_TOKEN'}})"""
    )
    alert = page.locator("#tokens-panel [role=alert]")
    alert.wait_for(timeout=ms(10))
    assert "TOKEN_STORE=ssm" in alert.inner_text()
    assert row.count() == 1  # The table is still there, under the message.
    assert page.locator("#new-token").count() == 0
    console.assert_clean(409)


def test_rotation_is_not_offered_where_the_store_cannot_rotate(page, app, console):
    sign_in(page, app, "/admin/tokens")
    assert "rotation needs TOKEN_STORE=ssm" in page.locator("#rotation-note").inner_text()
    assert page.get_by_role("button", name="Rotate").count() == 0
    console.assert_clean()


def test_a_wrong_typed_confirmation_says_what_to_type(page, app, console):
    sign_in(page, app, "/admin/tokens")
    page.evaluate(
        """() => htmx.ajax('POST', '/admin/tokens/rotate', {target: '#tokens-panel',
             values: {name: 'UNITY_CLIENT_TOKEN', confirm: 'UNITY'}})"""
    )
    alert = page.locator("#tokens-panel [role=alert]")
    alert.wait_for(timeout=ms(10))
    assert "Type UNITY_CLIENT_TOKEN to confirm" in alert.inner_text()
    console.assert_clean(400)


def test_disconnect_all_matching_beyond_the_limit_says_to_narrow_the_filter(
    page, app, redis_server, console, screenshot
):
    forge_instance(redis_server, "forged-many", 1001, "many-")
    try:
        sign_in(page, app, "/admin/clients?q=many-")
        button = page.get_by_role("button", name=re.compile(r"Disconnect all 1001 matching"))
        button.wait_for(timeout=ms(10))
        page.get_by_label("Type 1001 to confirm").fill("1001")
        button.click()
        alert = page.locator("#action-result [role=alert]")
        alert.wait_for(timeout=ms(10))
        assert "narrow the filter to 1000 or fewer" in alert.inner_text()
        screenshot(page, "clients-action-error")
    finally:
        unforge_instance(redis_server, "forged-many")
    console.assert_clean(409)


def test_disconnect_selected_with_nothing_ticked_says_so(page, app, console):
    with connect(f"{app.ws}/ws/untouched", additional_headers={"X-Auth-Token": CLIENT_TOKEN}) as socket:
        sign_in(page, app, "/admin/clients")
        page.locator('#clients-table tr[data-client-id="untouched"]').wait_for(timeout=ms(10))
        page.get_by_role("button", name="Disconnect selected").click()
        alert = page.locator("#action-result [role=alert]")
        alert.wait_for(timeout=ms(10))
        assert "tick the connections first" in alert.inner_text()
        socket.ping().wait(timeout(5))  # Nobody was disconnected.
    console.assert_clean(400)


def test_a_failure_without_an_answer_for_the_page_shows_in_the_banner(page, app, console):
    sign_in(page, app, "/admin/tokens")
    # A token that does not exist: the server answers 404 as plain JSON, not a fragment for the panel.
    page.evaluate(
        """() => htmx.ajax('POST', '/admin/tokens/revoke', {target: '#tokens-panel', values: {name: 'NOPE'}})"""
    )
    banner = page.locator("#request-error")
    banner.wait_for(state="visible", timeout=ms(10))
    assert re.search(r"POST /admin/tokens/revoke failed: 404", banner.inner_text())
    assert "no token named" in banner.inner_text()
    page.get_by_role("button", name="Dismiss").click()
    banner.wait_for(state="hidden", timeout=ms(5))
    # htmx itself logs the failed request (the page showed it); nothing else may appear.
    console.errors = [e for e in console.errors if "Response Status Error Code 404" not in e]
    console.assert_clean(404)
