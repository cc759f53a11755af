"""The cluster as it is (issue 24 items 3, 13 and 15), in real headless Chromium against two appliances
on a real Redis: an instance killed with SIGKILL is shown stale within a heartbeat, with its clients;
when its presence expires each of its connections' history says it was lost; the System page shows
rates and the last hour's trends as server-drawn SVG under the strict CSP."""

from __future__ import annotations

import json
import re

import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, timeout
from websockets.sync.client import connect

pytestmark = pytest.mark.slow

#: Heartbeats every 3 s (a third of the TTL): stale 4.5 s after the last beat, expired after 9 s.
TTL = "9"


def ms(seconds: float) -> float:
    return timeout(seconds) * 1000


def sign_in(page, app, path: str) -> None:
    page.goto(app.http + path)
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(path) + "$"))


def ws(app, client_id: str, token: str = CLIENT_TOKEN):
    return connect(f"{app.ws}/ws/{client_id}", additional_headers={"X-Auth-Token": token}, open_timeout=timeout(10))


def traffic(controller, client, rounds: int) -> None:
    """Commands to ``client`` and its replies: what the rates and trends count."""
    for i in range(rounds):
        controller.send(json.dumps({"target": "hb-survivor", "message": f"step {i}"}))
        assert client.recv(timeout=timeout(10)) == f"step {i}"
        client.send(f"done {i}")


def test_a_killed_instance_turns_stale_then_its_connections_are_recorded_as_lost(
    page, start_appliance, own_redis, console, screenshot
):
    env = {"PRESENCE_TTL": TTL}
    a = start_appliance(env, redis_url=own_redis.url, name="hb-a")
    b = start_appliance(env, redis_url=own_redis.url, name="hb-b")
    with ws(a, "hb-ctl", CONTROLLER_TOKEN) as controller, ws(a, "hb-survivor") as survivor:
        victim = ws(b, "hb-victim")
        traffic(controller, survivor, 20)
        sign_in(page, a, "/admin/system")
        # Both beat: uptime, version, memory and Redis latency from each instance's own heartbeat.
        for name in ("hb-a", "hb-b"):
            row = page.locator(f'#instances tr[data-instance="{name}"][data-status="live"]')
            row.wait_for(timeout=ms(15))
            assert re.search(r"\d+ MiB", row.inner_text()) and re.search(r"[\d.]+ ms", row.inner_text())

        # Rates: a second beat after the traffic gives this instance's commands per second.
        def rated() -> bool:
            traffic(controller, survivor, 5)
            page.reload()
            cell = page.locator('#instances tr[data-instance="hb-a"] td').nth(9).inner_text()
            return bool(re.match(r"[1-9][\d.]* / ", cell))

        _wait(page, rated, 20, "a commands-per-second rate on hb-a")

        page.goto(a.http + "/admin/clients")
        page.locator('#clients-table tr[data-client-id="hb-victim"]:not(.stale)').wait_for(timeout=ms(10))
        page.locator("#live-state.state-live").wait_for(timeout=ms(10))
        b.kill()  # SIGKILL: no goodbye, its presence stays in Redis until the TTL.
        # Stale within a heartbeat: the row, and a banner naming the instance, with no reload.
        page.locator('#clients-table tr[data-client-id="hb-victim"][data-stale="true"]').wait_for(timeout=ms(8))
        assert "hb-b" in page.locator("#stale-instances").inner_text()
        # The badge does not say "Live" for them.
        page.locator("#live-state.state-stale").wait_for(timeout=ms(5))
        assert "hb-b" in page.locator("#live-state").inner_text()
        assert page.locator('#clients-table tr[data-client-id="hb-survivor"].stale').count() == 0
        page.goto(a.http + "/admin/system")
        stale = page.locator('#instances tr[data-instance="hb-b"][data-status="stale"]')
        if stale.count():  # Still within its TTL (a slow machine may be past it): the view to show.
            page.locator('#trends svg.chart[data-field="connections"]').first.wait_for(timeout=ms(5))
            screenshot(page, "system-cluster")

        # Once its presence expired: gone from the list, and its connection's history says why.
        page.goto(a.http + "/admin/clients")
        page.locator('#clients-table tr[data-client-id="hb-victim"]').wait_for(state="detached", timeout=ms(20))

        def lost_recorded() -> bool:
            page.goto(a.http + "/admin/client?id=hb-victim")
            return "instance lost" in page.locator("#connect-history").inner_text()

        _wait(page, lost_recorded, 15, "the lost-instance history entry")
        history = page.locator("#connect-history").inner_text()
        assert "hb-b lost" in history and "1006" in history
        screenshot(page, "client-instance-lost")

        # Trends: charts drawn on the server, cluster-wide and per instance, with points.
        page.goto(a.http + "/admin/system")
        assert page.locator('#instances tr[data-instance="hb-b"]').count() == 0
        cluster = page.locator('#trends .charts[data-scope="cluster"] svg.chart')
        assert cluster.count() == 5
        drawn = page.locator('#trends .charts[data-scope="cluster"] svg.chart[data-field="commands_in"]')
        assert int(drawn.get_attribute("data-points") or 0) >= 2
        assert drawn.locator("polyline").count() >= 1
        own = page.locator('#trends .charts[data-instance="hb-a"] svg.chart')
        assert own.count() == 5
        victim.close_timeout = 0.1
    console.assert_clean()


def _wait(page, condition, within: float, message: str) -> None:
    """Poll ``condition`` (which may reload the page) until true, without fixed sleeps between tries."""
    import time

    deadline = time.monotonic() + timeout(within)
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {message}")
        page.wait_for_timeout(250)
