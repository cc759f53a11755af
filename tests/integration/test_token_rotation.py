"""Tokens end to end: real appliances on a real moto SSM and a real Redis, ``wsbridge tokens`` as operators run it.

Rotation with old and new tokens both accepted during the grace window, expiry closing
old-token connections with 4011, revocation, two instances switching within a second,
SSM unreachable at start and mid-run, scoped tokens, and the token as a WebSocket
subprotocol from a browser-like client (never echoed, never in the URL).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
from moto_support import MotoServer, seed, unique_prefix
from support import (
    ADMIN_TOKEN,
    CLIENT_TOKEN,
    CONTROLLER_TOKEN,
    ROOT,
    closed_with,
    command,
    eventually,
    free_port,
    recv,
    timeout,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

_EMPTY_DIR = tempfile.mkdtemp(prefix="wsb-tokens-cwd-")  # no stray .env
#: Long enough for the checks made during the window (two CLI runs), short enough to wait out.
#: Long enough for four CLI runs (a Python start each, seconds apiece at load 10) inside the window.
GRACE = timeout(20)
SEED = {"LLM_SECRET_TOKEN": CONTROLLER_TOKEN, "UNITY_CLIENT_TOKEN": CLIENT_TOKEN, "ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    yield server
    server.stop()


def wsbridge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``wsbridge ...`` as an operator runs it, with the appliance's settings."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        env=env,
        cwd=_EMPTY_DIR,
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )


async def accepted(app, client_id: str, token: str) -> bool:
    """Whether ``token`` opens a connection now (refusals are accepted then closed with a code)."""
    async with app.connect(client_id, token) as ws:
        try:
            await asyncio.wait_for(ws.recv(), timeout(0.5))
        except TimeoutError:
            return True  # still open
        except ConnectionClosed:
            return False
    return True


async def first_accepted(app, client_id: str, token: str) -> float:
    """The start time of the first attempt with ``token`` that ``app`` accepted."""
    deadline = time.monotonic() + timeout(10)
    while time.monotonic() < deadline:
        started = time.monotonic()
        if await accepted(app, client_id, token):
            return started
    raise AssertionError(f"{app.name} never accepted the token")


async def refused_with(app, client_id: str, token: str) -> int | None:
    async with app.connect(client_id, token) as ws:
        return (await closed_with(ws))[0]


# --- no AWS for the env store ---------------------------------------------------------------------


def test_env_store_neither_imports_nor_contacts_aws():
    script = (
        "import sys; from appliance.settings import Settings; from appliance.app import create_app;"
        "create_app(Settings(_env_file=None, llm_secret_token='a'*40, unity_client_token='b'*40));"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- SSM at start ----------------------------------------------------------------------------------


def test_ssm_unreachable_at_start_is_one_line_and_exit(moto):
    env = {
        "PATH": "/usr/bin:/bin",
        **moto.appliance_env(unique_prefix(), SSM_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "serve", "--port", str(free_port())],
        env=env,
        cwd=_EMPTY_DIR,
        capture_output=True,
        text=True,
        timeout=timeout(60),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsbridge: cannot load tokens from the ssm store: cannot read ")


@pytest.fixture
def ssm_pair(start_appliance, redis_server, moto):
    """Two instances sharing Redis and one SSM prefix; polling off, so only notifications can explain speed."""
    redis_server.command("FLUSHALL")
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    env = moto.appliance_env(
        prefix, TOKEN_ROTATION_ENABLED="true", TOKEN_REFRESH_SECONDS="3600", TOKEN_GRACE_SECONDS=str(GRACE)
    )
    a = start_appliance(env, redis_url=redis_server.url, name="tok-a")
    b = start_appliance(env, redis_url=redis_server.url, name="tok-b")
    return a, b


def rotate(app, name: str = "UNITY_CLIENT_TOKEN", *extra: str) -> str:
    result = wsbridge(app.env, "tokens", "--actor", "test-operator", "rotate", name, *extra)
    assert result.returncode == 0, result.stderr
    value = result.stdout.strip()
    assert len(value) >= 40 and "\n" not in value  # printed once, alone on stdout
    return value


async def test_rotation_reaches_every_instance_within_a_second_and_old_connections_expire_with_4011(
    ssm_pair, redis_server
):
    a, b = ssm_pair
    async with a.connect("old-on-a") as old_a, b.connect("old-on-b") as old_b, a.controller() as llm:
        new = rotate(a)
        rotated_at = time.monotonic()
        # When did each instance start accepting the new token? (a probe's own wait is not counted)
        switched = await asyncio.gather(*(first_accepted(app, f"probe-{app.name}", new) for app in (a, b)))
        assert all(at - rotated_at < timeout(1) for at in switched), [at - rotated_at for at in switched]
        # Grace window: the old token still opens connections, and old connections still work.
        assert await accepted(b, "late-old", CLIENT_TOKEN)
        await llm.send(command("old-on-b", "still here"))
        assert await recv(old_b) == "still here"
        # Status: versions, grace end, connections per version cluster-wide; never a value.
        status = wsbridge(a.env, "tokens", "status", "--json")
        assert status.returncode == 0, status.stderr
        assert CLIENT_TOKEN not in status.stdout and new not in status.stdout and CONTROLLER_TOKEN not in status.stdout
        entry = next(e for e in json.loads(status.stdout) if e["name"] == "UNITY_CLIENT_TOKEN")
        assert (entry["version"], entry["previous_version"], entry["previous_accepted"]) == (2, 1, True)
        assert entry["connections"] == {"1": 2} and entry["connections_scope"] == "cluster"
        table = wsbridge(a.env, "tokens", "status")
        assert "UNITY_CLIENT_TOKEN" in table.stdout and "1 (accepted)" in table.stdout and "v1: 2" in table.stdout
        # Grace over: old-token connections on both instances are closed with 4011, the new token carries on.
        assert (await closed_with(old_a, GRACE + 5))[0] == 4011
        assert (await closed_with(old_b, 1))[0] == 4011
        assert await refused_with(a, "old-again", CLIENT_TOKEN) == 4001
        evictions = [
            line for line in (await a.aget("/metrics"))[1].splitlines() if line.startswith("wsbridge_token_evictions")
        ]
        assert evictions == ["wsbridge_token_evictions_total 1.0"]
        async with b.connect("new-client", new) as fresh:
            await llm.send(command("new-client", "hello v2"))
            assert await recv(fresh) == "hello v2"
    audit = (await redis_server.acommand("LRANGE", "wsb:audit", "0", "-1")).decode()
    assert '"token.rotate"' in audit and '"test-operator"' in audit and '"UNITY_CLIENT_TOKEN"' in audit
    assert new not in audit
    assert new not in a.log() + b.log() and CLIENT_TOKEN not in a.log() + b.log()


async def test_revoke_ends_the_grace_window_cluster_wide_and_evicts(start_appliance, redis_server, moto):
    await redis_server.acommand("FLUSHALL")
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    env = moto.appliance_env(prefix, TOKEN_ROTATION_ENABLED="true", TOKEN_REFRESH_SECONDS="3600")  # grace 900 s
    a = start_appliance(env, redis_url=redis_server.url, name="rev-a")
    b = start_appliance(env, redis_url=redis_server.url, name="rev-b")
    async with a.controller("planner-a") as llm_a, b.controller("planner-b") as llm_b:
        new = rotate(a, "LLM_SECRET_TOKEN")
        await eventually(lambda: accepted(b, "probe-llm", new), 1, "b accepts the new controller token")
        await llm_a.send(command("nobody", "x"))  # old connections still work during the grace window
        assert json.loads(await recv(llm_a))["error"] == "target_offline"
        result = wsbridge(a.env, "tokens", "--actor", "test-operator", "revoke", "LLM_SECRET_TOKEN")
        revoked = time.monotonic()  # from the revoke written, not the CLI's own start (seconds under load)
        assert result.returncode == 0, result.stderr
        assert "Revoked version 1 of LLM_SECRET_TOKEN" in result.stdout
        assert (await closed_with(llm_a, 2))[0] == 4011
        assert (await closed_with(llm_b, 2))[0] == 4011
        assert time.monotonic() - revoked < timeout(3)
    assert await refused_with(b, "planner-c", CONTROLLER_TOKEN) == 4001
    assert '"token.revoke"' in (await redis_server.acommand("LRANGE", "wsb:audit", "0", "-1")).decode()


async def test_keep_connections_leaves_old_connections_open_after_the_grace_window(start_appliance, moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    env = moto.appliance_env(
        prefix, TOKEN_ROTATION_ENABLED="true", TOKEN_GRACE_SECONDS=str(timeout(1)), TOKEN_REFRESH_SECONDS="0.5"
    )
    app = start_appliance(env, name="keep")  # embedded broker, no Redis: the refresh interval brings the change
    async with app.connect("kept") as kept, app.controller() as llm:
        rotate(app, "UNITY_CLIENT_TOKEN", "--keep-connections")
        await eventually(lambda: _grace_over(app), 20, "the grace window to end on the instance")
        assert await refused_with(app, "late", CLIENT_TOKEN) == 4001
        await llm.send(command("kept", "still open"))
        assert await recv(kept) == "still open"


async def _grace_over(app) -> bool:
    return await refused_with(app, "probe-grace", CLIENT_TOKEN) == 4001


def test_rotation_is_refused_unless_enabled_and_with_the_env_store(moto):
    prefix = unique_prefix()
    seed(moto.ssm(), prefix, SEED)
    env = {"PATH": "/usr/bin:/bin", **moto.appliance_env(prefix)}
    result = wsbridge(env, "tokens", "rotate", "UNITY_CLIENT_TOKEN")
    assert result.returncode == 1 and "TOKEN_ROTATION_ENABLED=true" in result.stderr
    env_store = {"PATH": "/usr/bin:/bin", "LLM_SECRET_TOKEN": CONTROLLER_TOKEN, "UNITY_CLIENT_TOKEN": CLIENT_TOKEN}
    result = wsbridge({**env_store, "TOKEN_ROTATION_ENABLED": "true"}, "tokens", "rotate", "UNITY_CLIENT_TOKEN")
    assert result.returncode == 1 and "rotation needs TOKEN_STORE=ssm" in result.stderr
    status = wsbridge(env_store, "tokens", "status")
    assert status.returncode == 0 and "UNITY_CLIENT_TOKEN" in status.stdout and CLIENT_TOKEN not in status.stdout


async def test_ssm_unreachable_mid_run_keeps_the_last_good_tokens_and_tells_readyz(start_appliance):
    moto = MotoServer().start()  # its own server: this test stops it
    try:
        prefix = unique_prefix()
        seed(moto.ssm(), prefix, SEED)
        app = start_appliance(moto.appliance_env(prefix, TOKEN_REFRESH_SECONDS="0.2"), name="stale")
        status, body = await app.aget("/readyz")
        assert status == 200 and body["tokens"]["ok"] is True and body["tokens"]["store"] == f"ssm:{prefix}"
    finally:
        moto.stop()

    async def refresh_failed() -> bool:
        return (await app.aget("/readyz"))[1]["tokens"]["ok"] is False

    await eventually(refresh_failed, 20, "/readyz to report the failed refresh")
    status, body = await app.aget("/readyz")
    assert status == 200 and "serving the last good tokens" in body["tokens"]["error"]
    assert await accepted(app, "still-works", CLIENT_TOKEN)
    assert (await app.aget("/api/v1/clients", ADMIN_TOKEN))[0] == 200
    metrics_text = (await app.aget("/metrics"))[1]
    assert "wsbridge_token_store_up 0.0" in metrics_text
    failures = next(
        line for line in metrics_text.splitlines() if line.startswith("wsbridge_token_refresh_failures_total")
    )
    assert float(failures.split()[1]) >= 1


async def test_scoped_client_token_opens_only_matching_ids(start_appliance, moto):
    prefix = unique_prefix()
    lights = "lights-token-0123456789abcdef"
    seed(moto.ssm(), prefix, {**SEED, "client_tokens/lights": json.dumps({"ids": "lights_*", "token": lights})})
    app = start_appliance(moto.appliance_env(prefix), name="scoped")
    async with app.connect("lights_kitchen", lights) as lamp, app.controller() as llm:
        await llm.send(command("lights_kitchen", "on"))
        assert await recv(lamp) == "on"
    assert await refused_with(app, "door_1", lights) == 4001
    assert await refused_with(app, "LLM", lights) == 4001  # not lights_*, and reserved anyway
    assert (await app.aget("/api/v1/clients", lights))[0] == 403


# --- browsers and WebGL: the token as a subprotocol --------------------------------------------------


async def test_subprotocol_token_authenticates_and_is_never_echoed(start_appliance):
    app = start_appliance(name="subproto")
    url = f"{app.ws}/ws/browser_1"
    async with connect(url, subprotocols=["wsbridge.v1", f"wsbridge.token.{CLIENT_TOKEN}"]) as browser:
        assert browser.subprotocol == "wsbridge.v1"
        assert browser.response.headers.get_all("Sec-WebSocket-Protocol") == ["wsbridge.v1"]
        assert CLIENT_TOKEN not in str(browser.response.headers)
        async with connect(f"{app.ws}/ws/LLM", subprotocols=[f"wsbridge.token.{CONTROLLER_TOKEN}"]) as llm:
            assert llm.subprotocol is None  # no version offered: v1, and nothing selected
            assert "Sec-WebSocket-Protocol" not in llm.response.headers
            await llm.send(command("browser_1", "Jump"))
            assert await recv(browser) == "Jump"
    async with connect(url, subprotocols=["wsbridge.v1", "wsbridge.token.wrong-token-value"]) as wrong:
        assert (await closed_with(wrong))[0] == 4001
    async with connect(f"{url}?token={CLIENT_TOKEN}") as in_url:  # never in the URL: proxies log URLs
        assert (await closed_with(in_url))[0] == 4001
    assert CLIENT_TOKEN not in app.log() and CONTROLLER_TOKEN not in app.log()


async def test_unknown_subprotocol_only_is_still_answered_without_one(start_appliance):
    app = start_appliance(name="subproto-unknown")
    try:
        async with connect(
            f"{app.ws}/ws/c1", subprotocols=["chat"], additional_headers={"X-Auth-Token": CLIENT_TOKEN}
        ) as ws:
            assert ws.subprotocol is None
    except InvalidStatus as exc:  # pragma: no cover - the assertion below explains it
        raise AssertionError(f"handshake failed: {exc}") from exc
