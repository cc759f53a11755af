"""What the pages say, in real headless Chromium (issue 24 items 4, 11 and 12): every live instance and
the right Instances count, search by a piece of the id, the address or a group, Send suggestions
asked of the server, one time format, System values instead of Python reprs."""

from __future__ import annotations

import json
import re

import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, timeout
from websockets.sync.client import connect

pytestmark = pytest.mark.slow


def ms(seconds: float) -> float:
    return timeout(seconds) * 1000


def sign_in(page, app, path: str) -> None:
    page.goto(app.http + path)
    page.get_by_label("Admin or viewer token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(re.escape(path) + "$"))


def rows(page) -> list[str]:
    return page.locator("#clients-table tbody tr[data-client-id]").evaluate_all(
        "rows => rows.map(r => r.dataset.clientId)"
    )


def test_an_instance_without_connections_is_listed_and_counted(page, start_appliance, own_redis, console):
    serving = start_appliance(redis_url=own_redis.url, name="views-a")
    start_appliance(redis_url=own_redis.url, name="views-b")
    sign_in(page, serving, "/admin/system")
    for name in ("views-a", "views-b"):
        # Neither holds a connection: both are live, both are listed.
        page.locator(f'#instances tr[data-instance="{name}"]').wait_for(timeout=ms(10))
    page.goto(serving.http + "/admin/clients")
    page.locator("#live-state.state-live").wait_for(timeout=ms(10))
    assert page.locator('[data-counter="instances"]').inner_text() == "2"
    assert page.locator('[data-counter="connections"]').inner_text() == "0"
    console.assert_clean()


def test_search_by_a_piece_of_the_id_the_address_or_a_group_in_any_case(page, start_appliance, console):
    app = start_appliance(name="views-search")
    grouped = connect(
        f"{app.ws}/ws/Robot-Kitchen-1?groups=Lights",
        additional_headers={"X-Auth-Token": CLIENT_TOKEN},
        subprotocols=["wsbridge.v2"],
        open_timeout=timeout(10),
    )
    plain = connect(f"{app.ws}/ws/other-client", additional_headers={"X-Auth-Token": CLIENT_TOKEN})
    with grouped, plain:
        sign_in(page, app, "/admin/clients")
        search = page.get_by_label("Search id, address or group")
        for text, expected in (
            ("kitchen", ["Robot-Kitchen-1"]),  # Inside the id, any case.
            ("LIGHT", ["Robot-Kitchen-1"]),  # A group.
            ("127.0.0.1", ["Robot-Kitchen-1", "other-client"]),  # The address.
            ("ther", ["other-client"]),
        ):
            search.fill(text)
            page.wait_for_function(
                "expected => JSON.stringify([...document.querySelectorAll('#clients-table tr[data-client-id]')]"
                ".map(r => r.dataset.clientId)) === JSON.stringify(expected)",
                arg=expected,
                timeout=ms(10),
            )
    console.assert_clean()


def test_send_suggestions_come_from_the_server_beyond_the_first_hundreds(page, start_appliance, own_redis, console):
    app = start_appliance(redis_url=own_redis.url, name="views-send")
    fields: list[str] = []
    for i in range(600):
        record = {"id": f"zz-{i:04d}", "role": "client", "instance": "forged", "remote": "10.0.0.1"}
        fields += [record["id"], json.dumps(record)]
    summary = {"instance": "forged", "epoch": "x", "membership": 600, "connections": 600, "clients": 600}
    own_redis.command("HSET", "wsb:instance:forged", *fields)
    own_redis.command("SET", "wsb:summary:forged", json.dumps(summary), "EX", "120")
    own_redis.command("SADD", "wsb:instances", "forged")
    sign_in(page, app, "/admin/send")
    page.get_by_label("Client id or group").fill("ZZ-0599")  # Sorted, it is the 600th: past any fixed list.
    page.locator('#client-ids option[value="zz-0599"]').wait_for(state="attached", timeout=ms(10))
    assert page.locator("#client-ids option").count() == 1
    page.get_by_label("Client id or group").fill("zz-05")
    page.wait_for_function("() => document.querySelectorAll('#client-ids option').length === 50", timeout=ms(10))
    console.assert_clean()


def test_times_and_system_values_read_as_an_operator_expects(page_with, start_appliance, console, screenshot):
    app = start_appliance(name="views-values")
    page = page_with(timezone_id="Asia/Tokyo")  # Local time is not UTC there.
    with connect(f"{app.ws}/ws/timed-1", additional_headers={"X-Auth-Token": CLIENT_TOKEN}):
        sign_in(page, app, "/admin/clients")
        cell = page.locator('#clients-table tr[data-client-id="timed-1"] time').first
        cell.wait_for(timeout=ms(10))
        assert re.fullmatch(r"\d+ s ago", cell.inner_text())
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", cell.get_attribute("title"))
        page.get_by_label("Times on hover in").select_option("local")
        assert re.search(r"GMT\+9|JST", cell.get_attribute("title"))
        page.reload()  # The choice is kept.
        cell = page.locator('#clients-table tr[data-client-id="timed-1"] time').first
        cell.wait_for(timeout=ms(10))
        assert re.search(r"GMT\+9|JST", cell.get_attribute("title"))
        assert page.get_by_label("Times on hover in").input_value() == "local"
        page.get_by_label("Times on hover in").select_option("utc")
    page.goto(app.http + "/admin/tokens")
    for name in ("ADMIN_TOKEN", "UNITY_CLIENT_TOKEN", "LLM_SECRET_TOKEN"):
        assert page.locator(f'tr[data-token="{name}"] td').nth(4).inner_text() == "never"
    page.goto(app.http + "/admin/system")
    text = page.locator("main").inner_text()
    for repr_ in ("True", "False", "None", "memory (memory"):
        assert repr_ not in text, f"{repr_!r} on the System page"
    assert page.locator("#token-store").inner_text().count("yes") >= 1
    screenshot(page, "system-values")
    console.assert_clean()


def test_audit_filters_and_csv_export(page, start_appliance, console, tmp_path, screenshot):
    app = start_appliance(name="views-audit")
    with connect(f"{app.ws}/ws/audit-target", additional_headers={"X-Auth-Token": CLIENT_TOKEN}):
        sign_in(page, app, "/admin/client?id=audit-target")
        page.get_by_role("button", name="Disconnect").click()
        page.get_by_text("Disconnected 1 connection").wait_for(timeout=ms(10))
    page.goto(app.http + "/admin/audit")
    filters = page.locator("#audit-filters")
    filters.get_by_label("By").fill("admin_tok")  # A piece of the actor's name, any case.
    filters.get_by_label("Target contains").fill("AUDIT-TARG")
    filters.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"actor=admin_tok"))
    actions = page.locator("#audit tbody tr td:nth-child(2)").all_inner_texts()
    assert actions == ["client.disconnect"]
    screenshot(page, "audit-filtered")
    with page.expect_download() as download:
        page.get_by_role("link", name="Export these rows as CSV").click()
    path = tmp_path / "audit.csv"
    download.value.save_as(path)
    lines = path.read_text().splitlines()
    assert lines[0] == "time_utc,action,actor,source,target,detail"
    assert len(lines) == 2 and ",client.disconnect,ADMIN_TOKEN," in lines[1] and ",audit-target," in lines[1]
    # A time range after every event: nothing.
    filters = page.locator("#audit-filters")
    filters.get_by_label("From (UTC)").fill("2099-01-01T00:00:00")
    filters.get_by_role("button", name="Filter").click()
    page.locator("#audit .empty", has_text="No events match these filters").wait_for(timeout=ms(10))
    console.assert_clean()
