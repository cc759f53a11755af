"""Runs the scenarios against each target and collects the figures.

Targets:

- ``reference``: the bare relay of :mod:`bench.relay` (one process).
- ``embedded``: ``wsbridge serve`` on the embedded broker (one process).
- ``redis``: a Redis server and two ``wsbridge serve`` instances sharing it;
  controllers connect to instance A, clients to instance B, so every command
  and every reply crosses Redis.

All targets are deployed side by side and the traffic scenarios are
interleaved: for each scenario, each round runs it against every target in
turn, and a figure is the median of its rounds. On a shared 2-core machine the
background load comes and goes; interleaving spreads it over the targets
instead of charging it to whichever one happened to run during a busy minute.
The clients stay connected between scenarios (100 for the loops, then up to
1000 for fan-out). Idle servers of the other targets cost next to nothing
meanwhile (their pings), and count as "ours" in the other-load figure.

The memory scenario uses a fresh deployment per target, one after the other,
so its baseline is a server that has seen no traffic.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import statistics
import time
from dataclasses import dataclass, field

from .loadgen import LoadGenerator
from .procs import Processes, free_port, machine_busy_seconds, redis_clients, wait_http_ok, wait_redis

__all__ = ["Options", "TARGETS", "SCENARIOS", "run_memory", "run_traffic"]

TARGETS = ("reference", "embedded", "redis")
SCENARIOS = ("closed", "open", "fanout", "memory", "redis-conns")


@dataclass
class Options:
    targets: tuple[str, ...] = TARGETS
    scenarios: tuple[str, ...] = SCENARIOS
    duration: float = 4.0
    warmup: float = 1.0
    clients: int = 100
    outstanding: int = 200
    controllers: int = 1
    rates: tuple[float, ...] = (500.0, 2000.0)
    fanout_clients: int = 1000
    fanout_repeats: int = 10
    memory_clients: tuple[int, ...] = (1000, 5000, 10000)
    memory_targets: tuple[str, ...] = ("reference", "embedded")
    # Extra embedded-broker targets: name -> another wsbridge script (a branch to compare, say).
    extra_targets: dict = field(default_factory=dict)
    log: callable = print
    rounds: int = 3  # each traffic scenario runs this many times per target, interleaved; medians reported
    quiet_wait: float = 60.0  # total seconds the run may spend waiting for the machine to be quiet
    quiet_threshold: float = 15.0  # "quiet": other processes use less than this % of a core
    profiler: object = None  # a bench.profile.Profiler to sample the servers during the closed loop


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


async def _deploy(target: str, procs: Processes, tokens: _Tokens, tag: str, extra: dict | None = None) -> _Deployment:
    extra = extra or {}
    if target == "reference":
        port = free_port()
        proc = procs.start_reference(f"reference-{tag}", port, tokens.controller)
        await wait_http_ok(proc, f"http://127.0.0.1:{port}/healthz")
        url = f"ws://127.0.0.1:{port}"
        return _Deployment(url, url, [proc], proc)
    settings = {"LLM_SECRET_TOKEN": tokens.controller, "UNITY_CLIENT_TOKEN": tokens.client}
    if target == "embedded" or target in extra:
        port = free_port()
        proc = procs.start_appliance(f"{target}-{tag}", port, settings, extra.get(target))
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
    """CPU of some server processes over a window, and of everything else on the machine."""

    def __init__(self, procs: list, ours: list) -> None:
        self.procs = procs
        self.ours = ours  # every process this run started (idle targets included)

    def start(self) -> None:
        self._each = {proc.name: proc.cpu_seconds() for proc in self.procs}
        self._ours = sum(proc.cpu_seconds() for proc in self.ours)
        self._machine = machine_busy_seconds()
        self._own = time.process_time()
        self._wall = time.monotonic()

    def percent(self) -> float:
        return sum(self.by_process().values())

    def by_process(self) -> dict[str, float]:
        wall = time.monotonic() - self._wall
        return {proc.name: 100 * (proc.cpu_seconds() - self._each[proc.name]) / wall for proc in self.procs}

    def others(self) -> float:
        """CPU used by everything else on the machine meanwhile (other jobs, steal), % of a core.

        The machine has 2 cores, possibly shared with whatever else runs: a
        figure taken while this is high is noise, and the table shows it.
        """
        wall = time.monotonic() - self._wall
        ours = (sum(proc.cpu_seconds() for proc in self.ours) - self._ours) + (time.process_time() - self._own)
        return max(0.0, 100 * (machine_busy_seconds() - self._machine - ours) / wall)


class _QuietBudget:
    """Waits, within a budget for the whole run, until other processes leave the machine alone."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.left = opts.quiet_wait

    async def wait(self, ours: list) -> float:
        threshold = self.opts.quiet_threshold
        if self.left <= 0:
            return float("nan")
        while True:
            probe = _ServerCpu([], ours)
            probe.start()
            await asyncio.sleep(0.5)
            self.left -= 0.5
            load = probe.others()
            if load < threshold:
                return load
            if self.left <= 0:
                return load
            await asyncio.sleep(0.5)
            self.left -= 0.5


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


