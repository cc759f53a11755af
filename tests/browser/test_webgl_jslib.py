"""The Unity WebGL transport's JavaScript half (WsBridge.jslib) in real headless Chromium against a real appliance.

The plugin is loaded into ``webgl/harness.html``, a stand-in for the Emscripten runtime of a Unity WebGL
player with only the helpers the plugin may use; the page's small loop does what ``WebGLTransport.cs``
does in C# (poll once per frame, reply, reconnect after a close). The token travels as the subprotocol
``wsbridge.token.<token>`` next to ``wsbridge.v1``, since browsers cannot set headers.

Chromium is Debian's package (tools/apt/browser.txt), driven by Playwright (test extra); nothing is
downloaded at run time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import CLIENT_TOKEN, CONTROLLER_TOKEN, ROOT, timeout
from websockets.sync.client import connect
from websockets.sync.server import serve

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")

JSLIB = ROOT / "unity_project" / "Packages" / "com.wsbridge.client" / "Runtime" / "Plugins" / "WebGL" / "WsBridge.jslib"
HARNESS = Path(__file__).resolve().parent / "webgl" / "harness.html"


@pytest.fixture(scope="module")
def browser(request) -> Iterator:
    """The session's Chromium of tests/browser/conftest.py when there is one (one Playwright per process), else our own."""
    try:
        shared = request.getfixturevalue("chromium")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield shared
        return
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium not found: run the tests through `python3 dev.py test` (tools/apt/browser.txt)")
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (CI), where Chromium refuses its sandbox.
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context()
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    # Chromium logs every failed WebSocket attempt (the server is down during the restart): expected, not a defect.
    tab.on(
        "console",
        lambda message: errors.append(message.text)
        if message.type == "error" and not message.text.startswith("WebSocket connection to")
        else None,
    )
    tab.set_content(HARNESS.read_text())
    tab.add_script_tag(content=JSLIB.read_text())
    tab.evaluate("install()")
    tab.set_default_timeout(timeout(20) * 1000)
    yield tab, errors
    context.close()


def ask(app, target: str, text: str) -> dict:
    """One command from a controller (X-Auth-Token, like the LLM side), and its reply frame."""
    with connect(f"{app.ws}/ws/webgl-llm", additional_headers={"X-Auth-Token": CONTROLLER_TOKEN}) as llm:
        llm.send(json.dumps({"target": target, "message": text}))
        return json.loads(llm.recv(timeout=timeout(10)))


def test_jslib_connects_with_the_subprotocol_token_replies_and_reconnects_after_a_restart(start_appliance, page):
    page, errors = page
    app = start_appliance({"ALLOWED_ORIGINS": "null"}, name="webgl")  # about:blank sends Origin: null
    page.evaluate(
        "([url, token]) => startClient(url, ['wsbridge.v1', 'wsbridge.token.' + token])",
        [f"{app.ws}/ws/webgl-1", CLIENT_TOKEN],
    )
    page.wait_for_function("bridge.connections === 1", timeout=timeout(10) * 1000)
    # The appliance selected the version protocol, never the token entry (it would be echoed back).
    assert page.evaluate("bridge.protocol") == "wsbridge.v1"

    reply = ask(app, "webgl-1", "echo héllo 🎮 from the LLM")
    assert reply == {"sender": "webgl-1", "message": "héllo 🎮 from the LLM"}

    app.terminate()  # every socket closed with 1001
    page.wait_for_function("bridge.closes.length >= 1", timeout=timeout(10) * 1000)
    assert page.evaluate("bridge.closes[0].code") == 1001
    app.start()  # same port; the page's loop reconnects
    page.wait_for_function("bridge.connections === 2", timeout=timeout(20) * 1000)
    assert ask(app, "webgl-1", "echo after restart") == {"sender": "webgl-1", "message": "after restart"}

    # A local close with a code browsers may not send (1009) goes out as 1000 instead of throwing.
    with connect(f"{app.ws}/ws/webgl-llm", additional_headers={"X-Auth-Token": CONTROLLER_TOKEN}) as llm:
        llm.send(json.dumps({"target": "webgl-1", "message": "close-too-big"}))
        page.wait_for_function("bridge.closes.length >= 2", timeout=timeout(10) * 1000)
    page.evaluate("bridge.stopped = true")
    assert errors == []
    assert CLIENT_TOKEN not in app.log()


