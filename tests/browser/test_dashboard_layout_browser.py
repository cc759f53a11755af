"""Every dashboard page at a phone's and a desktop's width, in light and dark schemes, in real headless
Chromium (issue 24 items 5 and 7): no page scrolls sideways, no table hides columns on a desktop, and
axe-core finds no serious or critical accessibility violation (contrast among them).

axe-core is vendored under tests/browser/vendor/ and answered by the test for a URL of the
appliance's own origin, so the page loads it as ``script-src 'self'``: the CSP is the production one.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path

import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, timeout
from websockets.sync.client import connect

pytestmark = pytest.mark.slow

AXE = Path(__file__).resolve().parent / "vendor" / "axe-4.10.3.min.js"
AXE_URL = "/admin/static/axe.min.js"  # Not a file of the appliance: answered by the test (page.route).
PAGES = [
    "/admin/clients",
    "/admin/client?id=layout-unity-1",
    "/admin/send",
    "/admin/tokens",
    "/admin/audit",
    "/admin/system",
]
WIDTHS = (390, 1440)


def ms(seconds: float) -> float:
    return timeout(seconds) * 1000


@pytest.fixture(scope="module")
def app():
    from support import Appliance

    appliance = Appliance(name="browser-layout").start()
    yield appliance
    appliance.stop()


@pytest.fixture(scope="module")
def populated(app):
    """Every table with rows: clients of both protocols with groups, a controller, connect history,
    recent commands with replies, audit entries."""
    with contextlib.ExitStack() as stack:
        with connect(f"{app.ws}/ws/layout-unity-1", additional_headers={"X-Auth-Token": CLIENT_TOKEN}):
            pass  # A closed connection in the history.
        unity = stack.enter_context(
            connect(
                f"{app.ws}/ws/layout-unity-1?groups=lights,kitchen,a-rather-long-group-name",
                additional_headers={"X-Auth-Token": CLIENT_TOKEN},
                subprotocols=["wsbridge.v2"],
                open_timeout=timeout(10),
            )
        )
        stack.enter_context(
            connect(f"{app.ws}/ws/layout-unity-2-with-a-long-id", additional_headers={"X-Auth-Token": CLIENT_TOKEN})
        )
        controller = stack.enter_context(
            connect(f"{app.ws}/ws/layout-llm", additional_headers={"X-Auth-Token": CONTROLLER_TOKEN})
        )

        def answer() -> None:
            with contextlib.suppress(Exception):
                for frame in unity:
                    command = json.loads(frame)  # Version 2: {"id", "from", "message"}.
                    reply = "ok " + "x" * 120
                    unity.send(json.dumps({"reply_to": command["id"], "message": reply}) if command["id"] else reply)

        threading.Thread(target=answer, daemon=True).start()
        controller.send(json.dumps({"target": "layout-unity-1", "id": "c-1", "message": "MoveForward 10 " + "y" * 100}))
        controller.recv(timeout=timeout(10))
        yield app


def sign_in(page, app) -> None:
    page.goto(app.http + "/admin/clients")
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r"/admin/clients$"))


def send_once(page, app) -> None:
    """A row in the Send page's history (kept in the session)."""
    page.goto(app.http + "/admin/send")
    page.get_by_label("Client id or group").fill("layout-unity-1")
    page.get_by_label("Message").fill("Jump " + "z" * 150)
    page.get_by_role("button", name="Send", exact=True).click()
    page.locator("#sent-rows tr.status-replied").first.wait_for(timeout=ms(15))


def visit(page, app, path: str) -> None:
    page.goto(app.http + path)
    page.locator("main h1").first.wait_for(timeout=ms(10))


def overflow(page) -> dict:
    return page.evaluate(
        """() => ({
            page: document.documentElement.scrollWidth - document.documentElement.clientWidth,
            tables: [...document.querySelectorAll('.table-wrap')]
                .filter(w => w.scrollWidth > w.clientWidth + 1)
                .map(w => (w.querySelector('table') || w).id || w.id || w.className),
        })"""
    )


@pytest.mark.parametrize("width", WIDTHS)
def test_no_page_scrolls_sideways(page, populated, width, console, screenshot):
    app = populated
    page.set_viewport_size({"width": width, "height": 900})
    page.goto(app.http + "/admin/login")
    assert overflow(page)["page"] <= 0, "the sign-in page scrolls sideways"
    sign_in(page, app)
    send_once(page, app)
    problems = {}
    for path in PAGES:
        visit(page, app, path)
        found = overflow(page)
        if found["page"] > 0:
            problems[path] = f"page {found['page']} px wider than the window"
        elif width >= 1440 and found["tables"]:
            problems[path] = f"tables that hide columns: {found['tables']}"
        name = re.sub(r"\W+", "-", path.removeprefix("/admin/")).strip("-")
        screenshot(page, f"layout-{width}-{name}")
    assert not problems, problems
    console.assert_clean()


def axe_violations(page) -> list[str]:
    page.add_script_tag(url=AXE_URL)
    found = page.evaluate(
        """async () => {
            const result = await axe.run(document, {resultTypes: ['violations']});
            return result.violations
                .filter(v => v.impact === 'serious' || v.impact === 'critical')
                .map(v => v.id + ' (' + v.impact + '): ' + v.nodes.slice(0, 3)
                    .map(n => n.target.join(' ') + ' ' + (n.failureSummary || '').replace(/\\s+/g, ' ')).join(' | '));
        }"""
    )
    return list(found)


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("width", WIDTHS)
def test_no_serious_accessibility_violation(page, populated, width, scheme, console, screenshot):
    app = populated
    source = AXE.read_text()
    page.route(
        re.compile(re.escape(AXE_URL) + "$"),
        lambda route: route.fulfill(status=200, content_type="text/javascript", body=source),
    )
    page.emulate_media(color_scheme=scheme)
    page.set_viewport_size({"width": width, "height": 900})
    page.goto(app.http + "/admin/login")
    problems = {"/admin/login": axe_violations(page)}
    sign_in(page, app)
    send_once(page, app)
    for path in PAGES:
        visit(page, app, path)
        problems[path] = axe_violations(page)
        if scheme == "dark" and path in ("/admin/clients", "/admin/tokens"):
            screenshot(page, f"dark-{width}-{path.removeprefix('/admin/')}")
    problems = {path: found for path, found in problems.items() if found}
    assert not problems, json.dumps(problems, indent=1)
    console.assert_clean()
