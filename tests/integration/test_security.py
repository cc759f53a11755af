"""Attacks from issue #20 replayed against real appliances; each test failed before its fix.

Real uvicorn (``wsbridge serve``), a real moto SSM for scoped tokens, real Redis where the
case is about a cluster.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import html.parser
import io
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from moto_support import MotoServer, seed, unique_prefix
from support import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    CONTROLLER_TOKEN,
    SCAN,
    closed_with,
    command,
    eventually,
    recv,
    recv_json,
    timeout,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

SEED = {"LLM_SECRET_TOKEN": CONTROLLER_TOKEN, "UNITY_CLIENT_TOKEN": CLIENT_TOKEN, "ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


def scoped_token(name: str) -> str:
    value = secrets.token_urlsafe(32)
    SCAN.add_secrets({f"client_tokens/{name}": value})
    return value


# --- 1. scoped client tokens and groups -------------------------------------------------------------


async def test_scoped_token_joins_only_the_groups_it_names_and_the_shared_token_any(start_appliance, moto):
    prefix = unique_prefix()
    kiosks, bare = scoped_token("kiosks"), scoped_token("bare")
    seed(
        moto.ssm(),
        prefix,
        {
            **SEED,
            "client_tokens/kiosks": json.dumps({"ids": "kiosk-*", "groups": ["kiosks"], "token": kiosks}),
            "client_tokens/bare": json.dumps({"ids": "bare-*", "token": bare}),
        },
    )
    app = start_appliance(moto.appliance_env(prefix), name="groups")
    # The attack: a kiosk token joining another fleet's groups is refused before it is registered.
    async with app.connect("kiosk-7?groups=lights,doors", kiosks) as intruder:
        assert (await closed_with(intruder))[0] == 4014
    async with app.connect("kiosk-8?groups=kiosks,lights", kiosks) as intruder:
        assert (await closed_with(intruder))[0] == 4014
    async with app.connect("bare-1?groups=kiosks", bare) as intruder:  # no "groups": no group at all
        assert (await closed_with(intruder))[0] == 4014
    async with (
        app.connect("kiosk-1?groups=kiosks", kiosks) as kiosk,
        app.connect("bare-2", bare) as plain,
        app.connect("lamp_1?groups=lights", CLIENT_TOKEN) as lamp,  # the shared token: any group, as before
        app.controller() as llm,
    ):
        await llm.send(command("group:lights", "on", id=1))
        assert await recv(lamp) == "on"
        assert (await recv_json(llm))["count"] == 1  # the refused intruders are not counted
        await llm.send(command("group:kiosks", "wake", id=2))
        assert await recv(kiosk) == "wake"
        assert (await recv_json(llm))["count"] == 1
        await llm.send(command("bare-2", "hello"))
        assert await recv(plain) == "hello"
    body = (await app.aget("/metrics"))[1]
    assert 'wsbridge_connections_closed_total{reason="group_not_allowed"} 3.0' in body
    async with httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as admin:  # what the operator sees
        await _sign_in(admin, ADMIN_TOKEN)
        page = (await admin.get("/admin/tokens")).text
    assert "ids kiosk-*; groups kiosks" in page and "ids bare-*; groups none" in page


# --- 3. the sign-in lock-out under a burst ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_burst_of_sign_ins_from_one_address_gets_at_most_five_judged(start_appliance, request, backend):
    redis_url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    # Only the sign-in limiter decides here; an address of its own, so the lock-out it leaves in the shared
    # Redis touches no other test.
    limits_off = {"MAX_FAILED_HANDSHAKES_PER_MINUTE": "0", "HTTP_REQUESTS_PER_SECOND": "0"}
    app = start_appliance(limits_off, redis_url=redis_url, name=f"burst-{backend}")
    address = {"X-Forwarded-For": f"198.51.100.{207 if backend == 'memory' else 208}"}
    async with httpx.AsyncClient(
        base_url=app.http, timeout=timeout(60), limits=httpx.Limits(max_connections=200), headers=address
    ) as http:
        page = await http.get("/admin/login")
        csrf = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
        guesses = [f"wrong-guess-{i:03d}" for i in range(149)]
        guesses.insert(75, ADMIN_TOKEN)  # the right one in the middle of the burst, from the same address

        async def sign_in(token: str) -> int:
            response = await http.post("/admin/login", data={"token": token, "_csrf_token": csrf})
            return response.status_code

        statuses = await asyncio.gather(*(sign_in(token) for token in guesses))
    judged = [status for status in statuses if status != 429]
    assert len(judged) <= 5, sorted(statuses)
    assert set(judged) <= {401, 303}
    # The lock-out holds afterwards too, whoever got in: the right token is refused now.
    async with httpx.AsyncClient(base_url=app.http, timeout=timeout(10), headers=address) as late:
        page = await late.get("/admin/login")
        csrf = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
        response = await late.post("/admin/login", data={"token": ADMIN_TOKEN, "_csrf_token": csrf})
        if 303 not in judged:  # the right one lost the race: the address stays locked out
            assert response.status_code == 429


# --- 2. slow request bodies ------------------------------------------------------------------------------

SLOW_BODY = (
    b"POST /api/v1/commands HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\nContent-Length: 100\r\n%s\r\n"
)


async def slow_body(app, address: str | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request that announces 100 bytes of body and never sends them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    forwarded = f"X-Forwarded-For: {address}\r\n".encode() if address else b""
    writer.write(SLOW_BODY % forwarded)
    await writer.drain()
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        async with asyncio.timeout(timeout(within)):
            while await reader.read(65536):
                pass  # An answer, if any; then the end.
    except TimeoutError:
        return False
    except ConnectionError:
        pass  # Aborted: a reset is a close too.
    return True


async def test_a_body_that_never_comes_is_dropped_at_the_deadline_and_healthz_stays_served(start_appliance):
    app = start_appliance({"HANDSHAKE_TIMEOUT": "2"}, name="slowbody")
    held = [await slow_body(app) for _ in range(200)]
    try:
        for _ in range(3):
            status, _ = await app.aget("/healthz")
            assert status == 200
        async with app.connect("device_1") as device, app.controller() as llm:
            await llm.send(command("device_1", "still served"))
            assert await recv(device) == "still served"
        closed = await asyncio.gather(*(closed_by_server(reader, 30) for reader, _ in held))
        assert all(closed), f"{closed.count(False)} of {len(closed)} slow bodies still open"
    finally:
        for _, writer in held:
            writer.close()
    metrics_text = (await app.aget("/metrics"))[1]
    assert "wsbridge_handshake_timeouts_total 200.0" in metrics_text


async def test_requests_waiting_for_their_body_count_in_the_per_address_cap(start_appliance):
    app = start_appliance(
        {"HANDSHAKE_TIMEOUT": "60", "MAX_CONNECTIONS_PER_ADDRESS": "20", "LIMITS_EXEMPT_IPS": ""}, name="slowcap"
    )
    attacker, bystander = "203.0.113.9", "203.0.113.10"
    held = [await slow_body(app, attacker) for _ in range(20)]
    try:
        async with httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as http:

            async def refused() -> bool:
                # With a valid token, so no failed handshake (and no cool-down) can explain a 429.
                headers = {"X-Forwarded-For": attacker, "X-Auth-Token": CONTROLLER_TOKEN}
                response = await http.get("/api/v1/clients", headers=headers)
                return response.status_code == 429 and response.json()["error"] == "too_many_connections"

            await eventually(refused, 10, "the attacker's 21st request refused")
            response = await http.get(
                "/api/v1/clients", headers={"X-Forwarded-For": bystander, "X-Auth-Token": CONTROLLER_TOKEN}
            )
            assert response.status_code == 200
            assert (await app.aget("/healthz"))[0] == 200
        # A body announced too large is refused before a byte of it is read, at once and not at the deadline.
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
        writer.write(b"POST /api/v1/commands HTTP/1.1\r\nHost: bridge\r\nContent-Length: 500000000\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(65536), timeout(10))
        writer.close()
        assert answer.startswith(b"HTTP/1.1 413 ") and b"body_too_large" in answer
        headers = {"X-Auth-Token": CLIENT_TOKEN, "X-Forwarded-For": attacker}
        async with connect(f"{app.ws}/ws/device_2", additional_headers=headers) as device:
            assert (await closed_with(device))[0] == 4013
    finally:
        for _, writer in held:
            writer.close()


# --- 5. no page loads a script from elsewhere ------------------------------------------------------------

#: Where the crawl starts: the public pages, the documentation UIs Litestar can serve, the dashboard.
START_PAGES = [
    "/",
    "/healthz",
    "/readyz",
    "/schema",
    "/schema/openapi.json",
    "/schema/swagger",
    "/schema/redoc",
    "/schema/elements",
    "/schema/rapidoc",
    "/schema/openapi.yaml",
    "/admin/",
    "/admin/login",
    "/admin/clients",
    "/admin/system",
    "/admin/audit",
    "/admin/client?id=crawl_1",
    "/admin/send",
    "/admin/tokens",
]


_LOADS = frozenset({("script", "src"), ("link", "href"), ("iframe", "src"), ("img", "src"), ("embed", "src")})


class _References(html.parser.HTMLParser):
    """Every URL a page makes the browser load (scripts, styles, frames, images) and every link it offers."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if (tag, name) in _LOADS:
                self.loads.append(value)
            elif tag == "a" and name == "href":
                self.links.append(value)


