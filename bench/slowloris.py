"""Slow peers against one appliance: does a legitimate client still connect and route at its normal latency?

``python -m bench.slowloris`` starts an appliance (embedded broker), measures a legitimate
controller/client pair (connect time, then round-trip latency of ``--commands`` commands),
then opens ``--peers`` TCP connections that never finish their HTTP headers (half send
nothing, half dribble one byte every ``--dribble`` seconds, the slowloris pattern) and
measures the pair again while they are all open. Finally it reports when the server dropped
the slow peers (``HANDSHAKE_TIMEOUT``, here ``--handshake-timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from .loadgen import latency_summary
from .procs import Processes, free_port, raise_nofile_limit, wait_http_ok

__all__ = ["main", "run_slowloris"]

_REQUEST = b"GET /ws/slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" * 100


async def _legitimate(url: str, controller: str, client: str, commands: int) -> dict:
    started = time.perf_counter_ns()
    async with connect(f"{url}/ws/legit", additional_headers={"X-Auth-Token": client}) as dev:
        connect_ms = (time.perf_counter_ns() - started) / 1e6
        async with connect(f"{url}/ws/legit-llm", additional_headers={"X-Auth-Token": controller}) as llm:
            latencies = []
            for i in range(commands):
                sent = time.perf_counter_ns()
                await llm.send(json.dumps({"target": "legit", "message": f"m{i}"}))
                assert await asyncio.wait_for(dev.recv(), 10) == f"m{i}"
                latencies.append(time.perf_counter_ns() - sent)
    return {"connect_ms": connect_ms, "latency": latency_summary(latencies)}


async def _slow_peer(port: int, dribble: float | None, dropped: list[float], hold: float) -> None:
    opened = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        dropped.append(-1.0)  # Could not even connect.
        return
    try:
        for byte in _REQUEST:
            if dribble is not None:
                writer.write(bytes([byte]))
            try:
                if await asyncio.wait_for(reader.read(1), dribble or hold) == b"":
                    break
            except TimeoutError:
                if dribble is None:
                    break
    except (ConnectionError, OSError):
        pass
    dropped.append(time.monotonic() - opened)
    writer.close()


async def run_slowloris(procs: Processes, peers: int, handshake_timeout: float, dribble: float, commands: int) -> dict:
    controller, client = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    port = free_port()
    proc = procs.start_appliance(
        "slowloris",
        port,
        {"LLM_SECRET_TOKEN": controller, "UNITY_CLIENT_TOKEN": client, "HANDSHAKE_TIMEOUT": str(handshake_timeout)},
    )
    await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
    url = f"ws://127.0.0.1:{port}"
    quiet = await _legitimate(url, controller, client, commands)
    dropped: list[float] = []
    tasks = [
        asyncio.create_task(_slow_peer(port, dribble if i % 2 else None, dropped, handshake_timeout * 4))
        for i in range(peers)
    ]
    await asyncio.sleep(1.0)  # Every slow peer connected and stalling.
    under_attack = await _legitimate(url, controller, client, commands)
    await asyncio.wait(tasks, timeout=handshake_timeout * 4 + 10)
    held = sorted(d for d in dropped if d >= 0)
    return {
        "peers": peers,
        "handshake_timeout": handshake_timeout,
        "quiet": quiet,
        "under_attack": under_attack,
        "peers_dropped": len(held),
        "peers_never_connected": sum(1 for d in dropped if d < 0),
        "dropped_after_s": {"min": held[0], "max": held[-1]} if held else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.slowloris", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=1000, help="slow peers (default 1000)")
    parser.add_argument("--handshake-timeout", type=float, default=10.0, help="HANDSHAKE_TIMEOUT (default 10)")
    parser.add_argument("--dribble", type=float, default=1.0, help="seconds between a dribbler's bytes (default 1)")
    parser.add_argument("--commands", type=int, default=200, help="round trips measured per phase (default 200)")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="wsbridge-slowloris-") as tmp, Processes(Path(tmp)) as procs:
        r = asyncio.run(run_slowloris(procs, args.peers, args.handshake_timeout, args.dribble, args.commands))
    print()
    print(f"{r['peers']} slow peers, HANDSHAKE_TIMEOUT={r['handshake_timeout']:g} s")
    print("| phase | connect ms | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for phase in ("quiet", "under_attack"):
        p = r[phase]
        lat = p["latency"]
        print(f"| {phase} | {p['connect_ms']:.1f} | {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | {lat['max_ms']:.2f} |")
    span = r["dropped_after_s"]
    print(
        f"slow peers dropped: {r['peers_dropped']}"
        + (f", after {span['min']:.1f} to {span['max']:.1f} s" if span else "")
        + f"; never connected: {r['peers_never_connected']}"
    )


if __name__ == "__main__":
    main()
