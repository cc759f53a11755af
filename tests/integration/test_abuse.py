"""Floods, scanners, slow peers and foreign origins against a real appliance (SECURITY.md, docs/protocol.md).

Peers are told apart by ``X-Forwarded-For``: the appliance trusts it from 127.0.0.1 (the
default ``FORWARDED_ALLOW_IPS``), as it would from Traefik, and loopback itself is exempt
from per-address limits by default, so each test picks documentation addresses.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from support import (
    CLIENT_TOKEN,
    CONTROLLER_TOKEN,
    SCAN,
    closed_with,
    command,
    eventually,
    http_aget,
    recv,
    timeout,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus


def dial(app, client_id: str, token: str | None, address: str | None = None, **headers: str):
    extra = {"X-Auth-Token": token} if token else {}
    if address:
        extra["X-Forwarded-For"] = address
    return connect(f"{app.ws}/ws/{client_id}", additional_headers={**extra, **headers}, open_timeout=timeout(10))


async def handshake_status(app, client_id: str, token: str | None, address: str | None = None, **headers) -> int:
    """101 when the upgrade succeeded (then closed), else the HTTP status that refused it."""
    try:
        async with dial(app, client_id, token, address, **headers):
            return 101
    except InvalidStatus as exc:
        SCAN.capture(f"HTTP body of a refused handshake ({exc.response.status_code})", exc.response.body or b"")
        return exc.response.status_code


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def metrics(app) -> str:
    return (await http_aget(app.http + "/metrics"))[1]


async def test_an_address_that_keeps_failing_handshakes_gets_429_before_any_upgrade(start_appliance):
    app = start_appliance({"MAX_FAILED_HANDSHAKES_PER_MINUTE": "5", "HANDSHAKE_COOLDOWN": "30"})
    scanner, other = "203.0.113.10", "203.0.113.11"
    for _ in range(6):
        async with dial(app, "c1", "guessed-token-000000", scanner) as ws:
            assert (await closed_with(ws))[0] == 4001
    status = await handshake_status(app, "c1", CLIENT_TOKEN, scanner)  # Even the right token: cooling down.
    assert status == 429
    assert await handshake_status(app, "c1", CLIENT_TOKEN, other) == 101
    async with httpx.AsyncClient() as http:
        answer = await http.get(
            app.http + "/api/v1/clients", headers={"X-Auth-Token": CONTROLLER_TOKEN, "X-Forwarded-For": scanner}
        )
        assert answer.status_code == 429 and int(answer.headers["retry-after"]) > 0
        assert (await http.get(app.http + "/healthz", headers={"X-Forwarded-For": scanner})).status_code == 200
    text = await metrics(app)
    assert metric(text, "wsbridge_address_cooldowns_total") == 1
    assert metric(text, 'wsbridge_admission_refused_total{reason="cooldown"}') == 2


async def test_http_401_and_403_count_as_failed_handshakes(start_appliance):
    app = start_appliance({"MAX_FAILED_HANDSHAKES_PER_MINUTE": "3"})
    async with httpx.AsyncClient() as http:
        statuses = [
            (
                await http.get(
                    app.http + "/api/v1/clients",
                    headers={"X-Auth-Token": f"guess-{i:016d}", "X-Forwarded-For": "203.0.113.20"},
                )
            ).status_code
            for i in range(5)
        ]
    assert statuses == [403, 403, 403, 403, 429]


async def test_connections_per_address_are_capped_with_4013(start_appliance):
    app = start_appliance({"MAX_CONNECTIONS_PER_ADDRESS": "3"})
    address = "203.0.113.30"
    held = [await dial(app, f"dev-{i}", CLIENT_TOKEN, address) for i in range(3)]
    try:
        async with dial(app, "dev-3", CLIENT_TOKEN, address) as ws:
            assert await closed_with(ws) == (4013, "too many connections from this address or with this token")
        async with dial(app, "dev-4", CLIENT_TOKEN, "203.0.113.31") as ws, app.controller("LLM") as llm:
            await llm.send(command("dev-4", "still routing"))
            assert await recv(ws) == "still routing"
        await held.pop().close()

        async def admitted():
            async with dial(app, "dev-5", CLIENT_TOKEN, address) as ws:
                await ws.send("hello")
                return ws.protocol.close_rcvd is None
            return False

        assert await eventually(admitted, 5, "a slot freed by a closed connection")
    finally:
        for ws in held:
            await ws.close()


async def test_connections_per_token_are_capped_with_4013_whatever_the_address(start_appliance):
    app = start_appliance({"MAX_CONNECTIONS_PER_TOKEN": "2"})
    held = [await dial(app, f"dev-{i}", CLIENT_TOKEN, f"203.0.113.{40 + i}") for i in range(2)]
    try:
        async with dial(app, "dev-2", CLIENT_TOKEN, "203.0.113.49") as ws:
            assert (await closed_with(ws))[0] == 4013
        async with connect(  # The same token offered as a subprotocol (browsers) counts the same.
            f"{app.ws}/ws/dev-3", subprotocols=["wsbridge.v1", f"wsbridge.token.{CLIENT_TOKEN}"]
        ) as ws:
            assert (await closed_with(ws))[0] == 4013
        async with app.controller("LLM") as llm, app.controller("LLM2") as llm2:  # Another token: its own budget.
            await llm.send(command("dev-0", "go"))
            assert await recv(held[0]) == "go"
            await llm2.send(command("dev-1", "go"))
            assert await recv(held[1]) == "go"
    finally:
        for ws in held:
            await ws.close()


async def test_http_requests_are_rate_limited_per_address_but_not_health_checks(start_appliance):
    app = start_appliance({"HTTP_REQUESTS_PER_SECOND": "1", "HTTP_BURST": "3"})
    async with httpx.AsyncClient() as http:
        busy = {"X-Auth-Token": CONTROLLER_TOKEN, "X-Forwarded-For": "203.0.113.50"}
        statuses = [(await http.get(app.http + "/api/v1/clients", headers=busy)).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        calm = {"X-Auth-Token": CONTROLLER_TOKEN, "X-Forwarded-For": "203.0.113.51"}
        assert (await http.get(app.http + "/api/v1/clients", headers=calm)).status_code == 200
        health = [(await http.get(app.http + "/readyz", headers=busy)).status_code for _ in range(10)]
        assert set(health) == {200}


async def test_refused_handshakes_do_not_flood_the_log(start_appliance):
    app = start_appliance({"LOG_FLOOD_BURST": "5", "LOG_FLOOD_RATE": "1", "MAX_FAILED_HANDSHAKES_PER_MINUTE": "0"})
    started = time.monotonic()
    for i in range(100):
        async with dial(app, f"scan-{i}", "guessed-token-000000", "203.0.113.60") as ws:
            await closed_with(ws)
    elapsed = time.monotonic() - started
    refusals = app.log().count("Refused connection for id")
    assert refusals <= 5 + elapsed + 1, f"{refusals} refusal lines in {elapsed:.1f} s"
    suppressed = sum(
        float(v)
        for v in re.findall(r"^wsbridge_log_lines_suppressed_total\{[^}]*\} ([0-9.e+]+)$", await metrics(app), re.M)
    )
    assert suppressed >= 100 - refusals


async def test_browser_origins_are_checked_and_clients_without_origin_still_connect(start_appliance):
    app = start_appliance({"ALLOWED_ORIGINS": "https://game.example.com"})
    assert await handshake_status(app, "c1", CLIENT_TOKEN, Origin="https://evil.example") == 403
    assert await handshake_status(app, "c1", CLIENT_TOKEN, Origin="null") == 403
    assert await handshake_status(app, "c1", CLIENT_TOKEN, Origin="https://game.example.com") == 101
    assert await handshake_status(app, "c1", CLIENT_TOKEN, Origin=app.http) == 101  # The appliance's own pages.
    assert await handshake_status(app, "c1", CLIENT_TOKEN) == 101
    async with httpx.AsyncClient() as http:
        foreign = await http.post(app.http + "/api/v1/clients", headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403 and foreign.json()["error"] == "cross_origin"
        cross_site = await http.post(app.http + "/api/v1/clients", headers={"Sec-Fetch-Site": "cross-site"})
        assert cross_site.status_code == 403
        own = await http.post(app.http + "/api/v1/clients", headers={"Origin": app.http})
        assert own.status_code != 403  # Reaches the app (405: the API has no POST there).
        # A same-origin form post under Referrer-Policy: no-referrer carries Origin: null (Chromium).
        null_same = {"Origin": "null", "Sec-Fetch-Site": "same-origin"}
        assert (await http.post(app.http + "/api/v1/clients", headers=null_same)).status_code != 403
        null_foreign = {"Origin": "null", "Sec-Fetch-Site": "cross-site"}
        assert (await http.post(app.http + "/api/v1/clients", headers=null_foreign)).status_code == 403
        allowed_site = {"Origin": "https://game.example.com", "Sec-Fetch-Site": "cross-site"}
        assert (await http.post(app.http + "/api/v1/clients", headers=allowed_site)).status_code != 403
        reads = await http.get(app.http + "/", headers={"Origin": "https://evil.example"})
        assert reads.status_code == 200
    text = await metrics(app)
    assert metric(text, 'wsbridge_admission_refused_total{reason="origin"}') == 2
    assert metric(text, 'wsbridge_admission_refused_total{reason="cross_origin"}') == 3


@pytest.mark.slow
async def test_slowloris_peers_are_dropped_and_a_legitimate_client_routes_meanwhile(start_appliance):
    """200 peers that never finish their headers (half silent, half one byte at a time)."""
    deadline = timeout(2)
    app = start_appliance({"HANDSHAKE_TIMEOUT": str(deadline)})
    request = b"GET /ws/slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" * 50
    dropped_after: list[float] = []

    async def slow_peer(dribble: bool) -> None:
        opened = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        try:
            if dribble:
                for byte in request:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    if await _closed_within(reader, 0.2):
                        break
            else:
                await _closed_within(reader, deadline * 4)
        except (ConnectionError, OSError):
            pass
        dropped_after.append(time.monotonic() - opened)
        writer.close()

    peers = [asyncio.create_task(slow_peer(i % 2 == 1)) for i in range(200)]
    try:
        await asyncio.sleep(0.5)  # All 200 are connected and stalling.
        latencies = []
        async with app.connect("legit") as client, app.controller("LLM") as llm:
            for i in range(20):
                sent = time.monotonic()
                await llm.send(command("legit", f"step {i}"))
                assert await recv(client) == f"step {i}"
                latencies.append(time.monotonic() - sent)
        assert max(latencies) < timeout(0.5), latencies
        await asyncio.wait_for(asyncio.gather(*peers), deadline * 4 + timeout(5))
    finally:
        for peer in peers:
            peer.cancel()
    assert len(dropped_after) == 200
    assert min(dropped_after) >= deadline * 0.9, "dropped before the deadline"
    assert max(dropped_after) < deadline + timeout(3), f"slowest drop after {max(dropped_after):.1f} s"
    assert metric(await metrics(app), "wsbridge_handshake_timeouts_total") >= 200


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closed the connection within ``seconds``."""
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