async def test_no_page_of_the_appliance_references_a_script_outside_its_own_origin(start_appliance):
    app = start_appliance({"VIEWER_TOKEN": secrets.token_urlsafe(32)}, name="crawl")
    own = urllib.parse.urlsplit(app.http).netloc
    async with (
        app.connect("crawl_1"),
        httpx.AsyncClient(base_url=app.http, timeout=timeout(10), follow_redirects=True) as http,
    ):
        page = await http.get("/admin/login")
        csrf = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
        signed_in = await http.post("/admin/login", data={"token": ADMIN_TOKEN, "_csrf_token": csrf})
        assert signed_in.url.path == "/admin/clients"
        seen: set[str] = set()
        queue = list(START_PAGES)
        foreign: list[tuple[str, str]] = []
        html_pages = 0
        while queue and len(seen) < 200:
            path = queue.pop(0)
            if path in seen or "logout" in path or path.endswith("/events"):
                continue
            seen.add(path)
            async with http.stream("GET", path) as response:
                kind = response.headers.get("content-type", "")
                if "text/html" not in kind:
                    continue
                body = (await response.aread()).decode(errors="replace")
            html_pages += 1
            parser = _References()
            parser.feed(body)
            for url in parser.loads:
                parts = urllib.parse.urlsplit(url)
                if (parts.scheme or parts.netloc) and parts.netloc != own:
                    foreign.append((path, url))
            if "<script" in body:  # Any page with a script carries the strict policy.
                assert "script-src 'self'" in response.headers.get("content-security-policy", ""), path
            for link in parser.links:
                parts = urllib.parse.urlsplit(urllib.parse.urljoin(app.http + path, link))
                if parts.netloc == own and parts.path not in seen:
                    queue.append(parts.path + (f"?{parts.query}" if parts.query else ""))
    assert html_pages >= 8, seen
    assert foreign == []
    # The schema stays for tools and LLM tool definitions; no documentation UI is served.
    async with httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as http:
        assert (await http.get("/schema/openapi.json")).json()["info"]["title"] == "WebSocket Bridge"
        for ui in ("/schema/swagger", "/schema/redoc", "/schema/elements", "/schema/rapidoc"):
            assert (await http.get(ui)).status_code == 404


