"""The event feed in-process, on the real relay and memory broker: recording only while followed, resuming."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from appliance.app import Relaying, wire_relay
from appliance.brokers.memory import MemoryBroker
from appliance.event_feed import EventFeed, FeedEvent, Gap, TooManyFollowers
from appliance.settings import Settings


@pytest.fixture
async def parts() -> AsyncIterator[Relaying]:
    settings = Settings(_env_file=None, llm_secret_token="c" * 32, unity_client_token="u" * 32, instance_id="feed")
    wired = wire_relay(settings, MemoryBroker())
    await wired.relay.start()
    yield wired
    await wired.relay.stop()


def say(parts: Relaying, sender: str, message: str) -> None:
    """A client's message on its way to the controllers, as the relay publishes it."""
    parts.relay.broker.send_to_controllers(json.dumps({"sender": sender, "message": message}))


async def take(events: AsyncIterator[FeedEvent | Gap | None], n: int) -> list[FeedEvent | Gap]:
    taken: list[FeedEvent | Gap] = []
    async with asyncio.timeout(5):
        async for item in events:
            if item is not None:
                taken.append(item)
            if len(taken) == n:
                return taken
    raise AssertionError("the feed ended")


def messages(items: list[FeedEvent | Gap]) -> list[str]:
    return [json.loads(i.frame)["message"] if isinstance(i, FeedEvent) else "<gap>" for i in items]


async def test_nobody_following_leaves_the_message_path_as_it_was(parts):
    relay = parts.relay
    untouched = relay.deliver_to_controllers
    feed = EventFeed(relay, retain=0.0)
    say(parts, "c1", "before anybody follows")
    assert relay.deliver_to_controllers == untouched and not feed.events
    follower = feed.follower()
    assert relay.deliver_to_controllers != untouched  # Tapped while followed.
    say(parts, "c1", "heard")
    assert messages(await take(follower.events(), 1)) == ["heard"]
    follower.close()
    say(parts, "c1", "after the last one left")  # Retention 0: this message stops the recording.
    assert relay.deliver_to_controllers == untouched and not feed.recording


async def test_a_follower_resumes_exactly_on_this_instance_and_by_time_elsewhere(parts):
    feed = EventFeed(parts.relay, capacity=3)
    first = feed.follower()
    say(parts, "c1", "one")
    (one,) = await take(first.events(), 1)
    assert isinstance(one, FeedEvent)
    first.close()
    say(parts, "c2", "two")
    say(parts, "c1", "three")
    resumed = feed.follower(one.id)
    assert messages(await take(resumed.events(), 2)) == ["two", "three"]
    resumed.close()
    for n in range(4):  # Beyond the buffer's 3: the follower is told what it lost.
        say(parts, "c1", f"more {n}")
    lagging = feed.follower(one.id)
    items = await take(lagging.events(), 4)
    assert isinstance(items[0], Gap) and "no longer kept" in items[0].detail
    assert messages(items[1:]) == ["more 1", "more 2", "more 3"]
    lagging.close()
    # An id from another instance (or an earlier recording): a gap, then the events after its time.
    foreign = f"elsewhere.1.{int(one.at * 1000)}"
    items = await take(feed.follower(foreign).events(), 4)
    assert isinstance(items[0], Gap) and messages(items[1:]) == ["more 1", "more 2", "more 3"]
    assert isinstance((await take(feed.follower("garbage").events(), 1))[0], Gap)
    assert [e.sender for e in feed.recent("c1", limit=2)] == ["c1", "c1"]


async def test_the_buffer_is_bounded_by_characters_too(parts):
    feed = EventFeed(parts.relay, chars=300)
    follower = feed.follower()
    for n in range(10):
        say(parts, "c1", f"{n}" * 50)
    assert 1 < len(feed.events) < 10 and sum(len(e.frame) for e in feed.events) <= 300
    assert json.loads(feed.events[-1].frame)["message"] == "9" * 50
    follower.close()


async def test_one_address_holds_a_bounded_number_of_followers(parts):
    # 1,000 streams from one address were all accepted (~24 KB and a wake-up a second each); an agent that opens
    # an EventSource per task and never closes one would pile them up.
    feed = EventFeed(parts.relay)
    feed.max_per_address = 2
    held = [feed.follower(address="203.0.113.9") for _ in range(2)]
    with pytest.raises(TooManyFollowers):
        feed.follower(address="203.0.113.9")
    assert feed.admits("203.0.113.10") and feed.admits(None), "other addresses and exempt callers are not limited"
    unlimited = [feed.follower() for _ in range(3)]
    held.pop().close()
    assert feed.admits("203.0.113.9")
    held.append(feed.follower(address="203.0.113.9"))
    for follower in held + unlimited:
        follower.close()
        follower.close()  # Closing twice counts once.
    assert not feed._by_address and feed._followers == 0
