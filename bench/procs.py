"""The servers under test as subprocesses: start, wait until healthy, measure, stop.

Every server runs in its own process (so its memory and CPU can be read from
``/proc``), with its file-descriptor limit raised to the hard limit (10,000
clients need 10,000 sockets), in a new session (a Ctrl-C in the terminal
reaches only the harness, which then stops them in order), with its output in a
log file under the run's temporary folder. :class:`Processes` stops everything
it started, also on errors.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = [
    "Proc",
    "Processes",
    "cpu_seconds",
    "free_port",
    "machine_busy_seconds",
    "process_tree",
    "raise_nofile_limit",
    "rss_kib",
]

REPO = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Settings the appliance reads from the environment: never inherit them from the
# caller's shell, so a run measures the documented defaults plus what we set.
_APPLIANCE_SETTINGS = {
    "LLM_SECRET_TOKEN",
    "UNITY_CLIENT_TOKEN",
    "ADMIN_TOKEN",
    "BIND_HOST",
    "WEB_SOCKET_PORT",
    "FORWARDED_ALLOW_IPS",
    "PUBLIC_URL",
    "REDIS_PUBLISH_POOL_SIZE",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "INSTANCE_ID",
    "MAX_MESSAGE_BYTES",
    "CLIENT_RATE_LIMIT",
    "CLIENT_RATE_BURST",
    "CONTROLLER_RATE_LIMIT",
    "CONTROLLER_RATE_BURST",
    "DUPLICATE_POLICY",
    "PING_INTERVAL",
    "PING_TIMEOUT",
    "PRESENCE_TTL",
    "SHUTDOWN_GRACE",
    "LOG_LEVEL",
}


def raise_nofile_limit() -> int:
    """Raise this process's open-files soft limit to the hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found.extend(int(child) for child in text.split())
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo.extend(_children(current))
    return pids


def rss_kib(pid: int) -> int:
    """VmRSS of a process and its descendants, in KiB (from /proc/<pid>/status)."""
    total = 0
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants so far."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state is field 3, utime 14 and stime 15 (proc(5)).
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot, steal included (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guests are inside user.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / _CLK_TCK


def _child_setup() -> None:
    raise_nofile_limit()


#: Benchmarks send version-2 commands (each with an id, an idempotency key) far faster than a caller's
#: key budget allows for long (COMMAND_KEYS_PER_CALLER): they measure the relay, not the budget.
UNBUDGETED_KEYS = {"COMMAND_KEYS_PER_CALLER": "1000000", "COMMAND_KEY_BYTES_PER_CALLER": str(1024**3)}


class Proc:
    """One server subprocess with its log file."""

    def __init__(self, name: str, kind: str, argv: list[str], env: dict[str, str], cwd: Path, log_dir: Path) -> None:
        self.name = name
        self.kind = kind  # "reference", "appliance" or "redis"
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (the appliance then closes its sockets with 1001), SIGKILL after ``grace``."""
        if self.alive():
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._log.close()


def reference_args(port: int, controller_token: str) -> list[str]:
    """A random token may start with '-': joined with '=', argparse never takes it for an option."""
    return ["--port", str(port), f"--controller-token={controller_token}"]


class Processes:
    """Starts the servers of one run and stops all of them at the end (a context manager)."""

    def __init__(self, workdir: Path, wsbridge: Path | None = None) -> None:
        self.workdir = workdir
        self.wsbridge = wsbridge or Path(sys.executable).with_name("wsbridge")
        self.started: list[Proc] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()

    def stop(self, proc: Proc) -> None:
        if proc in self.started:
            self.started.remove(proc)
        proc.stop()

    def _start(self, name: str, kind: str, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        proc = Proc(name, kind, argv, env, cwd or self.workdir, self.workdir)
        self.started.append(proc)
        return proc

    @staticmethod
    def _base_env() -> dict[str, str]:
        return {key: value for key, value in os.environ.items() if key not in _APPLIANCE_SETTINGS}

    def start_reference(self, name: str, port: int, controller_token: str) -> Proc:
        argv = [sys.executable, "-m", "bench.relay", *reference_args(port, controller_token)]
        env = self._base_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        return self._start(name, "reference", argv, env, cwd=REPO)

    def start_appliance(self, name: str, port: int, settings: dict[str, str], wsbridge: Path | None = None) -> Proc:
        wsbridge = wsbridge or self.wsbridge
        if not wsbridge.exists():
            raise RuntimeError(f"{wsbridge} not found: install the project (python3 dev.py test --co)")
        env = {**self._base_env(), **UNBUDGETED_KEYS, **settings}
        # The appliance's own folder for .env: an empty one, so no developer .env is read.
        cwd = self.workdir / name
        cwd.mkdir(exist_ok=True)
        argv = [str(wsbridge), "serve", "--host", "127.0.0.1", "--port", str(port)]
        return self._start(name, "appliance", argv, env, cwd=cwd)

    def start_redis(self, name: str, port: int) -> Proc:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server; python3 dev.py test installs it)")
        argv = [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "20000",
            "--dir",
            str(self.workdir),
        ]
        return self._start(name, "redis", argv, self._base_env())


async def wait_http_ok(proc: Proc, url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early with the log tail if the process died."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            status = await asyncio.to_thread(_http_status, url)
            if status == 200:
                return
            last_error = f"HTTP {status}"
        except OSError as exc:
            last_error = str(exc)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{proc.name} not healthy at {url} after {timeout:.0f} s ({last_error}):\n{proc.log_tail()}")


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def wait_redis(proc: Proc, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        try:
            if await asyncio.to_thread(_redis_ping, port):
                return
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"redis on port {port} not answering after {timeout:.0f} s:\n{proc.log_tail()}")


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def redis_clients(port: int) -> list[dict[str, str]]:
    """``CLIENT LIST`` of the Redis server, without this probe's own connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"CLIENT LIST\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            # Bulk string: $<len>\r\n<payload>\r\n
            header, _, rest = data.partition(b"\r\n")
            if header.startswith(b"$") and len(rest) >= int(header[1:]) + 2:
                break
    header, _, rest = data.partition(b"\r\n")
    payload = rest[: int(header[1:])].decode()
    entries = []
    for line in payload.splitlines():
        entry = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if entry.get("cmd") == "client|list":
            continue  # this probe
        entries.append(entry)
    return entries
