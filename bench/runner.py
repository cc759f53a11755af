"""Runs the scenarios against each target and collects the figures.

Targets:

- ``reference``: the bare relay of :mod:`bench.relay` (one process).
- ``embedded``: ``wsbridge serve`` on the embedded broker (one process).
- ``redis``: a Redis server and two ``wsbridge serve`` instances sharing it;
  controllers connect to instance A, clients to instance B, so every command
  and every reply crosses Redis.

Per target, one deployment serves the traffic scenarios in order (the clients
stay connected between them): closed loop, open loop at each rate, then
fan-out (after connecting the remaining clients). The memory scenario uses a
fresh deployment, so its baseline is a server that has seen no traffic.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import time
from dataclasses import dataclass, field

from .loadgen import LoadGenerator
from .procs import Processes, free_port, machine_busy_seconds, redis_clients, wait_http_ok, wait_redis

__all__ = ["Options", "TARGETS", "SCENARIOS", "run_target"]

TARGETS = ("reference", "embedded", "redis")
SCENARIOS = ("closed", "open", "fanout", "memory", "redis-conns")


@dataclass
class Options:
    targets: tuple[str, ...] = TARGETS
    scenarios: tuple[str, ...] = SCENARIOS
    duration: float = 5.0
    warmup: float = 1.0
    clients: int = 100
    outstanding: int = 200
    controllers: int = 1
    rates: tuple[float, ...] = (500.0, 2000.0)
    fanout_clients: int = 1000
    fanout_repeats: int = 10
    memory_clients: tuple[int, ...] = (1000, 5000, 10000)
    memory_targets: tuple[str, ...] = ("reference", "embedded")
    log: callable = print
    quiet_wait: float = 20.0  # seconds to wait, before each scenario, for the machine to be quiet
    quiet_threshold: float = 15.0  # "quiet": other processes use less than this % of a core
    profiler: object = None  # a bench.profile.Profiler to sample the servers during the closed loop
    extra: dict = field(default_factory=dict)


@dataclass
class _Deployment:
    controller_url: str
    client_url: str
    # Processes whose CPU counts as "the server" (both instances and Redis for the redis target).
    server_pids: list
    main: object  # the Proc whose memory is measured (the one holding the clients)
    redis_port: int | None = None


class _Tokens:
    def __init__(self) -> None:
        # Fresh random tokens per run; never printed.
        self.controller = secrets.token_urlsafe(24)
        self.client = secrets.token_urlsafe(24)


async def _deploy(target: str, procs: Processes, tokens: _Tokens, tag: str) -> _Deployment:
    if target == "reference":
        port = free_port()
        proc = procs.start_reference(f"reference-{tag}", port, tokens.controller)
        await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
        url = f"ws://127.0.0.1:{port}"
        return _Deployment(url, url, [proc], proc)
    settings = {"LLM_SECRET_TOKEN": tokens.controller, "UNITY_CLIENT_TOKEN": tokens.client}
    if target == "embedded":
        port = free_port()
        proc = procs.start_appliance(f"embedded-{tag}", port, settings)
        await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
        url = f"ws://127.0.0.1:{port}"
        return _Deployment(url, url, [proc], proc)
    if target == "redis":
        redis_port = free_port()
        redis = procs.start_redis(f"redis-{tag}", redis_port)
        await wait_redis(redis, redis_port)
        instances = []
        for name in ("a", "b"):
            port = free_port()
            proc = procs.start_appliance(
                f"redis-{tag}-{name}",
                port,
                {**settings, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "INSTANCE_ID": f"bench-{name}"},
            )
            instances.append((proc, port))
        for proc, port in instances:
            await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
            # Ready means the broker is reachable; the traffic would fail before that.
            await wait_http_ok(proc, f"http://127.0.0.1:{port}/readyz")
        (a, port_a), (b, port_b) = instances
        return _Deployment(f"ws://127.0.0.1:{port_a}", f"ws://127.0.0.1:{port_b}", [a, b, redis], b, redis_port)
    raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")


class _ServerCpu:
    def __init__(self, procs) -> None:
        self.procs = procs
        self._start = 0.0
        self._wall = 0.0

    def start(self) -> None:
        self._start = sum(proc.cpu_seconds() for proc in self.procs)
        self._machine = machine_busy_seconds()
        self._own = time.process_time()
        self._wall = time.monotonic()

        self._each = {proc.name: proc.cpu_seconds() for proc in self.procs}

    def percent(self) -> float:
        wall = time.monotonic() - self._wall
        return 100 * (sum(proc.cpu_seconds() for proc in self.procs) - self._start) / wall

    def others(self) -> float:
        """CPU used by everything else on the machine meanwhile (other jobs, steal), % of a core.

        The machine has 2 cores shared with whatever else runs: a figure taken
        while this is high is noise, and the table shows it next to the figures.
        """
        wall = time.monotonic() - self._wall
        ours = (sum(proc.cpu_seconds() for proc in self.procs) - self._start) + (time.process_time() - self._own)
        return max(0.0, 100 * (machine_busy_seconds() - self._machine - ours) / wall)

    def by_process(self) -> dict[str, float]:
        wall = time.monotonic() - self._wall
        return {proc.name: 100 * (proc.cpu_seconds() - self._each[proc.name]) / wall for proc in self.procs}


async def _wait_quiet(opts: Options, procs: list) -> float:
    """Wait (bounded) until other processes leave the machine alone; returns their load, % of a core.

    The machine has 2 cores and may be shared (other test suites, other
    benchmarks): a figure measured while something else burns a core says
    little. Each scenario's ``other_cpu_pct`` tells how quiet it really was.
    """
    deadline = time.monotonic() + opts.quiet_wait
    while True:
        probe = _ServerCpu(procs)
        probe.start()
        await asyncio.sleep(0.5)
        load = probe.others()
        if load < opts.quiet_threshold or time.monotonic() >= deadline:
            if load >= opts.quiet_threshold and opts.quiet_wait > 0:
                opts.log(f"    (machine still busy: {load:.0f} % of a core used by other processes)")
            return load
        await asyncio.sleep(0.5)


def _ids(count: int, prefix: str = "c") -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


async def _connect_or_fail(gen: LoadGenerator, ids: list[str]) -> None:
    connected = await gen.connect_clients(ids)
    if connected < len(ids):
        raise RuntimeError(
            f"only {connected}/{len(ids)} clients connected "
            f"(failures {dict(gen.connect_failures)}, server closes {dict(gen.server_closes)})"
        )
    silent = await gen.probe(ids)
    if silent:
        raise RuntimeError(f"{len(silent)} clients never echoed a probe (e.g. {silent[:5]})")


def _redis_conns(port: int) -> dict:
    entries = redis_clients(port)
    return {"total": len(entries), "pubsub": sum(1 for e in entries if int(e.get("sub", 0)) or int(e.get("psub", 0)))}


async def _traffic(target: str, opts: Options, procs: Processes, tokens: _Tokens) -> dict:
    results: dict = {}
    deployment = await _deploy(target, procs, tokens, "traffic")
    gen = LoadGenerator(deployment.controller_url, deployment.client_url, tokens.controller, tokens.client)
    log = opts.log
    try:
        await gen.connect_controllers(opts.controllers)
        base_ids = _ids(opts.clients)
        await _connect_or_fail(gen, base_ids)
        if "closed" in opts.scenarios:
            log(f"  [{target}] closed loop: {opts.clients} clients, {opts.outstanding} outstanding, {opts.duration:g} s")
            await _wait_quiet(opts, deployment.server_pids)
            cpu = _ServerCpu(deployment.server_pids)
            cpu.start()
            if opts.profiler is not None:
                for proc in deployment.server_pids:
                    if proc.kind == "appliance":
                        opts.profiler.start(f"{proc.name}-closed", proc.pid, opts.warmup + opts.duration)
            result = await gen.closed_loop(base_ids, opts.outstanding, opts.duration, opts.warmup)
            result["server_cpu_pct"] = cpu.percent()
            result["server_cpu_pct_by_process"] = cpu.by_process()
            result["other_cpu_pct"] = cpu.others()
            if opts.profiler is not None:
                await asyncio.to_thread(opts.profiler.finish)
            results["closed"] = result
        if "open" in opts.scenarios:
            for rate in opts.rates:
                log(f"  [{target}] open loop: {rate:g} commands/s, {opts.duration:g} s")
                await _wait_quiet(opts, deployment.server_pids)
                cpu = _ServerCpu(deployment.server_pids)
                cpu.start()
                result = await gen.open_loop(base_ids, rate, opts.duration, opts.warmup)
                result["server_cpu_pct"] = cpu.percent()
                result["server_cpu_pct_by_process"] = cpu.by_process()
                result["other_cpu_pct"] = cpu.others()
                results[f"open_{rate:g}"] = result
        if "redis-conns" in opts.scenarios and deployment.redis_port:
            # Read after the load at this client count: a publish pool that grows
            # with the load would show here.
            results["redis_conns"] = {str(len(gen.clients)): _redis_conns(deployment.redis_port)}
        if "fanout" in opts.scenarios or "redis-conns" in opts.scenarios:
            fan_ids = _ids(max(opts.fanout_clients, opts.clients))
            log(f"  [{target}] connecting {len(fan_ids)} clients")
            await _connect_or_fail(gen, fan_ids)
            fan_ids = fan_ids[: opts.fanout_clients]
            if "fanout" in opts.scenarios:
                log(f"  [{target}] fan-out to {len(fan_ids)} clients x {opts.fanout_repeats}")
                await _wait_quiet(opts, deployment.server_pids)
                cpu = _ServerCpu(deployment.server_pids)
                cpu.start()
                results["fanout"] = await gen.fan_out(fan_ids, opts.fanout_repeats)
                results["fanout"]["other_cpu_pct"] = cpu.others()
            if "redis-conns" in opts.scenarios and deployment.redis_port:
                results.setdefault("redis_conns", {})[str(len(gen.clients))] = _redis_conns(deployment.redis_port)
        results["server_closes"] = dict(gen.server_closes)
        results["connect_failures"] = dict(gen.connect_failures)
    finally:
        await gen.close()
        procs.stop_all()
    return results


async def _memory(target: str, opts: Options, procs: Processes, tokens: _Tokens) -> dict:
    """Server RSS growth per idle client connection, at each count in ``opts.memory_clients``."""
    deployment = await _deploy(target, procs, tokens, "memory")
    gen = LoadGenerator(deployment.controller_url, deployment.client_url, tokens.controller, tokens.client)
    server = deployment.main
    out: dict = {}
    try:
        # Warm the code paths (imports, first allocations) with a few connections
        # that come and go, so the baseline is a server that has run, not one that
        # has just booted.
        warm = LoadGenerator(deployment.controller_url, deployment.client_url, tokens.controller, tokens.client)
        await warm.connect_controllers(1, prefix="warm-ctl")
        warm_ids = _ids(20, "warm")
        await warm.connect_clients(warm_ids)
        await warm.probe(warm_ids, timeout=10)
        await warm.close()
        await asyncio.sleep(1.0)
        gc.collect()
        baseline = server.rss_kib()
        out["baseline_kib"] = baseline
        for count in sorted(opts.memory_clients):
            opts.log(f"  [{target}] memory: {count} idle clients")
            started = time.monotonic()
            connected = await gen.connect_clients(_ids(count, "m"))
            connect_s = time.monotonic() - started
            rss = await _settled_rss(server)
            out[str(count)] = {
                "connected": connected,
                "open": gen.open_clients(),
                "rss_kib": rss,
                "kib_per_conn": (rss - baseline) / max(connected, 1),
                "connect_s": connect_s,
            }
        out["server_closes"] = dict(gen.server_closes)
        out["connect_failures"] = dict(gen.connect_failures)
    finally:
        await gen.close()
        procs.stop_all()
    return out


async def _settled_rss(server, timeout: float = 10.0) -> int:
    """RSS once it stops moving (two readings 0.5 s apart within 1 %)."""
    deadline = time.monotonic() + timeout
    previous = server.rss_kib()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        current = server.rss_kib()
        if abs(current - previous) <= previous * 0.01:
            return current
        previous = current
    return previous


async def run_target(target: str, opts: Options, procs: Processes) -> dict:
    tokens = _Tokens()
    results: dict = {}
    traffic = {"closed", "open", "fanout", "redis-conns"} & set(opts.scenarios)
    if traffic:
        results.update(await _traffic(target, opts, procs, tokens))
    if "memory" in opts.scenarios and target in opts.memory_targets:
        results["memory"] = await _memory(target, opts, procs, tokens)
    return results
