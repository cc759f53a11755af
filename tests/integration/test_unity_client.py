"""The Unity client (the UPM package in unity_project/Packages/com.wsbridge.client) built with Mono and run against real appliances.

``BridgeClient.cs`` and ``BridgeProtocol.cs`` are compiled with ``mcs`` together with the C# test program
``unity/BridgeClientTests.cs`` and run with ``mono``, one scenario per process. This module plays the
controller with the ``websockets`` library and starts, restarts and reconfigures the appliance; the C#
program plays the device, checks what it sees and exits non-zero with a ``FAIL:`` line on a failed check.
``CommandListener.cs`` and the example device are compiled against ``unity/UnityEngineStub.cs`` and driven
by ``unity/ListenerSmoke.cs`` like the Unity player would (Awake, Start, Update per frame, pause/resume).

Mono comes from ``tools/apt/unity.txt`` (installed by ``python3 dev.py test``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from http import HTTPStatus
from pathlib import Path

import httpx
import pytest
import websockets
from moto_support import MotoServer, seed, unique_prefix
from support import CLIENT_TOKEN, CONTROLLER_TOKEN, ROOT, Appliance, command, eventually, recv_json, timeout

PACKAGE = ROOT / "unity_project" / "Packages" / "com.wsbridge.client"
CORE = PACKAGE / "Runtime" / "Core"
HARNESS = Path(__file__).resolve().parent / "unity"
# The newest C# Mono's mcs compiles; the Unity scripts promise to stay within it.
LANGVERSION = "7.2"
# Where the package is installed from by git URL (unity_project/README.md) and documented (package.json).
REPOSITORY = "https://github.com/wsbridge/websocket-bridge"
TRANSPORT = sorted(CORE.rglob("*.cs"))
UNITY_SCRIPTS = [*sorted((PACKAGE / "Runtime" / "Unity").rglob("*.cs")), *sorted((PACKAGE / "Samples~").rglob("*.cs"))]
EDITOR_SCRIPTS = sorted((PACKAGE / "Editor").rglob("*.cs"))


def compile_cs(out: Path, sources: list[Path], target: str = "exe", defines: list[str] | None = None) -> Path:
    """mcs with warnings as errors: what compiles cleanly here also compiles in Unity without noise."""
    mcs = shutil.which("mcs")
    if mcs is None or shutil.which("mono") is None:
        pytest.fail("mcs/mono not found: run the tests through `python3 dev.py test` (tools/apt/unity.txt)")
    result = subprocess.run(
        [
            mcs,
            f"-langversion:{LANGVERSION}",
            "-warn:4",
            "-warnaserror+",
            "-r:System.Core",
            f"-target:{target}",
            *(f"-define:{name}" for name in defines or []),
            f"-out:{out}",
            *map(str, sources),
        ],
        capture_output=True,
        text=True,
        timeout=timeout(120),
    )
    assert result.returncode == 0, f"mcs failed:\n{result.stdout}{result.stderr}"
    return out


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unity") / "BridgeClientTests.exe"
    return compile_cs(out, [*TRANSPORT, HARNESS / "BridgeClientTests.cs"])


@pytest.fixture(scope="module")
def webgl_harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harness with WebGLTransport, its plugin functions played by a browser-like ClientWebSocket."""
    out = tmp_path_factory.mktemp("unity-webgl") / "WebGLTransportTests.exe"
    return compile_cs(
        out,
        [
            *TRANSPORT,
            HARNESS / "BridgeClientTests.cs",
            HARNESS / "BrowserSocketEmulation.cs",
            HARNESS / "WebGLPlayerEmulation.cs",
        ],
        defines=["WSBRIDGE_WEBGL_TESTS"],
    )


@pytest.fixture(scope="module")
def app() -> Iterator[Appliance]:
    """One appliance with the default limits for the tests that do not restart or reconfigure it."""
    appliance = Appliance(name="unity")
    appliance.start()
    yield appliance
    appliance.stop()


@pytest.fixture(scope="module")
def redis_app(redis_server) -> Iterator[Appliance]:
    """The same, on Redis, for the tests that run on both brokers and need nothing else of their own."""
    appliance = Appliance(redis_url=redis_server.url, name="unity-redis")
    appliance.start()
    yield appliance
    appliance.stop()


@pytest.fixture(params=["memory", "redis"])
def relay(request: pytest.FixtureRequest) -> Appliance:
    """conftest's ``relay``, but ``app`` for the memory broker: one appliance per broker for the module."""
    return request.getfixturevalue("app" if request.param == "memory" else "redis_app")


class Device:
    """One run of the C# test program; its ``EVENT``/``FAIL`` lines are read as they come."""

    def __init__(self, process: asyncio.subprocess.Process, scenario: str, workdir: Path) -> None:
        self.process = process
        self.scenario = scenario
        self.workdir = workdir
        self.lines: list[str] = []

    async def _next_line(self, within: float) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout(within))
        if not raw:
            await self.process.wait()
            raise AssertionError(
                f"{self.scenario} exited ({self.process.returncode}) early:\n{self.output}{self._crash_reports()}"
            )
        line = raw.decode(errors="replace").rstrip("\n")
        self.lines.append(line)
        if line.startswith("FAIL:"):
            raise AssertionError(f"{self.scenario}: {line}\n{self.output}")
        return line

    async def expect(self, prefix: str, within: float = 15.0) -> str:
        """The next output line starting with ``prefix`` (others are kept in the transcript)."""
        try:
            async with asyncio.timeout(timeout(within)):
                while not (line := await self._next_line(within)).startswith(prefix):
                    pass
        except TimeoutError:
            raise AssertionError(
                f"{self.scenario}: no line starting with {prefix!r} within {within} s:\n{self.output}"
            ) from None
        return line

    async def passes(self, within: float = 20.0) -> None:
        """The program ends with exit code 0 and a PASS line."""
        await self.expect(f"PASS {self.scenario}", within)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout(10))
        except TimeoutError:
            raise AssertionError(
                f"{self.scenario} printed PASS but did not exit:\n{await self._thread_dump()}"
            ) from None
        assert code == 0, f"{self.scenario} exited with {code}:\n{self.output}"

    async def _thread_dump(self) -> str:
        """SIGQUIT makes mono print every thread's stack; what a hang needs to be understood."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGQUIT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while raw := await self.process.stdout.readline():
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
        return self.output

    def _crash_reports(self) -> str:
        """A native crash of the Mono runtime leaves mono_crash.*.json in the working directory (a temporary one)."""
        reports = sorted(self.workdir.glob("mono_crash.*.json"))
        return "".join(f"\nMono crash report {report}" for report in reports)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@contextlib.asynccontextmanager
async def device(
    harness: Path, scenario: str, env: dict[str, str] | None = None, **options: object
) -> AsyncIterator[Device]:
    args: list[str] = []
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    process = await asyncio.create_subprocess_exec(
        shutil.which("mono") or "mono",
        "--debug",
        str(harness),
        scenario,
        *args,
        "--deadline",
        str(timeout(30)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        # Not the repository: a native crash of Mono writes mono_crash.*.json into the working directory.
        cwd=harness.parent,
    )
    try:
        yield Device(process, scenario, harness.parent)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def ask(llm, target: str, text: str, within: float = 10.0) -> str:
    """Send one command and return the target's reply (failing on an error frame)."""
    await llm.send(frame(target, text))
    reply = await recv_json(llm, within)
    assert "error" not in reply, f"error frame for {text[:40]!r}: {reply}"
    assert reply["sender"] == target, reply
    return reply["message"]


