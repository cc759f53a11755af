"""Faults short of a crash: a Redis that stalls (connections open, nothing flows).

A SIGKILLed Redis or instance is covered in test_cluster.py; a stall is only seen by
timeouts and pings, so it is the case that hangs relays that trust TCP. Documented
bound: docs/deploy.md, "When Redis stalls".
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from support import CONTROLLER_TOKEN, command, http_aget, timeout
from tcp_proxy import TcpProxy
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
        errors: dict[int, dict] = {}
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
                        errors[data["id"]] = data

            readers = [asyncio.create_task(collect_dev()), asyncio.create_task(collect_llm())]
            sent = 0

            async def send_some(n: int, pause: float) -> None:
                nonlocal sent
                for _ in range(n):
                    await llm.send(command("stall-dev", f"m{sent}", id=sent))
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
                delivered = {int(t[1:]) for t in received}
                return all(i in delivered or i in errors for i in range(sent))

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
        for i in range(sent):  # Exactly one outcome per command (an unknown outcome may also have arrived).
            if i in errors:
                assert errors[i]["error"] in ("delivery_failed", "target_offline"), errors[i]
                assert i not in texts or errors[i]["detail"].startswith("outcome unknown"), errors[i]
            else:
                assert i in texts, f"m{i} neither delivered nor reported"
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
