"""The admin dashboard over plain HTTP against real appliance processes: auth, CSRF, headers, escaping, pages.

The browser-only behaviour (htmx swaps, the live banner, no CSP violations) is in tests/browser/.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from support import ADMIN_TOKEN, CLIENT_TOKEN, CONTROLLER_TOKEN, timeout, wait_until
from websockets.sync.client import connect

VIEWER_TOKEN = "test-viewer-token-0123456789ab"
PAGES = ["/admin/clients", "/admin/system", "/admin/client?id=someone", "/admin/audit"]
HX = {"HX-Request": "true"}


class Browser:
    """An HTTP client that behaves like the dashboard page: cookies, and the CSRF token read from the page."""

    def __init__(self, base: str, address: str | None = None) -> None:
        headers = {"X-Forwarded-For": address} if address else {}
        self.http = httpx.Client(base_url=base, follow_redirects=False, timeout=timeout(10), headers=headers)
        self.csrf = ""

    def get(self, path: str, **kwargs) -> httpx.Response:
        response = self.http.get(path, **kwargs)
        found = re.search(r'name="_csrf_token" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    def post(self, path: str, data: dict | None = None, *, csrf: bool = True, **kwargs) -> httpx.Response:
        data = dict(data or {})
        if csrf:
            data["_csrf_token"] = self.csrf
        return self.http.post(path, data=data, **kwargs)

    def login(self, token: str = ADMIN_TOKEN, next_path: str = "/admin/clients") -> httpx.Response:
        self.get("/admin/login")
        return self.post("/admin/login", {"token": token, "next": next_path})

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def app(request) -> Iterator:
    from support import Appliance

    appliance = Appliance({"VIEWER_TOKEN": VIEWER_TOKEN}, name="dash").start()
    yield appliance
    appliance.stop()


@pytest.fixture
def browser(app) -> Iterator[Browser]:
    b = Browser(app.http)
    yield b
    b.close()


@pytest.fixture
def admin(browser) -> Browser:
    assert browser.login().status_code == 303
    return browser


def ws_connect(app, client_id: str, token: str = CLIENT_TOKEN):
    """A synchronous WebSocket (its own thread answers pings): these tests are synchronous, like httpx's client."""
    return connect(f"{app.ws}/ws/{client_id}", additional_headers={"X-Auth-Token": token}, open_timeout=timeout(10))


def set_cookies(response: httpx.Response) -> dict[str, str]:
    return {c.split("=", 1)[0]: c for c in response.headers.get_list("set-cookie")}


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_every_page_redirects_to_the_login_without_a_session(browser, path):
    response = browser.get(path)
    assert response.status_code == 303
    assert response.headers["location"].startswith("/admin/login?next=")
    assert urllib.parse.quote(path, safe="") in response.headers["location"]


@pytest.mark.parametrize("path", [*PAGES, "/admin/session"])
def test_an_htmx_request_without_a_session_redirects_the_whole_page(browser, path):
    response = browser.get(path, headers=HX)
    assert response.status_code == 200
    assert response.headers["hx-redirect"] == "/admin/login"
    assert "<" not in response.text  # No login form to swap into a table cell.


