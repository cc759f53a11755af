"""Throughput of 2 and 4 appliance instances over one Redis and over a three-shard Redis Cluster.

``python -m bench.redis_scale`` (about 2 minutes). Instances are paired: in each pair the
controllers connect to the first instance and the clients to the second, so every command
and every reply crosses Redis; all pairs run the closed loop at once and their round trips
add up. One Redis: ``redis-server`` as in the main bench. Cluster: six ``redis-server``
processes (three primaries, three replicas) made into a cluster by ``redis-cli --cluster
create``, the instances on ``REDIS_CLUSTER=true``. Every process runs on this machine, so
on 2 cores the figures say what sharding costs or saves per round trip, not how a cluster
of machines scales.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .loadgen import LoadGenerator
from .procs import Proc, Processes, free_port, raise_nofile_limit, wait_http_ok, wait_redis

__all__ = ["main"]


def _cluster_node(procs: Processes, name: str, port: int) -> Proc:
    server = shutil.which("redis-server")
    assert server is not None, "redis-server not found"
    folder = procs.workdir / name
    folder.mkdir(exist_ok=True)
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
        "--dir",
        str(folder),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-port",
        str(free_port()),
    ]
    return procs._start(name, "redis", argv, procs._base_env())


async def _redis(procs: Processes, kind: str, tag: str) -> tuple[dict[str, str], list[Proc]]:
    """Start Redis of ``kind``: the settings the instances need, and its processes."""
    if kind == "single":
        port = free_port()
        proc = procs.start_redis(f"redis-{tag}", port)
        await wait_redis(proc, port)
        return {"REDIS_URL": f"redis://127.0.0.1:{port}/0"}, [proc]
    ports = [free_port() for _ in range(6)]
    nodes = [_cluster_node(procs, f"cluster-{tag}-{i}", port) for i, port in enumerate(ports)]
    for node, port in zip(nodes, ports, strict=True):
        await wait_redis(node, port)
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli not found"
    create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "1"]
    await asyncio.to_thread(subprocess.run, [*create, "--cluster-yes"], check=True, capture_output=True, timeout=60)
    for _ in range(600):
        info = await asyncio.to_thread(
            subprocess.run, [cli, "-p", str(ports[0]), "cluster", "info"], capture_output=True, text=True
        )
        if "cluster_state:ok" in info.stdout:
            break
        await asyncio.sleep(0.1)
    return {"REDIS_URL": f"redis://127.0.0.1:{ports[0]}/0", "REDIS_CLUSTER": "true"}, nodes


async def _measure(procs: Processes, kind: str, instances: int, args: argparse.Namespace) -> dict:
    tag = f"{kind}{instances}"
    redis_settings, redis_procs = await _redis(procs, kind, tag)
    controller_token, client_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    settings = {"LLM_SECRET_TOKEN": controller_token, "UNITY_CLIENT_TOKEN": client_token, **redis_settings}
    apps = []
    for i in range(instances):
        port = free_port()
        proc = procs.start_appliance(f"app-{tag}-{i}", port, {**settings, "INSTANCE_ID": f"{tag}-{i}"})
        apps.append((proc, port))
    for proc, port in apps:
        await wait_http_ok(proc, f"http://127.0.0.1:{port}/readyz")
    generators = []
    for pair in range(instances // 2):
        (_, controller_port), (_, client_port) = apps[2 * pair], apps[2 * pair + 1]
        gen = LoadGenerator(
            f"ws://127.0.0.1:{controller_port}", f"ws://127.0.0.1:{client_port}", controller_token, client_token
        )
        await gen.connect_controllers(1, prefix=f"ctl-{pair}-")
        ids = [f"dev-{pair}-{i}" for i in range(args.clients // (instances // 2))]
        connected = 0
        for _ in range(10):  # A fresh cluster may refuse a few claims while its nodes agree on the slots.
            connected = await gen.connect_clients(ids)
            if connected == len(ids):
                break
            for cid in [cid for cid, client in gen.clients.items() if client.transport is None]:
                del gen.clients[cid]
            await asyncio.sleep(1)
        assert connected == len(ids), f"{connected} of {len(ids)} clients connected: {dict(gen.connect_failures)}"
        generators.append((gen, ids))
    servers = [proc for proc, _ in apps] + redis_procs

    def server_cpu() -> float:
        return sum(proc.cpu_seconds() for proc in servers)

    outstanding = args.outstanding // (instances // 2)
    try:
        results = await asyncio.gather(
            *(gen.closed_loop(ids, outstanding, args.duration, args.warmup, server_cpu) for gen, ids in generators)
        )
    finally:
        for gen, _ in generators:
            await gen.close()
        for proc in [proc for proc, _ in apps] + redis_procs:
            procs.stop(proc)
    round_trips = sum(r["round_trips"] for r in results)
    return {
        "round_trips_per_s": sum(r["round_trips_per_s"] for r in results),
        "p50_ms": statistics.median(r["latency"]["p50_ms"] for r in results),
        "p99_ms": max(r["latency"]["p99_ms"] for r in results),
        "server_cpu_us_per_round_trip": results[0]["server_cpu_us_per_round_trip"]
        * results[0]["round_trips"]
        / max(round_trips, 1),
        "unanswered": sum(r["unanswered"] for r in results),
        "errors": sum(r["errors"] for r in results),
    }


async def _run(args: argparse.Namespace) -> None:
    raise_nofile_limit()
    rows = []
    with tempfile.TemporaryDirectory(prefix="wsbridge-scale-") as tmp, Processes(Path(tmp), args.wsbridge) as procs:
        for kind in args.backends.split(","):
            for instances in (int(n) for n in args.instances.split(",")):
                print(f"  {kind}, {instances} instances ...", file=sys.stderr, flush=True)
                rows.append((kind, instances, await _measure(procs, kind, instances, args)))
    print(
        "| Redis | instances | round trips/s | p50 (ms) | p99 (ms) | server CPU per round trip (us) | unanswered | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, instances, r in rows:
        name = "one Redis" if kind == "single" else "Cluster, 3 shards"
        print(
            f"| {name} | {instances} | {r['round_trips_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['server_cpu_us_per_round_trip']:.0f} | {r['unanswered']} | {r['errors']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="single,cluster", help="single,cluster")
    parser.add_argument("--instances", default="2,4", help="appliance instances, in pairs")
    parser.add_argument("--clients", type=int, default=100, help="clients in all (spread over the pairs)")
    parser.add_argument("--outstanding", type=int, default=200, help="commands in flight in all")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--wsbridge", type=Path, default=None, help="the wsbridge script (default: next to python)")
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
