"""What controllers hear, for callers without a WebSocket: ``GET /api/v1/events`` and MCP listeners.

Every message that reaches the controllers (a client's unsolicited text, a late reply, a reply
to a broadcast) reaches **every** instance: the broker hands it to each instance's
``Relay.deliver_to_controllers``. So each instance can serve the whole cluster's events to its
own HTTP and MCP callers without any new traffic between instances. While somebody follows the
feed on this instance, it *taps* that call (it swaps the relay's bound method for one that also
records the frame); when nobody has followed it for :data:`RETAIN_SECONDS`, it puts the method
back. Nothing is added to the message path of an instance nobody follows.

The buffer is this instance's: the last :data:`BUFFER_EVENTS` events, numbered in the order
this instance heard them. An event id is ``<stream>.<seq>.<ms>``: resuming with
``Last-Event-ID`` on the instance (and recording stretch, ``stream``) that issued it is exact;
elsewhere (another replica behind the load balancer, a restart, a pause in recording) the
follower is told there may be a gap and resumes from the time in the id, since every instance
heard the same messages at about the same time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

__all__ = [
    "BUFFER_EVENTS",
    "KEEPALIVE_SECONDS",
    "MAX_FOLLOWERS_PER_ADDRESS",
    "RETAIN_SECONDS",
    "EventFeed",
    "FeedEvent",
    "Follower",
    "Gap",
    "TooManyFollowers",
]

log = logging.getLogger(__name__)

#: Events kept per instance for Last-Event-ID and the MCP messages resource, and their characters at most
#: (1,000 messages of the 64 KiB MAX_MESSAGE_BYTES would be 64 MB).
BUFFER_EVENTS = 1000
BUFFER_CHARS = 4_000_000
#: How long the feed keeps recording after its last follower left (a reconnecting follower resumes).
RETAIN_SECONDS = 300.0
#: A follower that heard nothing for this long gets a keep-alive (an SSE comment), so proxies keep it open.
KEEPALIVE_SECONDS = 15.0
#: Followers one address may hold on this instance at once (each costs ~24 KB and a wake-up a second);
#: an EventSource reconnects by itself, so an agent that never closes one piles them up.
MAX_FOLLOWERS_PER_ADDRESS = 100
#: How often a waiting follower looks whether the instance is shutting down.
_POLL_SECONDS = 1.0


class _Tappable(Protocol):
    """The relay's side the feed needs (appliance/relay.py): the broker calls ``deliver_to_controllers``."""

    deliver_to_controllers: Any  # A bound method the feed swaps while recording.
    draining: bool


class _Frame(msgspec.Struct):
    sender: str = ""


