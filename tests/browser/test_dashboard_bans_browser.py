"""The Bans page in real headless Chromium: ban a connected client, it cannot come back, lift, it can (issue #24 item 16)."""

from __future__ import annotations

import re

import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, timeout
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def ms(seconds: float) -> float:
    return timeout(seconds) * 1000


def dial(app, client_id: str):
    return connect(f"{app.ws}/ws/{client_id}", additional_headers={"X-Auth-Token": CLIENT_TOKEN})


def close_code_of(ws) -> int | None:
    """Read until the relay closes ``ws``; its close code."""
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=timeout(10))
    return ws.close_code


def test_ban_closes_the_client_it_cannot_come_back_lift_and_it_can(page, start_appliance, console, screenshot):
    app = start_appliance(name="bans-browser")
    page.goto(app.http + "/admin/bans")
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/admin/bans$"))
    assert page.get_by_role("link", name="Bans").get_attribute("aria-current") == "page"

    # A target that is neither an id nor an address: said in the page, nothing banned.
    page.get_by_label("Client id, IP address or CIDR block").fill("not an id!")
    page.get_by_role("button", name="Ban", exact=True).click()
    page.get_by_role("alert").filter(has_text="neither a client id").wait_for(timeout=ms(10))

    with dial(app, "kiosk-9") as held:
        page.get_by_label("Client id, IP address or CIDR block").fill("kiosk-9")
        page.get_by_label("For").select_option(label="1 day")
        page.get_by_label("Reason (kept in the audit trail)").fill("stolen <b>device</b>")
        page.get_by_role("button", name="Ban", exact=True).click()
        page.get_by_role("status").filter(has_text="Banned kiosk-9; 1 connection closed").wait_for(timeout=ms(10))
        assert close_code_of(held) == 4016
    row = page.locator('tr[data-ban="id:kiosk-9"]')
    assert "stolen <b>device</b>" in row.inner_text()  # Shown as text, never markup.
    screenshot(page, "bans")
    with dial(app, "kiosk-9") as again:  # Straight back: refused at the handshake.
        assert close_code_of(again) == 4016

    row.get_by_role("button", name="Lift").click()
    row.wait_for(state="detached", timeout=ms(10))
    page.get_by_role("status").filter(has_text="Lifted the ban on kiosk-9").wait_for(timeout=ms(10))
    with dial(app, "kiosk-9") as back:
        back.send("hello")
        back.ping().wait(timeout(10))  # Open and answered: not refused.
        assert back.close_code is None

    page.goto(app.http + "/admin/audit?action=ban.")
    assert page.locator("text=ban.lift").count() >= 1 and page.locator("text=ban.add").count() >= 1
    console.assert_clean(400)