async def quit_device(llm, target: str, run: Device) -> None:
    await llm.send(command(target, "quit"))
    assert await recv_json(llm) == {"sender": target, "message": "bye"}  # flushed before the 1000 close
    await run.passes()


async def listed(app: Appliance, client_id: str) -> bool:
    status, body = await app.aget("/api/v1/clients", token=app.env["LLM_SECRET_TOKEN"])
    assert status == 200, body
    return any(record["id"] == client_id for record in body["clients"])


def size_and_hash(text: str) -> str:
    data = text.encode()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def payload(nbytes: int) -> str:
    """Text of exactly ``nbytes`` UTF-8 bytes with 2-, 3- and 4-byte characters, so a character straddles
    every read boundary somewhere and decoding chunk by chunk would corrupt it."""
    unit = "héllo wörld — 🎮 ünïcode "
    text = unit * (nbytes // len(unit.encode()) + 1)
    while len(text.encode()) > nbytes:
        text = text[:-1]
    return text + "x" * (nbytes - len(text.encode()))


def frame(target: str, message: str) -> str:
    """A controller frame with the text unescaped, so its UTF-8 size is the message's plus a small envelope."""
    return json.dumps({"target": target, "message": message}, ensure_ascii=False, separators=(",", ":"))


def frame_bytes(target: str, message: str) -> int:
    return len(frame(target, message).encode())


# --- offline and compile-only -------------------------------------------------------------------


def documented_close_codes() -> tuple[list[int], list[int]]:
    """docs/protocol.md's close-code table: (the codes it says not to retry, the others)."""
    rows = re.findall(r"^\| (\d{4}) \|.*\| ([^|]*)\|$", (ROOT / "docs" / "protocol.md").read_text(), re.M)
    final = [int(code) for code, retry in rows if re.match(r"not?\b", retry.strip())]
    retried = [int(code) for code, _ in rows if int(code) not in final]
    assert {4001, 4011, 4014, 4016} <= set(final) and {1011, 4004, 4015} <= set(retried), rows  # the table was read
    return final, retried


async def test_selftest_backoff_endpoint_codec_and_retry_loop(harness):
    """Also: every close code docs/protocol.md says not to retry is final, the others are retried, all described."""
    final, retried = documented_close_codes()
    codes = {"final_codes": ",".join(map(str, final)), "retried_codes": ",".join(map(str, retried))}
    async with device(harness, "selftest", **codes) as run:
        await run.passes()


def test_the_readme_says_the_client_stops_at_every_final_close_code():
    readme = (ROOT / "unity_project" / "README.md").read_text()
    stops = {
        int(code)
        for row in re.findall(r"^\|.*\*\*Stops\*\*.*$", readme, re.M)
        for code in re.findall(r"\b4\d{3}\b", row)
    }
    assert set(documented_close_codes()[0]) <= stops, sorted(set(documented_close_codes()[0]) - stops)


async def test_listener_and_example_compile_against_the_unity_stand_in(tmp_path):
    compile_cs(tmp_path / "UnityScripts.dll", [*TRANSPORT, *UNITY_SCRIPTS, HARNESS / "UnityEngineStub.cs"], "library")
    # The editor assembly (the read-only Status drawer) too, in the editor.
    compile_cs(
        tmp_path / "UnityEditorScripts.dll",
        [*TRANSPORT, *UNITY_SCRIPTS, *EDITOR_SCRIPTS, HARNESS / "UnityEngineStub.cs"],
        "library",
        defines=["UNITY_EDITOR"],
    )


# --- against a running appliance ----------------------------------------------------------------


async def test_connects_with_the_token_header_and_closes_cleanly(app, harness):
    async with (
        app.controller() as llm,
        device(harness, "device", url=app.ws, id="unity-hello", token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected client=device connections=1")
        await eventually(lambda: listed(app, "unity-hello"), 10, "unity-hello in /api/v1/clients")
        await quit_device(llm, "unity-hello", run)

    # Stop() closed with 1000 and the appliance saw it: the client is gone from the listing.
    async def gone() -> bool:
        return not await listed(app, "unity-hello")

    await eventually(gone, 10, "unity-hello to leave")


async def test_command_from_controller_is_dispatched_and_the_reply_reaches_the_controller(app, harness):
    async with (
        app.controller() as llm,
        device(harness, "device", url=app.ws, id="unity-echo", token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        assert await ask(llm, "unity-echo", "echo hello world") == "hello world"
        assert await ask(llm, "unity-echo", 'ECHO  héllo 🎮 {"json": true}') == 'héllo 🎮 {"json": true}'
        await quit_device(llm, "unity-echo", run)


async def test_message_at_the_size_limit_arrives_intact(app, harness):
    limit = 65536  # MAX_MESSAGE_BYTES default; the controller's whole frame counts
    target = "unity-limit"
    text = payload(limit - frame_bytes(target, "size "))
    message = "size " + text
    assert frame_bytes(target, message) == limit
    async with (
        app.controller(max_size=None) as llm,
        device(harness, "device", url=app.ws, id=target, token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        assert await ask(llm, target, message) == size_and_hash(text)
        await quit_device(llm, target, run)


async def test_200_kib_message_arrives_intact_when_the_limit_is_raised(start_appliance, harness):
    big = start_appliance({"MAX_MESSAGE_BYTES": str(256 * 1024)}, name="unity-big")
    text = payload(200 * 1024)
    async with (
        big.controller(max_size=None) as llm,
        device(harness, "device", url=big.ws, id="unity-big", token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        # The client reads 16 KiB at a time: the message is reassembled from many partial receives.
        assert await ask(llm, "unity-big", "size " + text) == size_and_hash(text)
        await quit_device(llm, "unity-big", run)


async def test_concurrent_sends_from_many_threads_all_arrive(app, harness):
    async with (
        app.controller() as llm,
        device(harness, "device", url=app.ws, id="unity-burst", token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        count = 300
        await llm.send(command("unity-burst", f"burst {count}"))
        replies = [(await recv_json(llm))["message"] for _ in range(count + 1)]
        assert sorted(replies[:-1]) == sorted(f"burst {i}" for i in range(count))
        assert replies[-1] == f"burst done {count}"
        await quit_device(llm, "unity-burst", run)


async def test_reconnects_after_the_appliance_restarts(start_appliance, harness):
    restarting = start_appliance(name="unity-restart")
    target = "unity-restart"
    async with device(
        harness, "device", url=restarting.ws, id=target, token=CLIENT_TOKEN, expect_connections=2, expect_close=1001
    ) as run:
        await run.expect("EVENT connected client=device connections=1")
        async with restarting.controller() as llm:
            assert await ask(llm, target, "echo before") == "before"
        await asyncio.to_thread(restarting.terminate)  # SIGTERM: every socket is closed with 1001
        await run.expect("EVENT disconnected client=device code=1001")
        await asyncio.to_thread(restarting.start)  # same port
        await run.expect("EVENT connected client=device connections=2")
        async with restarting.controller() as llm:
            assert await ask(llm, target, "echo after") == "after"
            await quit_device(llm, target, run)


async def test_duplicate_refused_with_4009_is_retried_until_the_id_is_free(start_appliance, harness):
    strict = start_appliance({"DUPLICATE_POLICY": "reject"}, name="unity-reject")
    target = "unity-busy"
    holder = await strict.connect(target)
    async with device(harness, "device", url=strict.ws, id=target, token=CLIENT_TOKEN, expect_close=4009) as run:
        refused = await run.expect("EVENT disconnected client=device code=4009")
        assert "willRetry=True" in refused, refused
        await run.expect("EVENT disconnected client=device code=4009")  # it keeps trying, with backoff
        await holder.close()
        async with strict.controller() as llm:

            async def echoed() -> bool:
                await llm.send(frame(target, "echo free"))
                reply = await recv_json(llm)
                if reply.get("error") == "target_offline":
                    return False
                assert reply == {"sender": target, "message": "free"}, reply
                return True

            await eventually(echoed, 10, "the client to take the freed id")
            await quit_device(llm, target, run)


@pytest.mark.parametrize(
    ("client_id", "token", "code"),
    [
        ("unity-badtoken", "not-the-token", 4001),
        ("LLM", CLIENT_TOKEN, 4003),  # the controller id with a client token
    ],
    ids=["bad-token-4001", "reserved-id-4003"],
)
async def test_refused_connection_is_not_retried_and_the_reason_is_reported(app, harness, client_id, token, code):
    async with device(harness, "rejected", url=app.ws, id=client_id, token=token, expect_close=code) as run:
        line = await run.expect("EVENT rejected")
        await run.passes()
    reason = line.split("reason=", 1)[1]
    assert line.startswith(f"EVENT rejected code={code} ") and reason.strip(), line
    assert token not in run.output  # the token is never printed, not even in the reason


async def test_newer_connection_with_the_same_id_takes_over_and_the_old_one_gives_up(relay, harness):
    async with (
        relay.controller() as llm,
        device(harness, "replaced", url=relay.ws, id="unity-dup", token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT replaced code=4010")
        assert await ask(llm, "unity-dup", "echo who") == "second:who"
        await quit_device(llm, "unity-dup", run)


async def test_receive_watchdog_drops_a_silent_connection_and_reconnects(app, harness):
    async with device(harness, "watchdog", url=app.ws, id="unity-idle", token=CLIENT_TOKEN, receive_timeout=0.5) as run:
        await run.passes()
    assert 'reason="receive timeout' in run.output


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The listener, the example and the Unity stand-in (UNITY_EDITOR defined, as in the editor's play mode)."""
    return compile_cs(
        tmp_path_factory.mktemp("unity-smoke") / "ListenerSmoke.exe",
        [*TRANSPORT, *UNITY_SCRIPTS, *sorted(HARNESS.glob("Unity*.cs")), HARNESS / "ListenerSmoke.cs"],
        defines=["UNITY_EDITOR"],
    )


async def test_command_listener_dispatches_to_the_example_light_on_the_main_thread(app, smoke):
    async with (
        app.controller() as llm,
        device(smoke, "listener", url=app.ws, id="unity-light", token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        assert await ask(llm, "unity-light", "off") == "light off"
        assert await ask(llm, "unity-light", "intensity 2.5") == "intensity 2.5"
        assert await ask(llm, "unity-light", "intensity lots") == "error: usage: intensity <0..8>"
        assert await ask(llm, "unity-light", "dance") == "error: unknown command dance"
        assert await ask(llm, "unity-light", "on") == "light on"
        await llm.send(command("unity-light", "quit"))
        await run.expect("EVENT resumed connections=2")  # the short pause kept connection 1, the long one replaced it
        await run.passes()
    lines = run.output
    assert "EVENT unhandled dance" in lines  # the UnityEvent fallback got the unknown command

    async def gone() -> bool:
        return not await listed(app, "unity-light")

    await eventually(gone, 10, "unity-light to leave")


async def test_reloading_the_boot_scene_keeps_one_listener_and_duplicates_destroy_themselves(app, smoke):
    """Issue 25 item 3: a stand-in that keeps DontDestroyOnLoad objects across loads; three loads, one listener."""
    target = "unity-reloads"
    async with (
        app.controller() as llm,
        device(smoke, "reloads", url=app.ws, id=target, token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        assert await ask(llm, target, "off") == "light off"  # the lamp of the last load, through the first listener
        await llm.send(command(target, "quit"))
        await run.passes()


async def test_v1_replies_keep_the_command_order_with_async_handlers_and_their_exceptions_are_logged(app, smoke):
    """Issue 25 items 7 and 6: v1 has no ids, so "slow" (an async handler, five frames) must answer before "echo"."""
    target = "unity-v1-order"
    async with (
        app.controller() as llm,
        device(smoke, "v1order", url=app.ws, id=target, token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        await llm.send(command(target, "slow first"))
        await llm.send(command(target, "echo second"))
        replies = [(await recv_json(llm))["message"] for _ in range(2)]
        assert replies == ["first", "second"]
        assert await ask(llm, target, "boom") == "error: boom: fuse blown"
        await llm.send(command(target, "quit"))
        await run.passes()


async def test_a_device_build_without_environment_variables_takes_the_token_from_a_resource_asset(app, smoke):
    """Issue 25 item 2: no UNITY_CLIENT_TOKEN (Android, iOS, WebGL have none); the editor warns until the asset exists."""
    target = "unity-device-token"
    async with (
        app.controller() as llm,
        device(smoke, "devicetoken", env={"UNITY_CLIENT_TOKEN": ""}, url=app.ws, id=target, token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        assert await ask(llm, target, "ping") == "pong"
        await llm.send(command(target, "quit"))
        await run.passes()


@pytest.fixture(scope="module")
def smoke_webgl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The listener with the WebGL transport over the browser emulation (and the frame loop)."""
    return compile_cs(
        tmp_path_factory.mktemp("unity-smoke-webgl") / "ListenerSmokeWebGL.exe",
        [
            *TRANSPORT,
            *UNITY_SCRIPTS,
            *sorted(HARNESS.glob("Unity*.cs")),
            HARNESS / "ListenerSmoke.cs",
            HARNESS / "BrowserSocketEmulation.cs",
        ],
        defines=["UNITY_EDITOR", "WSBRIDGE_WEBGL_TESTS"],
    )


async def test_a_command_that_waited_in_a_hidden_webgl_tab_is_refused_not_run_late(app, smoke_webgl):
    """Issue 25 item 5: the browser stamps what it queues; the listener counts that time (Command Max Age 1 s)."""
    target = "unity-hidden-tab"
    async with (
        app.controller() as llm,
        device(smoke_webgl, "hiddentab", url=app.ws, id=target, token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        assert await ask(llm, target, "echo visible") == "visible"
        assert await ask(llm, target, "hide") == "hidden"
        await run.expect("EVENT hidden")  # no frame runs from now on for 3 s
        await llm.send(command(target, "echo while-hidden"))  # waits ~3 s in the browser's queue
        refused = (await recv_json(llm, 20))["message"]
        assert refused.startswith("error: echo not run: it waited "), refused
        assert "(limit 1 s)" in refused, refused
        assert await ask(llm, target, "echo visible-again") == "visible-again"
        await llm.send(command(target, "quit"))
        await run.passes()


async def test_commands_a_replaced_client_delivers_late_do_not_fill_the_pending_count(smoke):
    """Issue 25 item 4: offline; 100 such commands used to leave every later command refused as busy."""
    async with device(smoke, "stale", id="unity-stale", token="t") as run:
        await run.passes()


async def test_commands_never_run_late_and_teardown_never_blocks(relay, smoke):
    """Disabled, paused, stalled frames, an old connection, the frame budget, a domain reload, a destroyed primary
    listener, a dead socket on resume and at teardown (the C# program is the controller too; see ListenerSmoke.cs)."""
    async with device(
        smoke,
        "lifecycle",
        env={"UNITY_CLIENT_TOKEN": CLIENT_TOKEN},
        url=relay.ws,
        id="unity-life",
        token=CLIENT_TOKEN,
        controller_token=relay.env["LLM_SECRET_TOKEN"],
    ) as run:
        await run.passes(within=60)
    assert "EVENT per-frame 5,5,2" in run.output
    assert CLIENT_TOKEN not in run.output.replace(f"--token {CLIENT_TOKEN}", "")


async def test_webgl_transport_authenticates_by_subprotocol_and_reconnects_after_a_restart(
    start_appliance, webgl_harness
):
    """WebGLTransport.cs (polled per frame, no headers: the token only in Sec-WebSocket-Protocol) under BridgeClient."""
    restarting = start_appliance(name="unity-webgl")
    target = "unity-webgl"
    async with device(
        webgl_harness,
        "device",
        transport="webgl",
        url=restarting.ws,
        id=target,
        token=CLIENT_TOKEN,
        expect_connections=2,
        expect_close=1001,
    ) as run:
        await run.expect("EVENT connected client=device connections=1")
        async with restarting.controller() as llm:
            assert await ask(llm, target, "echo héllo 🎮") == "héllo 🎮"
            assert await ask(llm, target, "size " + payload(20000)) == size_and_hash(payload(20000))
        await asyncio.to_thread(restarting.terminate)
        await run.expect("EVENT disconnected client=device code=1001")
        await asyncio.to_thread(restarting.start)
        await run.expect("EVENT connected client=device connections=2")
        async with restarting.controller() as llm:
            assert await ask(llm, target, "echo after") == "after"
            await quit_device(llm, target, run)
    assert "EVENT transport webgl" in run.output
    assert "EVENT offered wsbridge.v1,wsbridge.token.<token>" in run.output
    assert CLIENT_TOKEN not in restarting.log()


async def test_webgl_transport_reports_a_refused_token_as_final(app, webgl_harness):
    """A browser sees the refusal's close code (the appliance selects the offered version even when refusing)."""
    async with device(
        webgl_harness, "rejected", transport="webgl", url=app.ws, id="unity-webgl-bad", token="wrong", expect_close=4001
    ) as run:
        line = await run.expect("EVENT rejected")
        await run.passes()
    assert line.startswith("EVENT rejected code=4001 "), line


@pytest.mark.parametrize("transport", ["clientwebsocket", "webgl"])
async def test_a_binary_message_is_read_as_utf8_text_on_both_transports(request, transport):
    """Issue 25 item 10: ClientWebSocket's transport and the WebGL one (the .jslib in Chromium, its emulation here)."""
    harness_path = request.getfixturevalue("harness" if transport == "clientwebsocket" else "webgl_harness")
    replies: list[str] = []

    async def binary_commands(ws) -> None:
        await ws.send("echo héllo 🎮".encode())  # bytes: a binary frame
        replies.append(await asyncio.wait_for(ws.recv(), timeout(10)))
        await ws.send(b"quit")
        replies.append(await asyncio.wait_for(ws.recv(), timeout(10)))
        await ws.wait_closed()

    # A browser needs one of its subprotocols selected; ClientWebSocket (v1) offers none.
    selected = ["wsbridge.v1"] if transport == "webgl" else None
    async with websockets.serve(binary_commands, "127.0.0.1", 0, subprotocols=selected) as server:
        port = server.sockets[0].getsockname()[1]
        async with device(
            harness_path, "device", transport=transport, url=f"ws://127.0.0.1:{port}", id="unity-binary", token="t"
        ) as run:
            await run.passes()
    assert replies == ["héllo 🎮", "bye"]


async def test_webgl_transport_refuses_a_token_a_browser_cannot_send_once_with_the_reason(app, webgl_harness):
    """Issue 25 item 10: new WebSocket() throws on such a subprotocol, which looked like a 1006 retried forever."""
    async with device(
        webgl_harness,
        "rejected",
        transport="webgl",
        url=app.ws,
        id="unity-webgl-badchars",
        token="has space",
        expect_close="none",
    ) as run:
        line = await run.expect("EVENT rejected")
        await run.passes()
    assert "characters a browser cannot send" in line, line
    assert "has space" not in run.output.replace("--token has space", "")


async def test_webgl_transport_gives_up_with_a_reason_after_repeated_refused_opens(webgl_harness):
    """Issue 25 item 10: an origin the appliance refuses (403) reaches a page as a close 1006 before open, like a server
    that is down. After MaxRefusedOpens such attempts in a row the client stops and says what to check."""
    handshakes: list[str] = []

    async def refuse_origin(connection, request):
        handshakes.append(request.path)
        return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")

    async def never(ws) -> None:
        raise AssertionError("the handshake was refused")

    async with websockets.serve(never, "127.0.0.1", 0, process_request=refuse_origin) as server:
        port = server.sockets[0].getsockname()[1]
        async with device(
            webgl_harness,
            "rejected",
            transport="webgl",
            url=f"ws://127.0.0.1:{port}",
            id="unity-webgl-403",
            token="t",
            expect_close="none",
            max_refused_opens=3,
            expect_attempts=3,
        ) as run:
            line = await run.expect("EVENT rejected")
            await run.passes()
    assert "gave up after 3 attempts" in line and "ALLOWED_ORIGINS" in line, line
    assert len(handshakes) == 3


# --- the WebGL player: one thread, frames, no thread pool, no timers (issue 25) -----------------------


async def test_webgl_player_connects_answers_and_times_out_a_connect_on_one_thread_with_a_starved_pool(
    app, webgl_harness
):
    """WebGLPlayerEmulation.cs: the client runs from the frame loop alone; every pool thread is held by a blocker
    and at the end nothing waits in the pool's queue or for a timer. First a connect the server never answers times
    out by the frame clock, then the device connects to the real appliance and answers commands."""
    target = "unity-webgl-frames"
    async with (
        app.controller() as llm,
        device(webgl_harness, "frameloop", url=app.ws, id=target, token=CLIENT_TOKEN, silent=1) as run,
    ):
        await run.expect("EVENT starved workers=")
        await run.expect("EVENT timed-out attempts=")
        await run.expect("EVENT connected client=device connections=1")
        assert await ask(llm, target, "echo héllo 🎮") == "héllo 🎮"
        assert await ask(llm, target, "size " + payload(20000)) == size_and_hash(payload(20000))
        await quit_device(llm, target, run)


async def test_webgl_player_reconnects_after_a_1011_on_one_thread_with_a_starved_pool(webgl_harness):
    """A server error (1011) on the first connection: the backoff runs on the frame clock and the client comes back."""
    connections: list[object] = []

    async def failing_first(ws) -> None:
        connections.append(ws)
        if len(connections) == 1:
            await ws.close(1011, "internal error")
            return
        await ws.send("echo again")
        assert await asyncio.wait_for(ws.recv(), timeout(10)) == "again"
        await ws.send("quit")
        assert await asyncio.wait_for(ws.recv(), timeout(10)) == "bye"
        await ws.wait_closed()

    async with websockets.serve(failing_first, "127.0.0.1", 0, subprotocols=["wsbridge.v1"]) as server:
        port = server.sockets[0].getsockname()[1]
        async with device(
            webgl_harness,
            "frameloop",
            url=f"ws://127.0.0.1:{port}",
            id="unity-webgl-1011",
            token="t",
            expect_connections=2,
            expect_close=1011,
        ) as run:
            await run.expect("EVENT disconnected client=device code=1011")
            await run.expect("EVENT connected client=device connections=2")
            await run.passes()
    assert len(connections) == 2


# --- hangs, races and final codes (issue 13) ------------------------------------------------------


async def test_connect_timeout_holds_against_a_server_that_never_answers_the_upgrade(harness):
    """Mono's ConnectAsync ignores cancellation once TCP is up: the client must still time out, retry, and stop at once."""
    async with device(harness, "blackhole") as run:
        line = await run.expect("EVENT stopped-in")
        await run.passes()
    assert int(line.split("ms=")[1]) < 5000, line  # half the scenario's 10 s CloseTimeout: at once, not after it


async def test_send_racing_stop_never_leaves_a_message_for_a_later_start(harness):
    async with device(harness, "sendrace") as run:
        await run.passes(within=60)


async def test_every_message_accepted_before_stop_reaches_the_controller(app, harness):
    async with (
        app.controller() as llm,
        device(harness, "flush", url=app.ws, id="unity-flush", token=CLIENT_TOKEN) as run,
    ):
        received: list[str] = []

        async def read() -> None:  # read all along: a controller that stops reading slows the sender down
            while True:
                received.append(json.loads(await llm.recv())["message"])

        reader = asyncio.create_task(read())
        try:
            accepted = int((await run.expect("EVENT accepted")).split()[-1])
            await run.passes()
            assert accepted > 0
            with contextlib.suppress(AssertionError):
                await eventually(lambda: asyncio.sleep(0, len(received) >= accepted), 10, f"{accepted} messages")
            await asyncio.sleep(0.5)  # and nothing more than what Send() accepted
        finally:
            reader.cancel()
        assert len(received) == accepted, (
            f"{accepted} accepted, {len(received)} received:\n{run.output}\n{app.log()[-4000:]}"
        )
        # Per sender thread the sequence is complete and in order: nothing accepted was lost or reordered.
        by_thread: dict[str, list[int]] = {}
        for message in received:
            _, thread, number = message.split()
            by_thread.setdefault(thread, []).append(int(number))
        for numbers in by_thread.values():
            assert numbers == list(range(len(numbers))), numbers[:20]


async def test_token_expired_4011_is_final_and_its_reason_reported(harness):
    """A server that closes with 4011 (token expired or revoked): the client stops instead of retrying."""

    async def expire(ws) -> None:
        await ws.close(4011, "token expired or revoked; reconnect with the current token")

    async with websockets.serve(expire, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with device(
            harness, "rejected", url=f"ws://127.0.0.1:{port}", id="unity-expired", token="old", expect_close=4011
        ) as run:
            line = await run.expect("EVENT rejected")
            await run.passes()
    assert line.startswith("EVENT rejected code=4011 reason=token expired"), line


def admin_delete(app: Appliance, client_id: str) -> int:
    """DELETE /api/v1/clients/{id} with the admin token (blocking: run it in a thread)."""
    import urllib.request

    from support import ADMIN_TOKEN

    request = urllib.request.Request(
        f"{app.http}/api/v1/clients/{client_id}", method="DELETE", headers={"X-Auth-Token": ADMIN_TOKEN}
    )
    with urllib.request.urlopen(request, timeout=timeout(10)) as response:
        return response.status


async def test_disconnected_by_an_administrator_4012_is_final_as_documented(app, harness):
    """DELETE /api/v1/clients/{id} (docs/protocol.md: 4012, "not automatically: a person decided it"):
    the Unity client stops, as the Python client does, instead of coming straight back."""
    async with device(harness, "rejected", url=app.ws, id="unity-kicked", token=CLIENT_TOKEN, expect_close=4012) as run:
        await run.expect("EVENT connected client=rejected connections=1")
        assert await asyncio.to_thread(admin_delete, app, "unity-kicked") == 204
        line = await run.expect("EVENT rejected")
        await run.passes()
    assert line.startswith("EVENT rejected code=4012 reason=disconnected by an administrator"), line
    assert not await listed(app, "unity-kicked")


# --- the UPM package ------------------------------------------------------------------------------

# Unity's own assemblies a package asmdef may reference (the test framework's, for Tests/).
UNITY_ASSEMBLIES = {"UnityEngine.TestRunner", "UnityEditor.TestRunner"}


def asmdefs() -> dict[Path, dict]:
    return {path: json.loads(path.read_text()) for path in sorted(PACKAGE.rglob("*.asmdef"))}


def test_package_json_asmdefs_and_project_manifest_agree():
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert manifest["name"] == PACKAGE.name == "com.wsbridge.client"
    assert re.fullmatch(r"\d+\.\d+\.\d+", manifest["version"]), manifest["version"]
    assert re.fullmatch(r"20\d\d\.\d", manifest["unity"]), manifest["unity"]
    assert manifest["description"] and manifest["displayName"]
    assert manifest["license"] == "MIT"  # the repository's (pyproject.toml)
    for url in (manifest["documentationUrl"], manifest["changelogUrl"]):  # the repository the README installs from
        assert url.startswith(REPOSITORY + "/blob/main/unity_project/"), url
    assert (
        f"{REPOSITORY}.git?path=/unity_project/Packages/com.wsbridge.client"
        in (ROOT / "unity_project" / "README.md").read_text()
    )
    for sample in manifest["samples"]:
        folder = PACKAGE / sample["path"]
        assert sample["path"].startswith("Samples~/") and folder.is_dir() and list(folder.glob("*.cs")), sample
    assert f"## [{manifest['version']}]" in (PACKAGE / "CHANGELOG.md").read_text()

    definitions = asmdefs()
    names = [definition["name"] for definition in definitions.values()]
    assert len(names) == len(set(names)), names
    for path, definition in definitions.items():
        unknown = set(definition.get("references", [])) - set(names) - UNITY_ASSEMBLIES
        assert not unknown, f"{path.relative_to(PACKAGE)} references unknown assemblies {unknown}"
        # Every script of the assembly declares a namespace under its rootNamespace.
        for script in path.parent.rglob("*.cs"):
            declared = re.findall(r"^namespace ([\w.]+)", script.read_text(), re.M)
            assert declared and all(n.startswith(definition["rootNamespace"]) for n in declared), script
    core = definitions[CORE / "WebSocketBridge.Core.asmdef"]
    assert core["noEngineReferences"] is True
    for script in CORE.rglob("*.cs"):  # the transport and protocol code stays free of UnityEngine
        code = "\n".join(line.split("//")[0] for line in script.read_text().splitlines())
        assert "UnityEngine" not in code, script
    unity = definitions[PACKAGE / "Runtime" / "Unity" / "WebSocketBridge.asmdef"]
    assert unity["references"] == ["WebSocketBridge.Core"]
    editor = definitions[PACKAGE / "Editor" / "WebSocketBridge.Editor.asmdef"]
    assert editor["includePlatforms"] == ["Editor"] and editor["references"] == ["WebSocketBridge"]
    tests = definitions[PACKAGE / "Tests" / "Runtime" / "WebSocketBridge.Tests.asmdef"]
    assert (
        "UNITY_INCLUDE_TESTS" in tests["defineConstraints"] and "nunit.framework.dll" in tests["precompiledReferences"]
    )

    # unity_project/ opens as a project that uses the local package and runs its tests.
    project = PACKAGE.parent.parent
    dependencies = json.loads((project / "Packages" / "manifest.json").read_text())
    assert dependencies["dependencies"][manifest["name"]] == f"file:{PACKAGE.name}"
    assert manifest["name"] in dependencies["testables"]
    version = re.search(
        r"^m_EditorVersion: (\d+)\.(\d+)\.", (project / "ProjectSettings" / "ProjectVersion.txt").read_text(), re.M
    )
    assert version and tuple(map(int, version.groups())) >= tuple(map(int, manifest["unity"].split(".")))


def test_the_readme_says_what_a_webgl_build_needs():
    """Issue 25 item 11: ALLOWED_ORIGINS, the characters a token may use (the ones WebGLTransport accepts), Run In
    Background, scoped tokens; and the close codes the client describes are in its table."""
    readme = (ROOT / "unity_project" / "README.md").read_text()
    webgl = readme.split("## WebGL", 1)[1].split("\n## ", 1)[0]
    for needed in ("ALLOWED_ORIGINS", "Run In Background", "scoped client token", "MaxRefusedOpens", "4008"):
        assert needed in webgl, needed
    transport = (CORE / "WebGLTransport.cs").read_text()
    allowed = re.search(r'"([^"]+)"\.IndexOf\(c\) >= 0', transport)
    assert allowed and f"letters, digits and ``{allowed[1]}``" in webgl, (
        "the README's token characters differ from IsToken's"
    )
    builds = readme.split("### Tokens in builds", 1)[1].split("\n## ", 1)[0]
    assert "WsBridgeToken.txt" in builds and "public" in builds and "scoped client token" in builds
    assert "/Assets/Resources/WsBridgeToken.txt" in (ROOT / "unity_project" / ".gitignore").read_text()
    client = (CORE / "BridgeClient.cs").read_text()
    described = {int(code) for code in re.findall(r"const int \w+ = (4\d\d\d);", client)}
    table = readme.split("## What the connection does", 1)[1].split("\n## ", 1)[0]
    assert {4004, 4013} <= described
    for code in described:
        assert str(code) in table, code


def test_every_package_file_has_a_meta_with_a_unique_guid():
    sys.path.insert(0, str(HARNESS))
    try:
        add_meta = importlib.import_module("add_meta")
    finally:
        sys.path.remove(str(HARNESS))
    guids: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix == ".meta":
            assert path.with_suffix("").exists(), f"orphaned {path.relative_to(PACKAGE)}"
            continue
        if not add_meta.needs_meta(path):
            continue
        meta = path.with_name(path.name + ".meta")
        assert meta.exists(), f"{path.relative_to(PACKAGE)} has no .meta (run tests/integration/unity/add_meta.py)"
        text = meta.read_text()
        guid = re.search(r"^guid: ([0-9a-f]{32})$", text, re.M)
        assert guid, f"{meta.relative_to(PACKAGE)} has no valid guid"
        assert guid[1] not in guids, f"{meta.relative_to(PACKAGE)} repeats the guid of {guids[guid[1]]}"
        guids[guid[1]] = path
        assert ("folderAsset: yes" in text) == path.is_dir(), meta
    jslib = (PACKAGE / "Runtime" / "Plugins" / "WebGL" / "WsBridge.jslib.meta").read_text()
    assert "WebGL: WebGL\n    second:\n      enabled: 1" in jslib  # the plugin is included in WebGL players


async def test_package_nunit_tests_pass_and_every_script_compiles_for_webgl(tmp_path):
    """Tests/Runtime (Unity Test Framework) run here against an NUnit stand-in; Core compiles with UNITY_WEBGL."""
    exe = compile_cs(
        tmp_path / "PackageTests.exe",
        [*TRANSPORT, *sorted((PACKAGE / "Tests").rglob("*.cs")), HARNESS / "NUnitStandIn.cs"],
    )
    async with device(exe, "nunit") as run:
        await run.passes()
    assert "FAIL" not in run.output
    compile_cs(tmp_path / "WebGL.dll", TRANSPORT, "library", defines=["UNITY_WEBGL"])
    compile_cs(
        tmp_path / "WebGLPlayer.dll",
        [*TRANSPORT, *UNITY_SCRIPTS, HARNESS / "UnityEngineStub.cs"],
        "library",
        defines=["UNITY_WEBGL"],
    )


async def test_token_revoked_by_the_operator_ends_the_connection_with_4011_and_no_retry(start_appliance, harness):
    """The real appliance on a real (moto) SSM: rotate the client token, revoke the old one: 4011, final."""
    moto = await asyncio.to_thread(MotoServer().start)
    try:
        prefix = unique_prefix()
        seed(moto.ssm(), prefix, {"LLM_SECRET_TOKEN": CONTROLLER_TOKEN, "UNITY_CLIENT_TOKEN": CLIENT_TOKEN})
        # Embedded broker: the appliance learns of the revocation at its next refresh.
        env = moto.appliance_env(prefix, TOKEN_ROTATION_ENABLED="true", TOKEN_REFRESH_SECONDS="0.5")
        relay = start_appliance(env, name="unity-revoke")
        async with device(
            harness, "rejected", url=relay.ws, id="unity-revoked", token=CLIENT_TOKEN, expect_close=4011
        ) as run:
            await run.expect("EVENT connected client=rejected connections=1")
            for action in ("rotate", "revoke"):
                result = await asyncio.to_thread(
                    subprocess.run,
                    [
                        sys.executable,
                        "-m",
                        "appliance",
                        "tokens",
                        "--actor",
                        "unity-test",
                        action,
                        "UNITY_CLIENT_TOKEN",
                    ],
                    env=relay.env,
                    cwd=relay.workdir,
                    capture_output=True,
                    text=True,
                    timeout=timeout(60),
                )
                assert result.returncode == 0, result.stderr
            line = await run.expect("EVENT rejected")
            await run.passes()
    finally:
        await asyncio.to_thread(moto.stop)
    assert line.startswith("EVENT rejected code=4011 reason=token expired or revoked"), line


async def test_a_4010_from_our_own_abandoned_attempt_is_retried(harness):
    """Mono cannot cancel a handshake: an attempt abandoned after the connect timeout may still complete at the
    server, which then replaces the client's live connection (4010). That 4010 is not another game instance."""
    order: dict[object, int] = {}
    live: list = []

    async def slow_first(connection, request) -> None:
        order[connection] = len(order) + 1
        if order[connection] == 1:
            # Answers only once the client has given up on it (0.3 s connect timeout) and its next attempt is live:
            # waited for, not a fixed sleep that a loaded machine could outlast.
            async with asyncio.timeout(timeout(15)):
                while not live:
                    await asyncio.sleep(0.01)

    async def appliance_like(ws) -> None:
        number = order[ws]
        if number == 1:  # the abandoned attempt registers late and takes the id, as the appliance would
            await live[0].close(4010, "replaced by a newer connection")
        elif number == 2:
            live.append(ws)
        else:
            await ws.send("quit")
            assert await ws.recv() == "bye"
        await ws.wait_closed()

    async with websockets.serve(appliance_like, "127.0.0.1", 0, process_request=slow_first) as server:
        port = server.sockets[0].getsockname()[1]
        async with device(
            harness,
            "device",
            url=f"ws://127.0.0.1:{port}",
            id="unity-orphan",
            token="t",
            connect_timeout=0.3,
            expect_connections=2,
            expect_close=4010,
        ) as run:
            line = await run.expect("EVENT disconnected client=device code=4010")
            await run.passes()
    assert "willRetry=True" in line and "abandoned connection attempt" in line, line


async def test_v2_client_stops_with_a_reason_when_the_server_does_not_select_wsbridge_v2(harness):
    """An appliance without protocol v2 would send bare text a v2 codec cannot read: the client says so and stops."""
    offered: list[list[str]] = []

    async def v1_only(ws) -> None:
        offered.append(list(ws.request.headers.get_all("Sec-WebSocket-Protocol")))
        await ws.wait_closed()

    async with websockets.serve(v1_only, "127.0.0.1", 0) as server:  # selects no subprotocol
        port = server.sockets[0].getsockname()[1]
        async with device(
            harness,
            "rejected",
            url=f"ws://127.0.0.1:{port}",
            id="unity-v1only",
            token="t",
            protocol=2,
            expect_close="none",
        ) as run:
            line = await run.expect("EVENT rejected")
            await run.passes()
    assert "did not accept protocol v2" in line, line
    assert offered == [["wsbridge.v2"]]


async def test_v2_codec_over_the_wire_with_mono_subprotocol_negotiation(harness):
    """The C# v2 client against a server that selects wsbridge.v2: ids (integer, string, null), async replies."""
    frames: list[str] = []
    headers: list[str | None] = []

    async def v2_server(ws) -> None:
        headers.append(ws.request.headers.get("X-Auth-Token"))
        await ws.send(json.dumps({"id": 7, "from": "llm-a", "message": "echo hi"}))
        await ws.send(json.dumps({"id": "b-1", "from": "llm-b", "message": "later x"}))
        await ws.send(json.dumps({"id": None, "from": "llm-a", "message": "echo plain"}))
        for _ in range(3):
            frames.append(await asyncio.wait_for(ws.recv(), timeout(10)))
        await ws.send(json.dumps({"id": None, "from": "llm-a", "message": "quit"}))
        frames.append(await asyncio.wait_for(ws.recv(), timeout(10)))
        await ws.wait_closed()

    async with websockets.serve(v2_server, "127.0.0.1", 0, subprotocols=["wsbridge.v2"]) as server:
        port = server.sockets[0].getsockname()[1]
        async with device(harness, "v2", url=f"ws://127.0.0.1:{port}", id="unity-v2wire", token="tok") as run:
            await run.passes()
    assert headers == ["tok"]
    replies = sorted(frames[:3])
    assert replies == sorted(
        ['{"reply_to":7,"message":"hi from llm-a"}', '{"reply_to":"b-1","message":"later x"}', "plain from llm-a"]
    ), frames
    assert frames[3] == "bye"


# --- protocol v2 end to end -----------------------------------------------------------------------


async def next_reply(ws, within: float = 10.0) -> dict:
    """The next frame that is not a status frame ({"id", "status", ...})."""
    while "status" in (frame := await recv_json(ws, within)):
        pass
    return frame


async def test_v2_reply_reaches_only_the_sending_controller_with_reply_to_and_rtt(relay, harness):
    target = "unity-v2"
    async with (
        relay.controller("llm-a") as first,
        relay.controller("llm-b") as second,
        device(harness, "v2", url=relay.ws, id=target, token=CLIENT_TOKEN, groups="lights,doors") as run,
    ):
        await run.expect("EVENT connected")
        # A handler's return value answers the command with an integer id, to its sender only.
        await first.send(json.dumps({"target": target, "message": "echo hi", "id": 7}))
        reply = await next_reply(first)
        assert reply["reply_to"] == 7 and reply["sender"] == target, reply
        assert reply["message"] == "hi from llm-a", reply
        assert isinstance(reply["rtt_ms"], int | float) and reply["rtt_ms"] >= 0, reply
        # An async handler (Task<string>) with a string id.
        await second.send(json.dumps({"target": target, "message": "later x", "id": "b-1"}))
        reply = await next_reply(second)
        assert (reply["reply_to"], reply["message"]) == ("b-1", "later x"), reply
        # Group membership from the connect (?groups=...). Group commands wait for no reply (docs/protocol.md), so the
        # device's answer reaches every controller as a plain client message.
        await second.send(json.dumps({"target": "group:doors", "message": "echo via group", "id": "g"}))
        for ws in (second, first):
            plain = await next_reply(ws)
            assert plain["sender"] == target and "via group from llm-b" in plain["message"], plain
        # Neither controller saw the other's replies.
        for ws in (first, second):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.5)
        # A command without id gets a plain reply, which every controller receives, as in v1.
        await first.send(command(target, "quit"))
        for ws in (first, second):
            assert await recv_json(ws) == {"sender": target, "message": "bye"}
        await run.passes()


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_v2_replies_to_a_broadcast_reach_every_controller_as_the_clients_plain_message(
    request, start_appliance, harness, broker
):
    """Issue 25 item 8: the C# v2 client answers a broadcast's id with {"reply_to", "message"}; controllers get
    {"sender", "message"}, not the envelope as text, and a caller waiting for the broadcast's replies gets them."""
    redis_url = request.getfixturevalue("redis_server").url if broker == "redis" else None
    relay = start_appliance(redis_url=redis_url, name=f"unity-v2-broadcast-{broker}")
    target = "unity-v2-everyone"
    async with (
        relay.controller("llm-a") as first,
        relay.controller("llm-b") as second,
        device(harness, "v2", url=relay.ws, id=target, token=CLIENT_TOKEN, groups="lights") as run,
    ):
        await run.expect("EVENT connected")
        for addressed, command_id in (("*", "b-7"), ("group:lights", "g-8")):
            await first.send(json.dumps({"target": addressed, "message": "echo everyone", "id": command_id}))
            for ws in (first, second):
                assert await next_reply(ws) == {"sender": target, "message": "everyone from llm-a"}
        # ...and a caller that waits for a broadcast's replies (HTTP wait_ms) gets the C# client's, per client.
        async with httpx.AsyncClient(
            base_url=relay.http, headers={"X-Auth-Token": CONTROLLER_TOKEN}, timeout=timeout(20)
        ) as http:
            body = {"target": "group:lights", "message": "echo waited", "wait_ms": int(timeout(10) * 1000)}
            response = await http.post("/api/v1/commands", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert (result["status"], result["count"], result["no_reply"]) == ("replied", 1, []), result
        assert [(r["client"], r["message"].split(" from ")[0]) for r in result["replies"]] == [(target, "waited")]
        for ws in (first, second):  # the controllers got it too, as the client's plain message
            reply = await next_reply(ws)
            assert reply["sender"] == target and reply["message"].startswith("waited from "), reply
        await first.send(command(target, "quit"))
        for ws in (first, second):
            assert await recv_json(ws) == {"sender": target, "message": "bye"}
        await run.passes()


async def test_v2_command_listener_replies_with_reply_to_on_the_main_thread(app, smoke):
    """CommandListener with Protocol Version 2: the example light's replies and the unknown-command error carry
    reply_to and reach the sending controller only; a command without id gets a plain reply."""
    target = "unity-light-v2"
    async with (
        app.controller("llm-light") as llm,
        app.controller("llm-other") as other,
        device(smoke, "listener", url=app.ws, id=target, token=CLIENT_TOKEN, protocol=2) as run,
    ):
        await run.expect("EVENT connected")
        # Issue 25 item 9: the registered handlers are the client's manifest, sent by default under v2 (never as a
        # message: "other" below would get it first), with the light sample's descriptions and arguments.
        manifest = await declared_manifest(app, target, {"on", "off", "toggle", "intensity", "status", "quit"})
        intensity = next(c for c in manifest["commands"] if c["name"] == "intensity")
        assert intensity["description"] == "Sets the light's brightness"
        assert intensity["arguments"]["properties"] == {
            "value": {"type": "number", "description": "brightness from 0 to 8"}
        }
        assert intensity["arguments"]["required"] == ["value"]
        for number, (text, expected) in enumerate(
            [("off", "light off"), ("intensity 2.5", "intensity 2.5"), ("dance", "error: unknown command dance")]
        ):
            await llm.send(json.dumps({"target": target, "message": text, "id": number}))
            reply = await next_reply(llm)
            assert (reply["reply_to"], reply["sender"], reply["message"]) == (number, target, expected), reply
        await llm.send(command(target, "on"))  # no id: plain reply to every controller
        for ws in (llm, other):
            assert await recv_json(ws) == {"sender": target, "message": "light on"}
        await llm.send(command(target, "quit"))
        await run.expect("EVENT resumed connections=2")
        await run.passes()
    assert "manifest" not in run.output  # the appliance's answer is no command: not handed to Unhandled Command


async def declared_manifest(app: Appliance, client_id: str, names: set[str]) -> dict:
    """The manifest of ``client_id`` in the HTTP API, once it names ``names``."""

    async def read():
        status, body = await app.aget(f"/api/v1/clients/{client_id}", token=app.env["LLM_SECRET_TOKEN"])
        manifest = body.get("manifest") if status == 200 else None
        return manifest if manifest and {c["name"] for c in manifest["commands"]} == names else None

    return await eventually(read, 10, f"the manifest of {client_id}")
