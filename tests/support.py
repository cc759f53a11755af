"""Real parts for tests: a Redis server on a free port and appliance processes on uvicorn.

Nothing here imitates the appliance: tests talk to real processes over real sockets.
Timeouts scale with ``WSBRIDGE_TEST_TIMEOUT_SCALE`` for slow machines. Async tests use the
async helpers (``eventually``, ``aget``, ``acommand``): a blocking wait would keep their open
sockets from answering pings (tests/unit/test_async_tests_do_not_block.py checks it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from leak_scan import SCAN, secrets_in_env
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("WSBRIDGE_TEST_TIMEOUT_SCALE", "1"))
CONTROLLER_TOKEN = "test-controller-token-0123456789"
CLIENT_TOKEN = "test-client-token-9876543210"
ADMIN_TOKEN = "test-admin-token-abcdefabcdef"
TOKENS = (CONTROLLER_TOKEN, CLIENT_TOKEN, ADMIN_TOKEN)
SCAN.add_secrets({"CONTROLLER_TOKEN": CONTROLLER_TOKEN, "CLIENT_TOKEN": CLIENT_TOKEN, "ADMIN_TOKEN": ADMIN_TOKEN})


def timeout(seconds: float) -> float:
    return seconds * SCALE


#: Ports for the servers tests start: below Linux's ephemeral range (32768-60999), so no
#: outgoing connection can take a port between its check and the server's bind, and split
#: among pytest-xdist workers, so two workers never pick the same one. Redis Cluster's bus
#: (port + 10000) stays below the ephemeral range too.
PORTS_FIRST, PORTS_LAST = 12_000, 22_000
_handed_out: set[int] = set()  # a port handed out but not bound yet is not free either
_port_picker = random.Random()  # its own generator: tests that seed `random` do not repeat ports


def free_port() -> int:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    span = (PORTS_LAST - PORTS_FIRST) // max(workers, 1)
    first = PORTS_FIRST + worker * span
    for port in _port_picker.sample(range(first, first + span), 200):
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise AssertionError(f"no free port in {first}-{first + span}")


def wait_until(condition: Callable[[], Any], within: float = 10.0, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout(within)
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {message}")
        time.sleep(0.02)


async def eventually(condition: Callable[[], Awaitable[Any]], within: float = 10.0, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout(within)
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {message}")
        await asyncio.sleep(0.02)


def http_get(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"X-Auth-Token": token} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout(5)) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    SCAN.capture(f"HTTP body of GET {urllib.parse.urlsplit(url).path}", body)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


async def http_aget(url: str, token: str | None = None) -> tuple[int, Any]:
    """``http_get`` for async tests: waits without blocking the event loop (and the sockets it serves)."""
    async with httpx.AsyncClient(timeout=timeout(5)) as http:
        response = await http.get(url, headers={"X-Auth-Token": token} if token else {})
    SCAN.capture(f"HTTP body of GET {urllib.parse.urlsplit(url).path}", response.content)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


class _Managed:
    """A child process the tests own; ``kill`` is the hard stop for crash scenarios."""

    process: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


class RedisServer(_Managed):
    """A throwaway redis-server on a free port; can be killed and restarted on the same port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run the tests through `python3 dev.py test`")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="wsb-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    #: Sent after each command: Redis answers ``+OK`` and closes, so the reply ends at EOF
    #: (no parsing, no waiting for silence). Deprecated since Redis 7.2, still served.
    _QUIT = b"*1\r\n$4\r\nQUIT\r\n"

    def _payload(self, args: tuple[str, ...]) -> bytes:
        command = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        return command.encode() + self._QUIT

    def command(self, *args: str) -> bytes:
        """Send one command with redis-cli-free RESP and return the raw reply (sync tests and fixtures)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout(5)) as sock:
            sock.sendall(self._payload(args))
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).removesuffix(b"+OK\r\n")

    async def acommand(self, *args: str) -> bytes:
        """``command`` for async tests: waits without blocking the event loop."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(self._payload(args))
            reply = await asyncio.wait_for(reader.read(), timeout(5))  # Until Redis closes, after QUIT.
        finally:
            writer.close()
        return reply.removesuffix(b"+OK\r\n")

    @staticmethod
    def _connected_clients(info: bytes) -> int:
        for line in info.decode().splitlines():
            if line.startswith("connected_clients:"):
                return int(line.split(":")[1]) - 1  # Not counting this query's own connection.
        raise AssertionError(f"no connected_clients in INFO: {info!r}")

    def connected_clients(self) -> int:
        return self._connected_clients(self.command("INFO", "clients"))

    async def aconnected_clients(self) -> int:
        return self._connected_clients(await self.acommand("INFO", "clients"))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class Appliance(_Managed):
    """``wsbridge serve`` in a subprocess on a free port, with its log kept in a file."""

    def __init__(self, env: dict[str, str] | None = None, *, redis_url: str | None = None, name: str = "app") -> None:
        self.port = free_port()
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"wsb-{name}-", suffix=".log")[1])
        self.workdir = tempfile.mkdtemp(prefix="wsb-cwd-")  # No stray .env from the developer's tree.
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LLM_SECRET_TOKEN": CONTROLLER_TOKEN,
            "UNITY_CLIENT_TOKEN": CLIENT_TOKEN,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "INSTANCE_ID": name,
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **({"REDIS_URL": redis_url} if redis_url else {}),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        SCAN.add_secrets(secrets_in_env(self.env))
        SCAN.add_log(self.log_path, name)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> Appliance:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance", "serve", "--port", str(self.port)],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: self._status("/healthz") == 200 or self._exited(), 20, f"{self.name} /healthz")
        if self._exited():
            raise AssertionError(f"{self.name} exited at start:\n{self.log()}")
        if wait_ready:
            wait_until(lambda: self._status("/readyz") == 200, 20, f"{self.name} /readyz")
        return self

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _status(self, path: str) -> int | None:
        try:
            return http_get(self.http + path)[0]
        except OSError:
            return None

    def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        return http_get(self.http + path, token)

    async def aget(self, path: str, token: str | None = None) -> tuple[int, Any]:
        return await http_aget(self.http + path, token)

    def terminate(self, wait: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout(wait))
        self.process = None
        return code

    def stop(self) -> None:
        if self.process is not None:
            try:  # The final metrics, for the leak scan: every counter the test moved.
                SCAN.capture(f"/metrics of {self.name}", http_get(self.http + "/metrics")[1])
            except OSError:
                pass
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # --- WebSocket helpers -------------------------------------------------------------

    def connect(self, client_id: str, token: str | None = CLIENT_TOKEN, **kwargs: Any):
        headers = {"X-Auth-Token": token} if token is not None else {}
        return connect(
            f"{self.ws}/ws/{client_id}",
            additional_headers=headers,
            compression=None,
            open_timeout=timeout(10),
            **kwargs,
        )

    def controller(self, client_id: str = "LLM", **kwargs: Any):
        return self.connect(client_id, CONTROLLER_TOKEN, **kwargs)


async def recv(ws: ClientConnection, within: float = 5.0) -> str:
    frame = await asyncio.wait_for(ws.recv(), timeout(within))
    if isinstance(frame, str) and frame.startswith('{"error"'):
        SCAN.capture("error frame", frame)
    return frame


async def recv_json(ws: ClientConnection, within: float = 5.0) -> dict[str, Any]:
    return json.loads(await recv(ws, within))


async def closed_with(ws: ClientConnection, within: float = 5.0) -> tuple[int | None, str]:
    """Wait until the server closes ``ws``; returns its close code and reason."""
    try:
        async with asyncio.timeout(timeout(within)):
            async for _ in ws:
                pass
    except Exception:
        pass
    received = ws.protocol.close_rcvd
    if received:
        SCAN.capture(f"close reason ({received.code})", received.reason)
    return (received.code, received.reason) if received else (None, "")


def command(target: str, message: str, **extra: Any) -> str:
    return json.dumps({"target": target, "message": message, **extra})
