"""Presence under churn: 10,000 idle clients on a Redis deployment while 100 connect (and 100 leave) per second.

``python -m bench.churn`` deploys the ``redis`` target (Redis and two instances; the
clients on instance B), connects the idle clients, then measures two windows of the
same length: idle, and churning at ``--rate`` connects per second (each connect
replaces a client that leaves). For each window it reports Redis commands per second
(``INFO stats`` ``total_commands_processed``), Redis CPU and instance B CPU (``/proc``).
What a connect costs is the difference between the windows, divided by the rate.

``--wsbridge PATH`` runs another build (say main's ``.venv/bin/wsbridge``) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

from .loadgen import LoadGenerator
from .procs import Processes, raise_nofile_limit
from .runner import _deploy, _ids, _Tokens

__all__ = ["main", "run_churn"]


def _redis_commands(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"INFO stats\r\n")
        data = b""
        while b"total_commands_processed:" not in data or not data.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    raise RuntimeError("no total_commands_processed in INFO stats")


async def _window(deployment, gen: LoadGenerator, seconds: float, rate: float, fresh: list[str]) -> dict:
    redis_proc = deployment.server_pids[-1]
    instance = deployment.main
    commands_before = _redis_commands(deployment.redis_port) + 1  # The probe's own INFO.
    cpu_before = redis_proc.cpu_seconds(), instance.cpu_seconds()
    started = time.monotonic()
    connects = 0
    pending: set[asyncio.Task] = set()
    if rate > 0:
        leaving = iter([cid for cid, client in gen.clients.items() if client.transport is not None])
        interval = 1.0 / rate
        next_at = started
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            while next_at <= now:
                next_at += interval
                victim = gen.clients.get(next(leaving))
                if victim is not None and victim.transport is not None:
                    victim.transport.disconnect()
                task = asyncio.ensure_future(gen.connect_clients([fresh.pop()]))
                pending.add(task)
                task.add_done_callback(pending.discard)
                connects += 1
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if pending:
            await asyncio.wait(pending, timeout=15)
    else:
        await asyncio.sleep(seconds)
    elapsed = time.monotonic() - started
    commands = _redis_commands(deployment.redis_port) - commands_before
    redis_cpu = redis_proc.cpu_seconds() - cpu_before[0]
    instance_cpu = instance.cpu_seconds() - cpu_before[1]
    return {
        "seconds": elapsed,
        "connects_per_s": connects / elapsed,
        "redis_commands_per_s": commands / elapsed,
        "redis_cpu_percent": 100 * redis_cpu / elapsed,
        "instance_cpu_percent": 100 * instance_cpu / elapsed,
        "open_clients": gen.open_clients(),
    }


async def run_churn(procs: Processes, clients: int, rate: float, seconds: float, log=print) -> dict:
    tokens = _Tokens()
    deployment = await _deploy("redis", procs, tokens, "churn")
    gen = LoadGenerator(deployment.controller_url, deployment.client_url, tokens.controller, tokens.client)
    try:
        log(f"  connecting {clients} idle clients to instance B")
        started = time.monotonic()
        connected = await gen.connect_clients(_ids(clients, "idle"))
        log(f"  {connected} connected in {time.monotonic() - started:.0f} s; settling")
        await asyncio.sleep(3)
        fresh = _ids(int(rate * seconds * 1.2) + 10, "churn")
        log(f"  idle window ({seconds:g} s)")
        idle = await _window(deployment, gen, seconds, 0, fresh)
        log(f"  churn window ({seconds:g} s, {rate:g} connects/s)")
        churn = await _window(deployment, gen, seconds, rate, fresh)
        per_connect = (churn["redis_commands_per_s"] - idle["redis_commands_per_s"]) / max(churn["connects_per_s"], 1)
        return {
            "clients": connected,
            "idle": idle,
            "churn": churn,
            "redis_commands_per_connect": per_connect,
            "server_closes": dict(gen.server_closes),
            "connect_failures": dict(gen.connect_failures),
        }
    finally:
        await gen.close()
        procs.stop_all()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.churn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000, help="idle clients (default 10000)")
    parser.add_argument("--rate", type=float, default=100.0, help="connects (and leaves) per second (default 100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each window (default 10)")
    parser.add_argument("--wsbridge", type=Path, default=None, help="the wsbridge script to run (default: this one)")
    args = parser.parse_args(argv)
    limit = raise_nofile_limit()
    if limit < args.clients + args.rate * args.seconds + 100:
        print(f"warning: open-files limit {limit} is low for {args.clients} clients", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="wsbridge-churn-") as tmp, Processes(Path(tmp), args.wsbridge) as procs:
        result = asyncio.run(run_churn(procs, args.clients, args.rate, args.seconds))
    print()
    print(
        f"| window ({result['clients']} idle clients) | connects/s | Redis commands/s | Redis CPU % | instance CPU % |"
    )
    print("|---|---|---|---|---|")
    for name in ("idle", "churn"):
        w = result[name]
        print(
            f"| {name} | {w['connects_per_s']:.0f} | {w['redis_commands_per_s']:.0f} | "
            f"{w['redis_cpu_percent']:.1f} | {w['instance_cpu_percent']:.1f} |"
        )
    print(f"Redis commands per connect+leave: {result['redis_commands_per_connect']:.1f}")
    if result["server_closes"] or result["connect_failures"]:
        print(f"server closes: {result['server_closes']}, connect failures: {result['connect_failures']}")


if __name__ == "__main__":
    main()
