"""A real browser (Debian's headless Chromium, driven by Playwright) authenticates with the token as a
WebSocket subprotocol, the way browsers and Unity WebGL builds must: no header, nothing in the URL, and
the server's answer selects the version protocol, never the token (a browser fails a handshake that
selects a protocol it did not offer)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from support import CLIENT_TOKEN, CONTROLLER_TOKEN, command, timeout
from websockets.sync.client import connect

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")

OPEN = """([url, protocols]) => new Promise((resolve) => {
  const ws = new WebSocket(url, protocols);
  window.received = [];
  ws.onmessage = (event) => window.received.push(event.data);
  ws.onopen = () => { window.socket = ws; resolve({open: true, protocol: ws.protocol}); };
  ws.onclose = (event) => resolve({open: false, code: event.code, reason: event.reason});
})"""
#: Resolve with the close code the server sent (a refusal is accepted, then closed with a code).
CLOSED = """([url, protocols]) => new Promise((resolve) => {
  const ws = new WebSocket(url, protocols);
  ws.onclose = (event) => resolve(event.code);
})"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    executable = shutil.which("chromium")
    if executable is None:
        raise RuntimeError("chromium not found: run the tests through `python3 dev.py test` (tools/apt/browser.txt)")
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (CI), where Chromium refuses its sandbox.
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_browser_connects_with_the_token_as_a_subprotocol(browser, start_appliance):
    app = start_appliance(name="browser-token")
    page = browser.new_page()
    try:
        page.goto(app.http + "/")
        url = f"{app.ws}/ws/browser_1"
        opened = page.evaluate(OPEN, [url, ["wsbridge.v1", f"wsbridge.token.{CLIENT_TOKEN}"]])
        assert opened == {"open": True, "protocol": "wsbridge.v1"}

        # Playwright's sync API owns this thread's event loop: the controller uses the sync client.
        with connect(f"{app.ws}/ws/LLM", additional_headers={"X-Auth-Token": CONTROLLER_TOKEN}) as llm:
            llm.send(command("browser_1", "Jump 3"))
            page.wait_for_function("window.received.length > 0", timeout=timeout(5) * 1000)
        assert page.evaluate("window.received") == ["Jump 3"]
        page.evaluate("window.socket.close()")

        # A refusal selects the offered version as well, so the browser sees the close code, not 1006.
        wrong = page.evaluate(CLOSED, [f"{app.ws}/ws/browser_3", ["wsbridge.v1", "wsbridge.token.not-the-token"]])
        assert wrong == 4001
        # The token alone is not enough for a browser: the server never echoes it, and Chromium fails a
        # handshake that selects none of the protocols it offered (hence "offer wsbridge.v1 too" in the docs).
        assert page.evaluate(CLOSED, [f"{app.ws}/ws/browser_4", [f"wsbridge.token.{CLIENT_TOKEN}"]]) == 1006
    finally:
        page.close()
    assert CLIENT_TOKEN not in app.log()
