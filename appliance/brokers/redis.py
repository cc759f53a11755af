"""The Redis broker: any number of instances share pub/sub, id ownership and presence.

Connections to Redis are constant per instance, whatever the number of clients:
one subscriber connection multiplexing every local id's channel, and a small
bounded pool for publishing (batched into pipelines, in order) and presence.

Keys (prefix ``wsb:``):

- ``wsb:c:{id}``: channel of one id; payload ``m{seq}|{origin}|{sender}\n<text>`` to deliver
  (``sender``: the controller, which a version-2 client is told), ``r{seq}|{origin}\n<json>``
  to deliver a command with an id (:class:`~appliance.core.requests.Routed`), ``k<owner>``
  to close the connection ``owner`` that a newer claim replaced.
  ``PUBLISH`` returns the number of instances subscribed, so 0 means ``target_offline``.
- ``wsb:i:{instance}``: the outcome channel of one instance. Every instance that
  receives a command answers on the origin's channel, batched per event-loop pass:
  ``a`` then comma-separated ``{seq}`` (queued on a live client connection) or
  ``{seq}:{error_code}`` (not delivered: no such connection any more, a controller,
  or closing). The origin resolves each command's ``on_result`` exactly once: at the
  first success, or when every counted receiver failed; a command without answer
  after 10 to 20 s (its receiver died) or when Redis is lost fails with
  ``delivery_failed``. ``e<json>`` carries the command service's events (status,
  reply, fan-out count, disconnect order) to the instance that needs them.
- ``wsb:fan``: broadcast and group commands, subscribed by every instance; ``PUBLISH``
  returns how many instances will report a count.
- ``wsb:q:{id}``: list of commands queued for an absent client (JSON, oldest first), with
  a TTL of its longest-lived entry; ``wsb:qd:{controller}:{id}`` remembers a queued or
  delivered command so that a repeat is never delivered twice.
- ``wsb:controllers``: channel of reply frames for every controller.
- ``wsb:owner:{id}``: who holds the id (``generation|role|instance|conn_key``), with a
  TTL refreshed by the holder, so a crashed instance's ids free themselves; the
  holder re-asserts it on every heartbeat, so a key lost to eviction or ``FLUSHALL``
  comes back (or, if someone else took the id meanwhile, the holder closes with 4010).
- ``wsb:instance:{name}``: hash of that instance's presence records, same TTL; one
  field is written or deleted per connect or disconnect, the whole hash only on the
  periodic refresh and after an outage.
- ``wsb:summary:{name}``: that instance's counters and membership version (JSON of
  :meth:`~appliance.brokers.base.Inbox.presence_summary`), same TTL, written in the same
  transaction as its presence hash; ``wsb:instances`` is the set of names (added with
  every presence write), so an idle dashboard reads two small keys instead of every
  presence record, and a full presence read needs no SCAN of the keyspace.
- ``wsb:hist:{id}``: the id's connect history (JSON entries of
  :func:`~appliance.core.history.close_entry`, newest first), ``LPUSH`` + ``LTRIM`` to
  ``HISTORY_PER_CLIENT`` + ``EXPIRE`` ``HISTORY_TTL_SECONDS``, written in the same pipeline
  as the presence change of the close that produced it (never on the handshake's path).

During an outage the instance keeps its local clients: a command whose target is
local is delivered directly, others fail with ``delivery_failed``; the subscriber
reconnects with backoff and resubscribes and reasserts every local id, and
releases the ids whose connections closed meanwhile (so a reconnect under
``DUPLICATE_POLICY=reject`` is not blocked by a stale owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .. import metrics
from ..core.protocol import ErrorCode, Role
from ..core.requests import Enqueued, Routed
from .base import Broker, BrokerNotStarted, BrokerUnavailable, Claim, Inbox, OnResult, Owner, failure_detail

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

PREFIX = "wsb:"
CONTROLLERS = f"{PREFIX}controllers"
CLIENT_CHANNEL = f"{PREFIX}c:"
INSTANCE_CHANNEL = f"{PREFIX}i:"
FAN_CHANNEL = f"{PREFIX}fan"
QUEUE_KEY = f"{PREFIX}q:"
QUEUE_SEEN_KEY = f"{PREFIX}qd:"
OWNER_KEY = f"{PREFIX}owner:"
INSTANCE_KEY = f"{PREFIX}instance:"
HISTORY_KEY = f"{PREFIX}hist:"
SUMMARY_KEY = f"{PREFIX}summary:"
INSTANCES_KEY = f"{PREFIX}instances"
#: History entries waiting for Redis (an outage): beyond this many, the oldest are dropped.
HISTORY_BACKLOG = 10_000
GENERATION_KEY = f"{PREFIX}generation"

# Atomic claim: a live owner of the other role always wins (2); a reject-policy claim loses
# to a live owner (0); otherwise it wins and the previous owner is told, on the id's
# channel, to close the connection it replaced.
CLAIM = """
local previous = redis.call('GET', KEYS[1])
if previous then
  if string.match(previous, '^%d+|([^|]*)|') ~= ARGV[5] then return {2, previous} end
  if ARGV[3] == '1' then return {0, previous} end
