"""The dashboard's Send and disconnect actions in-process: the real app, its real command service, fake sockets.

Litestar's TestClient runs the whole app (lifespan, plugins, the dashboard's session and CSRF
checks) on an event loop of its own; the clients are :class:`Answering` connections opened on
that loop through the client's portal, so only the WebSocket transport is a stand-in.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.core.protocol import CloseCode, Role
from appliance.settings import Settings

ADMIN = "a" * 32
HX = {"HX-Request": "true"}


class Answering:
    """A client connection that answers every command at once with ``reply(command)``."""

    def __init__(self, app: Any, client_id: str, reply=None) -> None:
        self.relay = app.state.relay
        self.reply = reply
        self.close_code: int | None = None
        self.conn = self.relay.new_connection(client_id, Role.CLIENT, self._send, "127.0.0.1:1")

    async def _send(self, event: dict[str, Any]) -> None:
        if event["type"] != "websocket.send":
            self.close_code = event["code"]
        elif self.reply is not None:
            answer = self.reply(event["text"])
            self.relay.perform(self.conn, self.conn.session.receive_text(answer, time.time()))

    async def open(self) -> Answering:
        assert await self.relay.open(self.conn) is None
        self.conn.opened()
        return self


class Admin:
    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.csrf = ""

    def get(self, path: str) -> Any:
        response = self.client.get(path)
        found = re.search(r'name="_csrf_token" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict[str, str], **kwargs: Any) -> Any:
        return self.client.post(path, data={**data, "_csrf_token": self.csrf}, follow_redirects=False, **kwargs)


@pytest.fixture(scope="module")
def admin() -> Iterator[Admin]:
    """One app for the module: starting it (lifespan, MCP, dashboard) costs more than the tests."""
    settings = Settings(
        _env_file=None, llm_secret_token="c" * 32, unity_client_token="u" * 32, admin_token=ADMIN, instance_id="unit"
    )
    with TestClient(create_app(settings)) as client:
        admin = Admin(client)
        admin.get("/admin/login")
        assert admin.post("/admin/login", {"token": ADMIN}).status_code == 303
        admin.get("/admin/send")
        yield admin


def connect(admin: Admin, client_id: str, reply=None) -> Answering:
    async def opened() -> Answering:
        return await Answering(admin.client.app, client_id, reply).open()

    assert admin.client.blocking_portal is not None
    return admin.client.blocking_portal.call(opened)


def test_send_waits_for_the_reply_and_shows_it_escaped(admin):
    connect(admin, "echo", lambda text: f"done: {text} <img src=x>")
    response = admin.post(
        "/admin/send", {"kind": "client", "target": "echo", "message": "Move <b>10</b>", "wait": "5"}, headers=HX
    )
    assert response.status_code == 200
    assert "replied" in response.text and "<img" not in response.text
    assert "done: Move &lt;b&gt;10&lt;/b&gt; &lt;img src=x&gt;" in response.text
    assert "command.send" in admin.get("/admin/audit?action=command.").text


def test_send_to_an_offline_target_says_so_and_an_empty_form_is_refused(admin):
    row = admin.post("/admin/send", {"kind": "client", "target": "nobody", "message": "x", "wait": "2"}, headers=HX)
    assert "target_offline" in row.text or "offline" in row.text
    row = admin.post("/admin/send", {"kind": "client", "target": "", "message": ""}, headers=HX)
    assert "invalid" in row.text and "choose a target" in row.text


def test_disconnect_closes_the_client_with_4012_and_is_audited(admin):
    client = connect(admin, "kick")
    result = admin.post("/admin/client/disconnect", {"id": "kick"}, headers=HX)
    assert "Disconnected 1 connection" in result.text
    assert client.close_code == CloseCode.DISCONNECTED
    assert "client.disconnect" in admin.get("/admin/audit?action=client.").text


def test_the_ban_api_bans_lists_and_lifts_with_the_admin_token_only_and_audits_each(admin):
    """/api/v1/bans in process (appliance/bans_api.py); the two-instance test is tests/integration/test_new_ids.py."""
    http, headers = admin.client, {"X-Auth-Token": ADMIN}
    sent = {"target": "kiosk-1", "seconds": 600}
    assert http.post("/api/v1/bans", json=sent, headers={"X-Auth-Token": "u" * 32}).status_code == 403
    assert http.post("/api/v1/bans", json={**sent, "seconds": 10}, headers=headers).status_code in (400, 422)
    wide = http.post("/api/v1/bans", json={**sent, "target": "10.0.0.0/6"}, headers=headers)
    assert wide.status_code == 422 and "too wide" in wide.json()["detail"]
    made = http.post("/api/v1/bans", json={**sent, "target": "2001:db8::5", "reason": "scan"}, headers=headers)
    assert made.status_code == 201 and made.json()["key"] == "address:2001:db8::5/128" and made.json()["closed"] == 0
    assert [b["key"] for b in http.get("/api/v1/bans", headers=headers).json()["bans"]] == ["address:2001:db8::5/128"]
    assert http.delete("/api/v1/bans", params={"target": "2001:db8::5"}, headers=headers).status_code == 204
    assert http.delete("/api/v1/bans", params={"target": "2001:db8::5"}, headers=headers).status_code == 404
    assert http.get("/api/v1/bans", headers=headers).json() == {"bans": []}
    assert http.blocking_portal is not None
    events = http.blocking_portal.call(http.app.state.audit.recent, 10, "ban.")
    assert [(e.action, e.target, e.detail.get("via")) for e in events] == [
        ("ban.lift", "address:2001:db8::5/128", "api"),
        ("ban.add", "address:2001:db8::5/128", "api"),
    ]
