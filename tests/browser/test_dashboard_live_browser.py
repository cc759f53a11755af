"""Live refreshes of the clients table in real headless Chromium: they keep the operator's place (focus,
scroll) and the badge says when and why they are held (issue 24 items 6 and 10)."""

from __future__ import annotations

import contextlib
import re

import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, timeout
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def ms(seconds: float) -> float:
    return timeout(seconds) * 1000


@pytest.fixture(scope="module")
def app():
    from support import Appliance

    appliance = Appliance(name="browser-live").start()
    yield appliance
    appliance.stop()


def client(app, client_id: str):
    return connect(
        f"{app.ws}/ws/{client_id}", additional_headers={"X-Auth-Token": CLIENT_TOKEN}, open_timeout=timeout(10)
    )


def sign_in(page, app, path: str = "/admin/clients") -> None:
    page.goto(app.http + path)
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(path) + "$"))
    page.locator("#live-state.state-live").wait_for(timeout=ms(10))


def row(page, client_id: str):
    return page.locator(f'#clients-table tr[data-client-id="{client_id}"]')


def test_focus_and_scroll_survive_live_refreshes(page, app, console):
    with contextlib.ExitStack() as stack:
        for i in range(30):
            stack.enter_context(client(app, f"focus-{i:02d}"))
        sign_in(page, app)
        row(page, "focus-29").wait_for(timeout=ms(10))
        link = page.get_by_role("link", name="focus-20", exact=True)
        link.focus()
        page.evaluate("() => window.scrollTo(0, 300)")
        assert page.evaluate("() => window.scrollY") == 300
        for churn in ("churn-a", "churn-b", "churn-c"):  # Rows come (above the focused one) and go.
            with client(app, churn):
                row(page, churn).wait_for(timeout=ms(10))
            row(page, churn).wait_for(state="detached", timeout=ms(10))
            focused = page.evaluate("() => [document.activeElement.tagName, document.activeElement.textContent.trim()]")
            assert focused == ["A", "focus-20"], f"focus moved to {focused} after a refresh"
            assert page.evaluate("() => window.scrollY") == 300
        # The row of the focused control leaves: focus stays in the table, not on <body>.
        page.get_by_label("Select focus-05").focus()
        page.evaluate("() => document.activeElement.setAttribute('data-was-focused', '1')")
    with client(app, "focus-keep"):
        row(page, "focus-keep").wait_for(timeout=ms(10))
        row(page, "focus-05").wait_for(state="detached", timeout=ms(10))
        assert page.evaluate("() => document.activeElement.id") == "clients-table"
    console.assert_clean()


def test_the_tables_sideways_scroll_survives_a_refresh_on_a_phone(page, app, console):
    page.set_viewport_size({"width": 390, "height": 800})
    with client(app, "phone-1"):
        sign_in(page, app)
        row(page, "phone-1").wait_for(timeout=ms(10))
        table = page.locator("#clients-table")
        assert table.evaluate("t => t.scrollWidth > t.clientWidth"), "the table is narrower than a phone?"
        table.evaluate("t => { t.scrollLeft = 120; }")
        with client(app, "phone-2"):
            row(page, "phone-2").wait_for(timeout=ms(10))
            assert table.evaluate("t => t.scrollLeft") == 120
    console.assert_clean()


def test_the_badge_says_the_table_is_held_and_why(page, app, console, screenshot):
    badge = page.locator("#live-state")
    with client(app, "held-1"):
        sign_in(page, app)
        page.get_by_label("Select held-1").check()
        assert badge.inner_text() == "Held: 1 row is ticked, so the table is not refreshed"
        with client(app, "came-while-held"):
            page.wait_for_function(
                "() => document.querySelector('#live-state').textContent.includes('changes are waiting')",
                timeout=ms(10),
            )
            assert row(page, "came-while-held").count() == 0
            screenshot(page, "clients-held")
            page.get_by_label("Select held-1").uncheck()
            row(page, "came-while-held").wait_for(timeout=ms(10))
            assert badge.inner_text() == "Live"
            page.get_by_label(re.compile(r"Type \d+ to confirm")).fill("2")
            assert badge.inner_text() == "Held: a confirmation is being typed, so the table is not refreshed"
            page.get_by_label(re.compile(r"Type \d+ to confirm")).fill("")
            assert badge.inner_text() == "Live"
    console.assert_clean()
