"""Command records for follow-ups (appliance/commands/followup.py), in-process on the embedded broker."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from appliance.api_types import CommandRecordBody
from appliance.brokers.memory import MemoryBroker
from appliance.commands.followup import LATE_REPLY_SECONDS, TEXT_BYTES, UNNAMED, Followups, bounded
from appliance.commands.outcome import Outcome
from appliance.core.requests import SEND_MARGIN_SECONDS, Routed, V1Matcher
from appliance.registry import LocalConnections

TIMEOUT = Outcome(504, {"id": "c1", "status": "timeout", "target": "dev", "delivered": True, "detail": "late"})


async def other_instance(broker: MemoryBroker, command_id: str) -> dict | None:
    """What another instance reads: the broker's copy, not this instance's memory."""
    record = await Followups(broker).get(command_id)
    return None if record is None else record.public(time.time())


async def test_a_reply_after_the_timeout_turns_the_record_to_replied_late_on_every_instance():
    broker = MemoryBroker()
    followups = Followups(broker)
    followups.opened("h:1", "c1", "dev", "MoveForward 10", 1000)
    assert followups.answered("h:1", "c1", TIMEOUT) is not None
    await followups.written()
    seen = await other_instance(broker, "c1")
    assert seen is not None
    assert (seen["status"], seen["caller"], seen["delivered"], seen["open"]) == ("timeout", "answered", True, True)
    followups.replied("h:1", "c1", "dev", "moved", time.time())
    await followups.written()
    seen = await other_instance(broker, "c1")
    assert seen is not None
    assert (seen["status"], seen["reply"], seen["late"], seen["open"]) == ("replied", "moved", True, False)
    followups.replied("h:1", "c1", "dev", "again", time.time())  # Final: no longer followed.
    assert (await followups.get("c1")).reply == "moved"  # type: ignore[union-attr]


async def test_a_caller_that_leaves_is_recorded_and_later_events_still_land():
    broker = MemoryBroker()
    followups = Followups(broker)
    followups.opened("h:2", 7, "dev", "Scan", 5000)
    followups.caller_left(7, "disconnected")
    followups.delivered("h:2", 7)
    followups.failed("h:2", 7, "target_offline", "dev disconnected")
    await followups.written()
    seen = await other_instance(broker, "7")  # Integer ids are followed up by their digits.
    assert seen is not None
    assert (seen["caller"], seen["delivered"], seen["status"], seen["error"]) == (
        "disconnected",
        True,
        "failed",
        "target_offline",
    )


async def test_records_of_a_burst_are_written_once_each_in_their_latest_version():
    class Counting(MemoryBroker):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[str] = []

        async def record_put(self, owner: str, key: str, record: str) -> None:
            self.writes.append(key)
            await super().record_put(owner, key, record)

    broker = Counting()
    followups = Followups(broker)
    for n in range(50):
        followups.opened(f"h:{n}", f"c{n}", "dev", "m", 1000)
        followups.delivered(f"h:{n}", f"c{n}")
    await followups.written()
    assert sorted(broker.writes) == sorted(f"c{n}" for n in range(50))
    assert (await other_instance(broker, "c49"))["status"] == "delivered"  # type: ignore[index]


async def test_following_stops_once_no_reply_can_come_and_waiting_returns_then():
    followups = Followups(MemoryBroker())
    followups.opened("h:3", "c3", "dev", "m", 0)
    followups.answered("h:3", "c3", TIMEOUT)
    now = time.time()
    followups.sweep(now + LATE_REPLY_SECONDS - 1)
    followups.replied("h:3", "c3", "dev", "in time", now)
    assert (await followups.get("c3")).status == "replied"  # type: ignore[union-attr]
    followups.opened("h:4", "c4", "dev", "m", 0)
    followups.sweep(time.time() + LATE_REPLY_SECONDS + 1)
    followups.replied("h:4", "c4", "dev", "too late", time.time())  # Not followed any more: dropped.
    assert (await followups.get("c4")).status == "sending"  # type: ignore[union-attr]
    started = time.monotonic()
    assert await followups.wait("nothing", 0.1) is None
    assert 0.1 <= time.monotonic() - started < 5


async def test_a_waiting_follow_up_returns_as_soon_as_the_reply_is_in():
    followups = Followups(MemoryBroker())
    followups.opened("h:5", "c5", "dev", "m", 10_000)
    waiting = asyncio.ensure_future(followups.wait("c5", 30))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    followups.replied("h:5", "c5", "dev", "done", time.time())
    record = await asyncio.wait_for(waiting, 5)
    assert record is not None and record.reply == "done"


@pytest.mark.parametrize(("left", "sent"), [(SEND_MARGIN_SECONDS + 0.01, True), (SEND_MARGIN_SECONDS - 0.01, False)])
def test_a_v1_command_is_not_handed_over_when_its_sender_is_about_to_report_it_unsent(left, sent):
    matcher = V1Matcher(max_waiting=2)
    first, second = (Routed("LLM", n, "m", "i", "h:1", ms) for n, ms in ((1, 1000), (2, round((1 + left) * 1000))))
    matcher.submit("dev", first, 0.0)
    matcher.submit("dev", second, 0.0)
    advance = matcher.expire(1.0)["dev"]
    assert (advance.send is second) is sent and (second in advance.expired) is not sent


def test_record_keys_of_two_owners_never_meet():
    from appliance.commands.followup import record_key

    ids = ["job", "~alice/job", "~/job", "alice/job", 7, "~"]
    keys = [record_key(i, owner) for i in ids for owner in (None, "alice", "bob")]
    assert len(set(keys)) == len(keys)
    assert record_key("c1") == "c1" and record_key(5) == "5"  # unnamed tokens' keys as before


# --- bounded: texts cut, records per caller capped, lost instances told ----------------------------


@pytest.mark.parametrize("char", ["a", "\u00e9", "\U0001f600", "\x01", '"'])
def test_a_text_is_cut_to_at_most_4_kib_of_json_and_says_so(char):
    long = char * 65536
    kept, cut = bounded(long)
    assert cut and long.startswith(kept)
    assert TEXT_BYTES - 6 <= len(msgspec.json.encode(kept)) - 2 <= TEXT_BYTES  # within one escape of the bound
    assert bounded("MoveForward 10") == ("MoveForward 10", False)


async def test_a_record_keeps_4_kib_of_a_huge_message_and_reply_with_a_flag_each_in_the_schema():
    followups = Followups(MemoryBroker())
    followups.opened("h:1", "big", "dev", "m" * 65536, 1000)
    followups.opened("h:2", "small", "dev", "Scan", 1000)
    followups.replied("h:1", "big", "dev", "r" * 65536, time.time())
    followups.replied("h:2", "small", "dev", "done", time.time())
    await followups.written()
    big = await other_instance(followups.broker, "big")
    small = await other_instance(followups.broker, "small")
    assert big is not None and small is not None
    assert (len(big["message"]), len(big["reply"])) == (TEXT_BYTES, TEXT_BYTES)
    assert (big["message_truncated"], big["reply_truncated"]) == (True, True)
    assert (small["message"], small["message_truncated"], small["reply_truncated"]) == ("Scan", False, False)
    for body in (big, small):  # Every key a follow-up answers is in the API schema.
        typed = msgspec.to_builtins(msgspec.convert(body, CommandRecordBody))
        assert {k: v for k, v in typed.items() if v is not None} == body


async def test_each_caller_keeps_at_most_its_limit_of_records_and_its_oldest_go_first():
    broker = MemoryBroker(records_per_owner=3)
    for n in range(5):
        await broker.record_put("alice", f"k{n}", f"r{n}")
    await broker.record_put("bob", "k0", "bob's")
    assert [await broker.record_get("alice", f"k{n}") for n in range(5)] == [None, None, "r2", "r3", "r4"]
    await broker.record_put("alice", "k2", "r2 again")  # a write makes it the newest
    await broker.record_put("alice", "k5", "r5")
    assert [await broker.record_get("alice", f"k{n}") for n in (2, 3, 5)] == ["r2 again", None, "r5"]
    assert await broker.record_get("bob", "k0") == "bob's"  # another caller's flood takes nothing of his
    followups = Followups(MemoryBroker(records_per_owner=2))
    for n in range(3):
        followups.opened(f"h:{n}", f"c{n}", "dev", "m", 0, owner="agent")
        followups.answered(f"h:{n}", f"c{n}", Outcome(200, {"status": "replied", "sender": "dev", "message": "ok"}))
    await followups.written()
    assert await Followups(followups.broker).get("c0", "agent") is None
    assert (await Followups(followups.broker).get("c2", "agent")).reply == "ok"  # type: ignore[union-attr]
    assert await followups.broker.record_get(UNNAMED, "c2") is None  # the unnamed tokens' records are apart


async def test_an_open_record_whose_instance_restarted_is_reported_lost_not_open():
    broker, local = MemoryBroker(), LocalConnections("i1")
    await broker.start(local)  # type: ignore[arg-type]  # its presence summary names the live instance (i1, epoch)
    previous_life = Followups(broker, "i1", "old-epoch")
    previous_life.opened("h:1", "c1", "dev", "Scan", 60_000)
    previous_life.answered("h:1", "c1", TIMEOUT)  # timed out: a late reply was still awaited
    previous_life.opened("h:2", "c2", "dev", "Scan", 60_000)  # its caller was still waiting
    await previous_life.written()
    live = Followups(broker, "i1", local.epoch)
    live.opened("h:1", "c3", "dev", "Scan", 60_000)
    await live.written()
    now_here = Followups(broker, "i1", local.epoch)  # the restarted instance, or any other one
    started = time.monotonic()
    timed_out = await now_here.wait("c1", 30)
    assert time.monotonic() - started < 5  # nothing more can come: no waiting for it
    assert timed_out is not None
    body = timed_out.public(time.time())
    assert (body["status"], body["open"], body["lost"], body["caller"]) == ("timeout", False, True, "answered")
    waiting = (await now_here.get("c2")).public(time.time())  # type: ignore[union-attr]
    assert (waiting["status"], waiting["open"], waiting["lost"], waiting["caller"]) == (
        "sending",
        False,
        True,
        "disconnected",
    )
    followed = (await Followups(broker, "i2", "x").get("c3")).public(time.time())  # type: ignore[union-attr]
    assert followed["open"] is True and "lost" not in followed
    msgspec.convert(waiting, CommandRecordBody)
