"""The subscriber: one connection multiplexing every channel this instance listens to."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from ... import metrics
from ..base import BrokerUnavailable
from .keys import CONTROLLERS, FAN_CHANNEL
from .link import Link, unavailable

__all__ = ["Subscriber", "next_message"]

log = logging.getLogger(__name__)

IDLE_CHECK_SECONDS = 5.0
SUBSCRIBE_CHUNK = 1000


class SubscriberConnection(PubSub):
    """redis-py's PubSub reconnects and resubscribes before it reports an error, even with
    no retries; messages published meanwhile would be counted as delivered and then
    dropped when we rebuild the subscription. Here a lost connection is only closed, so
    :meth:`Subscriber.run` sees every loss and marks the instance down first."""

    async def _reconnect(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        await conn.disconnect()


async def next_message(pubsub: PubSub) -> dict[str, Any]:
    """The connection's next message; while idle a PING must come back, or it is dead without a reset."""
    silent_checks = 0
    while True:
        message = await pubsub.get_message(timeout=IDLE_CHECK_SECONDS)
        if message is not None:
            return message
        silent_checks += 1
        if silent_checks > 2:
            raise ConnectionError("no answer to PING on a subscriber connection")
        await pubsub.ping()


class _Subscriptions:
    """Reference-counted channel subscriptions whose confirmations can be awaited.

    Redis answers SUBSCRIBE in order on one connection, so counting sent and
    confirmed SUBSCRIBEs per channel tells exactly when a given one took effect.
    """

    def __init__(self) -> None:
        self.refs: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)
        self.acked: dict[str, int] = defaultdict(int)
        self.waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = defaultdict(list)

    def confirmed(self, channel: str) -> None:
        self.acked[channel] += 1
        done = self.acked[channel]
        pending = self.waiters.get(channel)
        if not pending:
            return
        still = []
        for needed, future in pending:
            if needed <= done:
                if not future.done():
                    future.set_result(None)
            else:
                still.append((needed, future))
        if still:
            self.waiters[channel] = still
        else:
            del self.waiters[channel]

    def wait_for(self, channel: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        needed = self.sent[channel]
        if self.acked[channel] >= needed:
            future.set_result(None)
        else:
            self.waiters[channel].append((needed, future))
        return future

    def fail_all(self, exc: Exception) -> None:
        for pending in self.waiters.values():
            for _, future in pending:
                if not future.done():
                    future.set_exception(exc)
        self.waiters.clear()

    def reset_counts(self) -> None:
        self.sent.clear()
        self.acked.clear()

    def forget(self, channel: str) -> None:
        if self.refs.get(channel, 0) == 0 and channel not in self.waiters:
            self.refs.pop(channel, None)
            self.sent.pop(channel, None)
            self.acked.pop(channel, None)


class Subscriber:
    """Listens on the instance's own channels and every local id's channel; reconnects with backoff.

    ``on_message(channel, data)`` gets every message; ``on_lost(exc)`` every loss of the
    connection (before anything else learns of it); ``came_back()`` runs once the
    subscriptions are confirmed while the link is down, and marks it up when it is done.
    Subclasses (cluster.py) say how to reach a channel's connection: ``_connected``,
    ``_send_subscribe``, ``_send_unsubscribe``.
    """

    #: Its name in the log.
    WHAT = "Redis subscriber"

    def __init__(
        self,
        link: Link,
        reply_channel: str,
        on_message: Callable[[bytes, bytes], None],
        on_lost: Callable[[BaseException], None],
        came_back: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self._link = link
        self._reply_channel = reply_channel
        self._on_message = on_message
        self._on_lost = on_lost
        self._came_back = came_back
        self._subs = _Subscriptions()
        self._pubsub: PubSub | None = None
        self.ready = asyncio.Event()
        self.stopping = False
        self._reconnect_requested = False

    def request_reconnect(self) -> None:
        """Another part saw Redis fail: rebuild the subscription even if this connection has not noticed."""
        self._reconnect_requested = True

    def lost(self) -> None:
        """Redis is down: nothing waiting for a confirmation will get one."""
        self.ready.clear()
        self._subs.fail_all(BrokerUnavailable(self._link.health()[1]))

    async def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()

    def _channels(self) -> list[str]:
        """Every channel to (re)subscribe after a connect: the instance's own and each one in use."""
        in_use = (channel for channel, refs in self._subs.refs.items() if refs > 0)
        return [self._reply_channel, CONTROLLERS, FAN_CHANNEL, *in_use]

    def _chunks(self, channels: list[str]) -> Iterator[list[str]]:
        """``channels`` in SUBSCRIBE-sized chunks, each counted as sent (:class:`_Subscriptions`)."""
        for start in range(0, len(channels), SUBSCRIBE_CHUNK):
            chunk = channels[start : start + SUBSCRIBE_CHUNK]
            for channel in chunk:
                self._subs.sent[channel] += 1
            yield chunk

    def _failed(self, exc: Exception) -> None:
        """The connection failed in :meth:`run`: a loss, and a logged bug when Redis is not the cause."""
        if isinstance(exc, BrokerUnavailable):
            exc = ConnectionError(str(exc))
        elif not isinstance(exc, (RedisError, OSError)):  # A bug here must not kill routing for good.
            log.exception("%s failed; reconnecting", self.WHAT)
            metrics.BROKER_TASK_ERRORS.labels(task="subscriber").inc()
        self._on_lost(exc)

    def _connected(self) -> bool:
        return self._pubsub is not None

    async def _send_subscribe(self, channel: str) -> None:
        assert self._pubsub is not None
        await self._pubsub.subscribe(channel)

    async def _send_unsubscribe(self, channel: str) -> None:
        assert self._pubsub is not None
        await self._pubsub.unsubscribe(channel)

    async def _connect(self) -> None:
        assert self._link.sub_client is not None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        self._pubsub = SubscriberConnection(self._link.sub_client.connection_pool, ignore_subscribe_messages=False)
        self._subs.reset_counts()
        for chunk in self._chunks(self._channels()):
            await self._pubsub.subscribe(*chunk)

    async def run(self) -> None:
        backoff = 0.1
        while not self.stopping:
            reasserting: asyncio.Task[None] | None = None
            try:
                await self._connect()
                assert self._pubsub is not None
                self._reconnect_requested = False
                while not self._reconnect_requested:
                    message = await next_message(self._pubsub)
                    kind = message["type"]
                    if kind == "message":
                        self._on_message(message["channel"], message["data"])
                    elif kind == "subscribe":
                        channel = message["channel"].decode()
                        self._subs.confirmed(channel)
                        if channel == CONTROLLERS and not self._link.up:
                            reasserting = asyncio.get_running_loop().create_task(self._came_back())
                            backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
            if reasserting is not None and not reasserting.done():
                reasserting.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def subscribe(self, channel: str) -> None:
        """Subscribe (or count one more user of) ``channel``; returns once Redis confirmed it."""
        if not self._link.up or not self._connected():
            raise BrokerUnavailable(self._link.health()[1])
        subs = self._subs
        subs.refs[channel] += 1
        if subs.refs[channel] == 1:
            subs.sent[channel] += 1
            try:
                await self._send_subscribe(channel)
            except (RedisError, OSError) as exc:
                subs.refs[channel] -= 1
                subs.forget(channel)
                raise unavailable(exc) from exc
            except BaseException:
                subs.refs[channel] -= 1
                subs.forget(channel)
                raise
        try:
            await asyncio.wait_for(subs.wait_for(channel), 10)
        except TimeoutError as exc:  # Redis is stalled (e.g. CLIENT PAUSE): refuse, do not hang.
            await self.unsubscribe(channel)
            raise BrokerUnavailable("redis did not confirm the subscription within 10 s") from exc
        except BaseException:
            await self.unsubscribe(channel)
            raise

    async def unsubscribe(self, channel: str) -> None:
        subs = self._subs
        subs.refs[channel] -= 1
        if subs.refs[channel] > 0:
            return
        subs.forget(channel)
        if self._link.up and self._connected():
            with contextlib.suppress(RedisError, OSError, BrokerUnavailable):
                await self._send_unsubscribe(channel)