_decode_frame = msgspec.json.Decoder(_Frame).decode


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One message controllers received: ``frame`` is exactly their ``{"sender", "message"}`` frame."""

    id: str
    seq: int
    at: float
    sender: str
    frame: str


class TooManyFollowers(Exception):
    """The address already holds MAX_FOLLOWERS_PER_ADDRESS followers of this instance's feed."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Events may be missing between the follower's Last-Event-ID and what follows."""

    detail: str


class EventFeed:
    """This instance's record of what controllers hear, while somebody follows it."""

    def __init__(
        self, relay: _Tappable, capacity: int = BUFFER_EVENTS, retain: float = RETAIN_SECONDS, chars: int = BUFFER_CHARS
    ) -> None:
        self.relay = relay
        self.events: deque[FeedEvent] = deque(maxlen=capacity)
        self.max_chars = chars
        self._chars = 0
        self.retain = retain
        self.stream = ""  # A new one for each stretch of recording: ids of an earlier stretch resume by time.
        self._seq = 0
        self._original: Callable[[str], None] | None = None
        self._followers = 0
        self.max_per_address = MAX_FOLLOWERS_PER_ADDRESS
        self._by_address: dict[str, int] = {}
        self._listeners: dict[object, Callable[[FeedEvent], None]] = {}
        self._idle_since: float | None = None
        self._changed = asyncio.Event()

    @property
    def recording(self) -> bool:
        return self._original is not None

    # --- the tap ---------------------------------------------------------------------------

    def _tap(self) -> None:
        self._idle_since = None
        if self._original is None:
            self.stream = secrets.token_hex(4)
            self._original = self.relay.deliver_to_controllers
            self.relay.deliver_to_controllers = self._deliver

    def _left(self) -> None:
        if not self._followers and not self._listeners:
            self._idle_since = time.monotonic()

    def _deliver(self, frame: str) -> None:
        original = self._original
        assert original is not None
        original(frame)  # The controllers first, as without the feed.
        try:
            sender = _decode_frame(frame).sender
        except msgspec.DecodeError:
            return
        self._seq += 1
        at = time.time()
        event = FeedEvent(f"{self.stream}.{self._seq}.{int(at * 1000)}", self._seq, at, sender, frame)
        events = self.events
        if len(events) == events.maxlen:
            self._chars -= len(events[0].frame)
        events.append(event)
        self._chars += len(frame)
        while self._chars > self.max_chars and len(events) > 1:
            self._chars -= len(events.popleft().frame)
        for listener in list(self._listeners.values()):
            try:
                listener(event)
            except Exception:  # One broken listener must not cost the others (or the controllers) anything.
                log.exception("An event listener failed")
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        if self._idle_since is not None and time.monotonic() - self._idle_since >= self.retain:
            self.stop()

    def stop(self) -> None:
        """Put the relay's method back; the buffer is dropped with it (its ids will resume by time)."""
        if self._original is not None:
            self.relay.deliver_to_controllers = self._original
            self._original = None
        self.events.clear()
        self._chars = 0
        self._idle_since = None
        self._changed.set()

    # --- followers ---------------------------------------------------------------------------

    def listen(self, listener: Callable[[FeedEvent], None]) -> Callable[[], None]:
        """Call ``listener`` (synchronously, must be quick) for each event from now on; returns the stop."""
        token = object()
        self._listeners[token] = listener
        self._tap()

        def unlisten() -> None:
            if self._listeners.pop(token, None) is not None:
                self._left()

        return unlisten

    def recent(self, sender: str | None = None, limit: int = 100) -> list[FeedEvent]:
        """The buffered events (of ``sender``), oldest first, at most ``limit``."""
        found = [e for e in self.events if sender is None or e.sender == sender]
        return found[-limit:]

    def _since(self, last_id: str | None) -> tuple[list[FeedEvent], Gap | None]:
        """The buffered events after ``last_id``, and whether some may be missing before them."""
        if last_id is None:
            return [], None
        stream, _, rest = last_id.partition(".")
        seq_text, _, ms_text = rest.partition(".")
        try:
            seq, ms = int(seq_text), int(ms_text)
        except ValueError:
            return [], Gap(f"Last-Event-ID {last_id[:80]!r} is not an id of this feed: following from now")
        if stream == self.stream and seq <= self._seq:
            missed = [e for e in self.events if e.seq > seq]
            oldest = missed[0].seq if missed else self._seq + 1
            if oldest > seq + 1:
                return missed, Gap(f"{oldest - seq - 1} events after {last_id} are no longer kept")
            return missed, None
        after = ms / 1000
        detail = "resumed by time on another instance (or after a restart): events at the cut may repeat or be missing"
        return [e for e in self.events if e.at > after], Gap(detail)

    def admits(self, address: str | None) -> bool:
        """Whether ``address`` (None: not limited) may follow once more: it holds fewer than the cap."""
        return address is None or self._by_address.get(address, 0) < self.max_per_address

    def _after(self, seq: int) -> list[FeedEvent]:
        """The buffered events after ``seq``, read from the end: their seqs are consecutive (1, 2, ... of this
        recording; stop() clears the buffer), so a follower's wake-up costs its new events, not the whole
        buffer (scanning 1,000 events per follower cost 2.5 ms of CPU per message with 100 followers)."""
        events = self.events
        start = max(0, len(events) - (self._seq - seq))
        return [events[i] for i in range(start, len(events))]

    def follower(self, last_id: str | None = None, address: str | None = None, *, limited: bool = True) -> Follower:
        """A follower from now (recording starts here, if it was not), resuming after ``last_id``.

        ``address`` (None: not limited) may hold :data:`MAX_FOLLOWERS_PER_ADDRESS`; beyond, TooManyFollowers
        (``limited=False``: counted, not refused, for a caller that asked :meth:`admits` already).
        """
        if limited and not self.admits(address):
            raise TooManyFollowers(address)
        return Follower(self, last_id, address)


class Follower:
    """One follower of the feed: registered (and recording) from its creation until :meth:`close`."""

    def __init__(self, feed: EventFeed, last_id: str | None, address: str | None = None) -> None:
        self.feed = feed
        self.address = address
        feed._followers += 1
        if address is not None:
            feed._by_address[address] = feed._by_address.get(address, 0) + 1
        feed._tap()
        self._missed, self._gap = feed._since(last_id)
        self._cursor = self._missed[-1].seq if self._missed else feed._seq
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.feed._followers -= 1
            if self.address is not None:
                left = self.feed._by_address.pop(self.address) - 1
                if left:
                    self.feed._by_address[self.address] = left
            self.feed._left()

    async def events(self) -> AsyncIterator[FeedEvent | Gap | None]:
        """The events after the follower's ``last_id`` (from the buffer), then each new one as it comes.

        Yields a :class:`Gap` when some may be missing, and ``None`` after :data:`KEEPALIVE_SECONDS`
        of silence (the caller's keep-alive). Ends when the instance shuts down.
        """
        feed = self.feed
        try:
            if self._gap is not None:
                yield self._gap
            for event in self._missed:
                yield event
            self._missed = []
            cursor, stream, quiet = self._cursor, feed.stream, 0.0
            while not feed.relay.draining:
                changed = feed._changed
                if feed._seq == cursor:
                    try:
                        async with asyncio.timeout(_POLL_SECONDS):
                            await changed.wait()
                    except TimeoutError:
                        quiet += _POLL_SECONDS
                        if quiet >= KEEPALIVE_SECONDS:
                            quiet = 0.0
                            yield None
                        continue
                if stream != feed.stream or not feed.recording:  # Stopped and restarted meanwhile.
                    yield Gap("the feed restarted on this instance: events may be missing")
                    feed._tap()
                    stream, cursor = feed.stream, feed._seq
                    continue
                fresh = feed._after(cursor)
                if fresh and fresh[0].seq > cursor + 1:
                    yield Gap(f"{fresh[0].seq - cursor - 1} events passed while this follower was behind")
                cursor = feed._seq
                quiet = 0.0
                for event in fresh:
                    yield event
        finally:
            self.close()
