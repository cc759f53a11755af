"""Send a command and disconnect a client from the dashboard, in real headless Chromium."""

from __future__ import annotations

import contextlib
import json
import re
import threading

import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, timeout
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def ms(seconds: float) -> float:
    return timeout(seconds) * 1000


@pytest.fixture(scope="module")
def app():
    from support import Appliance

    appliance = Appliance(name="browser-cmd").start()
    yield appliance
    appliance.stop()


def sign_in(page, app, path: str) -> None:
    page.goto(app.http + path)
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(path) + "$"))


def test_send_a_command_and_see_the_reply_appear(page, app, console, screenshot):
    with connect(f"{app.ws}/ws/unity-1", additional_headers={"X-Auth-Token": CLIENT_TOKEN}) as unity:

        def answer() -> None:
            with contextlib.suppress(Exception):
                for text in unity:
                    unity.send(f"done: {text} <script>alert(1)</script>")

        threading.Thread(target=answer, daemon=True).start()
        sign_in(page, app, "/admin/send")
        page.get_by_label("Client id or group").fill("unity-1")
        page.get_by_label("Message").fill("MoveForward 10")
        page.get_by_role("button", name="Send", exact=True).click()
        row = page.locator("#sent-rows tr.status-replied").first
        row.wait_for(timeout=ms(15))
        assert "done: MoveForward 10 <script>alert(1)</script>" in row.inner_text()
        assert page.locator("#sent-rows tr.pending").count() == 0
        assert page.locator("#sent-rows script").count() == 0
        screenshot(page, "send")
        # The client's detail page lists it among its recent commands, with the reply and round trip.
        page.goto(app.http + "/admin/client?id=unity-1")
        recent = page.locator('#recent-commands tr[data-outcome="replied"]').first
        recent.wait_for(timeout=ms(10))
        assert re.search(r"MoveForward 10.*done: MoveForward 10 <script>.* ms", recent.inner_text(), re.S)
        assert page.locator("#recent-commands script").count() == 0
        screenshot(page, "client-recent-commands")
    console.assert_clean()


def test_disconnect_a_client_after_confirming(page, app, console):
    with connect(f"{app.ws}/ws/kick-me", additional_headers={"X-Auth-Token": CLIENT_TOKEN}) as socket:
        sign_in(page, app, "/admin/clients")
        page.locator('#clients-table tr[data-client-id="kick-me"] a').click()
        page.wait_for_url(re.compile(r"/admin/client\?id=kick-me"))
        page.get_by_role("button", name="Disconnect").click()  # The confirm dialog is accepted by the fixture.
        page.get_by_text("Disconnected 1 connection").wait_for(timeout=ms(10))
        with pytest.raises(Exception):  # noqa: B017 (closed by the server)
            socket.recv(timeout=timeout(5))
        assert socket.close_code == 4012
    console.assert_clean()


def test_bulk_disconnect_of_selected_rows(page, app, console):
    with contextlib.ExitStack() as stack:
        sockets = [
            stack.enter_context(connect(f"{app.ws}/ws/sel-{i}", additional_headers={"X-Auth-Token": CLIENT_TOKEN}))
            for i in range(3)
        ]
        sign_in(page, app, "/admin/clients")
        for i in range(3):
            page.locator(f'#clients-table tr[data-client-id="sel-{i}"]').wait_for(timeout=ms(10))
        page.get_by_label("Select sel-0").check()
        page.get_by_label("Select sel-2").check()
        page.get_by_role("button", name="Disconnect selected").click()
        page.get_by_text("Disconnected 2 connections").wait_for(timeout=ms(10))
        for i in (0, 2):
            with pytest.raises(Exception):  # noqa: B017 (closed by the server)
                sockets[i].recv(timeout=timeout(5))
            assert sockets[i].close_code == 4012
        sockets[1].ping().wait(timeout(5))  # The one left unticked is still connected.
        # The table refreshes (ticked rows no longer hold live updates back) and loses the two.
        page.locator('#clients-table tr[data-client-id="sel-0"]').wait_for(state="detached", timeout=ms(15))
        assert page.locator('#clients-table tr[data-client-id="sel-1"]').count() == 1
    console.assert_clean()


