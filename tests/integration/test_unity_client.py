"""The Unity client (unity_project/Assets/Scripts/Network) built with Mono and run against real appliances.

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
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support import CLIENT_TOKEN, ROOT, Appliance, command, eventually, recv_json, timeout

NETWORK = ROOT / "unity_project" / "Assets" / "Scripts" / "Network"
HARNESS = Path(__file__).resolve().parent / "unity"
# The newest C# Mono's mcs compiles; the Unity scripts promise to stay within it.
LANGVERSION = "7.2"
TRANSPORT = [NETWORK / "BridgeClient.cs", NETWORK / "BridgeProtocol.cs"]
UNITY_SCRIPTS = [NETWORK / "CommandListener.cs", *sorted((NETWORK / "Examples").glob("*.cs"))]


def compile_cs(out: Path, sources: list[Path], target: str = "exe") -> Path:
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
def app() -> Iterator[Appliance]:
    """One appliance with the default limits for the tests that do not restart or reconfigure it."""
    appliance = Appliance(name="unity")
    appliance.start()
    yield appliance
    appliance.stop()


class Device:
    """One run of the C# test program; its ``EVENT``/``FAIL`` lines are read as they come."""

    def __init__(self, process: asyncio.subprocess.Process, scenario: str) -> None:
        self.process = process
        self.scenario = scenario
        self.lines: list[str] = []

    async def _next_line(self, within: float) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout(within))
        if not raw:
            await self.process.wait()
            raise AssertionError(f"{self.scenario} exited ({self.process.returncode}) early:\n{self.output}")
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

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@contextlib.asynccontextmanager
async def device(harness: Path, scenario: str, **options: object) -> AsyncIterator[Device]:
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
    )
    try:
        yield Device(process, scenario)
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


async def test_selftest_backoff_endpoint_codec_and_retry_loop(harness):
    async with device(harness, "selftest") as run:
        await run.passes()


async def test_listener_and_example_compile_against_the_unity_stand_in(tmp_path):
    compile_cs(tmp_path / "UnityScripts.dll", [*TRANSPORT, *UNITY_SCRIPTS, HARNESS / "UnityEngineStub.cs"], "library")


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


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_newer_connection_with_the_same_id_takes_over_and_the_old_one_gives_up(
    request, start_appliance, harness, broker
):
    redis_url = request.getfixturevalue("redis_server").url if broker == "redis" else None
    relay = start_appliance(redis_url=redis_url, name=f"unity-dup-{broker}")
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


async def test_command_listener_dispatches_to_the_example_light_on_the_main_thread(app, tmp_path):
    exe = compile_cs(
        tmp_path / "ListenerSmoke.exe",
        [*TRANSPORT, *UNITY_SCRIPTS, HARNESS / "UnityEngineStub.cs", HARNESS / "ListenerSmoke.cs"],
    )
    async with (
        app.controller() as llm,
        device(exe, "listener", url=app.ws, id="unity-light", token=CLIENT_TOKEN) as run,
    ):
        await run.expect("EVENT connected")
        assert await ask(llm, "unity-light", "off") == "light off"
        assert await ask(llm, "unity-light", "intensity 2.5") == "intensity 2.5"
        assert await ask(llm, "unity-light", "intensity lots") == "error: usage: intensity <0..8>"
        assert await ask(llm, "unity-light", "dance") == "error: unknown command dance"
        assert await ask(llm, "unity-light", "on") == "light on"
        await llm.send(command("unity-light", "quit"))
        await run.passes()
    lines = run.output
    assert "EVENT unhandled dance" in lines  # the UnityEvent fallback got the unknown command