# --- 6. the viewer and command texts ------------------------------------------------------------------------


async def _sign_in(http: httpx.AsyncClient, token: str) -> None:
    page = await http.get("/admin/login")
    csrf = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
    response = await http.post("/admin/login", data={"token": token, "_csrf_token": csrf})
    assert response.status_code == 303, response.text


@pytest.mark.parametrize("allowed", [False, True])
async def test_the_viewer_sees_outcomes_but_not_texts_unless_allowed(start_appliance, allowed):
    viewer_token = secrets.token_urlsafe(32)
    env = {"VIEWER_TOKEN": viewer_token, **({"VIEWER_SEES_MESSAGES": "true"} if allowed else {})}
    app = start_appliance(env, name=f"viewer-{allowed}")
    async with app.connect("kiosk_9") as kiosk, app.controller() as llm:
        await llm.send(command("kiosk_9", "OPEN-THE-SAFE-4711", id=1))
        assert await recv(kiosk) == "OPEN-THE-SAFE-4711"
        await kiosk.send("SAFE-CODE-0815")
        assert (await recv_json(llm))["status"] == "delivered"
        async with (
            httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as viewer,
            httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as admin,
        ):
            await _sign_in(viewer, viewer_token)
            await _sign_in(admin, ADMIN_TOKEN)

            async def replied() -> str | None:
                page = (await viewer.get("/admin/client?id=kiosk_9")).text
                return page if 'data-outcome="replied"' in page else None

            page = await eventually(replied, 10, "the reply on the viewer's client page")
            assert ("OPEN-THE-SAFE-4711" in page) is allowed
            assert ("SAFE-CODE-0815" in page) is allowed
            assert " ms</td>" in page  # the round trip stays
            admin_page = (await admin.get("/admin/client?id=kiosk_9")).text
            assert "OPEN-THE-SAFE-4711" in admin_page and "SAFE-CODE-0815" in admin_page


