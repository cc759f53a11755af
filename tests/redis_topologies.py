"""Redis in the shapes production uses: a primary with a replica and three Sentinels, and a Cluster.

Real ``redis-server`` processes on free ports (``--sentinel`` mode for the Sentinels), started
once per test module where the tests allow it: they cost a few seconds to form.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import redis
from support import free_port, timeout, wait_until

__all__ = ["MASTER_NAME", "ClusterGroup", "RedisProcess", "SentinelGroup"]

MASTER_NAME = "wsbmaster"


def _command(port: int, *args: str, within: float = 5.0, password: str | None = None) -> object:
    """One command on a fresh connection (Sentinels know no QUIT, so no raw RESP trick here)."""
    client = redis.Redis(
        host="127.0.0.1", port=port, password=password, socket_timeout=timeout(within), socket_connect_timeout=1
    )
    try:
        return client.execute_command(*args)
    finally:
        client.close()


class RedisProcess:
    """One ``redis-server`` (data node or Sentinel) with its own directory and config file."""

    def __init__(self, name: str, config: list[str], *, sentinel: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: run the tests through `python3 dev.py test`")
        self.name = name
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"wsb-{name}-"))
        self.config = self.dir / "redis.conf"  # Sentinels rewrite theirs: it must be a writable file.
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            f"dir {self.dir}",
            "loglevel warning",
            f"logfile {self.dir / 'log'}",
            *([] if sentinel else ["save ''", "appendonly no"]),
            *config,
        ]
        self.config.write_text("\n".join(lines) + "\n")
        self.args = [binary, str(self.config), *(["--sentinel"] if sentinel else [])]
        self.password = next((line.split()[1] for line in config if line.startswith("requirepass ")), None)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 15, f"{self.name} on port {self.port}")
        return self

    def answers(self) -> bool:
        try:
            return _command(self.port, "PING", within=1, password=self.password) is True
        except (OSError, redis.RedisError):
            return False

    def command(self, *args: str) -> object:
        return _command(self.port, *args, password=self.password)

    def kill(self) -> None:
        """The hard stop of a crash: SIGKILL, no goodbye to anyone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""


class SentinelGroup:
    """A primary, a replica and three Sentinels (quorum 2) that fail over within a few seconds."""

    def __init__(self, *, down_after_ms: int = 1000, password: str = "", sentinel_password: str = "") -> None:
        self.password, self.sentinel_password = password, sentinel_password
        data_auth = [f"requirepass {password}", f"masterauth {password}"] if password else []
        self.primary = RedisProcess("primary", data_auth)
        self.replica = RedisProcess("replica", [f"replicaof 127.0.0.1 {self.primary.port}", *data_auth])
        self.sentinels = [
            RedisProcess(
                f"sentinel{i}",
                [
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary.port} 2",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
                    f"sentinel failover-timeout {MASTER_NAME} 10000",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                    *([f"sentinel auth-pass {MASTER_NAME} {password}"] if password else []),
                    *([f"requirepass {sentinel_password}"] if sentinel_password else []),
                    *([f"sentinel sentinel-pass {sentinel_password}"] if sentinel_password else []),
                ],
                sentinel=True,
            )
            for i in range(3)
        ]

    @property
    def addresses(self) -> str:
        """REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    @property
    def env(self) -> dict[str, str]:
        return {"REDIS_SENTINELS": self.addresses, "REDIS_SENTINEL_MASTER": MASTER_NAME}

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica.start()
        wait_until(self._replica_in_sync, 30, "the replica in sync with the primary")
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._sentinels_agree, 60, "three Sentinels that see the replica and each other")
        return self

    def _replica_in_sync(self) -> bool:
        info = self.replica.command("INFO", "replication")
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.command("SENTINEL", "MASTER", MASTER_NAME)
            assert isinstance(state, dict)
            if state.get(b"num-other-sentinels") != b"2" or state.get(b"num-slaves") != b"1":
                return False
        return True

    def master_port(self) -> int:
        """Where the Sentinels say the master is now."""
        _, port = self.sentinels[0].command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)  # type: ignore[misc]
        return int(port)

    def master(self) -> RedisProcess:
        port = self.master_port()
        return self.primary if port == self.primary.port else self.replica

    def stop(self) -> None:
        for process in [*self.sentinels, self.replica, self.primary]:
            process.stop()


class ClusterGroup:
    """A Redis Cluster of three primaries and three replicas (node timeout 1 s, so a failover takes a few)."""

    def __init__(self, *, node_timeout_ms: int = 1000) -> None:
        self.nodes = [
            RedisProcess(
                f"cluster{i}",
                [
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",
                    f"cluster-port {free_port()}",  # Else port + 10000, which may be taken or above 65535.
                    f"cluster-node-timeout {node_timeout_ms}",
                    "cluster-replica-validity-factor 0",  # Any replica may take over, however stale.
                ],
            )
            for i in range(6)
        ]

    @property
    def url(self) -> str:
        """REDIS_URL: any node (the first)."""
        return self.nodes[0].url

    def start(self) -> ClusterGroup:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found (Debian's redis-tools)")
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout(60),
        )
        wait_until(self.healthy, 60, "the cluster in state ok on every node")
        return self

    def healthy(self) -> bool:
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                info = node.command("CLUSTER", "INFO")
            except (OSError, redis.RedisError):
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        return True

    def primary_of(self, key: str) -> RedisProcess:
        """The node serving ``key``'s slot now, as a live node sees it."""
        live = next(node for node in self.nodes if node.process is not None)
        slot = int(live.command("CLUSTER", "KEYSLOT", key))  # type: ignore[call-overload]
        for start, end, primary, *_ in live.command("CLUSTER", "SLOTS"):  # type: ignore[union-attr]
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == int(primary[1]))
        raise AssertionError(f"no primary serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
