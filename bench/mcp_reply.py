"""``python -m bench.mcp_reply``: ``send_command`` over /mcp with the MCP Python client, latency and calls/s.

Two setups: one appliance (embedded broker), and two appliances on one Redis behind a
round-robin TCP proxy (tests/tcp_proxy.py's ``LoadBalancer``, in this process). The proxy
balances per connection, so its MCP clients open a connection per request (no keep-alive):
every call may land on either instance, as behind Traefik without sticky sessions, and the
echo clients sit on the first instance, so half the calls cross Redis.

Per setup: ``--calls`` sequential calls of one session (median, p99), then ``--sessions``
sessions calling in a closed loop for ``--duration`` seconds (calls/s). The MCP client
library costs more CPU per call than the server does: ``generator_cpu_percent`` near 100
means the generator, not the appliance, set the pace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from picows import ws_connect

from .http_reply import EchoClient
from .loadgen import latency_summary
from .procs import Processes, free_port, raise_nofile_limit, wait_http_ok, wait_redis

__all__ = ["main", "run"]

ROOT = Path(__file__).resolve().parent.parent


def _client(url: str, token: str, keep_alive: bool) -> Client:
    limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30, limits=limits)
    return Client(streamable_http_client(f"{url}/mcp", http_client=http), read_timeout_seconds=30)


async def _call(client: Client, target: str) -> int:
    started = time.perf_counter_ns()
    result = await client.call_tool("send_command", {"target": target, "message": "ping", "timeout_seconds": 10})
    if result.is_error or (result.structured_content or {}).get("reply") != "ping":
        raise RuntimeError(f"send_command failed: {result.content}")
    return time.perf_counter_ns() - started


async def _measure(url: str, token: str, targets: list[str], calls: int, duration: float, keep_alive: bool) -> dict:
    async with _client(url, token, keep_alive) as client:
        for _ in range(10):  # Warm-up.
            await _call(client, targets[0])
        sequential = [await _call(client, targets[0]) for _ in range(calls)]
    seq = latency_summary(sequential)
    done = [0]
    stop_at = [0.0]

    async def session(target: str) -> None:
        async with _client(url, token, keep_alive) as client:
            await _call(client, target)
            await ready.wait()
            while time.perf_counter() < stop_at[0]:
                await _call(client, target)
                done[0] += 1

    ready = asyncio.Event()
    tasks = [asyncio.create_task(session(target)) for target in targets]
    await asyncio.sleep(2.0)  # Sessions open.
    own_before = time.process_time()
    stop_at[0] = time.perf_counter() + duration
    ready.set()
    await asyncio.gather(*tasks)
    own = time.process_time() - own_before
    return {
        "sequential_calls": calls,
        "sequential_p50_ms": round(seq["p50_ms"], 2),
        "sequential_p99_ms": round(seq["p99_ms"], 2),
        "sessions": len(targets),
        "calls_per_s": round(done[0] / duration, 1),
        "generator_cpu_percent": round(100 * own / duration),
    }


async def run(calls: int, sessions: int, duration: float, wsbridge: Path | None = None) -> dict[str, Any]:
    raise_nofile_limit()
    sys.path.insert(0, str(ROOT / "tests"))
    from tcp_proxy import LoadBalancer

    token, client_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    tokens = {"LLM_SECRET_TOKEN": token, "UNITY_CLIENT_TOKEN": client_token, "LOG_LEVEL": "WARNING"}
    headers = {"X-Auth-Token": client_token, "Sec-WebSocket-Protocol": "wsbridge.v2"}
    targets = [f"mcp-{i}" for i in range(sessions)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wsb-bench-mcp-") as tmp, Processes(Path(tmp), wsbridge) as procs:
        port = free_port()
        one = procs.start_appliance("mcp-one", port, tokens)
        await wait_http_ok(one, f"http://127.0.0.1:{port}/healthz")
        transports = [
            (await ws_connect(lambda: EchoClient(True), f"ws://127.0.0.1:{port}/ws/{t}", extra_headers=headers))[0]
            for t in targets
        ]
        results["one_instance"] = await _measure(f"http://127.0.0.1:{port}", token, targets, calls, duration, True)
        for transport in transports:
            transport.disconnect()
        procs.stop(one)

        redis_port = free_port()
        redis = procs.start_redis("mcp-redis", redis_port)
        await wait_redis(redis, redis_port)
        ports = [free_port(), free_port()]
        pair = [
            procs.start_appliance(f"mcp-{n}", p, {**tokens, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
            for n, p in zip("ab", ports, strict=True)
        ]
        for proc, p in zip(pair, ports, strict=True):
            await wait_http_ok(proc, f"http://127.0.0.1:{p}/healthz")
        transports = [
            (await ws_connect(lambda: EchoClient(True), f"ws://127.0.0.1:{ports[0]}/ws/{t}", extra_headers=headers))[0]
            for t in targets
        ]
        proxy = await LoadBalancer(ports).start()
        try:
            results["two_instances_round_robin"] = await _measure(
                f"http://127.0.0.1:{proxy.port}", token, targets, calls, duration, False
            )
        finally:
            await proxy.stop()
            for transport in transports:
                transport.disconnect()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mcp_reply", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--wsbridge", type=Path, help="the wsbridge executable to measure (default: this tree's)")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.calls, args.sessions, args.duration, args.wsbridge)), indent=2))


if __name__ == "__main__":
    main()
