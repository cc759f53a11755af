"""The Redis broker: any number of instances share pub/sub, id ownership and presence.

Connections to Redis are constant per instance, whatever the number of clients:
one subscriber connection multiplexing every local id's channel, and a small
bounded pool for publishing (batched into pipelines, in order) and presence.

Keys (prefix ``wsb:``):

- ``wsb:c:{id}``: channel of one id; payload ``m<text>`` to deliver, ``k<owner>`` to
  close the connection ``owner`` that a newer claim replaced. ``PUBLISH`` returns the
  number of instances holding the id, so 0 means ``target_offline``.
- ``wsb:controllers``: channel of reply frames for every controller.
- ``wsb:owner:{id}``: who holds the id (``generation|instance|conn_key``), with a TTL
  refreshed by the holder, so a crashed instance's ids free themselves.
- ``wsb:instance:{name}``: hash of that instance's presence records, same TTL.

During an outage the instance keeps its local clients: a command whose target is
local is delivered directly, others fail with ``delivery_failed``; the subscriber
reconnects with backoff and resubscribes and reasserts every local id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

import msgspec
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..core.protocol import ErrorCode
from .base import Broker, BrokerNotStarted, BrokerUnavailable, Claim, Inbox, OnFailure, Owner

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

PREFIX = "wsb:"
CONTROLLERS = f"{PREFIX}controllers"
CLIENT_CHANNEL = f"{PREFIX}c:"
OWNER_KEY = f"{PREFIX}owner:"
INSTANCE_KEY = f"{PREFIX}instance:"
GENERATION_KEY = f"{PREFIX}generation"

# Atomic claim: a reject-policy claim loses to a live owner; otherwise it wins and the
# previous owner is told, on the id's channel, to close the connection it replaced.
CLAIM = """
local previous = redis.call('GET', KEYS[1])
if previous and ARGV[3] == '1' then return {0, previous} end
local owner = redis.call('INCR', KEYS[2]) .. '|' .. ARGV[1]
redis.call('SET', KEYS[1], owner, 'EX', ARGV[2])
if previous then redis.call('PUBLISH', ARGV[4], 'k' .. previous) end
return {1, owner, previous or ''}
"""

# Compare-and-delete: an old connection's cleanup never removes a newer owner.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# After an outage: keep our claim if it is still ours or free; report a newer owner.
REASSERT = """
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
return current
"""

PUBLISH_BATCH = 512
IDLE_CHECK_SECONDS = 5.0
_json = msgspec.json.Encoder()
_json_decode = msgspec.json.Decoder()


class _SubscriberConnection(PubSub):
    """redis-py's PubSub reconnects and resubscribes before it reports an error, even with
    no retries; messages published meanwhile would be counted as delivered and then
    dropped when we rebuild the subscription. Here a lost connection is only closed, so
    :meth:`RedisBroker._subscriber` sees every loss and marks the instance down first."""

    async def _reconnect(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        await conn.disconnect()


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


class RedisBroker(Broker):
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        instance: str,
        presence_ttl: int = 30,
        pool_size: int = 8,
        display: str = "redis",
    ) -> None:
        self._url = url
        self._display = display
        self.instance = instance
        self.presence_ttl = presence_ttl
        self._pool_size = pool_size
        self._inbox: Inbox | None = None
        self._redis: Redis | None = None
        self._sub_client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._subs = _Subscriptions()
        self._up = False
        self._reason = "not started"
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._outbox: list[tuple[str, bytes, str | None, str | None, OnFailure | None]] = []
        self._outbox_ready = asyncio.Event()
        self._presence_dirty = asyncio.Event()
        self._subscriber_ready = asyncio.Event()
        self._reconnect_requested = False
        self._publishing = False
        self._owners: dict[str, Owner] = {}  # Local ids this instance holds, for refresh and reassert.

    # --- lifecycle --------------------------------------------------------------------

    @property
    def inbox(self) -> Inbox:
        if self._inbox is None:
            raise BrokerNotStarted("RedisBroker used before `await broker.start(inbox)`")
        return self._inbox

    def describe(self) -> str:
        return f"redis ({self._display})"

    async def start(self, inbox: Inbox) -> None:
        self._inbox = inbox
        # One immediate retry replaces a pooled connection that went stale while Redis restarted;
        # anything longer is the subscriber's reconnect loop's job, not a command's.
        common = dict(socket_connect_timeout=3, socket_timeout=10, retry=Retry(NoBackoff(), 1))
        pool = BlockingConnectionPool.from_url(self._url, max_connections=self._pool_size, timeout=5, **common)
        self._redis = Redis(connection_pool=pool)
        # No retries on the subscriber: _subscriber() must see every loss (see _SubscriberConnection).
        common["retry"] = Retry(NoBackoff(), 0)
        sub_pool = BlockingConnectionPool.from_url(self._url, max_connections=1, timeout=5, **common)
        self._sub_client = Redis(connection_pool=sub_pool)
        self._claim = self._redis.register_script(CLAIM)
        self._release = self._redis.register_script(RELEASE)
        self._reassert = self._redis.register_script(REASSERT)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._subscriber(), name="redis-subscriber"),
            loop.create_task(self._publisher(), name="redis-publisher"),
            loop.create_task(self._heartbeat(), name="redis-presence"),
        ]
        # Give Redis a moment so a healthy start is ready at once; an outage is not fatal.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscriber_ready.wait(), 5)
        if not self._up:
            log.warning(
                "Redis at %s is not reachable yet (%s); retrying in the background", self._display, self._reason
            )

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for client_id, owner in self._owners.items():
                        pipe.eval(RELEASE, 1, OWNER_KEY + client_id, owner.encode())
                    pipe.delete(INSTANCE_KEY + self.instance)
                    await pipe.execute()
        for closable in (self._pubsub, self._sub_client, self._redis):
            if closable is not None:
                with contextlib.suppress(Exception):
                    await closable.aclose()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.connection_pool.disconnect()
        if self._sub_client is not None:
            with contextlib.suppress(Exception):
                await self._sub_client.connection_pool.disconnect()

    def health(self) -> tuple[bool, str]:
        # The reason is public (/readyz needs no token): the error class only, no host or port.
        return self._up, "ok" if self._up else f"redis unreachable ({self._reason})"

    def _mark_down(self, exc: BaseException) -> None:
        detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        if self._up:
            log.error("Lost Redis at %s (%s); cross-instance delivery is failing", self._display, detail)
        self._up = False
        self._reason = type(exc).__name__
        self._subscriber_ready.clear()
        self._subs.fail_all(BrokerUnavailable(self.health()[1]))

    # --- subscriber -------------------------------------------------------------------

    async def _connect_subscriber(self) -> None:
        assert self._sub_client is not None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        self._pubsub = _SubscriberConnection(self._sub_client.connection_pool, ignore_subscribe_messages=False)
        self._subs.reset_counts()
        channels = [CONTROLLERS, *(ch for ch, refs in self._subs.refs.items() if refs > 0)]
        for start in range(0, len(channels), 1000):
            chunk = channels[start : start + 1000]
            for channel in chunk:
                self._subs.sent[channel] += 1
            await self._pubsub.subscribe(*chunk)

    async def _subscriber(self) -> None:
        backoff = 0.1
        while not self._stopping:
            reasserting: asyncio.Task[None] | None = None
            try:
                await self._connect_subscriber()
                assert self._pubsub is not None
                self._reconnect_requested = False
                silent_checks = 0
                while not self._reconnect_requested:
                    message = await self._pubsub.get_message(timeout=IDLE_CHECK_SECONDS)
                    if message is None:
                        # Idle: a PING must come back, or the connection is dead without a reset.
                        silent_checks += 1
                        if silent_checks > 2:
                            raise ConnectionError("no answer to PING on the subscriber connection")
                        await self._pubsub.ping()
                        continue
                    silent_checks = 0
                    kind = message["type"]
                    if kind == "message":
                        self._on_message(message["channel"], message["data"])
                    elif kind == "subscribe":
                        channel = message["channel"].decode()
                        self._subs.confirmed(channel)
                        if channel == CONTROLLERS and not self._up:
                            reasserting = asyncio.get_running_loop().create_task(self._came_back())
                            backoff = 0.1
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._mark_down(exc)
            except Exception as exc:  # A bug here must not kill routing for good.
                log.exception("Redis subscriber failed; reconnecting")
                self._mark_down(exc)
            if reasserting is not None and not reasserting.done():
                reasserting.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _came_back(self) -> None:
        """Redis is reachable (again): reassert local ids, then report ready; retried until it works."""
        backoff = 0.1
        while not await self._reassert_all():
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _reassert_all(self) -> bool:
        assert self._redis is not None
        try:
            if self._owners:
                items = list(self._owners.items())
                async with self._redis.pipeline(transaction=False) as pipe:
                    for client_id, owner in items:
                        pipe.eval(REASSERT, 1, OWNER_KEY + client_id, owner.encode(), self.presence_ttl)
                    results = await pipe.execute()
                for (client_id, owner), current in zip(items, results, strict=True):
                    if current.decode() != owner.encode():
                        log.info("%s was claimed elsewhere during the outage; closing the local connection", client_id)
                        self.inbox.replaced(client_id, owner)
            await self._write_presence()
        except (RedisError, OSError) as exc:
            self._reason = type(exc).__name__
            log.warning("Redis is back but re-registering local ids failed: %s: %s", type(exc).__name__, exc)
            return False
        if not self._up:
            log.info("Redis at %s is reachable; routing through it", self._display)
        self._up = True
        self._reason = "ok"
        self._subscriber_ready.set()
        return True

    def _on_message(self, channel: bytes, data: bytes) -> None:
        inbox = self.inbox
        if channel == b"wsb:controllers":
            inbox.deliver_to_controllers(data.decode())
            return
        client_id = channel[len(CLIENT_CHANNEL) :].decode()
        kind, payload = data[:1], data[1:].decode()
        if kind == b"m":
            inbox.deliver(client_id, payload)
        elif kind == b"k":
            inbox.replaced(client_id, Owner.decode(payload))

    async def _subscribe(self, channel: str) -> None:
        if not self._up or self._pubsub is None:
            raise BrokerUnavailable(self.health()[1])
        self._subs.refs[channel] += 1
        if self._subs.refs[channel] == 1:
            self._subs.sent[channel] += 1
            try:
                await self._pubsub.subscribe(channel)
            except (RedisError, OSError) as exc:
                self._subs.refs[channel] -= 1
                self._subs.forget(channel)
                raise BrokerUnavailable(f"redis unreachable ({type(exc).__name__})") from exc
        try:
            await asyncio.wait_for(self._subs.wait_for(channel), 10)
        except TimeoutError as exc:  # Redis is stalled (e.g. CLIENT PAUSE): refuse, do not hang.
            await self._unsubscribe(channel)
            raise BrokerUnavailable("redis did not confirm the subscription within 10 s") from exc
        except BaseException:
            await self._unsubscribe(channel)
            raise

    async def _unsubscribe(self, channel: str) -> None:
        self._subs.refs[channel] -= 1
        if self._subs.refs[channel] > 0:
            return
        self._subs.forget(channel)
        if self._up and self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(channel)

    # --- ownership --------------------------------------------------------------------

    async def claim(self, client_id: str, instance: str, conn_key: str, reject_if_taken: bool) -> Claim:
        channel = CLIENT_CHANNEL + client_id
        # Subscribe first, so a newer claim's kick can never be missed.
        await self._subscribe(channel)
        try:
            accepted, owner_value, *rest = await self._claim(
                keys=[OWNER_KEY + client_id, GENERATION_KEY],
                args=[f"{instance}|{conn_key}", self.presence_ttl, "1" if reject_if_taken else "0", channel],
            )
        except (RedisError, OSError) as exc:
            await self._unsubscribe(channel)
            raise BrokerUnavailable(f"redis unreachable ({type(exc).__name__})") from exc
        if not accepted:
            await self._unsubscribe(channel)
            return Claim(False, None, Owner.decode(owner_value.decode()))
        owner = Owner.decode(owner_value.decode())
        previous = Owner.decode(rest[0].decode()) if rest and rest[0] else None
        self._owners[client_id] = owner
        self._presence_dirty.set()
        return Claim(True, owner, previous)

    async def release(self, client_id: str, owner: Owner) -> None:
        if self._owners.get(client_id) == owner:
            del self._owners[client_id]
        self._presence_dirty.set()
        try:
            if self._up and self._redis is not None:
                await self._release(keys=[OWNER_KEY + client_id], args=[owner.encode()])
        except (RedisError, OSError):
            pass  # The owner key expires on its own within PRESENCE_TTL.
        finally:
            await self._unsubscribe(CLIENT_CHANNEL + client_id)

    # --- routing ----------------------------------------------------------------------

    def send(self, target: str, text: str, on_failure: OnFailure) -> None:
        if self._bypass_outbox():
            self._deliver_locally(target, text, on_failure)
            return
        self._outbox.append((CLIENT_CHANNEL + target, b"m" + text.encode(), target, text, on_failure))
        self._outbox_ready.set()

    def send_to_controllers(self, frame: str) -> None:
        if self._bypass_outbox():
            self.inbox.deliver_to_controllers(frame)
            return
        self._outbox.append((CONTROLLERS, frame.encode(), None, frame, None))
        self._outbox_ready.set()

    def _bypass_outbox(self) -> bool:
        """During an outage deliver locally at once, but never ahead of older queued messages."""
        return not self._up and not self._outbox and not self._publishing

    def _deliver_locally(self, target: str, text: str, on_failure: OnFailure) -> None:
        if not self.inbox.deliver(target, text):
            on_failure(ErrorCode.DELIVERY_FAILED, f"cross-instance delivery failed: {self.health()[1]}")

    async def _publisher(self) -> None:
        """Send queued messages as pipelines on one connection: in order, one round trip per batch."""
        assert self._redis is not None
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                batch, self._outbox = self._outbox[:PUBLISH_BATCH], self._outbox[PUBLISH_BATCH:]
                if not self._up:  # Down while these waited: local delivery, in order.
                    self._fall_back(batch)
                    continue
                self._publishing = True
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for channel, payload, *_ in batch:
                            pipe.publish(channel, payload)
                        receivers = await pipe.execute()
                except (RedisError, OSError) as exc:
                    self._mark_down(exc)
                    self._reconnect_requested = True  # The subscriber may not have noticed yet.
                    self._fall_back(batch)
                    continue
                finally:
                    self._publishing = False
                for (_, _, target, _, on_failure), count in zip(batch, receivers, strict=True):
                    if count == 0 and on_failure is not None:
                        on_failure(ErrorCode.TARGET_OFFLINE, f"{target} is not connected")

    def _fall_back(self, batch: list[tuple[str, bytes, str | None, str | None, OnFailure | None]]) -> None:
        for _, _, target, text, on_failure in batch:
            if target is None:
                self.inbox.deliver_to_controllers(text)
            else:
                self._deliver_locally(target, text, on_failure)

    # --- presence ---------------------------------------------------------------------

    async def _write_presence(self) -> None:
        assert self._redis is not None
        records = self.inbox.presence_records()
        key = INSTANCE_KEY + self.instance
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if records:
                pipe.hset(key, mapping={r["id"]: _json.encode(r) for r in records})
            pipe.expire(key, self.presence_ttl)
            for client_id in self._owners:
                pipe.expire(OWNER_KEY + client_id, self.presence_ttl)
            await pipe.execute()

    async def _heartbeat(self) -> None:
        """Refresh presence every third of its TTL, and soon after any connect or disconnect."""
        period = self.presence_ttl / 3
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._presence_dirty.wait(), period)
                await asyncio.sleep(0.2)  # Let a burst of connects settle into one write.
            self._presence_dirty.clear()
            if not self._up:
                continue
            try:
                await self._write_presence()
            except (RedisError, OSError) as exc:
                log.warning("Could not refresh presence in Redis: %s", exc)

    async def presence(self) -> list[dict[str, Any]]:
        if not self._up or self._redis is None:
            raise BrokerUnavailable(self.health()[1])
        local = self.inbox.presence_records()
        records = list(local)
        try:
            keys = [key async for key in self._redis.scan_iter(match=INSTANCE_KEY + "*", count=500)]
            own = (INSTANCE_KEY + self.instance).encode()
            for key in keys:
                if key == own:
                    continue
                for value in (await self._redis.hgetall(key)).values():
                    records.append(_json_decode.decode(value))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis unreachable ({type(exc).__name__})") from exc
        return records