class _Live:
    """One deployed target with its generator and its results."""

    def __init__(self, target: str, deployment: _Deployment, gen: LoadGenerator) -> None:
        self.target = target
        self.deployment = deployment
        self.gen = gen
        self.results: dict = {}
        self.rounds: dict[str, list[dict]] = {}
        self.failed: str | None = None


def _median_round(rounds: list[dict], key, higher_is_better: bool) -> dict:
    """The round whose ``key`` is the median, with every round's ``key`` under ``rounds``.

    With an even number of rounds the worse of the two middle ones is taken,
    so the reported figure is never flattered by the choice.
    """
    ordered = sorted(rounds, key=key)
    middle = (len(ordered) - 1) // 2 if higher_is_better else len(ordered) // 2
    chosen = dict(ordered[middle])
    chosen["rounds"] = [key(r) for r in rounds]
    return chosen


async def run_traffic(opts: Options, procs: Processes, log=print) -> dict[str, dict]:
    """The traffic scenarios against every target in ``opts.targets``, interleaved."""
    targets = [t for t in opts.targets]
    live: list[_Live] = []
    quiet = _QuietBudget(opts)
    try:
        for target in targets:
            tokens = _Tokens()
            try:
                deployment = await _deploy(target, procs, tokens, "traffic", opts.extra_targets)
                gen = LoadGenerator(deployment.controller_url, deployment.client_url, tokens.controller, tokens.client)
                entry = _Live(target, deployment, gen)
                live.append(entry)
                await gen.connect_controllers(opts.controllers)
                await _connect_or_fail(gen, _ids(opts.clients))
            except Exception as exc:  # one broken target must not hide the others' figures
                log(f"  [{target}] FAILED to start: {exc}")
                if live and live[-1].target == target:
                    live[-1].failed = str(exc)
                else:
                    failed = _Live(target, None, None)
                    failed.failed = str(exc)
                    live.append(failed)

        async def each_round(name: str, describe: str, scenario) -> None:
            for round_no in range(opts.rounds):
                for entry in live:
                    if entry.failed:
                        continue
                    log(f"  [{entry.target}] {describe} (round {round_no + 1}/{opts.rounds})")
                    await quiet.wait(procs.started)
                    servers = entry.deployment.server_pids
                    cpu = _ServerCpu(servers, procs.started)
                    cpu.start()
                    try:
                        result = await scenario(entry, round_no)
                    except Exception as exc:
                        log(f"  [{entry.target}] FAILED: {exc}")
                        entry.failed = f"{name}: {exc}"
                        continue
                    result["server_cpu_pct"] = cpu.percent()
                    result["server_cpu_pct_by_process"] = cpu.by_process()
                    result["other_cpu_pct"] = cpu.others()
                    entry.rounds.setdefault(name, []).append(result)

        base_ids = _ids(opts.clients)
        if "closed" in opts.scenarios:

            async def closed(entry: _Live, round_no: int) -> dict:
                profiler = opts.profiler if round_no == 0 else None
                if profiler is not None:
                    for proc in entry.deployment.server_pids:
                        if proc.kind == "appliance":
                            profiler.start(f"{proc.name}-closed", proc.pid, opts.warmup + opts.duration)
                servers = entry.deployment.server_pids
                result = await entry.gen.closed_loop(
                    base_ids,
                    opts.outstanding,
                    opts.duration,
                    opts.warmup,
                    server_cpu=lambda: sum(proc.cpu_seconds() for proc in servers),
                )
                if profiler is not None:
                    await asyncio.to_thread(profiler.finish)
                return result

            await each_round(
                "closed",
                f"closed loop: {opts.clients} clients, {opts.outstanding} outstanding, {opts.duration:g} s",
                closed,
            )
            for entry in live:
                if entry.rounds.get("closed"):
                    entry.results["closed"] = _median_round(
                        entry.rounds["closed"], lambda r: r["round_trips_per_s"], higher_is_better=True
                    )

        if "open" in opts.scenarios:
            for rate in opts.rates:

                async def open_loop(entry: _Live, round_no: int, rate=rate) -> dict:
                    return await entry.gen.open_loop(base_ids, rate, opts.duration, opts.warmup)

                key = f"open_{rate:g}"
                await each_round(key, f"open loop: {rate:g} commands/s, {opts.duration:g} s", open_loop)
                for entry in live:
                    if entry.rounds.get(key):
                        entry.results[key] = _median_round(
                            entry.rounds[key], lambda r: r["latency"]["p99_ms"], higher_is_better=False
                        )

        if "redis-conns" in opts.scenarios:
            for entry in live:
                if not entry.failed and entry.deployment.redis_port:
                    # Read after the load at this client count: a publish pool that grew with it would show.
                    entry.results["redis_conns"] = {
                        str(len(entry.gen.clients)): _redis_conns(entry.deployment.redis_port)
                    }

        if "fanout" in opts.scenarios or "redis-conns" in opts.scenarios:
            fan_total = max(opts.fanout_clients, opts.clients)
            for entry in live:
                if entry.failed:
                    continue
                log(f"  [{entry.target}] connecting {fan_total} clients")
                try:
                    await _connect_or_fail(entry.gen, _ids(fan_total))
                except Exception as exc:
                    log(f"  [{entry.target}] FAILED: {exc}")
                    entry.failed = f"connect {fan_total}: {exc}"
            fan_ids = _ids(opts.fanout_clients)
            if "fanout" in opts.scenarios:

                async def fan_out(entry: _Live, round_no: int) -> dict:
                    servers = entry.deployment.server_pids
                    profiler = opts.profiler if round_no == 0 else None
                    if profiler is not None:
                        for proc in servers:
                            if proc.kind == "appliance":
                                # About 0.25 s per repeat (the fan-out, its echoes, the pause).
                                profiler.start(f"{proc.name}-fanout", proc.pid, 0.25 * opts.fanout_repeats)
                    result = await entry.gen.fan_out(
                        fan_ids, opts.fanout_repeats, server_cpu=lambda: sum(proc.cpu_seconds() for proc in servers)
                    )
                    if profiler is not None:
                        await asyncio.to_thread(profiler.finish)
                    return result

                await each_round("fanout", f"fan-out to {len(fan_ids)} clients x {opts.fanout_repeats}", fan_out)
                for entry in live:
                    rounds = entry.rounds.get("fanout")
                    if rounds:
                        entry.results["fanout"] = _pool_fanout(rounds)
            if "redis-conns" in opts.scenarios:
                for entry in live:
                    if not entry.failed and entry.deployment.redis_port:
                        entry.results.setdefault("redis_conns", {})[str(len(entry.gen.clients))] = _redis_conns(
                            entry.deployment.redis_port
                        )

        for entry in live:
            if entry.gen is not None:
                entry.results["server_closes"] = dict(entry.gen.server_closes)
                entry.results["connect_failures"] = dict(entry.gen.connect_failures)
            if entry.failed:
                entry.results["failed"] = entry.failed
    finally:
        for entry in live:
            if entry.gen is not None:
                await entry.gen.close()
        procs.stop_all()
    return {entry.target: entry.results for entry in live}