def test_the_event_stream_without_a_session_says_expired(browser):
    response = browser.get("/admin/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "event: expired" in response.text
    assert "counters" not in response.text


def test_login_with_the_admin_token_sets_a_strict_httponly_session_cookie(browser, app):
    response = browser.login(next_path="/admin/system")
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/system"
    cookie = set_cookies(response)["wsb_session"]
    assert ADMIN_TOKEN not in cookie
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/admin", "Max-Age=1800"):
        assert attribute in cookie
    assert "Secure" not in cookie  # Plain HTTP here; see the TLS test.
    page = browser.get("/admin/system")
    assert page.status_code == 200
    assert ADMIN_TOKEN not in page.text


def test_a_wrong_token_is_refused_and_gets_no_session(browser):
    browser.get("/admin/login")
    response = browser.post("/admin/login", {"token": "wrong"})
    assert response.status_code == 401
    assert "not valid" in response.text
    assert "null" in set_cookies(response).get("wsb_session", "null")
    assert browser.get("/admin/clients").status_code == 303


def test_the_controller_token_cannot_sign_in(browser):
    assert browser.login(CONTROLLER_TOKEN).status_code == 401


def test_next_never_redirects_off_the_dashboard(browser):
    for evil in ("https://evil.example/", "//evil.example/x", "/admin/../x", "/elsewhere"):
        response = browser.login(next_path=evil)
        assert response.headers["location"] == "/admin/clients"
        browser.http.cookies.clear()


def test_a_session_id_brought_by_the_browser_is_never_promoted(app):
    planted = "a" * 64
    b = Browser(app.http)
    try:
        b.get("/admin/login")
        b.http.cookies.set("wsb_session", planted, domain="127.0.0.1", path="/admin")
        response = b.post("/admin/login", {"token": ADMIN_TOKEN})
        assert response.status_code == 303
        issued = set_cookies(response)["wsb_session"].split(";")[0].split("=", 1)[1]
        assert issued != planted and len(issued) == 64
        # The planted id is not signed in.
        other = httpx.Client(base_url=app.http, cookies={"wsb_session": planted})
        assert other.get("/admin/clients").status_code == 303
        other.close()
    finally:
        b.close()


def test_logout_ends_the_session_even_for_a_copied_cookie(admin, app):
    stolen = dict(admin.http.cookies.items())
    admin.get("/admin/clients")
    response = admin.post("/admin/logout")
    assert response.status_code == 303 and response.headers["location"] == "/admin/login"
    replay = httpx.Client(base_url=app.http, cookies=stolen)
    assert replay.get("/admin/clients").status_code == 303
    replay.close()


def test_logout_from_htmx_redirects_the_whole_page(admin):
    admin.get("/admin/clients")
    response = admin.http.post("/admin/logout", headers={**HX, "x-csrftoken": admin.csrf})
    assert response.headers["hx-redirect"] == "/admin/login"
    assert admin.get("/admin/clients").status_code == 303


def test_the_viewer_token_signs_in_read_only(browser):
    assert browser.login(VIEWER_TOKEN).status_code == 303
    page = browser.get("/admin/clients")
    assert page.status_code == 200
    assert 'class="role role-viewer"' in page.text


# --- CSRF ----------------------------------------------------------------------------------------


def test_login_without_the_csrf_token_is_forbidden(browser):
    browser.get("/admin/login")
    response = browser.post("/admin/login", {"token": ADMIN_TOKEN}, csrf=False)
    assert response.status_code == 403
    assert "wsb_session" not in set_cookies(response)


def test_logout_without_the_csrf_token_is_forbidden_and_keeps_the_session(admin):
    admin.get("/admin/clients")
    assert admin.post("/admin/logout", csrf=False).status_code == 403
    assert admin.http.post("/admin/logout", headers={"x-csrftoken": "0" * 128}).status_code == 403
    assert admin.get("/admin/clients").status_code == 200


def test_the_csrf_token_is_in_the_page_for_htmx_and_its_cookie_is_httponly(browser):
    page = browser.get("/admin/login")
    cookie = set_cookies(page)["wsb_csrf"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
    headers = json.loads(re.search(r"<body hx-headers='([^']+)'", page.text).group(1))
    assert headers["x-csrftoken"] == browser.csrf


def test_the_csrf_header_from_the_page_is_accepted(admin):
    admin.get("/admin/clients")
    response = admin.http.post("/admin/logout", headers={"x-csrftoken": admin.csrf})
    assert response.status_code == 303


# --- headers ------------------------------------------------------------------------------------


def _check_security_headers(response: httpx.Response) -> None:
    csp = response.headers["content-security-policy"]
    directives = {d.split()[0]: d for d in csp.split("; ")}
    assert directives["default-src"] == "default-src 'self'"
    assert directives["frame-ancestors"] == "frame-ancestors 'none'"
    assert directives["form-action"] == "form-action 'self'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", [*PAGES, "/admin/clients?q=a"])
def test_pages_send_a_strict_csp_and_are_never_cached(admin, path):
    response = admin.get(path)
    assert response.status_code == 200
    _check_security_headers(response)
    assert response.headers["cache-control"] == "no-store"
    assert "<script>" not in response.text and " style=" not in response.text  # Nothing inline for the CSP.


def test_partials_and_refusals_carry_the_same_headers(admin, browser):
    _check_security_headers(admin.get("/admin/clients", headers={**HX, "HX-Target": "clients-table"}))
    _check_security_headers(Browser(admin.http.base_url.__str__()).get("/admin/clients"))


def test_static_files_are_served_locally_with_the_vendored_htmx(browser):
    page = browser.get("/admin/login")
    _check_security_headers(page)
    assert page.headers["cache-control"] == "no-store"
    scripts = re.findall(r'<script src="([^"]+)"', page.text)
    assert "/admin/static/vendor/htmx-2.0.11.min.js" in scripts
    for src in scripts:
        response = browser.get(src)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/javascript")
        _check_security_headers(response)
    config = json.loads(re.search(r'<meta name="htmx-config" content=\'([^\']+)\'', page.text).group(1))
    assert config["includeIndicatorStyles"] is False and config["allowEval"] is False
    assert config["allowScriptTags"] is False and config["selfRequestsOnly"] is True


def test_cookies_are_secure_behind_tls(app):
    """A trusted proxy (FORWARDED_ALLOW_IPS, 127.0.0.1 by default) says the browser used HTTPS."""
    b = Browser(app.http)
    try:
        page = b.get("/admin/login", headers={"X-Forwarded-Proto": "https"})
        csrf_cookie = set_cookies(page)["wsb_csrf"]
        assert "Secure" in csrf_cookie
        # httpx, like a browser, keeps Secure cookies off plain http: hand it over as the proxy would.
        cookie = csrf_cookie.split(";")[0]
        response = b.post(
            "/admin/login", {"token": ADMIN_TOKEN}, headers={"X-Forwarded-Proto": "https", "Cookie": cookie}
        )
        assert response.status_code == 303
        assert "Secure" in set_cookies(response)["wsb_session"]
    finally:
        b.close()


# --- rate limit ----------------------------------------------------------------------------------


def test_failed_logins_are_rate_limited_per_address(app):
    attacker, bystander = Browser(app.http, "198.51.100.7"), Browser(app.http, "198.51.100.8")
    try:
        attacker.get("/admin/login")
        for _ in range(5):
            assert attacker.post("/admin/login", {"token": "guess"}).status_code == 401
        locked = attacker.post("/admin/login", {"token": ADMIN_TOKEN})  # Even the right token, now.
        assert locked.status_code == 429
        assert int(locked.headers["retry-after"]) > 0
        assert "wsb_session" not in set_cookies(locked) or "null" in set_cookies(locked)["wsb_session"]
        assert bystander.login().status_code == 303
    finally:
        attacker.close()
        bystander.close()


# --- clients page ---------------------------------------------------------------------------------


def _ids(html: str) -> list[str]:
    return re.findall(r'<tr data-client-id="([^"]+)"', html)


def test_clients_are_listed_filtered_sorted_and_paged(admin, app):
    with contextlib.ExitStack() as sockets:
        for i in range(30):
            sockets.enter_context(ws_connect(app, f"dash-{i:02d}"))
        sockets.enter_context(ws_connect(app, "dash-llm", CONTROLLER_TOKEN))
        wait_until(
            lambda: len(_ids(admin.get("/admin/clients?q=dash-&limit=200").text)) == 31, 5, "31 connections listed"
        )
        first = admin.get("/admin/clients?q=dash-&role=client&limit=25")
        assert _ids(first.text) == [f"dash-{i:02d}" for i in range(25)]
        assert "30 of 31 connections match" in first.text
        assert "server-timing" in first.headers
        cursor = re.search(r'href="/admin/clients\?[^"]*cursor=([^"&]+)', first.text).group(1)
        second = admin.get(f"/admin/clients?q=dash-&role=client&limit=25&cursor={cursor}")
        assert _ids(second.text) == [f"dash-{i:02d}" for i in range(25, 30)]
        assert 'rel="next"' not in second.text and "First page" in second.text
        assert 'rel="next"' in first.text and "First page" not in first.text
        assert _ids(admin.get("/admin/clients?q=dash-&role=controller").text) == ["dash-llm"]
        assert _ids(admin.get("/admin/clients?q=dash-1").text) == [f"dash-{i}" for i in range(10, 20)]
        descending = _ids(admin.get("/admin/clients?q=dash-0&sort=id&order=desc").text)
        assert descending == [f"dash-{i:02d}" for i in range(9, -1, -1)]
        assert _ids(admin.get("/admin/clients?q=dash-&cursor=!!garbage!!&limit=25").text)[0] == "dash-00"


def test_the_table_partial_is_the_same_block_as_the_page(admin):
    page = admin.get("/admin/clients?q=nobody-here")
    partial = admin.get("/admin/clients?q=nobody-here", headers={**HX, "HX-Target": "clients-table"})
    assert "<html" not in partial.text and partial.text.strip().startswith('<section id="clients-table"')
    block = re.search(r'(<section id="clients-table".*?</section>)', page.text, re.S).group(1)
    assert partial.text.strip() == block.strip()
    assert "No connection matches." in partial.text


def test_client_detail_and_system_pages(admin, app):
    with ws_connect(app, "detail-me"):
        wait_until(
            lambda: "Connection on <code>dash</code>" in admin.get("/admin/client?id=detail-me").text,
            5,
            "detail page shows the live connection",
        )
        system = admin.get("/admin/system").text
        assert "ready" in system and "<code>dash</code> (this one)" in system and "memory" in system
    wait_until(
        lambda: "Not connected now." in admin.get("/admin/client?id=detail-me").text,
        5,
        "detail page says the client left",
    )


def test_client_detail_shows_the_connect_history_with_close_codes_escaped(admin, app):
    evil = "<img src=x onerror=alert(3)>"
    with ws_connect(app, "history-me") as ws:
        ws.close(code=4000, reason=evil)  # The peer's close reason is client-controlled text.
    with ws_connect(app, "history-me") as older:
        with ws_connect(app, "history-me"):  # Replaces the older one: 4010 by the relay.
            wait_until(lambda: older.close_code == 4010, 5, "the older connection replaced")

    def rows() -> list[tuple[str, str, str]] | None:
        html = admin.get("/admin/client?id=history-me").text
        found = re.findall(r'<tr data-close-code="(\d+)">.*?<td class="msg">([^<]*)</td><td>(relay|peer)</td>', html)
        return found if len(found) == 3 else None

    assert wait_until(rows, 5, "three closed connections on the detail page") == [
        ("1000", "", "peer"),  # The newest closed itself when the with-block ended.
        ("4010", "replaced by a newer connection", "relay"),
        ("4000", "&lt;img src=x onerror=alert(3)&gt;", "peer"),
    ]
    html = admin.get("/admin/client?id=history-me").text
    assert evil not in html and "<img" not in html
    assert "kept in this instance&#39;s memory" in html and "the last 50" in html
    assert "Connect history" in admin.get("/admin/client?id=never-seen").text
    assert "No closed connection recorded." in admin.get("/admin/client?id=never-seen").text


def test_login_and_logout_are_in_the_audit_trail(app):
    b = Browser(app.http, "203.0.113.9")
    try:
        b.login()
        b.get("/admin/clients")
        b.post("/admin/logout")
        b.login()
        audit = b.get("/admin/audit?action=log").text
        rows = re.findall(
            r"<tr><td>(?:(?!</td>).)*</td><td>(login|logout)</td><td>([A-Z_]+)</td><td><code>([^<]+)</code>", audit
        )
        assert ("logout", "ADMIN_TOKEN", "203.0.113.9") in rows
        assert ("login", "ADMIN_TOKEN", "203.0.113.9") in rows
        assert ADMIN_TOKEN not in audit
    finally:
        b.close()


# --- live stream --------------------------------------------------------------------------------


def _sse_events(response: httpx.Response, wanted: str, within: float) -> Iterator[tuple[str, str]]:
    event, data = "", []
    deadline = time.monotonic() + timeout(within)
    for line in response.iter_lines():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {wanted!r} event within {within} s")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line == "" and event:
            yield event, "\n".join(data)
            event, data = "", []


def test_the_event_stream_sends_counters_and_a_changed_signal(admin, app):
    with admin.http.stream("GET", "/admin/events", timeout=timeout(15)) as stream:
        assert stream.status_code == 200
        events = _sse_events(stream, "counters", 10)
        assert next(events)[0] == "hello"
        name, html = next(events)
        assert name == "counters" and 'data-counter="connections"' in html
        with ws_connect(app, "stream-watch"):
            seen = []
            for name, _ in events:
                seen.append(name)
                if name == "changed":
                    break
            assert "changed" in seen


def _command_calls(redis_server, *commands: str) -> int:
    """How many times Redis has run these commands (INFO commandstats), for counting what a watcher reads."""
    stats = redis_server.command("INFO", "commandstats").decode()
    return sum(
        int(found.group(1))
        for command in commands
        for found in [re.search(rf"cmdstat_{command}:calls=(\d+)", stats)]
        if found
    )


def test_an_idle_stream_reads_no_presence_records_and_still_sees_the_other_instance(start_appliance, redis_server):
    """An open dashboard polls two small keys, never the whole presence list, yet a connect on
    another instance still makes its page re-fetch, and the counters include that instance."""
    redis_server.command("FLUSHALL")
    a = start_appliance(redis_url=redis_server.url, name="idle-a")
    b = start_appliance(redis_url=redis_server.url, name="idle-b")
    browser = Browser(a.http)
    sockets = contextlib.ExitStack()
    try:
        for n in range(3):
            sockets.enter_context(ws_connect(b, f"idle-{n}"))
        assert browser.login().status_code == 303
        wait_until(lambda: 'data-counter="connections">3<' in browser.get("/admin/clients").text, 10, "3 on b listed")
        with browser.http.stream("GET", "/admin/events", timeout=timeout(30)) as stream:
            events = _sse_events(stream, "changed", 20)
            assert [next(events)[0], next(events)[0]] == ["hello", "counters"]
            full_reads = _command_calls(redis_server, "hgetall", "scan")
            polls = _command_calls(redis_server, "mget")
            time.sleep(3.5)  # About three polls of an idle stream.
            assert _command_calls(redis_server, "hgetall", "scan") == full_reads, "an idle stream read every record"
            assert _command_calls(redis_server, "mget") >= polls + 2, "the stream stopped polling"
            with ws_connect(b, "idle-late"):
                seen = []
                for name, data in events:
                    seen.append((name, data))
                    if name == "changed":
                        break
                counters = [data for name, data in seen if name == "counters"]
                assert counters and 'data-counter="connections">4<' in counters[-1]
                # Both instances, though only b holds connections (a serves the page).
                assert 'data-counter="instances">2<' in counters[-1]
    finally:
        sockets.close()
        browser.close()


# --- escaping -------------------------------------------------------------------------------------


def test_client_controlled_text_is_escaped(start_appliance, redis_server):
    """Presence in Redis is written by any instance; a forged entry must render as text."""
    redis_server.command("FLUSHALL")
    app = start_appliance(redis_url=redis_server.url, name="esc")
    evil = {
        "id": "<script>alert(1)</script>",
        "role": "client",
        "instance": "<b>x</b>",
        "connected_since": "2026-01-01T00:00:00+00:00",
        "remote": '"><img src=x onerror=alert(2)>',
        "messages_in": 1,
        "messages_out": 2,
        "last_activity": "2026-01-01T00:00:00+00:00",
    }
    redis_server.command("HSET", "wsb:instance:forged", "evil", json.dumps(evil))
    redis_server.command("EXPIRE", "wsb:instance:forged", "60")
    redis_server.command("SADD", "wsb:instances", "forged")  # As every instance names itself.
    summary = {"instance": "<b>x</b>", "epoch": "<i>e</i>", "membership": 1, "connections": 1, "clients": 1}
    redis_server.command("SET", "wsb:summary:forged", json.dumps(summary), "EX", "60")
    b = Browser(app.http)
    try:
        b.login()

        def page_with_entry(path: str) -> str | None:
            html = b.get(path).text
            return html if "&lt;b&gt;x&lt;/b&gt;" in html else None  # The forged instance's name, escaped.

        listing = wait_until(lambda: page_with_entry("/admin/clients"), 5, "the forged entry listed")
        detail = re.search(r'<a href="(/admin/client\?id=[^"]+)">&lt;script', listing).group(1).replace("&amp;", "&")
        for path in ("/admin/clients", "/admin/system", detail):
            html = wait_until(lambda p=path: page_with_entry(p), 5, f"evil entry on {path}")
            assert "<script>alert" not in html and "<img src=x" not in html and "<b>x</b>" not in html
            if path != "/admin/system":
                assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    finally:
        b.close()


# --- sessions across instances and expiry ---------------------------------------------------------------


def test_a_session_in_redis_works_on_every_instance_and_ends_when_the_token_changes(start_appliance, redis_server):
    redis_server.command("FLUSHALL")
    a = start_appliance(redis_url=redis_server.url, name="sess-a")
    b = start_appliance(redis_url=redis_server.url, name="sess-b")
    browser = Browser(a.http)
    try:
        assert browser.login().status_code == 303
        browser.http.base_url = httpx.URL(b.http)  # Same cookies, another instance (a load balancer's job).
        page = browser.get("/admin/system")
        assert page.status_code == 200 and "<code>sess-b</code> (this one)" in page.text
        b.stop()
        # The admin token is rotated: sessions made with the old one end, even though Redis kept them.
        c = start_appliance({"ADMIN_TOKEN": "a-brand-new-admin-token-0123"}, redis_url=redis_server.url, name="sess-c")
        browser.http.base_url = httpx.URL(c.http)
        assert browser.get("/admin/system").status_code == 303
    finally:
        browser.close()


def test_sessions_end_after_idle_time_and_lifetime(start_appliance):
    app = start_appliance({"DASHBOARD_IDLE_TIMEOUT": "2", "DASHBOARD_SESSION_LIFETIME": "6"}, name="expiry")
    b = Browser(app.http)
    try:
        b.login()
        # Background refreshes do not keep an idle session alive...
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert b.get("/admin/clients", headers={**HX, "HX-Target": "clients-table", "x-dashboard-background": "1"})
            time.sleep(0.5)
        assert b.get("/admin/clients").status_code == 303
        # ...user actions do, but only until the lifetime.
        b.login()
        started = time.monotonic()
        while time.monotonic() - started < 3:  # Longer than the idle timeout, well within the lifetime.
            assert b.get("/admin/clients").status_code == 200
            time.sleep(0.5)
        time.sleep(max(0.0, 6.5 - (time.monotonic() - started)))
        assert b.get("/admin/clients").status_code == 303
    finally:
        b.close()


def test_the_event_stream_ends_with_expired_when_the_session_is_signed_out_elsewhere(admin, app):
    with admin.http.stream("GET", "/admin/events", timeout=timeout(20)) as stream:
        events = _sse_events(stream, "expired", 15)
        assert next(events)[0] == "hello"
        other = httpx.Client(base_url=app.http, cookies=dict(admin.http.cookies.items()))
        other.post("/admin/logout", headers={"x-csrftoken": admin.csrf})
        other.close()
        assert "expired" in [name for name, _ in events]


def test_a_stream_opened_after_presence_moved_says_changed_at_once(admin):
    """The page passes the digest it was rendered with; a stale one gets "changed" first thing."""
    page = admin.get("/admin/clients").text
    since = re.search(r'sse-connect="/admin/events\?since=([0-9a-f-]*)"', page).group(1)
    assert since
    with admin.http.stream("GET", "/admin/events?since=0000stale", timeout=timeout(15)) as stream:
        names = []
        for name, _ in _sse_events(stream, "changed", 10):
            names.append(name)
            if name == "changed" or len(names) > 3:
                break
        assert names[:3] == ["hello", "counters", "changed"]


@pytest.mark.parametrize(
    "path",
    ["/admin/send", "/admin/client/disconnect", "/admin/clients/disconnect", "/admin/tokens/rotate", "/admin/bans"],
)
def test_the_viewer_token_cannot_act(browser, path):
    browser.login(VIEWER_TOKEN)
    browser.get("/admin/clients")
    response = browser.post(
        path, {"id": "x", "target": "x", "message": "m", "name": "ADMIN_TOKEN", "confirm": "ADMIN_TOKEN"}
    )
    assert response.status_code == 403
    assert "read-only" in response.text


def test_the_viewer_token_does_not_see_the_ban_list(browser):
    browser.login(VIEWER_TOKEN)
    assert browser.get("/admin/bans").status_code == 403
    assert "/admin/bans" not in browser.get("/admin/clients").text


@pytest.mark.parametrize(
    "path", ["/admin/send", "/admin/client/disconnect", "/admin/tokens/rotate", "/admin/bans", "/admin/bans/lift"]
)
def test_actions_need_the_csrf_token(admin, path):
    admin.get("/admin/clients")
    assert admin.post(path, {"id": "x", "target": "x", "message": "m"}, csrf=False).status_code == 403


def test_the_login_page_keeps_a_signed_in_session(admin):
    response = admin.get("/admin/login?next=/admin/system")
    assert response.status_code == 303 and response.headers["location"] == "/admin/system"
    assert admin.get("/admin/clients").status_code == 200
    assert admin.get("/admin/").headers["location"] == "/admin/clients"


def test_an_open_event_stream_does_not_hold_up_shutdown(start_appliance):
    """SIGTERM: the stream ends by itself (the page reconnects elsewhere) instead of waiting out SHUTDOWN_GRACE."""
    app = start_appliance({"SHUTDOWN_GRACE": "60"}, name="drain")
    b = Browser(app.http)
    b.login()
    with b.http.stream("GET", "/admin/events", timeout=timeout(30)) as stream:
        events = _sse_events(stream, "hello", 10)
        assert next(events)[0] == "hello"
        started = time.monotonic()
        app.terminate(wait=60)
        assert time.monotonic() - started < 20, "the event stream held the shutdown up"
    b.close()