end
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

# Forget instances that stopped without saying so: only those whose summary and presence keys
# (KEYS[2i], KEYS[2i + 1], written with the name in one transaction) are both gone, checked
# atomically so a name re-added meanwhile stays.
FORGET_INSTANCES = """
local gone = 0
for i, name in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[2 * i], KEYS[2 * i + 1]) == 0 then
    gone = gone + redis.call('SREM', KEYS[1], name)
  end
end
return gone
"""

# Heartbeat and after an outage: keep each claim if it is still ours or free again (evicted,
# flushed, expired); report, as (index, current owner) pairs, those someone else holds now.
# One SET ... GET per key in the usual case (the script is atomic, so putting a newer
# owner back is never seen by anyone); Redis >= 6.2.
REASSERT = """
local lost = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1], 'GET')
  if current and current ~= ARGV[i + 1] then
    redis.call('SET', key, current, 'EX', ARGV[1])
    table.insert(lost, i)
    table.insert(lost, current)
  end
end
return lost
"""

# Offline queue: refuse a repeat (answer its state) or a full queue; else append, keep the
# list as long as its longest-lived entry, and remember (controller, id).
ENQUEUE = """
local seen = redis.call('GET', KEYS[2])
if seen and not (ARGV[5] == '1' and seen == 'd') then return seen end
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 'full' end
redis.call('RPUSH', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
redis.call('SET', KEYS[2], 'q', 'PX', ARGV[4])
return 'ok'
"""

PUBLISH_BATCH = 512
#: Outcomes are gathered this long before they are published to their origin.
ANSWER_DELAY_SECONDS = 0.002
REASSERT_CHUNK = 1000
IDLE_CHECK_SECONDS = 5.0
#: A command nobody answered for this long (its receiver died) fails after 1 to 2 periods.
OUTCOME_TIMEOUT_SECONDS = 10.0
_json = msgspec.json.Encoder()
_json_decode = msgspec.json.Decoder()
_CODES = {code.value: code for code in ErrorCode}


class _QueuedEntry(msgspec.Struct, frozen=True):
    routed: Routed
    expires: float  # epoch seconds on the enqueuing instance's clock


_routed_decode = msgspec.json.Decoder(Routed).decode
_queued_decode = msgspec.json.Decoder(_QueuedEntry).decode
_ENQUEUED = {
    "ok": Enqueued.QUEUED,
    "q": Enqueued.ALREADY_QUEUED,
    "d": Enqueued.ALREADY_DELIVERED,
    "full": Enqueued.FULL,
}

#: What waits in the outbox: (channel, payload, seq of a command or 0, target, text).
#: Commands carry target and text, controller frames a text, outcome batches neither:
#: what a fallback to local delivery needs during an outage.
_Item = tuple[str, bytes, int, str | None, str | None]


def _decode_owner(value: bytes) -> Owner | None:
    """Another holder's owner value; None if unreadable (a release with another format, say)."""
    try:
        return Owner.decode(value.decode())
    except ValueError:
        log.warning("Unreadable owner value in Redis: %r", value[:120])
        return None


