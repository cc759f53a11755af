"""The broker's connections to Redis and whether they work: the one place that says up or down."""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ... import metrics
from ..base import BrokerUnavailable
from .keys import Keys
from .target import RedisTarget

__all__ = ["Link"]

log = logging.getLogger(__name__)


class Link:
    """A small bounded pool for commands and one connection for the subscriber.

    ``up`` is true from the moment the subscriber is confirmed and every local id is
    re-asserted (:meth:`came_up`) until any part sees Redis fail (:meth:`went_down`).
    """

    def __init__(self, target: RedisTarget, *, display: str, pool_size: int) -> None:
        self.target = target
        self.keys = Keys(tagged=target.cluster)
        self.sharded = target.cluster  # SPUBLISH/SSUBSCRIBE instead of PUBLISH/SUBSCRIBE.
        self.display = display
        self._pool_size = pool_size
        self.redis: Redis | None = None
        self.sub_client: Redis | None = None
        self.up = False
        self._ever_up = False  # Reconnects are counted from the second time Redis is reachable.
        self.reason = "not started"

    def open(self) -> None:
        # One immediate retry replaces a pooled connection that went stale while Redis restarted;
        # anything longer is the subscriber's reconnect loop's job, not a command's.
        common: dict[str, Any] = dict(socket_connect_timeout=3, socket_timeout=10, retry=Retry(NoBackoff(), 1))
        self.redis = self.target.client(max_connections=self._pool_size, **common)
        # No retries on the subscriber: it must see every loss (see subscriber.SubscriberConnection).
        if not self.sharded:  # On a Cluster the subscriber opens one connection per primary itself.
            common["retry"] = Retry(NoBackoff(), 0)
            self.sub_client = self.target.client(max_connections=1, **common)

    async def close(self) -> None:
        for client in (self.sub_client, self.redis):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        for client in (self.redis, self.sub_client):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.connection_pool.disconnect()
                sentinels = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
                if sentinels is not None:  # The connections that ask the Sentinels where the master is.
                    with contextlib.suppress(Exception):
                        await sentinels.aclose()

    def health(self) -> tuple[bool, str]:
        # The reason is public (/readyz needs no token): the error class only, no host or port.
        return self.up, "ok" if self.up else f"redis unreachable ({self.reason})"

    def client(self) -> Redis:
        """The command client while Redis is up, else :class:`BrokerUnavailable`."""
        if not self.up or self.redis is None:
            raise BrokerUnavailable(self.health()[1])
        return self.redis

    def went_down(self, exc: BaseException) -> None:
        detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        if self.up:
            log.error("Lost Redis at %s (%s); cross-instance delivery is failing", self.display, detail)
            metrics.REDIS_OUTAGES.inc()
        self.up = False
        metrics.BROKER_UP.set(0)
        self.reason = reason(exc)

    def came_up(self) -> None:
        if not self.up:
            log.info("Redis at %s is reachable; routing through it", self.display)
            if self._ever_up:
                metrics.REDIS_RECONNECTS.inc()
        self.up = self._ever_up = True
        metrics.BROKER_UP.set(1)
        self.reason = "ok"


def reason(exc: BaseException) -> str:
    """Why Redis is down, for /readyz and the log: the error class, and a certificate failure said plainly.

    Never the error's text: it may name the host. A TLS verification failure is the one cause an
    operator must see at once (a CA that does not match the server: REDIS_TLS_CA_FILE).
    """
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return f"{type(exc).__name__}: TLS certificate verify failed, check REDIS_TLS_CA_FILE"
    return type(exc).__name__


def unavailable(exc: RedisError | OSError, template: str = "redis unreachable ({})") -> BrokerUnavailable:
    """The error a caller gets for a failed Redis call: the error class only, never an address."""
    return BrokerUnavailable(template.format(type(exc).__name__))
