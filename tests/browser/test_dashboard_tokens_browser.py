"""Token rotation from the dashboard in real headless Chromium, on a real moto SSM."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from leak_scan import SCAN
from moto_support import MotoServer, seed, unique_prefix
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, timeout
from websockets.sync.client import connect

pytestmark = pytest.mark.slow

SEED = {"LLM_SECRET_TOKEN": CONTROLLER_TOKEN, "UNITY_CLIENT_TOKEN": CLIENT_TOKEN, "ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


def ms(seconds: float) -> float:
    return timeout(seconds) * 1000


def test_rotate_a_token_see_it_once_old_one_accepted_in_grace_then_evicted(
    page, start_appliance, moto, console, screenshot
):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    app = start_appliance(moto.appliance_env(prefix, TOKEN_ROTATION_ENABLED="true"), name="tok-browser")
    page.goto(app.http + "/admin/tokens")
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/admin/tokens$"))
    with connect(f"{app.ws}/ws/old-one", additional_headers={"X-Auth-Token": CLIENT_TOKEN}) as old:
        row = page.locator('tr[data-token="UNITY_CLIENT_TOKEN"]')
        row.get_by_label("Type UNITY_CLIENT_TOKEN to rotate").fill("UNITY_CLIENT_TOKEN")
        row.get_by_role("button", name="Rotate").click()
        secret = page.locator("#new-token")
        secret.wait_for(timeout=ms(10))
        new_value = secret.inner_text().strip()
        assert new_value and new_value != CLIENT_TOKEN
        assert page.get_by_role("button", name="Copy").is_visible()
        screenshot(page, "tokens-rotated")
        # The old value still opens connections during the grace window.
        with connect(f"{app.ws}/ws/old-two", additional_headers={"X-Auth-Token": CLIENT_TOKEN}):
            pass
        with connect(f"{app.ws}/ws/new-one", additional_headers={"X-Auth-Token": new_value}):
            pass
        page.locator('tr[data-token="UNITY_CLIENT_TOKEN"]').get_by_role("button", name="End grace window now").click()
        page.locator('tr[data-token="UNITY_CLIENT_TOKEN"]').get_by_role("button", name="End grace window now").wait_for(
            state="detached", timeout=ms(10)
        )
        with pytest.raises(Exception):  # noqa: B017 (evicted: the server closes it with 4011)
            old.recv(timeout=timeout(10))
        assert old.close_code == 4011
    page.reload()
    assert page.locator("#new-token").count() == 0  # Shown once.
    console.assert_clean()


def test_rotate_keeping_connections_as_the_cli_offers(page, start_appliance, moto, console):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    app = start_appliance(moto.appliance_env(prefix, TOKEN_ROTATION_ENABLED="true"), name="tok-keep")
    page.goto(app.http + "/admin/tokens")
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/admin/tokens$"))
    assert page.locator("#rotation-note").count() == 0  # SSM with rotation enabled: offered.
    row = page.locator('tr[data-token="LLM_SECRET_TOKEN"]')
    row.get_by_label("Type LLM_SECRET_TOKEN to rotate").fill("LLM_SECRET_TOKEN")
    row.get_by_label("Keep connections opened with the old value").check()
    row.get_by_role("button", name="Rotate").click()
    page.locator("#new-token").wait_for(timeout=ms(10))
    page.goto(app.http + "/admin/audit?action=token.rotate")
    detail = page.locator("#audit tbody tr").first.inner_text()
    assert "keep_connections=yes" in detail and "LLM_SECRET_TOKEN" in detail
    console.assert_clean()


def test_the_audit_page_names_the_operator_who_signed_in_with_a_named_admin_token(
    page, start_appliance, moto, console, screenshot
):
    alice = "alice-admin-token-0123456789abcdef"
    SCAN.add_secrets({"ALICE": alice})
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, {**SEED, "admin_tokens/alice": alice})
    app = start_appliance(moto.appliance_env(prefix), name="tok-operator")
    page.goto(app.http + "/admin/audit")
    page.get_by_label("Admin or viewer token").fill(alice)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/admin/audit$"))
    login = page.locator("#audit tbody tr").filter(has=page.get_by_role("cell", name="login", exact=True))
    login.first.wait_for(timeout=ms(10))
    assert login.first.locator("td").nth(2).inner_text() == "alice"  # the person, not ADMIN_TOKEN
    assert "ADMIN_TOKEN" not in page.locator("#audit tbody").inner_text()
    screenshot(page, "audit-named-operator")
    console.assert_clean()