class _Pending:
    """A published command waiting for its outcome from the instances that received it."""

    __slots__ = ("on_result", "target", "receivers", "failures", "failure", "sender", "routed")

    def __init__(self, on_result: OnResult, target: str, sender: str = "", routed: Routed | None = None) -> None:
        self.on_result = on_result
        self.target = target
        self.sender = sender  # For local delivery when Redis is lost (the payload is not kept).
        self.routed = routed
        self.receivers = -1  # Unknown until PUBLISH answers.
        self.failures = 0
        self.failure: ErrorCode | None = None


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
        outbox_limit: int = 100_000,
        outcome_timeout: float = OUTCOME_TIMEOUT_SECONDS,
        queue_max: int = 1000,
        queue_remember_seconds: float = 300.0,
        history_per_client: int = 50,
        history_ttl: int = 7 * 86400,
    ) -> None:
        self._history_per_client = history_per_client
        self._history_ttl = history_ttl
        #: (id, JSON entry) not written yet, oldest first; written with the next presence write.
        self._history_out: deque[tuple[str, bytes]] = deque(maxlen=HISTORY_BACKLOG)
        self._history_writing: list[tuple[str, bytes]] = []  # In the pipeline now: not readable from Redis yet.
        self._queue_max = queue_max
        self._queue_remember = queue_remember_seconds
        self._url = url
        self._display = display
        self.instance = instance
        self.presence_ttl = presence_ttl
        self._pool_size = pool_size
        self._outbox_limit = outbox_limit
        self._outcome_timeout = outcome_timeout
        self._inbox: Inbox | None = None
        self._redis: Redis | None = None
        self._sub_client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._subs = _Subscriptions()
        self._up = False
        self._ever_up = False  # Reconnects are counted from the second time Redis is reachable.
        self._reason = "not started"
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._outbox: deque[_Item] = deque()
        self._outbox_ready = asyncio.Event()
        self._presence_dirty = asyncio.Event()
        self._presence_changed: set[str] = set()  # ids whose presence record changed since the last write
        self._subscriber_ready = asyncio.Event()
        self._reconnect_requested = False
        self._publishing = False
        self._owners: dict[str, Owner] = {}  # Local ids this instance holds, for refresh and reassert.
        self._unreleased: dict[str, Owner] = {}  # Releases that failed (outage): retried when Redis is back.
        # Outcomes: commands published and not answered yet, in two generations for an O(1) timeout.
        self._seq = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._pending_old: dict[int, _Pending] = {}
        self._reply_channel = INSTANCE_CHANNEL + instance
        self._origin = instance.encode()
        self._origin_tail = b"|" + self._origin + b"\n"
        self._origin_sep = b"|" + self._origin + b"|"
        self._answers: dict[bytes, list[bytes]] = {}  # Outcomes to send to other instances, per origin.
        self._answers_scheduled = False

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
        metrics.BROKER_UP.set(0)  # Until the subscriber is confirmed; then kept by _mark_down/_reassert_all.
        metrics.watch(metrics.REDIS_OUTBOX, lambda: len(self._outbox))
        # One immediate retry replaces a pooled connection that went stale while Redis restarted;
        # anything longer is the subscriber's reconnect loop's job, not a command's.
        common: dict[str, Any] = dict(socket_connect_timeout=3, socket_timeout=10, retry=Retry(NoBackoff(), 1))
        pool = BlockingConnectionPool.from_url(self._url, max_connections=self._pool_size, timeout=5, **common)
        self._redis = Redis(connection_pool=pool)
        # No retries on the subscriber: _subscriber() must see every loss (see _SubscriberConnection).
        common["retry"] = Retry(NoBackoff(), 0)
        sub_pool = BlockingConnectionPool.from_url(self._url, max_connections=1, timeout=5, **common)
        self._sub_client = Redis(connection_pool=sub_pool)
        self._claim = self._redis.register_script(CLAIM)
        self._release = self._redis.register_script(RELEASE)
        self._forget_instances = self._redis.register_script(FORGET_INSTANCES)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._subscriber(), name="redis-subscriber"),
            loop.create_task(self._resilient("publisher", self._publisher), name="redis-publisher"),
            loop.create_task(self._resilient("heartbeat", self._heartbeat), name="redis-presence"),
            loop.create_task(self._resilient("outcomes", self._expire_outcomes), name="redis-outcomes"),
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
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for client_id, owner in [*self._owners.items(), *self._unreleased.items()]:
                        pipe.eval(RELEASE, 1, OWNER_KEY + client_id, owner.encode())
                    pipe.delete(INSTANCE_KEY + self.instance, SUMMARY_KEY + self.instance)
                    pipe.srem(INSTANCES_KEY, self.instance)
                    self._queue_history(pipe, list(self._history_out))
                    await pipe.execute()
        self._fail_pending(self._pending, "the instance is shutting down")
        self._fail_pending(self._pending_old, "the instance is shutting down")
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
            metrics.REDIS_OUTAGES.inc()
        self._up = False
        metrics.BROKER_UP.set(0)
        self._reason = type(exc).__name__
        self._subscriber_ready.clear()
        self._subs.fail_all(BrokerUnavailable(self.health()[1]))
        # Commands published and counted whose answers may now never come: say so at once.
        for pending in (self._pending, self._pending_old):
            counted = {seq: p for seq, p in pending.items() if p.receivers >= 0}
            for seq in counted:
                del pending[seq]
            self._fail_pending(counted, f"outcome unknown: {self.health()[1]}")

    async def _resilient(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Keep a background task alive: an unexpected error is logged and counted, never fatal."""
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Redis broker task %s failed; restarting it", name)
                metrics.BROKER_TASK_ERRORS.labels(task=name).inc()
                await asyncio.sleep(0.1)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- subscriber -------------------------------------------------------------------

    async def _connect_subscriber(self) -> None:
        assert self._sub_client is not None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
        self._pubsub = _SubscriberConnection(self._sub_client.connection_pool, ignore_subscribe_messages=False)
        self._subs.reset_counts()
        channels = [
            self._reply_channel,
            CONTROLLERS,
            FAN_CHANNEL,
            *(ch for ch, refs in self._subs.refs.items() if refs > 0),
        ]
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
                metrics.BROKER_TASK_ERRORS.labels(task="subscriber").inc()
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
        try:
            await self._release_leftovers()
            await self._reassert_owners()
            await self._write_presence(full=True)
        except (RedisError, OSError) as exc:
            self._reason = type(exc).__name__
            log.warning("Redis is back but re-registering local ids failed: %s: %s", type(exc).__name__, exc)
            return False
        if not self._up:
            log.info("Redis at %s is reachable; routing through it", self._display)
            if self._ever_up:
                metrics.REDIS_RECONNECTS.inc()
        self._up = self._ever_up = True
        metrics.BROKER_UP.set(1)
        self._reason = "ok"
        self._subscriber_ready.set()
        return True

    async def _reassert_owners(self) -> None:
        """Keep every local id owned in Redis: rewrite a vanished key, give up an id taken elsewhere."""
        assert self._redis is not None
        items = list(self._owners.items())
        for start in range(0, len(items), REASSERT_CHUNK):
            chunk = items[start : start + REASSERT_CHUNK]
            lost = await self._redis.eval(
                REASSERT,
                len(chunk),
                *(OWNER_KEY + client_id for client_id, _ in chunk),
                self.presence_ttl,
                *(owner.encode() for _, owner in chunk),
            )
            for index, current in zip(lost[::2], lost[1::2], strict=True):
                client_id, owner = chunk[int(index) - 1]
                if self._owners.get(client_id) != owner:
                    continue  # Released meanwhile.
                log.info("%s is now held by %s; closing the local connection", client_id, current.decode())
                self.inbox.replaced(client_id, owner)

    async def _release_leftovers(self) -> None:
        """Releases that failed during an outage: do them now, so a stale owner blocks nobody."""
        assert self._redis is not None
        if not self._unreleased:
            return
        items = list(self._unreleased.items())
        async with self._redis.pipeline(transaction=False) as pipe:
            for client_id, owner in items:
                pipe.eval(RELEASE, 1, OWNER_KEY + client_id, owner.encode())
            await pipe.execute()
        for client_id, owner in items:
            if self._unreleased.get(client_id) == owner:
                del self._unreleased[client_id]

    def _on_message(self, channel: bytes, data: bytes) -> None:
        inbox = self.inbox
        if channel == b"wsb:controllers":
            inbox.deliver_to_controllers(data.decode())
            return
        if channel == b"wsb:fan":
            inbox.fan_in(data)
            return
        kind = data[:1]
        if kind == b"m":
            head, _, text = data.partition(b"\n")
            seq, _, rest = head[1:].partition(b"|")
            origin, _, sender = rest.partition(b"|")
            failure = inbox.deliver(channel[len(CLIENT_CHANNEL) :].decode(), text.decode(), sender.decode())
            self._answer(origin, seq, failure)
        elif kind == b"a":
            self._on_answers(data[1:])
        elif kind == b"e":
            inbox.instance_event(data[1:])
        elif kind == b"r":
            head, _, body = data.partition(b"\n")
            seq, _, origin = head[1:].partition(b"|")
            failure = inbox.deliver_routed(channel[len(CLIENT_CHANNEL) :].decode(), _routed_decode(body))
            self._answer(origin, seq, failure)
        elif kind == b"k":
            replaced = _decode_owner(data[1:])
            if replaced is not None:
                inbox.replaced(channel[len(CLIENT_CHANNEL) :].decode(), replaced)

    # --- outcomes ---------------------------------------------------------------------

    def _answer(self, origin: bytes, seq: bytes, failure: ErrorCode | None) -> None:
        """Tell the instance that published command ``seq`` what became of it here."""
        if origin == self._origin:
            self._received(int(seq), failure)
            return
        answer = seq if failure is None else seq + b":" + failure.value.encode()
        answers = self._answers.get(origin)
        if answers is None:
            self._answers[origin] = [answer]
        else:
            answers.append(answer)
        if not self._answers_scheduled:
            # One batch per origin every ANSWER_DELAY: under load that is one published answer
            # for many commands, not one per command (the bench saw +20 % CPU per round trip).
            self._answers_scheduled = True
            asyncio.get_running_loop().call_later(ANSWER_DELAY_SECONDS, self._send_answers)

    def _send_answers(self) -> None:
        self._answers_scheduled = False
        answers, self._answers = self._answers, {}
        for origin, batch in answers.items():
            # Outcomes bypass the outbox limit: they are bounded by the commands received.
            self._outbox.append((INSTANCE_CHANNEL + origin.decode(), b"a" + b",".join(batch), 0, None, None))
        self._outbox_ready.set()

    def _on_answers(self, payload: bytes) -> None:
        for answer in payload.split(b","):
            seq, _, code = answer.partition(b":")
            self._received(int(seq), _CODES.get(code.decode(), ErrorCode.DELIVERY_FAILED) if code else None)

    def _received(self, seq: int, failure: ErrorCode | None) -> None:
        """One receiver's outcome: the first success resolves; failures resolve once all counted failed."""
        pending = self._pending.get(seq) or self._pending_old.get(seq)
        if pending is None:
            return  # Resolved already (another receiver delivered it, or it timed out).
        if failure is None:
            self._resolve(seq, None)
            return
        pending.failures += 1
        if pending.failure is None:
            pending.failure = failure
        if 0 <= pending.receivers <= pending.failures:
            self._resolve(seq, pending.failure)

    def _resolve(self, seq: int, failure: ErrorCode | None, detail: str = "") -> None:
        pending = self._pending.pop(seq, None) or self._pending_old.pop(seq, None)
        if pending is None:
            return
        if failure is None:
            pending.on_result(None, "")
        else:
            pending.on_result(failure, detail or failure_detail(failure, pending.target))

    @staticmethod
    def _fail_pending(pending: dict[int, _Pending], why: str) -> None:
        for entry in pending.values():
            entry.on_result(ErrorCode.DELIVERY_FAILED, f"{entry.target}: {why}")
        pending.clear()

    async def _expire_outcomes(self) -> None:
        """Commands left without an answer (the receiving instance died) fail after 1 to 2 periods."""
        while True:
            await asyncio.sleep(self._outcome_timeout)
            expired, self._pending_old, self._pending = self._pending_old, self._pending, {}
            # Not yet counted (still in the outbox or being published): keep waiting for PUBLISH.
            for seq in [seq for seq, p in expired.items() if p.receivers < 0]:
                self._pending_old[seq] = expired.pop(seq)
            self._fail_pending(expired, f"no answer from the instance holding it within {self._outcome_timeout:g} s")

    # --- subscriptions ----------------------------------------------------------------

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
            except BaseException:
                self._subs.refs[channel] -= 1
                self._subs.forget(channel)
                raise
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

    async def claim(self, client_id: str, instance: str, conn_key: str, role: Role, reject_if_taken: bool) -> Claim:
        channel = CLIENT_CHANNEL + client_id
        # Subscribe first, so a newer claim's kick can never be missed. A command published
        # meanwhile is answered (target_offline until the connection is registered), not lost.
        await self._subscribe(channel)
        call = asyncio.ensure_future(
            self._claim(
                keys=[OWNER_KEY + client_id, GENERATION_KEY],
                args=[
                    f"{role.value}|{instance}|{conn_key}",
                    self.presence_ttl,
                    "1" if reject_if_taken else "0",
                    channel,
                    role.value,
                ],
            )
        )
        try:
            code, owner_value, *rest = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The script may have run: undo the claim once it answers, and the subscription.
            self._spawn(self._undo_claim(client_id, channel, call))
            raise
        except (RedisError, OSError) as exc:
            await self._unsubscribe(channel)
            raise BrokerUnavailable(f"redis unreachable ({type(exc).__name__})") from exc
        except BaseException:
            await self._unsubscribe(channel)
            raise
        if code != 1:
            await self._unsubscribe(channel)
            return Claim(False, None, _decode_owner(owner_value), role_conflict=code == 2)
        try:
            owner = Owner.decode(owner_value.decode())
            previous = _decode_owner(rest[0]) if rest and rest[0] else None
        except BaseException:  # Never keep an id nobody will release.
            self._spawn(self._undo_claim(client_id, channel, call))
            raise
        self._owners[client_id] = owner
        self._unreleased.pop(client_id, None)
        self._presence_changed.add(client_id)
        self._presence_dirty.set()
        return Claim(True, owner, previous)

    async def _undo_claim(self, client_id: str, channel: str, call: asyncio.Future[Any]) -> None:
        try:
            code, owner_value, *_ = await call
            if code == 1 and self._redis is not None:
                await self._release(keys=[OWNER_KEY + client_id], args=[owner_value])
        except (RedisError, OSError):
            pass  # Not claimed, or the owner key expires within PRESENCE_TTL.
        finally:
            await self._unsubscribe(channel)

    async def release(self, client_id: str, owner: Owner) -> None:
        if self._owners.get(client_id) == owner:
            del self._owners[client_id]
        self._presence_changed.add(client_id)
        self._presence_dirty.set()
        try:
            if not self._up or self._redis is None:
                raise ConnectionError("redis is down")
            await self._release(keys=[OWNER_KEY + client_id], args=[owner.encode()])
        except (RedisError, OSError):
            # Retried when Redis is back; a newer local claim of the id supersedes it.
            if client_id not in self._owners:
                self._unreleased[client_id] = owner
        finally:
            await self._unsubscribe(CLIENT_CHANNEL + client_id)

    # --- routing ----------------------------------------------------------------------

    def send(self, target: str, text: str, on_result: OnResult, sender: str = "") -> None:
        if self._bypass_outbox():
            self._deliver_locally(target, text, on_result, sender)
            return
        if len(self._outbox) >= self._outbox_limit:
            metrics.BROKER_OUTBOX_FULL.inc()
            on_result(ErrorCode.DELIVERY_FAILED, f"{target}: too many messages waiting for Redis; retry later")
            return
        seq = next(self._seq)
        self._pending[seq] = _Pending(on_result, target, sender)
        head = b"m" + str(seq).encode() + self._origin_sep + sender.encode() + b"\n"
        self._outbox.append((CLIENT_CHANNEL + target, head + text.encode(), seq, target, text))
        self._outbox_ready.set()

    def send_routed(self, target: str, routed: Routed, on_result: OnResult) -> None:
        if self._bypass_outbox():
            self._deliver_locally(target, routed, on_result)
            return
        if len(self._outbox) >= self._outbox_limit:
            metrics.BROKER_OUTBOX_FULL.inc()
            on_result(ErrorCode.DELIVERY_FAILED, f"{target}: too many messages waiting for Redis; retry later")
            return
        seq = next(self._seq)
        self._pending[seq] = _Pending(on_result, target, routed=routed)
        payload = b"r" + str(seq).encode() + self._origin_tail + _json.encode(routed)
        # On the target's channel, so it keeps its order with the commands without id.
        self._outbox.append((CLIENT_CHANNEL + target, payload, seq, target, None))
        self._outbox_ready.set()

    def send_to_instance(self, instance: str, payload: bytes) -> None:
        if instance == self.instance:
            self.inbox.instance_event(payload)
            return
        if not self._up:
            return  # Best effort: the sender's own deadline reports the timeout.
        self._outbox.append((INSTANCE_CHANNEL + instance, b"e" + payload, 0, None, None))
        self._outbox_ready.set()

    async def fan_out(self, payload: bytes) -> int:
        if not self._up or self._redis is None:
            raise BrokerUnavailable(self.health()[1])
        try:
            return int(await self._redis.publish(FAN_CHANNEL, payload))
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis unreachable: {type(exc).__name__}") from exc

    @staticmethod
    def _seen_key(routed: Routed) -> str:
        kind = "i" if isinstance(routed.id, int) else "s"
        return f"{QUEUE_SEEN_KEY}{routed.controller}:{kind}{routed.id}"

    async def enqueue(self, target: str, routed: Routed, now: float, *, requeue: bool = False) -> Enqueued:
        if self._redis is None or not self._up:
            raise BrokerUnavailable(self.health()[1])
        ttl_ms = max(1, routed.timeout_ms)
        entry = _json.encode(_QueuedEntry(routed, now + routed.timeout_ms / 1000))
        try:
            answer = await self._redis.eval(
                ENQUEUE,
                2,
                QUEUE_KEY + target,
                self._seen_key(routed),
                entry,
                self._queue_max,
                ttl_ms,
                max(ttl_ms, round(self._queue_remember * 1000)),
                "1" if requeue else "0",
            )
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis unreachable: {type(exc).__name__}") from exc
        return _ENQUEUED[answer.decode() if isinstance(answer, bytes) else str(answer)]

    async def take_queued(self, target: str, now: float) -> list[Routed]:
        if self._redis is None or not self._up:
            raise BrokerUnavailable(self.health()[1])
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.lrange(QUEUE_KEY + target, 0, -1)
                pipe.delete(QUEUE_KEY + target)
                raw, _ = await pipe.execute()
            taken = [e.routed for e in map(_queued_decode, raw) if e.expires > now]
            if taken:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for routed in taken:
                        pipe.set(self._seen_key(routed), "d", px=round(self._queue_remember * 1000))
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis unreachable: {type(exc).__name__}") from exc
        return taken

    async def owner_of(self, client_id: str) -> Owner | None:
        if self._redis is None:
            raise BrokerUnavailable(self.health()[1])
        try:
            value = await self._redis.get(OWNER_KEY + client_id)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis unreachable: {type(exc).__name__}") from exc
        if not value:
            return None
        return Owner.decode(value.decode() if isinstance(value, bytes) else str(value))

    def send_to_controllers(self, frame: str) -> None:
        if self._bypass_outbox():
            self.inbox.deliver_to_controllers(frame)
            return
        if len(self._outbox) >= self._outbox_limit:
            metrics.BROKER_OUTBOX_FULL.inc()
            return
        self._outbox.append((CONTROLLERS, frame.encode(), 0, None, frame))
        self._outbox_ready.set()

    def _bypass_outbox(self) -> bool:
        """During an outage deliver locally at once, but never ahead of older queued messages."""
        return not self._up and not self._outbox and not self._publishing

    def _deliver_locally(self, target: str, text: str | Routed, on_result: OnResult, sender: str = "") -> None:
        if isinstance(text, Routed):
            failure = self.inbox.deliver_routed(target, text)
        else:
            failure = self.inbox.deliver(target, text, sender)
        if failure is None:
            on_result(None, "")
        elif failure is ErrorCode.TARGET_OFFLINE:
            on_result(ErrorCode.DELIVERY_FAILED, f"cross-instance delivery failed: {self.health()[1]}")
        else:
            on_result(failure, failure_detail(failure, target))

    async def _publisher(self) -> None:
        """Send queued messages as pipelines on one connection: in order, one round trip per batch."""
        assert self._redis is not None
        outbox = self._outbox
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while outbox:
                batch = [outbox.popleft() for _ in range(min(PUBLISH_BATCH, len(outbox)))]
                if not self._up:  # Down while these waited: local delivery, in order.
                    self._fall_back(batch)
                    continue
                self._publishing = True
                started = time.perf_counter()
                try:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for channel, payload, *_ in batch:
                            pipe.publish(channel, payload)
                        receivers = await pipe.execute()
                    metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)
                except (RedisError, OSError) as exc:
                    self._mark_down(exc)
                    self._reconnect_requested = True  # The subscriber may not have noticed yet.
                    self._fall_back(batch)
                    continue
                except BaseException:
                    self._fall_back(batch)  # Never lose a batch silently, whatever went wrong.
                    raise
                finally:
                    self._publishing = False
                self._counted(batch, receivers)

    def _counted(self, batch: list[_Item], receivers: list[int]) -> None:
        for (_, _, seq, _, _), count in zip(batch, receivers, strict=True):
            if not seq:
                continue
            pending = self._pending.get(seq) or self._pending_old.get(seq)
            if pending is None:
                continue  # Already delivered: its answer came before PUBLISH's.
            if count == 0:
                self._resolve(seq, ErrorCode.TARGET_OFFLINE)
            else:
                pending.receivers = count
                if pending.failures >= count:
                    self._resolve(seq, pending.failure)

    def _fall_back(self, batch: list[_Item]) -> None:
        for _, _, seq, target, text in batch:
            if target is None:
                if text is not None:
                    self.inbox.deliver_to_controllers(text)
                continue  # Else an outcome batch for another instance: it times out there.
            pending = self._pending.pop(seq, None) or self._pending_old.pop(seq, None)
            if pending is not None:  # None: resolved already; never deliver what was reported failed.
                body = pending.routed if pending.routed is not None else text
                assert body is not None
                self._deliver_locally(target, body, pending.on_result, pending.sender)

    # --- presence ---------------------------------------------------------------------

    async def _write_presence(self, *, full: bool) -> None:
        """Write presence: the changed records only (O(1) per connect), or all of them."""
        assert self._redis is not None
        key = INSTANCE_KEY + self.instance
        inbox = self.inbox
        changed, self._presence_changed = self._presence_changed, set()
        history = self._history_writing = list(self._history_out)
        self._history_out.clear()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                if full:
                    records = inbox.presence_records()
                    pipe.delete(key)
                    if records:
                        pipe.hset(key, mapping={r["id"]: _json.encode(r) for r in records})
                else:
                    gone = []
                    for client_id in changed:
                        record = inbox.presence_record(client_id)
                        if record is None:
                            gone.append(client_id)
                        else:
                            pipe.hset(key, client_id, _json.encode(record))
                    if gone:
                        pipe.hdel(key, *gone)
                pipe.expire(key, self.presence_ttl)
                # Taken with the records above (no await between): the version matches what is written.
                pipe.set(SUMMARY_KEY + self.instance, _json.encode(inbox.presence_summary()), ex=self.presence_ttl)
                pipe.sadd(INSTANCES_KEY, self.instance)
                self._queue_history(pipe, history)
                await pipe.execute()
        except BaseException:
            self._presence_changed |= changed  # Written by the next attempt.
            self._history_out.extendleft(reversed(history))  # Oldest first again, ahead of newer ones.
            raise
        finally:
            self._history_writing = []

    def _queue_history(self, pipe: Any, history: list[tuple[str, bytes]]) -> None:
        for client_id, entry in history:
            key = HISTORY_KEY + client_id
            pipe.lpush(key, entry)
            pipe.ltrim(key, 0, self._history_per_client - 1)
            pipe.expire(key, self._history_ttl)

    # --- connect history --------------------------------------------------------------

    def record_history(self, client_id: str, entry: dict[str, Any]) -> None:
        self._history_out.append((client_id, _json.encode(entry)))
        self._presence_dirty.set()  # The heartbeat writes it with the presence change, within ~0.2 s.

    async def history(self, client_id: str, limit: int) -> list[dict[str, Any]]:
        limit = min(limit, self._history_per_client)
        if limit < 1:
            return []
        # Entries of this instance not written yet come first: they are the newest.
        unwritten = [
            _json_decode.decode(e) for i, e in reversed([*self._history_writing, *self._history_out]) if i == client_id
        ]
        if not self._up or self._redis is None:
            raise BrokerUnavailable(self.health()[1])
        try:
            stored = await self._redis.lrange(HISTORY_KEY + client_id, 0, limit - 1)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis unreachable ({type(exc).__name__})") from exc
        return [*unwritten, *(_json_decode.decode(e) for e in stored)][:limit]

    async def _heartbeat(self) -> None:
        """Write changed records soon after a connect or disconnect; every third of the TTL
        refresh everything and re-assert every local id's owner key."""
        period = self.presence_ttl / 3
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + period
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_refresh):
                    await self._presence_dirty.wait()
                await asyncio.sleep(0.2)  # Let a burst of connects settle into one write.
            self._presence_dirty.clear()
            refresh = loop.time() >= next_refresh
            if refresh:
                next_refresh = loop.time() + period
            if not self._up:
                continue
            try:
                if refresh:
                    await self._release_leftovers()
                    await self._reassert_owners()
                    await self._write_presence(full=True)
                else:
                    await self._write_presence(full=False)
            except (RedisError, OSError) as exc:
                log.warning("Could not refresh presence in Redis: %s", exc)

    async def presence(self) -> list[dict[str, Any]]:
        if not self._up or self._redis is None:
            raise BrokerUnavailable(self.health()[1])
        records = self.inbox.presence_records()
        try:
            others = await self._other_instances()
            async with self._redis.pipeline(transaction=False) as pipe:  # One round trip for every instance.
                for name in others:
                    pipe.hgetall(INSTANCE_KEY + name)
                hashes = await pipe.execute() if others else []
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis unreachable ({type(exc).__name__})") from exc
        decode = _json_decode.decode
        for values in hashes:
            records.extend(decode(value) for value in values.values())
        return records

    async def _other_instances(self) -> list[str]:
        """The names in ``wsb:instances`` but this one (every instance adds itself with each presence write)."""
        assert self._redis is not None
        members = await self._redis.smembers(INSTANCES_KEY)
        names = sorted(n.decode() if isinstance(n, bytes) else n for n in members)
        return [name for name in names if name != self.instance]

    async def presence_summary(self) -> list[dict[str, Any]]:
        if not self._up or self._redis is None:
            raise BrokerUnavailable(self.health()[1])
        summaries = [self.inbox.presence_summary()]
        try:
            others = await self._other_instances()
            values = await self._redis.mget([SUMMARY_KEY + name for name in others]) if others else []
            gone = [name for name, value in zip(others, values, strict=True) if value is None]
            if gone:  # Stopped without saying so (its keys expired): forget the name.
                keys = [INSTANCES_KEY, *(key for n in gone for key in (SUMMARY_KEY + n, INSTANCE_KEY + n))]
                await self._forget_instances(keys=keys, args=gone)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"redis unreachable ({type(exc).__name__})") from exc
        summaries.extend(_json_decode.decode(value) for value in values if value is not None)
        return summaries
