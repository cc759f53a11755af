"""Faults short of a crash: a Redis that stalls (connections open, nothing flows).

A SIGKILLed Redis or instance is covered in test_cluster.py; a stall is only seen by
timeouts and pings, so it is the case that hangs relays that trust TCP. Documented
bound: docs/deploy.md, "When Redis stalls".
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter

import pytest
from support import CONTROLLER_TOKEN, RedisServer, command, eventually, http_aget, recv, timeout, wait_until
from tcp_proxy import LoadBalancer, TcpProxy
from websockets.asyncio.client import connect

#: Documented in docs/deploy.md: an instance reports a stalled Redis (503 on /readyz) within this.
STALL_DETECTION_SECONDS = 20


async def ready(app) -> bool:
    try:
        return (await http_aget(app.http + "/readyz"))[0] == 200
    except OSError:
        return False


@pytest.mark.slow
async def test_a_stalled_redis_is_detected_routing_recovers_and_nothing_is_duplicated(redis_server, start_appliance):
    proxy = await TcpProxy(redis_server.port).start()
    try:
        # Started in threads: start() blocks while it polls, and the proxy runs on this loop.
        a = await asyncio.to_thread(start_appliance, redis_url=proxy.url, name="stall-a")
        b = await asyncio.to_thread(start_appliance, redis_url=redis_server.url, name="stall-b")
        received: list[str] = []
        errors: list[
            dict
        ] = []  # Protocol v1 (no ids: an id opts into v2's reply tracking), one per undelivered command.
        async with (
            a.connect("stall-dev") as dev,
            connect(f"{b.ws}/ws/stall-llm", additional_headers={"X-Auth-Token": CONTROLLER_TOKEN}) as llm,
        ):

            async def collect_dev():
                async for frame in dev:
                    received.append(frame)

            async def collect_llm():
                async for frame in llm:
                    data = json.loads(frame)
                    if "error" in data:
                        errors.append(data)

            readers = [asyncio.create_task(collect_dev()), asyncio.create_task(collect_llm())]
            sent = 0

            async def send_some(n: int, pause: float) -> None:
                nonlocal sent
                for _ in range(n):
                    await llm.send(command("stall-dev", f"m{sent}"))
                    sent += 1
                    await asyncio.sleep(pause)

            async def until(condition, within: float, what: str) -> float:
                started = time.monotonic()
                while not await condition():
                    assert time.monotonic() - started < within, f"{what} not within {within} s"
                    await send_some(1, 0.2)  # Steady traffic meanwhile.
                return time.monotonic() - started

            await send_some(10, 0.01)
            await until(lambda: _true(len(received) == 10), timeout(10), "warm-up delivered")

            proxy.stall()
            detected = await until(lambda: _not(ready(a)), timeout(STALL_DETECTION_SECONDS + 10), "stall detected")
            proxy.resume()
            recovered = await until(lambda: ready(a), timeout(30), "recovery")
            # Routing is back: new commands arrive, in order, exactly once.
            first_after = sent
            await send_some(20, 0.02)
            await until(lambda: _true(f"m{sent - 1}" in received), timeout(10), "routing after recovery")

            async def every_outcome_known() -> bool:
                return len({int(t[1:]) for t in received}) + len(errors) >= sent

            # Commands published to A during the stall wait for its answer: the outcome timeout
            # (10 to 20 s, OUTCOME_TIMEOUT_SECONDS in brokers/redis.py) reports them to the controller.
            started = time.monotonic()
            while not await every_outcome_known():
                assert time.monotonic() - started < timeout(25), "a command got no outcome"
                await asyncio.sleep(0.1)
            outcomes_after = time.monotonic() - started
            await asyncio.sleep(timeout(1))  # Anything late or duplicated would show up now.
            for reader in readers:
                reader.cancel()

        texts = [int(t[1:]) for t in received]
        assert len(texts) == len(set(texts)), "a message was delivered twice"
        assert texts == sorted(texts), "order was lost"
        assert list(range(first_after, sent)) == [i for i in texts if i >= first_after]
        # Exactly one outcome per command: delivered, or reported; an "outcome unknown" report may also
        # have arrived. Commands to one target are reported in order, so counts decide it.
        assert all(e["error"] in ("delivery_failed", "target_offline") for e in errors), errors
        unknown = sum(1 for e in errors if e["detail"].startswith("outcome unknown"))
        undelivered = sent - len(texts)
        assert len(errors) - unknown <= undelivered <= len(errors), (sent, len(texts), len(errors), unknown)
        lost = [i for i in range(sent) if i not in texts]
        print(
            f"stall detected after {detected:.1f} s, recovered {recovered:.1f} s after the stall ended; "
            f"{sent} commands, {len(lost)} not delivered and each reported to the controller "
            f"(the last report {outcomes_after:.1f} s after recovery)"
        )
        assert detected < timeout(STALL_DETECTION_SECONDS)
    finally:
        await proxy.stop()


async def _true(value: bool) -> bool:
    return value


async def _not(awaitable) -> bool:
    return not await awaitable


CLIENTS = 20
COMMANDS_PER_SECOND = 100


@pytest.mark.slow
async def test_a_rolling_restart_under_steady_traffic_reports_every_command_it_could_not_deliver(
    redis_server, start_appliance
):
    """Two instances behind a balancer, restarted one after the other (SIGTERM, then start) under traffic.

    Without an offline queue (protocol v1) a command to a client that is reconnecting cannot
    wait for it: the promise is that each such command is reported to the controller. Only
    commands whose *controller's own* connection dropped before the outcome may go unreported
    (the report had nowhere to go); they are counted apart.
    """
    from support import CLIENT_TOKEN

    from appliance.client import BridgeClient

    a = await asyncio.to_thread(start_appliance, redis_url=redis_server.url, name="roll-a")
    b = await asyncio.to_thread(start_appliance, redis_url=redis_server.url, name="roll-b")
    balancer = await LoadBalancer([a.port, b.port]).start()
    delivered: dict[int, int] = {}  # command number -> times a client saw it
    # Protocol v1, no ids (an id opts into v2's reply tracking): reports are counted per
    # (controller connection, target); one target's reports come in the order of its commands.
    errors: Counter[tuple[int, int]] = Counter()
    error_codes: Counter[str] = Counter()
    sent_on: dict[int, int] = {}  # command number -> the controller's connection count when sent
    stop = asyncio.Event()

    async def device(i: int) -> None:
        # Reads until cancelled once every outcome is in, with no timeout on a read. The devices
        # used to stop reading with the traffic (and cut each read short after 0.2 s): a command
        # sent in the last moment and delivered more than 0.2 s later on a busy machine reached a
        # device that no longer read, so it counted as neither delivered nor reported ("one
        # command of 1,060 had no outcome"), although the relay had delivered it (v1: handed to
        # the socket, no report due). A read cut short during a reconnect could also abandon a
        # socket the relay had just accepted, with commands written to it that nobody read.
        async with BridgeClient(balancer.ws, f"roll-{i}", CLIENT_TOKEN, backoff_initial=0.05, backoff_max=0.5) as dev:
            while True:
                n = int((await dev.receive())[1:])
                delivered[n] = delivered.get(n, 0) + 1

    async def controller_reader(llm: BridgeClient) -> None:
        while True:
            data = await llm.receive_json()
            if "error" in data:
                errors[(llm.connections, int(data["target"].split("-")[1]))] += 1
                error_codes[data["error"]] += 1

    devices = [asyncio.create_task(device(i)) for i in range(CLIENTS)]

    def unreported_on(connection: int) -> list[int]:
        """Per target, the undelivered commands sent on ``connection`` beyond the reports it got."""
        missing: list[int] = []
        for target in range(CLIENTS):
            undelivered = [
                n for n, c in sent_on.items() if c == connection and n % CLIENTS == target and n not in delivered
            ]
            missing += undelivered[errors[(connection, target)] :]
        return missing

    try:
        async with BridgeClient(
            balancer.ws, "roll-llm", CONTROLLER_TOKEN, backoff_initial=0.05, backoff_max=0.5
        ) as llm:
            reader = asyncio.create_task(controller_reader(llm))

            async def traffic() -> None:
                n = 0
                while not stop.is_set():
                    sent_on[n] = llm.connections
                    await llm.send_command(f"roll-{n % CLIENTS}", f"c{n}")
                    n += 1
                    await asyncio.sleep(1 / COMMANDS_PER_SECOND)

            await asyncio.sleep(timeout(2))  # Every device connected.
            sender = asyncio.create_task(traffic())
            await asyncio.sleep(2)
            for app in (a, b):  # The rolling restart: one instance at a time, the other keeps serving.
                await asyncio.to_thread(app.terminate)
                await asyncio.to_thread(app.start)
                await asyncio.sleep(2)
            stop.set()
            await sender
            waited = time.monotonic()
            while unreported_on(llm.connections):  # Last outcomes (a cross-instance timeout takes 10-20 s).
                if time.monotonic() - waited > timeout(OUTCOME_WAIT):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1)  # A late duplicate would show up now.
            reader.cancel()
            final_connection = llm.connections
    finally:
        stop.set()
        for task in devices:
            task.cancel()
        await asyncio.gather(*devices, return_exceptions=True)
        await balancer.stop()

    sent = len(sent_on)
    duplicated = [n for n, times in delivered.items() if times > 1]
    unreported = unreported_on(final_connection)
    # A report can only reach the controller on the connection the command was sent on.
    orphaned = [n for c in set(sent_on.values()) - {final_connection} for n in unreported_on(c)]
    print(
        f"rolling restart: {sent} commands at {COMMANDS_PER_SECOND}/s to {CLIENTS} reconnecting clients: "
        f"{len(delivered)} delivered, {sum(error_codes.values())} reported ({dict(error_codes)}), "
        f"{len(orphaned)} unreported because the controller's own connection was restarted, "
        f"{len(unreported)} unreported otherwise, {len(duplicated)} duplicated"
    )
    assert sent > COMMANDS_PER_SECOND * 4
    assert not duplicated
    assert not unreported, f"lost without a report: {unreported[:20]}"
    assert len(delivered) > sent * 0.5, "the instances hardly served during the roll"


#: Seconds to wait for the last commands' outcomes: the cross-instance outcome timeout is 10 to 20 s.
OUTCOME_WAIT = 21


@pytest.mark.slow
async def test_a_rolling_restart_with_the_offline_queue_loses_no_command_for_reconnecting_clients(
    redis_server, start_appliance
):
    """The same roll with ``"queue": true`` (controller API, #8): commands wait for their client.

    Every command sent on the controller connection that survived must reach its client
    (exactly once) or be reported; the figures are printed for docs/deploy.md.
    """
    from support import CLIENT_TOKEN

    from appliance.client import BridgeClient

    a = await asyncio.to_thread(start_appliance, redis_url=redis_server.url, name="rollq-a")
    b = await asyncio.to_thread(start_appliance, redis_url=redis_server.url, name="rollq-b")
    balancer = await LoadBalancer([a.port, b.port]).start()
    delivered: dict[int, int] = {}
    outcomes: dict[int, str] = {}  # id -> "replied" or an error / timeout
    sent_on: dict[int, int] = {}
    stop = asyncio.Event()

    async def device(i: int) -> None:
        # Reads and replies until cancelled once every outcome is in (why: the test above).
        async with BridgeClient(balancer.ws, f"rollq-{i}", CLIENT_TOKEN, backoff_initial=0.05, backoff_max=0.5) as dev:
            while True:
                n = int((await dev.receive())[1:])
                delivered[n] = delivered.get(n, 0) + 1
                await dev.send_text(f"done {n}")  # Version-1 clients' replies free their reply line.

    async def controller_reader(llm: BridgeClient) -> None:
        while True:
            data = await llm.receive_json()
            if "reply_to" in data:
                outcomes[data["reply_to"]] = "replied"
            elif "error" in data and "id" in data:
                outcomes[data["id"]] = data["error"]
            elif data.get("status") == "timeout":
                outcomes[data["id"]] = "timeout"

    devices = [asyncio.create_task(device(i)) for i in range(CLIENTS)]
    try:
        async with BridgeClient(balancer.ws, "rollq-llm", CONTROLLER_TOKEN, backoff_initial=0.05) as llm:
            reader = asyncio.create_task(controller_reader(llm))

            async def traffic() -> None:
                n = 0
                while not stop.is_set():
                    sent_on[n] = llm.connections
                    await llm.send_command(f"rollq-{n % CLIENTS}", f"c{n}", id=n, queue=True, timeout_ms=15_000)
                    n += 1
                    await asyncio.sleep(1 / COMMANDS_PER_SECOND)

            await asyncio.sleep(timeout(2))
            sender = asyncio.create_task(traffic())
            await asyncio.sleep(2)
            for app in (a, b):
                await asyncio.to_thread(app.terminate)
                await asyncio.to_thread(app.start)
                await asyncio.sleep(2)
            stop.set()
            await sender
            final_connection = llm.connections
            waited = time.monotonic()
            while any(n not in outcomes for n, c in sent_on.items() if c == final_connection):
                if time.monotonic() - waited > timeout(20):
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1)
            reader.cancel()
    finally:
        stop.set()
        for task in devices:
            task.cancel()
        await asyncio.gather(*devices, return_exceptions=True)
        await balancer.stop()

    ours = [n for n, c in sent_on.items() if c == final_connection]
    lost = [n for n in ours if n not in delivered]
    unreported = [n for n in lost if outcomes.get(n) in (None, "replied")]
    duplicated = [n for n, times in delivered.items() if times > 1]
    codes = Counter(outcomes.get(n, "none") for n in lost)
    print(
        f"rolling restart (offline queue): {len(sent_on)} commands, {len(ours)} on the surviving controller "
        f"connection: {len(ours) - len(lost)} reached their client, {len(lost)} did not ({dict(codes)}), "
        f"{len(unreported)} of them unreported, {len(duplicated)} duplicated; "
        f"all connections: {len(delivered)} of {len(sent_on)} reached their client"
    )
    assert len(sent_on) > COMMANDS_PER_SECOND * 4 and len(ours) > COMMANDS_PER_SECOND
    assert not duplicated
    assert not unreported, f"lost without a report: {unreported[:20]}"
    # SIGTERM drains before it closes, and the queue holds what a reconnecting client misses.
    assert not lost, f"commands lost for reconnecting clients: {lost[:20]} ({dict(codes)})"


class _AofRedis(RedisServer):
    """A redis-server with the append-only file on, every write fsynced (docs/deploy.md)."""

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"),
                *("--appendfsync", "always", "--dir", self.dir, "--loglevel", "warning"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, f"redis-server on port {self.port}")


@pytest.mark.slow
async def test_queued_commands_survive_a_redis_crash_with_aof(start_appliance):
    """Commands queued for an offline client are in Redis; with AOF a SIGKILLed Redis brings them back."""
    redis = _AofRedis()
    await asyncio.to_thread(redis.start)
    try:
        app = await asyncio.to_thread(start_appliance, redis_url=redis.url, name="aof")
        async with app.controller("aof-llm") as llm:
            for i in range(5):
                await llm.send(command("aof-dev", f"queued {i}", id=f"q{i}", queue=True, timeout_ms=120_000))
                status = json.loads(await recv(llm))
                assert (status["id"], status["status"]) == (f"q{i}", "queued"), status
            await asyncio.to_thread(redis.kill)  # SIGKILL: nothing flushed at exit; appendfsync always wrote each.
            await asyncio.to_thread(redis.start)

            async def ready_again() -> bool:
                return (await http_aget(app.http + "/readyz"))[0] == 200

            await eventually(ready_again, 30, "the instance back on the restarted Redis")
            async with app.connect("aof-dev") as dev:
                got = []
                for _ in range(5):  # A version-1 client gets one command with an id at a time: reply to each.
                    got.append(await recv(dev, 10))
                    await dev.send(f"done: {got[-1]}")
                assert got == [f"queued {i}" for i in range(5)]
    finally:
        await asyncio.to_thread(redis.stop)