def _pool_fanout(rounds: list[dict]) -> dict:
    """Fan-out figures over every repeat of every round."""
    delivered = [x for r in rounds for x in r["delivered_ms"]]
    replied = [x for r in rounds for x in r["replied_ms"]]
    nan = float("nan")
    return {
        "clients": rounds[0]["clients"],
        "repeats": sum(r["repeats"] for r in rounds),
        "incomplete": sum(r["incomplete"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "delivered_median_ms": statistics.median(delivered) if delivered else nan,
        "delivered_max_ms": max(delivered) if delivered else nan,
        "replied_median_ms": statistics.median(replied) if replied else nan,
        "server_cpu_pct": statistics.median(r["server_cpu_pct"] for r in rounds),
        "other_cpu_pct": statistics.median(r["other_cpu_pct"] for r in rounds),
        "server_cpu_ms_median": statistics.median(cpu)
        if (cpu := [x for r in rounds for x in r["server_cpu_ms"]])
        else nan,
        "server_cpu_ms_mean": statistics.fmean(cpu) if cpu else nan,
        "server_cpu_ms": cpu,
        "replied_ms": replied,
        "delivered_ms": delivered,
    }


async def run_memory(target: str, opts: Options, procs: Processes) -> dict:
    """Server RSS growth per idle client connection, at each count in ``opts.memory_clients``."""
    tokens = _Tokens()
    deployment = await _deploy(target, procs, tokens, "memory", opts.extra_targets)
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
