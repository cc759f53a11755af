"""Tokens: the store contract and its backends (env, SSM), rotation and eviction (:mod:`.service`).

Only the contract is imported here: the SSM backend imports boto3, which the env
store never needs, and the service imports the relay.
"""

from __future__ import annotations

import logging
import secrets

from ..settings import Settings
from .base import Grant, RotationUnavailable, TokenStore, TokenStoreError, TokenStoreNotStarted, TokenStoreUnavailable

__all__ = [
    "Grant",
    "RotationUnavailable",
    "TokenStore",
    "TokenStoreError",
    "TokenStoreNotStarted",
    "TokenStoreUnavailable",
    "fingerprint_key",
    "make_token_store",
    "token_labels",
]


log = logging.getLogger(__name__)

#: Where instances sharing Redis keep the fingerprint key when TOKEN_FINGERPRINT_KEY is not set.
FINGERPRINT_KEY_REDIS = "wsb:tokens:fingerprint-key"


def make_token_store(settings: Settings) -> TokenStore:
    """The configured store, not loaded yet (call ``load()``; it raises :class:`TokenStoreUnavailable`)."""
    store: TokenStore
    if settings.token_store == "ssm":
        from .ssm import SsmTokenStore

        store = SsmTokenStore(
            settings.ssm_prefix,
            region=settings.aws_region,
            endpoint_url=settings.ssm_endpoint_url,
            grace_seconds=settings.token_grace_seconds,
        )
    else:
        from .env import EnvTokenStore

        store = EnvTokenStore(settings)
    store.fingerprint_key = fingerprint_key(settings)
    store.labels = token_labels(settings)
    return store


def token_labels(settings: Settings) -> dict[str, str]:
    """Who acts with each fixed token that has a name in the settings (named tokens carry their own)."""
    named = {"LLM_SECRET_TOKEN": settings.controller_token_name, "ADMIN_TOKEN": settings.admin_token_name}
    return {token: name for token, name in named.items() if name}


def fingerprint_key(settings: Settings) -> bytes:
    """The deployment's key for token fingerprints, so every instance and ``wsbridge tokens`` show the same ones.

    ``TOKEN_FINGERPRINT_KEY`` if set; else a random key created once in Redis by whichever
    instance asks first (never expires); else, without Redis, this process's own random key
    (one instance: the dashboard's fingerprints agree with themselves, not with the CLI's).
    """
    if settings.token_fingerprint_key is not None:
        return settings.token_fingerprint_key.get_secret_value().encode()
    if settings.redis_enabled:
        from redis.exceptions import RedisError

        from ..brokers.redis.target import RedisTarget  # One URL, Sentinels or a Cluster.

        try:
            with RedisTarget.from_settings(settings).sync_client(socket_connect_timeout=3, socket_timeout=3) as redis:
                redis.set(FINGERPRINT_KEY_REDIS, secrets.token_hex(32), nx=True)
                shared = redis.get(FINGERPRINT_KEY_REDIS)
            if isinstance(shared, bytes) and shared:
                return shared
        except (RedisError, OSError) as exc:
            log.warning(
                "Token fingerprint key not shared (%s): fingerprints differ between instances", type(exc).__name__
            )
    return secrets.token_bytes(32)
