"""Commands safe to retry (appliance/commands/idempotency.py), in-process on the embedded broker."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec

from appliance.brokers.base import BrokerUnavailable
from appliance.brokers.memory import MemoryBroker
from appliance.commands.idempotency import ControllerKeys, IdempotentSends, fingerprint
from appliance.commands.outcome import Outcome
from appliance.core.protocol_v2 import Request, TargetKind


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
    first = await service.send("~", "k", COMMAND, 5, device.send)
    again = await service.send("~", "k", COMMAND, 5, device.send)
    assert device.sent == 1
    assert first.body.get("replayed") is None
    assert again.http_status == 200 and again.body == {**REPLIED.body, "replayed": True}


async def test_concurrent_repeats_wait_for_the_first_and_it_runs_once():
    service, device = await sends(), Device(REPLIED, delay=0.2)
    outcomes = await asyncio.gather(*(service.send("~", "k", COMMAND, 5, device.send) for _ in range(5)))
    assert device.sent == 1
    assert [o.http_status for o in outcomes] == [200] * 5
    assert sum(1 for o in outcomes if o.body.get("replayed")) == 4


async def test_the_same_key_for_another_command_is_refused_with_409():
    service, device = await sends(), Device(REPLIED)
    await service.send("~", "k", COMMAND, 5, device.send)
    other = await service.send("~", "k", fingerprint("dev", "MoveBack 10", False), 5, device.send)
    assert device.sent == 1
    assert other.http_status == 409 and other.body["error"] == "duplicate_id"
    assert "different command" in other.body["detail"]


async def test_a_command_refused_before_reaching_a_client_can_be_retried():
    service = await sends()
    offline = Device(Outcome(404, {"error": "target_offline", "detail": "not connected"}))
    assert (await service.send("~", "k", COMMAND, 5, offline.send)).http_status == 404
    online = Device(REPLIED)
    assert (await service.send("~", "k", COMMAND, 5, online.send)).http_status == 200
    assert online.sent == 1


async def test_a_timeout_is_remembered_so_a_retry_never_runs_it_twice():
    service = await sends()
    slow = Device(Outcome(504, {"id": "k", "status": "timeout", "target": "dev"}))
    await service.send("~", "k", COMMAND, 5, slow.send)
    again = await service.send("~", "k", COMMAND, 5, slow.send)
    assert slow.sent == 1 and again.http_status == 504 and again.body["replayed"] is True


async def test_a_repeat_that_cannot_wait_long_enough_is_told_it_is_still_in_flight():
    service, device = await sends(), Device(REPLIED, delay=1.0)
    first = asyncio.create_task(service.send("~", "k", COMMAND, 5, device.send))
    await asyncio.sleep(0.05)
    impatient = await service.send("~", "k", COMMAND, 0.1, device.send)
    assert impatient.http_status == 409 and "still in flight" in impatient.body["detail"]
    assert (await first).http_status == 200 and device.sent == 1


async def test_a_caller_that_stops_waiting_still_leaves_the_outcome_for_the_retry():
    service, device = await sends(), Device(REPLIED, delay=0.2)
    first = asyncio.create_task(service.send("~", "k", COMMAND, 5, device.send))
    await asyncio.sleep(0.05)
    first.cancel()  # a cancelled MCP call, an HTTP client that hung up
    retry = await service.send("~", "k", COMMAND, 5, device.send)
    assert device.sent == 1 and retry.http_status == 200 and retry.body["replayed"] is True


class FailingWrites(MemoryBroker):
    """The embedded broker whose first outcome writes fail, as Redis's do for a moment (or when full)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def idempotency_set(self, caller: str, key: str, record: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise BrokerUnavailable("redis: connection reset")
        await super().idempotency_set(caller, key, record)


class AnswerLate(MemoryBroker):
    """A broker whose claim is done at once and answered later (a Redis round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.claimed, self.answered = asyncio.Event(), asyncio.Event()

    async def idempotency_claim(self, caller: str, key: str, record: str) -> str | None:
        held = await super().idempotency_claim(caller, key, record)
        self.claimed.set()
        await self.answered.wait()
        return held


async def test_a_caller_that_stops_waiting_during_its_claim_does_not_leave_the_key_in_flight():
    broker, device = AnswerLate(), Device(REPLIED)
    service = IdempotentSends(broker, window_seconds=600)
    first = asyncio.ensure_future(service.send("~", "k", COMMAND, 5, device.send))
    await broker.claimed.wait()
    first.cancel()  # The HTTP client went away while the claim was on its way.
    broker.answered.set()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    retry = await asyncio.wait_for(service.send("~", "k", COMMAND, 2, device.send), 10)
    assert retry.http_status == 200 and retry.body.get("replayed") is None and device.sent == 1


async def test_an_outcome_whose_write_failed_still_answers_a_retry_on_any_instance():
    broker = FailingWrites(failures=2)
    here, there, device = IdempotentSends(broker, 600), IdempotentSends(broker, 600), Device(REPLIED)
    assert (await here.send("~", "k", COMMAND, 5, device.send)).http_status == 200
    again_here = await here.send("~", "k", COMMAND, 0.1, device.send)  # answered from this instance at once
    assert again_here.http_status == 200 and again_here.body["replayed"] is True
    again_there = await there.send("~", "k", COMMAND, 3, device.send)  # once the write retried landed
    assert again_there.http_status == 200 and again_there.body["replayed"] is True
    assert device.sent == 1 and broker.failures == 0
    await here.stop()


async def test_a_keyed_websocket_command_whose_outcome_write_failed_is_replayed_to_a_retry_not_left_in_flight():
    broker = FailingWrites(failures=1)
    sent: list[Request] = []
    frames: list[tuple[str, dict]] = []
    tasks: set[asyncio.Future] = set()
    keys = ControllerKeys(
        IdempotentSends(broker, 600),
        lambda waiter, controller, request: sent.append(request),
        lambda waiter, frame: frames.append((waiter, msgspec.json.decode(frame))),
        lambda coro: tasks.add(asyncio.ensure_future(coro)),
    )
    command = Request("dev", "MoveForward 10", "c1", 2000, False, TargetKind.CLIENT)
    keys.submit("w:1", "LLM", command)
    while not sent:
        await asyncio.sleep(0.01)
    keys.finished("w:1", "c1", '{"id":"c1","status":"replied","sender":"dev","message":"moved","rtt_ms":3.0}')
    await asyncio.gather(*tasks)  # the outcome's write: it failed
    keys.submit("w:2", "LLM", command)  # the controller reconnected and retried the same id
    for _ in range(300):
        if frames:
            break
        await asyncio.sleep(0.01)
    assert len(sent) == 1
    assert frames == [
        ("w:2", {"id": "c1", "status": "replied", "sender": "dev", "message": "moved", "rtt_ms": 3.0, "replayed": True})
    ]
    await keys._sends.stop()
