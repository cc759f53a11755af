"""Where Redis is: one URL (a server, or a managed primary endpoint), Sentinels, or a Cluster.

- ``REDIS_URL`` / ``REDIS_HOST``: one server, or a managed replication group's primary
  endpoint (ElastiCache: ``rediss://:AUTH@primary-endpoint:6379/0``; the endpoint's DNS name
  follows a failover, and every new connection resolves it again).
- ``REDIS_SENTINELS`` + ``REDIS_SENTINEL_MASTER``: every new connection asks the Sentinels
  where the master is now; a connection to a master demoted to replica is dropped at its
  first write (``READONLY``), and Sentinel itself closes client connections when it
  reconfigures a server.
- ``REDIS_CLUSTER=true``: redis-py's cluster client; see :mod:`.cluster`.

With ``rediss://`` the server's certificate is verified against the system's CAs (ElastiCache's
are public), or against ``REDIS_TLS_CA_FILE`` for a private CA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import redis
import redis.cluster
import redis.sentinel
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

if TYPE_CHECKING:
    from ...settings import Settings

__all__ = ["RedisTarget"]


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool, waiting for a free connection as the plain pool does instead of failing."""


@dataclass(frozen=True)
class RedisTarget:
    url: str = ""
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = ""
    sentinel_password: str | None = field(default=None, repr=False)
    #: The data password with Sentinels (a URL carries its own).
    password: str | None = field(default=None, repr=False)
    cluster: bool = False
    #: CA bundle verifying a ``rediss://`` server (REDIS_TLS_CA_FILE); None: the system's CAs.
    tls_ca_file: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisTarget:
        if settings.redis_sentinels:
            return cls(
                sentinels=tuple(settings.redis_sentinel_addresses()),
                sentinel_master=settings.redis_sentinel_master or "",
                sentinel_password=_secret(settings.redis_sentinel_password),
                password=_secret(settings.redis_password),
            )
        return cls(
            url=settings.redis_connection_url(), cluster=settings.redis_cluster, tls_ca_file=settings.redis_tls_ca_file
        )

    def _tls(self, options: dict[str, Any]) -> dict[str, Any]:
        return {**options, "ssl_ca_certs": self.tls_ca_file} if self.tls_ca_file else options

    @property
    def kind(self) -> str:
        return "cluster" if self.cluster else "sentinel" if self.sentinels else "single"

    def client(self, *, max_connections: int, timeout: float = 5, **options: Any) -> Redis:
        """A client on a pool of at most ``max_connections`` that waits up to ``timeout`` s for a free one.

        With Sentinels it always talks to the current master. In cluster mode this is one
        node's client only (the broker keeps its own cluster client, :mod:`.cluster`).
        """
        if self.sentinels:
            sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
            if self.sentinel_password:
                sentinel_options["password"] = self.sentinel_password
            sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_options)
            return sentinel.master_for(
                self.sentinel_master,
                connection_pool_class=_BlockingSentinelPool,
                max_connections=max_connections,
                timeout=timeout,
                password=self.password,
                **options,
            )
        options = self._tls(options)
        if self.cluster:
            # redis-py's cluster client follows the slot map. It is not a Redis subclass, but has every
            # command the appliance uses (single-slot pipelines and scripts, pub/sub); its per-node
            # pools fail instead of waiting when full, hence the larger bound.
            cluster = RedisCluster.from_url(self.url, max_connections=max_connections * 4, **options)
            return cast(Redis, cluster)
        pool = BlockingConnectionPool.from_url(self.url, max_connections=max_connections, timeout=timeout, **options)
        return Redis.from_pool(pool)

    def sync_client(self, **options: Any) -> redis.Redis:
        """A blocking client, for the few reads at start that cannot wait for the event loop."""
        if self.sentinels:
            sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
            if self.sentinel_password:
                sentinel_options["password"] = self.sentinel_password
            sentinel = redis.sentinel.Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_options)
            return sentinel.master_for(self.sentinel_master, password=self.password, **options)
        options = self._tls(options)
        if self.cluster:
            return cast(redis.Redis, redis.cluster.RedisCluster.from_url(self.url, **options))
        return redis.Redis.from_url(self.url, **options)


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None
