"""The dashboard's Send and disconnect actions through the real command service (the one behind /api/v1/commands)."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator

import httpx
import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, timeout, wait_until
from websockets.sync.client import connect

HX = {"HX-Request": "true"}


class Browser:
    def __init__(self, base: str) -> None:
        self.http = httpx.Client(base_url=base, follow_redirects=False, timeout=timeout(20))
        self.csrf = ""

    def get(self, path: str, **kwargs) -> httpx.Response:
        response = self.http.get(path, **kwargs)
        found = re.search(r'name="_csrf_token" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict, **kwargs) -> httpx.Response:
        return self.http.post(path, data={**data, "_csrf_token": self.csrf}, **kwargs)

    def login(self) -> None:
        self.get("/admin/login")
        assert self.post("/admin/login", {"token": ADMIN_TOKEN}).status_code == 303


@pytest.fixture(scope="module")
def app() -> Iterator:
    from support import Appliance

    appliance = Appliance(name="dash-cmd").start()
    yield appliance
    appliance.stop()


@pytest.fixture
def admin(app) -> Iterator[Browser]:
    b = Browser(app.http)
    b.login()
    b.get("/admin/send")
    yield b
    b.http.close()


def ws(app, client_id: str):
    return connect(
        f"{app.ws}/ws/{client_id}", additional_headers={"X-Auth-Token": CLIENT_TOKEN}, open_timeout=timeout(10)
    )


@contextlib.contextmanager
def answering(app, client_id: str, reply) -> Iterator:
    """A client that answers every command with ``reply(command)``, in its own thread."""
    with ws(app, client_id) as socket:

        def loop() -> None:
            with contextlib.suppress(Exception):
                for text in socket:
                    socket.send(reply(text))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        yield socket


def test_send_waits_for_the_reply_and_shows_it_escaped_with_its_round_trip(admin, app):
    evil = "<img src=x onerror=alert(1)>"
    with answering(app, "dash-echo", lambda text: f"done: {text} {evil}"):
        wait_until(
            lambda: '<option value="dash-echo">' in admin.get("/admin/send/targets?target=ECHO").text,
            5,
            "dash-echo suggested",
        )
        response = admin.post(
            "/admin/send",
            {"kind": "client", "target": "dash-echo", "message": "MoveForward <b>10</b>", "wait": "10"},
            headers={**HX, "x-pending-row": "pending-1"},
        )
    assert response.status_code == 200
    row = response.text
    assert 'id="pending-1" hx-swap-oob="delete"' in row
    assert "replied" in row and "<img" not in row and "<b>10</b>" not in row
    assert "done: MoveForward &lt;b&gt;10&lt;/b&gt; &lt;img src=x onerror=alert(1)&gt;" in row
    assert re.search(r"\d+\.\d ms", row)
    page = admin.get("/admin/send").text  # The session's history keeps it, with a resend form.
    assert "done: MoveForward" in page and "Resend" in page
    audit = admin.get("/admin/audit?action=command.").text
    assert "command.send" in audit and "sha256:" in audit and "MoveForward" not in audit


def test_disconnect_one_client_with_4012_and_audit(admin, app):
    with ws(app, "dash-kick") as socket:
        wait_until(lambda: "Connection on" in admin.get("/admin/client?id=dash-kick").text, 5, "dash-kick listed")
        result = admin.post("/admin/client/disconnect", {"id": "dash-kick"}, headers=HX)
        assert "Disconnected 1 connection" in result.text
        with pytest.raises(Exception):  # noqa: B017 (closed by the server)
            socket.recv(timeout=timeout(5))
        assert socket.close_code == 4012
    assert "client.disconnect" in admin.get("/admin/audit?action=client.").text


def test_bulk_disconnect_of_a_selection_and_of_everything_matching(admin, app):
    with contextlib.ExitStack() as stack:
        sockets = {i: stack.enter_context(ws(app, f"bulk-{i}")) for i in range(4)}
        wait_until(
            lambda: len(re.findall(r'data-client-id="bulk-', admin.get("/admin/clients?q=bulk-").text)) == 4,
            5,
            "four bulk clients listed",
        )
        picked = admin.post("/admin/clients/disconnect", {"id": ["bulk-0", "bulk-1"]}, headers=HX)
        assert "Disconnected 2 connections" in picked.text
        for i in (0, 1):
            with pytest.raises(Exception):  # noqa: B017
                sockets[i].recv(timeout=timeout(5))
            assert sockets[i].close_code == 4012
        wait_until(
            lambda: len(re.findall(r'data-client-id="bulk-', admin.get("/admin/clients?q=bulk-").text)) == 2,
            5,
            "two bulk clients left",
        )
        unconfirmed = admin.post("/admin/clients/disconnect", {"scope": "matching", "q": "bulk-"}, headers=HX)
        assert unconfirmed.status_code == 400 and "type 2 to confirm" in unconfirmed.text
        wrong = {"scope": "matching", "q": "bulk-", "confirm": "4"}
        assert admin.post("/admin/clients/disconnect", wrong, headers=HX).status_code == 400
        sockets[2].ping().wait(timeout(5))  # Nothing closed without the right count.
        matching = admin.post(
            "/admin/clients/disconnect", {"scope": "matching", "q": "bulk-", "confirm": "2"}, headers=HX
        )
        assert "Disconnected 2 connections" in matching.text
        for i in (2, 3):
            with pytest.raises(Exception):  # noqa: B017
                sockets[i].recv(timeout=timeout(5))
            assert sockets[i].close_code == 4012


def test_disconnect_all_matching_leaves_controllers_unless_asked(admin, app):
    from support import CONTROLLER_TOKEN

    controller = connect(
        f"{app.ws}/ws/mixed-llm", additional_headers={"X-Auth-Token": CONTROLLER_TOKEN}, open_timeout=timeout(10)
    )
    with controller, ws(app, "mixed-unity"):
        wait_until(
            lambda: len(re.findall(r'data-client-id="mixed-', admin.get("/admin/clients?q=mixed-").text)) == 2,
            5,
            "both listed",
        )
        page = admin.get("/admin/clients?q=mixed-").text
        assert "Type 1 to confirm" in page and "Disconnect all 1 matching clients" in page
        done = admin.post("/admin/clients/disconnect", {"scope": "matching", "q": "mixed-", "confirm": "1"}, headers=HX)
        assert "Disconnected 1 connection" in done.text
        controller.ping().wait(timeout(5))  # The controller stays.
        wait_until(
            lambda: 'data-client-id="mixed-unity"' not in admin.get("/admin/clients?q=mixed-").text, 5, "client gone"
        )
        asked = {"scope": "matching", "q": "mixed-", "controllers": "on", "confirm": "1"}
        assert "Disconnected 1 connection" in admin.post("/admin/clients/disconnect", asked, headers=HX).text
        with pytest.raises(Exception):  # noqa: B017 (closed by the server)
            controller.recv(timeout=timeout(5))
        assert controller.close_code == 4012


def test_groups_protocol_and_token_version_are_shown_and_filter_the_table(admin, app):
    v2 = connect(
        f"{app.ws}/ws/grouped-1?groups=lights,kitchen",
        additional_headers={"X-Auth-Token": CLIENT_TOKEN},
        subprotocols=["wsbridge.v2"],
        open_timeout=timeout(10),
    )
    with v2, ws(app, "ungrouped-1"):
        wait_until(
            lambda: 'data-client-id="grouped-1"' in admin.get("/admin/clients?q=grouped-1").text, 5, "grouped-1 listed"
        )
        page = admin.get("/admin/clients?q=").text
        assert '<option value="kitchen"' in page and '<option value="UNITY_CLIENT_TOKEN:1"' in page
        row = re.search(r'<tr data-client-id="grouped-1"[^>]*>(.*?)</tr>', page, re.S).group(1)
        assert "lights, kitchen" in row and "UNITY_CLIENT_TOKEN v1" in row and ">v2<" in row
        grouped = re.findall(r'data-client-id="([^"]+)"', admin.get("/admin/clients?group=kitchen").text)
        assert grouped == ["grouped-1"]
        by_token = re.findall(
            r'data-client-id="([^"]+)"', admin.get("/admin/clients?token_version=UNITY_CLIENT_TOKEN:1").text
        )
        assert {"grouped-1", "ungrouped-1"} <= set(by_token)