# --- 7. commands sent with the admin token are audited, whatever the channel -------------------------------


async def test_commands_sent_with_the_admin_token_through_the_api_and_mcp_are_audit_events(start_appliance):
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    app = start_appliance(name="audit-admin")
    async with app.connect("valve_3") as valve:

        async def answer() -> None:
            async for text in valve:
                await valve.send("done: " + str(text))

        answering = asyncio.create_task(answer())
        try:
            async with httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as http:
                for token, text in ((ADMIN_TOKEN, "API-BY-ADMIN"), (CONTROLLER_TOKEN, "API-BY-CONTROLLER")):
                    body = {"target": "valve_3", "message": text, "wait_ms": 5000}
                    sent = await http.post("/api/v1/commands", json=body, headers={"X-Auth-Token": token})
                    assert sent.status_code == 200, sent.text
            bearer = httpx2.AsyncClient(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=timeout(30))
            mcp = Client(
                streamable_http_client(f"{app.http}/mcp", http_client=bearer), read_timeout_seconds=timeout(30)
            )
            async with mcp as client:
                result = await client.call_tool("send_command", {"target": "valve_3", "message": "MCP-BY-ADMIN"})
                assert not result.is_error, result.content
        finally:
            answering.cancel()
    async with httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as admin:
        await _sign_in(admin, ADMIN_TOKEN)
        trail = (await admin.get("/admin/audit.csv?action=command.send")).text
    rows = [row for row in csv.DictReader(io.StringIO(trail)) if row["action"] == "command.send"]
    # The admin's two; the controller's commands are the relay's ordinary traffic, not audited.
    assert len(rows) == 2, trail
    details = [json.loads(row["detail"]) for row in rows]
    assert sorted(d["via"] for d in details) == ["api", "mcp"]
    assert all(row["actor"] == "ADMIN_TOKEN" and row["target"] == "valve_3" for row in rows)
    assert all(d["status"] == "replied" and d["message"].startswith("sha256:") for d in details)
    assert "API-BY-ADMIN" not in trail and "MCP-BY-ADMIN" not in trail  # a digest, never the text


# --- 9. X-Forwarded-For ------------------------------------------------------------------------------------------


async def test_forwarded_for_values_that_are_not_client_addresses_fall_back_to_the_peer(start_appliance):
    # The test's own address (127.0.0.1) is a trusted proxy (the default FORWARDED_ALLOW_IPS) but not exempt.
    app = start_appliance({"LIMITS_EXEMPT_IPS": "192.0.2.1"}, name="xff")
    forged = "<b>xff</b> 200 OK forged line"
    async with connect(
        f"{app.ws}/ws/xff_1", additional_headers={"X-Auth-Token": CLIENT_TOKEN, "X-Forwarded-For": "<b>xff</b>"}
    ):
        listed = (await app.aget("/api/v1/clients", CONTROLLER_TOKEN))[1]
        remote = next(c["remote"] for c in listed["clients"] if c["id"] == "xff_1")
        assert remote.startswith("127.0.0.1:"), remote
    async with httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as http:
        # Sign-ins with a different junk value each: one address (the peer's), so the lock-out holds.
        page = await http.get("/admin/login")
        csrf = re.search(r'name="_csrf_token" value="([^"]+)"', page.text).group(1)
        statuses = []
        for i in range(8):
            response = await http.post(
                "/admin/login",
                data={"token": f"guess-{i}", "_csrf_token": csrf},
                headers={"X-Forwarded-For": f"not-an-ip-{i}" if i % 2 else f"{forged} {i}"},
            )
            statuses.append(response.status_code)
        assert statuses == [401] * 5 + [429] * 3, statuses
    text = (await app.aget("/metrics"))[1]
    assert "wsbridge_forwarded_for_refused_total 9.0" in text
    assert "<b>xff</b>" not in app.log() and "forged line" not in app.log()


