"""Commands safe to retry (appliance/commands/idempotency.py), in-process on the embedded broker."""

from __future__ import annotations

import asyncio

from appliance.brokers.memory import MemoryBroker
from appliance.commands.idempotency import IdempotentSends, fingerprint
from appliance.commands.outcome import Outcome


class Device:
    """Stands for everything after the command service: counts the commands that went out."""

    def __init__(self, outcome: Outcome, delay: float = 0.0) -> None:
        self.outcome, self.delay, self.sent = outcome, delay, 0

    async def send(self) -> Outcome:
        self.sent += 1
        await asyncio.sleep(self.delay)
        return Outcome(self.outcome.http_status, dict(self.outcome.body))


REPLIED = Outcome(200, {"id": "k", "status": "replied", "target": "dev", "message": "ok"})
COMMAND = fingerprint("dev", "MoveForward 10", False)


async def sends() -> IdempotentSends:
    broker = MemoryBroker()
    return IdempotentSends(broker, window_seconds=600)


async def test_a_repeat_gets_the_first_outcome_marked_replayed_and_sends_nothing():
    service, device = await sends(), Device(REPLIED)
    first = await service.send("k", COMMAND, 5, device.send)
    again = await service.send("k", COMMAND, 5, device.send)
    assert device.sent == 1
    assert first.body.get("replayed") is None
    assert again.http_status == 200 and again.body == {**REPLIED.body, "replayed": True}


async def test_concurrent_repeats_wait_for_the_first_and_it_runs_once():
    service, device = await sends(), Device(REPLIED, delay=0.2)
    outcomes = await asyncio.gather(*(service.send("k", COMMAND, 5, device.send) for _ in range(5)))
    assert device.sent == 1
    assert [o.http_status for o in outcomes] == [200] * 5
    assert sum(1 for o in outcomes if o.body.get("replayed")) == 4


async def test_the_same_key_for_another_command_is_refused_with_409():
    service, device = await sends(), Device(REPLIED)
    await service.send("k", COMMAND, 5, device.send)
    other = await service.send("k", fingerprint("dev", "MoveBack 10", False), 5, device.send)
    assert device.sent == 1
    assert other.http_status == 409 and other.body["error"] == "duplicate_id"
    assert "different command" in other.body["detail"]


async def test_a_command_refused_before_reaching_a_client_can_be_retried():
    service = await sends()
    offline = Device(Outcome(404, {"error": "target_offline", "detail": "not connected"}))
    assert (await service.send("k", COMMAND, 5, offline.send)).http_status == 404
    online = Device(REPLIED)
    assert (await service.send("k", COMMAND, 5, online.send)).http_status == 200
    assert online.sent == 1


async def test_a_timeout_is_remembered_so_a_retry_never_runs_it_twice():
    service = await sends()
    slow = Device(Outcome(504, {"id": "k", "status": "timeout", "target": "dev"}))
    await service.send("k", COMMAND, 5, slow.send)
    again = await service.send("k", COMMAND, 5, slow.send)
    assert slow.sent == 1 and again.http_status == 504 and again.body["replayed"] is True


async def test_a_repeat_that_cannot_wait_long_enough_is_told_it_is_still_in_flight():
    service, device = await sends(), Device(REPLIED, delay=1.0)
    first = asyncio.create_task(service.send("k", COMMAND, 5, device.send))
    await asyncio.sleep(0.05)
    impatient = await service.send("k", COMMAND, 0.1, device.send)
    assert impatient.http_status == 409 and "still in flight" in impatient.body["detail"]
    assert (await first).http_status == 200 and device.sent == 1


async def test_a_caller_that_stops_waiting_still_leaves_the_outcome_for_the_retry():
    service, device = await sends(), Device(REPLIED, delay=0.2)
    first = asyncio.create_task(service.send("k", COMMAND, 5, device.send))
    await asyncio.sleep(0.05)
    first.cancel()  # a cancelled MCP call, an HTTP client that hung up
    retry = await service.send("k", COMMAND, 5, device.send)
    assert device.sent == 1 and retry.http_status == 200 and retry.body["replayed"] is True
