"""A real browser (headless Chromium via Playwright) speaks protocol version 2: it offers ``wsbridge.v2``
(with its token as a subprotocol entry), receives commands as JSON with their id and sender, and its
``reply_to`` answer reaches the sending controller as the correlated reply."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from support import CLIENT_TOKEN, CONTROLLER_TOKEN, command, timeout
from websockets.sync.client import connect

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")

#: A page that answers every command with {"reply_to": id, "message": "done: " + message}.
ANSWERING = """([url, protocols]) => new Promise((resolve) => {
  const ws = new WebSocket(url, protocols);
  window.received = [];
  ws.onmessage = (event) => {
    window.received.push(event.data);
    const command = JSON.parse(event.data);
    ws.send(JSON.stringify({reply_to: command.id, message: "done: " + command.message}));
  };
  ws.onopen = () => resolve({open: true, protocol: ws.protocol});
  ws.onclose = (event) => resolve({open: false, code: event.code});
})"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    executable = shutil.which("chromium")
    if executable is None:
        raise RuntimeError("chromium not found: run the tests through `python3 dev.py test` (tools/apt/browser.txt)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_browser_client_speaks_v2_and_its_reply_reaches_the_sender(browser, start_appliance):
    app = start_appliance(name="browser-v2")
    page = browser.new_page()
    try:
        page.goto(app.http + "/")
        protocols = ["wsbridge.v2", "wsbridge.v1", f"wsbridge.token.{CLIENT_TOKEN}"]
        opened = page.evaluate(ANSWERING, [f"{app.ws}/ws/browser_v2?groups=web", protocols])
        assert opened == {"open": True, "protocol": "wsbridge.v2"}
        # Playwright's sync API owns this thread's event loop: the controller uses the sync client.
        with connect(f"{app.ws}/ws/planner", additional_headers={"X-Auth-Token": CONTROLLER_TOKEN}) as llm:
            llm.send(command("browser_v2", "Jump 3", id="j-1"))
            frames = [json.loads(llm.recv(timeout=timeout(5))) for _ in range(2)]
        assert frames[0] == {"id": "j-1", "status": "delivered", "target": "browser_v2"}
        assert (frames[1]["reply_to"], frames[1]["sender"], frames[1]["message"]) == (
            "j-1",
            "browser_v2",
            "done: Jump 3",
        )
        assert json.loads(page.evaluate("window.received[0]")) == {"id": "j-1", "from": "planner", "message": "Jump 3"}
    finally:
        page.close()