async def test_an_exempt_address_cannot_be_claimed_in_x_forwarded_for(start_appliance):
    app = start_appliance(
        {"LIMITS_EXEMPT_IPS": "192.0.2.1", "MAX_FAILED_HANDSHAKES_PER_MINUTE": "3", "HANDSHAKE_COOLDOWN": "60"},
        name="xff-exempt",
    )
    codes = []
    headers = {"X-Auth-Token": "wrong-token", "X-Forwarded-For": "192.0.2.1"}
    for _ in range(6):
        try:
            async with connect(f"{app.ws}/ws/xff_2", additional_headers=headers) as ws:
                codes.append((await closed_with(ws))[0])
        except InvalidStatus as refused:
            codes.append(refused.response.status_code)
    # Counted under the peer's address, which is not exempt: the cool-down comes.
    assert codes[:3] == [4001] * 3 and 429 in codes[3:], codes


# --- 10. fingerprints and guessable tokens ------------------------------------------------------------------------


def _serve_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "serve", "--port", "1"],  # Refused before it binds.
            cwd=cwd,
            env={"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **env},
            capture_output=True,
            text=True,
            timeout=timeout(30),
        )


def test_a_token_with_fewer_than_128_bits_is_refused_at_start_with_one_clear_line(start_appliance):
    pin = "31415926535897932384"  # 20 digits: at most 66 bits
    result = _serve_once({"LLM_SECRET_TOKEN": pin, "UNITY_CLIENT_TOKEN": CLIENT_TOKEN})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "LLM_SECRET_TOKEN holds at most 66 bits of randomness" in lines[0] and "ALLOW_WEAK_TOKENS" in lines[0]
    assert pin not in result.stderr + result.stdout
    # The explicit override starts it (a lab, a test).
    app = start_appliance({"LLM_SECRET_TOKEN": pin, "ALLOW_WEAK_TOKENS": "true"}, name="weak-allowed")
    assert app.get("/healthz")[0] == 200


async def test_fingerprints_are_keyed_so_the_viewer_cannot_test_guesses(start_appliance, redis_server):
    key, viewer_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    app = start_appliance({"TOKEN_FINGERPRINT_KEY": key, "VIEWER_TOKEN": viewer_token}, name="fp")
    async with httpx.AsyncClient(base_url=app.http, timeout=timeout(10)) as viewer:
        await _sign_in(viewer, viewer_token)
        page = (await viewer.get("/admin/tokens")).text
    keyed = "hmac:" + hmac.new(key.encode(), CLIENT_TOKEN.encode(), hashlib.sha256).hexdigest()[:8]
    unkeyed = hashlib.sha256(CLIENT_TOKEN.encode()).hexdigest()[:8]
    assert keyed in page and unkeyed not in page
    # Without the setting, instances sharing Redis share a random key: the same fingerprints everywhere.
    await asyncio.to_thread(redis_server.command, "DEL", "wsb:tokens:fingerprint-key")
    env = {"VIEWER_TOKEN": viewer_token}
    a = start_appliance(env, redis_url=redis_server.url, name="fp-a")
    b = start_appliance(env, redis_url=redis_server.url, name="fp-b")
    shown = []
    for instance in (a, b):
        async with httpx.AsyncClient(base_url=instance.http, timeout=timeout(10)) as viewer:
            await _sign_in(viewer, viewer_token)
            page = (await viewer.get("/admin/tokens")).text
        shown.append(sorted(re.findall(r"hmac:[0-9a-f]{8}", page)))
    assert shown[0] and shown[0] == shown[1]
    assert keyed not in shown[0] and unkeyed not in str(shown)