def test_a_group_send_shows_how_many_received_it_and_an_offline_target_no_round_trip(page, app, console):
    with contextlib.ExitStack() as stack:
        for i in range(2):
            stack.enter_context(
                connect(f"{app.ws}/ws/grp-{i}?groups=team-a", additional_headers={"X-Auth-Token": CLIENT_TOKEN})
            )
        sign_in(page, app, "/admin/send")
        page.get_by_label("Kind").select_option("group")
        page.get_by_label("Client id or group").fill("team-a")
        page.get_by_label("Message").fill("Regroup")
        page.get_by_role("button", name="Send", exact=True).click()
        row = page.locator("#sent-rows tr.status-delivered").first
        row.wait_for(timeout=ms(15))
        assert "to 2 clients" in row.inner_text()
    page.get_by_label("Kind").select_option("client")
    page.get_by_label("Client id or group").fill("nobody-home")
    page.get_by_label("Message").fill("Hello?")
    page.get_by_role("button", name="Send", exact=True).click()
    offline = page.locator("#sent-rows tr.status-target_offline").first
    offline.wait_for(timeout=ms(15))
    assert offline.locator("td.num").inner_text().strip() == ""  # No round trip without a reply.
    console.assert_clean()


def test_a_waited_group_send_shows_each_v2_clients_reply_and_who_stayed_silent(page, app, console, screenshot):
    headers = {"X-Auth-Token": CLIENT_TOKEN}
    with contextlib.ExitStack() as stack:
        speaker = stack.enter_context(
            connect(f"{app.ws}/ws/crew-speaker?groups=crew", additional_headers=headers, subprotocols=["wsbridge.v2"])
        )
        stack.enter_context(
            connect(f"{app.ws}/ws/crew-silent?groups=crew", additional_headers=headers, subprotocols=["wsbridge.v2"])
        )

        def answer() -> None:
            with contextlib.suppress(Exception):
                for text in speaker:
                    frame = json.loads(text)
                    speaker.send(json.dumps({"reply_to": frame["id"], "message": f"aye: {frame['message']}"}))

        threading.Thread(target=answer, daemon=True).start()
        sign_in(page, app, "/admin/send")
        page.get_by_label("Kind").select_option("group")
        page.get_by_label("Client id or group").fill("crew")
        page.get_by_label("Message").fill("Report")
        page.get_by_label("Wait for the reply (s, 0 = do not wait)").fill(str(timeout(3)))
        page.get_by_role("button", name="Send", exact=True).click()
        row = page.locator("#sent-rows tr.status-delivered").first
        row.wait_for(timeout=ms(30))
        assert "to 2 clients" in row.inner_text()
        assert row.locator("li.reply").inner_text().startswith("crew-speaker: aye: Report")
        assert "crew-silent" in row.locator("li.no-reply").inner_text()
        assert row.locator("td.num").inner_text().strip() == ""  # Round trips per client, none for the send.
        screenshot(page, "send-group-replies")
    console.assert_clean()


def test_a_client_page_follows_its_disconnect_and_its_return_live(page, app, console):
    socket = connect(f"{app.ws}/ws/live-detail", additional_headers={"X-Auth-Token": CLIENT_TOKEN})
    with socket:
        sign_in(page, app, "/admin/client?id=live-detail")
        # The page may be read before the relay has claimed the id; the next 15 s re-read shows it.
        page.locator("#client-live section.card h2", has_text="Connection on").wait_for(timeout=ms(35))
        page.get_by_role("button", name="Disconnect").click()
        page.get_by_text("Disconnected 1 connection").wait_for(timeout=ms(10))
        # No reload: the connection card goes, the history gains the 4012 entry, the button leaves.
        # Within two of the page's 15 s re-reads at worst: a refresh on "changed" may run before
        # the close is in the history.
        page.locator("#not-connected").wait_for(timeout=ms(35))
        page.locator('#connect-history tr[data-close-code="4012"]').wait_for(timeout=ms(35))
        assert page.get_by_role("button", name="Disconnect").count() == 0
        assert page.locator("#client-live section.card h2", has_text="Connection on").count() == 0
    with connect(f"{app.ws}/ws/live-detail", additional_headers={"X-Auth-Token": CLIENT_TOKEN}):
        # It comes back: the stream says a connection came, and the page shows it.
        page.locator("#client-live section.card h2", has_text="Connection on").wait_for(timeout=ms(35))
        assert page.locator("#not-connected").count() == 0
    console.assert_clean()