def test_jslib_reports_a_refused_token_as_a_close_code(start_appliance, page):
    page, errors = page
    app = start_appliance({"ALLOWED_ORIGINS": "null"}, name="webgl-refused")  # about:blank sends Origin: null
    page.evaluate(
        "([url]) => { bridge.stopped = true; startClient(url, ['wsbridge.v1', 'wsbridge.token.wrong-token']); }",
        [f"{app.ws}/ws/webgl-2"],
    )
    page.wait_for_function("bridge.closes.length === 1", timeout=timeout(10) * 1000)
    assert page.evaluate("bridge.closes[0].code") == 4001
    assert errors == []


def test_jslib_stamps_what_a_hidden_tab_queues_and_bounds_the_queue(start_appliance, page):
    """Issue 25 item 5: while the player loop does not run (a hidden tab) the plugin keeps receiving; each message's
    wait is reported with it, and beyond WsBridge.maxQueued messages the socket is closed with 4008."""
    page, errors = page
    app = start_appliance({"ALLOWED_ORIGINS": "null"}, name="webgl-hidden")
    page.evaluate(
        "([url, token]) => startClient(url, ['wsbridge.v1', 'wsbridge.token.' + token])",
        [f"{app.ws}/ws/webgl-3", CLIENT_TOKEN],
    )
    page.wait_for_function("bridge.connections === 1", timeout=timeout(10) * 1000)
    page.evaluate("bridge.paused = true; WsBridge.maxQueued = 3")
    queued = "WsBridge.sockets[bridge.socket].events"
    with connect(f"{app.ws}/ws/webgl-llm", additional_headers={"X-Auth-Token": CONTROLLER_TOKEN}) as llm:
        for text in ("first", "second"):
            llm.send(json.dumps({"target": "webgl-3", "message": text}))
        page.wait_for_function(f"{queued}.length === 2", timeout=timeout(10) * 1000)
        # The tab stays hidden for at least 300 ms after the second message arrived.
        page.wait_for_function(f"performance.now() - {queued}[1].at > 300", timeout=timeout(10) * 1000)
        page.evaluate("bridge.paused = false")
        page.wait_for_function("bridge.messages.length === 2", timeout=timeout(10) * 1000)
        assert page.evaluate("bridge.messages") == ["first", "second"]
        ages = page.evaluate("bridge.ages")
        assert all(age >= 300 for age in ages), ages

        # Hidden again: three more are kept, the fourth closes the socket (4008) instead of growing the queue.
        page.evaluate("bridge.paused = true; bridge.stopped = true")
        for number in range(4):
            llm.send(json.dumps({"target": "webgl-3", "message": f"burst {number}"}))
        page.wait_for_function(f"{queued}.some(event => event.text.charAt(0) === 'c')", timeout=timeout(10) * 1000)
        assert page.evaluate(f"{queued}.length") == 4  # three messages and the close
        page.evaluate("bridge.paused = false")
        page.wait_for_function("bridge.closes.length === 1", timeout=timeout(10) * 1000)
    assert page.evaluate("bridge.messages.slice(2)") == ["burst 0", "burst 1", "burst 2"]
    assert page.evaluate("bridge.closes[0].code") == 4008
    assert errors == []


def test_jslib_decodes_a_binary_message_as_text_like_the_desktop_transport(page):
    """Issue 25 item 10: ClientWebSocket's transport reads a binary message as UTF-8 text; the plugin dropped it."""
    page, errors = page

    def binary_then_text(ws) -> None:
        ws.send("héllo 🎮".encode())  # bytes: a binary frame
        ws.send("text")
        with contextlib.suppress(Exception):
            ws.recv(timeout=timeout(10))

    with serve(binary_then_text, "127.0.0.1", 0, subprotocols=["wsbridge.v1"]) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.socket.getsockname()[1]
            page.evaluate(
                "([url]) => { bridge.stopped = true; startClient(url, ['wsbridge.v1', 'wsbridge.token.t']); }",
                [f"ws://127.0.0.1:{port}/ws/webgl-binary"],
            )
            page.wait_for_function("bridge.messages.length === 2", timeout=timeout(10) * 1000)
            assert page.evaluate("bridge.messages") == ["héllo 🎮", "text"]
        finally:
            server.shutdown()
            thread.join(timeout(10))
    assert errors == []
